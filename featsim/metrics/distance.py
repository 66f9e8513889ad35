"""Average pairwise feature distance D(F_C, F_M), within-domain baselines and energy distance.

Gu & Lee (2024, Bioengineering 11(4):406, section 3) define the average feature distance
between a natural-image feature set F_C and a medical-image feature set F_M as

    D(F_C, F_M) = 1 / (|F_C| |F_M|) * sum_{x in F_C} sum_{y in F_M} d(phi(x), phi(y)).

D alone is **not** a distance between distributions: D(F, F) > 0 for any non-degenerate F, and
D grows with the scale of the features, so "fine-tuning lowers D" can simply mean "fine-tuning
shrank the features". Read D next to the within-domain baselines (``within_distance``) and the
scale-free forms in ``DistanceSummary`` (ratio to the within-domain distances, the energy
coefficient), and use the energy distance (Szekely & Rizzo 2013, "Energy statistics: A class of
statistics based on distances", J. Stat. Plan. Inference 143:1249)

    E(X, Y) = 2 D(X, Y) - D(X, X) - D(Y, Y),

which, for the euclidean metric, is zero if and only if the two distributions are equal.

Numerics policy:
  * ``sqeuclidean`` and ``cosine`` have exact closed forms in O((n + m) d) (means of the rows
    and of their norms); ``cityblock`` is exact in O((n + m) d log(n + m)) by sorting each
    coordinate (mean |a_i - b_j| from prefix sums). None of them forms an n x m matrix.
  * ``euclidean`` needs every pair: it runs over tiles of ``block_size`` x ``16 * block_size``
    pairs, a jit-compiled GEMM and a jit-compiled epilogue (sqrt, mask, row sums) per tile, so
    memory is O(block_size^2 + (n + m) d) and no n x m matrix exists. Within-set sums visit
    only tiles on or above the diagonal. Inside a caller's jit the same tiles run as one
    ``lax.map``/``lax.scan``. Inputs are first centred on a common float64 mean (the
    metric is translation invariant), which removes the cancellation of
    ||x||^2 + ||y||^2 - 2 x.y; squared distances are clamped at 0 before ``sqrt``; within-set
    sums drop the diagonal exactly instead of summing sqrt(rounding noise).
  * Host path (concrete inputs): float32 inputs keep float32 for the O(n m d) tile products
    (full-precision matmul, ``Precision.HIGHEST``), every sum is accumulated in float64.
    float64 inputs run in float64 throughout. Inside a user's ``jax.jit`` the same kernels run
    in the widest float JAX allows (float32 unless x64 is enabled).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from featsim.metrics._validation import (
    as_features,
    check_same_dim,
    host_x64,
    is_traced,
    widest_float,
)
from featsim.metrics.options import METRICS
from featsim.parallel import LOCAL

__all__ = [
    "METRICS",
    "DistanceSummary",
    "average_distance",
    "distance_summary",
    "energy_distance",
    "within_distance",
]

_DEFAULT_BLOCK = 1024
_CITYBLOCK_COLUMNS = 64


_acc_dtype = widest_float  # accumulation dtype of every sum


def _compute_dtype(dtype) -> np.dtype:
    """Low-precision floats (bf16/fp16) compute in float32; float32/64 keep their dtype."""
    dtype = np.dtype(dtype)
    if dtype.itemsize < 4:
        return np.dtype(np.float32)
    return dtype


# --------------------------------------------------------------------------------------------
# Kernels. Each returns the SUM of d(x_i, y_j) over all pairs (``same=False``) or over ordered
# pairs i != j of one set (``same=True``), in the accumulation dtype.
# --------------------------------------------------------------------------------------------


def _sqeuclidean_sum(x, y, same: bool):
    acc = _acc_dtype()
    x = x.astype(acc)
    n = x.shape[0]
    if same:
        # sum_{i != j} ||x_i - x_j||^2 = 2 n sum_i ||x_i - mean||^2.
        xc = x - x.mean(axis=0)
        return 2.0 * n * jnp.sum(xc * xc)
    y = y.astype(acc)
    m = y.shape[0]
    mx, my = x.mean(axis=0), y.mean(axis=0)
    xc, yc = x - mx, y - my
    # Each term is non-negative: no cancellation.
    diff = mx - my
    return m * jnp.sum(xc * xc) + n * jnp.sum(yc * yc) + n * m * jnp.sum(diff * diff)


def _unit_rows(x):
    norms = jnp.sqrt(jnp.sum(x * x, axis=1, keepdims=True))
    return x / norms


def _cosine_sum(x, y, same: bool):
    acc = _acc_dtype()
    ux = _unit_rows(x.astype(acc))
    n = x.shape[0]
    sx = ux.sum(axis=0)
    if same:
        # sum_{i != j} (1 - u_i.u_j) = n(n - 1) - (||sum u||^2 - n).
        return n * (n - 1.0) - (jnp.sum(sx * sx) - n)
    uy = _unit_rows(y.astype(acc))
    m = y.shape[0]
    return n * m - jnp.sum(sx * uy.sum(axis=0))


def _pad_columns(a, width: int):
    d = a.shape[1]
    pad = (-d) % width
    if pad:
        a = jnp.pad(a, ((0, 0), (0, pad)))  # zero columns add |0 - 0| = 0
    return a.reshape(a.shape[0], -1, width).transpose(1, 0, 2)  # [chunks, rows, width]


def _cityblock_sum(x, y, same: bool, columns: int = _CITYBLOCK_COLUMNS):
    acc = _acc_dtype()
    n = x.shape[0]
    xs = _pad_columns(jnp.sort(x, axis=0).astype(acc), columns)

    if same:
        # For sorted a: sum_{i<j} |a_i - a_j| = sum_k a_(k) (2k - n + 1), k = 0..n-1.
        coef = (2.0 * jnp.arange(n, dtype=acc) - n + 1.0)[:, None]

        def chunk(a):
            return jnp.sum(a * coef)

        return 2.0 * jnp.sum(lax.map(chunk, xs))

    ys = _pad_columns(y.astype(acc), columns)
    search = jax.vmap(jnp.searchsorted, in_axes=(1, 1), out_axes=1)

    def chunk(args):
        a, b = args  # a sorted [n, w], b [m, w]
        prefix = jnp.concatenate([jnp.zeros((1, a.shape[1]), acc), jnp.cumsum(a, axis=0)])
        k = search(a, b)  # number of a-values below each b
        below = jnp.take_along_axis(prefix, k, axis=0)
        total = prefix[-1][None, :]
        kf = k.astype(acc)
        # sum_i |a_i - b| = b k - sum(a below) + sum(a above) - b (n - k)
        return jnp.sum(b * kf - below + (total - below) - b * (n - kf))

    return jnp.sum(lax.map(chunk, (xs, ys)))


def _tiles(a, rows: int, centre=None):
    """Centres and pads ``a [n, d]`` into tiles [k, rows, d]; squared norms [k, rows]; validity.

    Any common shift leaves euclidean distances unchanged, so ``centre`` only needs to be
    close to the data mean (it removes the cancellation in ||x||^2 + ||y||^2 - 2 x.y); the
    subtraction runs in the compute dtype.
    """
    n, d = a.shape
    k = -(-n // rows)
    if centre is not None:
        a = a - centre
    a = jnp.pad(a, ((0, k * rows - n), (0, 0)))
    sq = jnp.sum(a * a, axis=1)
    valid = jnp.arange(k * rows) < n
    return a.reshape(k, rows, d), sq.reshape(k, rows), valid.reshape(k, rows)


_tiles_jit = jax.jit(_tiles, static_argnums=1)


def _tile_gram(xb, yb):
    return jnp.matmul(xb, yb.T, precision=lax.Precision.HIGHEST)


def _tile_distance_sum(g, xsq, ysq, xv, yv, row0, col0, *, upper: bool):
    """Sum of ||x_i - y_j|| over the valid pairs of one tile, from its Gram block ``g``.

    ``upper`` (within-set sums) keeps only pairs with global column > global row; the caller
    doubles the result, so the diagonal counts as exactly 0 and symmetric pairs once each.
    """
    acc = _acc_dtype()
    dist = jnp.sqrt(jnp.maximum(xsq[:, None] + ysq[None, :] - 2.0 * g, 0.0))
    keep = xv[:, None] & yv[None, :]
    if upper:
        rows = row0 + jnp.arange(g.shape[0])
        cols = col0 + jnp.arange(g.shape[1])
        keep = keep & (cols[None, :] > rows[:, None])
    row_sums = jnp.sum(jnp.where(keep, dist, 0.0), axis=1)
    return jnp.sum(row_sums.astype(acc))


_tile_gram_jit = jax.jit(_tile_gram)
_tile_distance_sum_jit = jax.jit(_tile_distance_sum, static_argnames="upper")


def _balanced(total: int, most: int) -> int:
    """Tile length <= ``most`` that splits ``total`` into equal tiles (little padding)."""
    tiles = -(-total // most)
    size = -(-total // tiles)
    return min(most, -(-size // 8) * 8)  # a multiple of 8 suits the GEMM kernels


def _tile_shape(n: int, m: int, block: int) -> tuple[int, int]:
    # Wide tiles: fewer, larger GEMMs (1024 x 16384 float32 is 64 MiB), balanced so that a
    # set of 20,000 rows is 2 x 10,000 columns, not 2 x 16,384 with 12,768 padding rows.
    return _balanced(n, block), _balanced(m, 16 * block)


def _euclidean_sum_host(x, y, centre, *, block: int, same: bool, share=LOCAL):
    """Host loop over tiles: one jit-compiled GEMM per tile, then a jit-compiled epilogue.

    Keeping the GEMM a call of its own matters on CPU: XLA fuses a matmul with its elementwise
    consumer into a kernel about 2x slower than the plain GEMM (measured while writing
    benchmarks/metrics.py). Calls are dispatched asynchronously, so tiles pipeline; the
    per-tile sums (accumulation dtype) are added in float64 on the host. With a ``share``
    (see ``average_distance``) each process computes the tiles it owns and the per-tile sums
    of all processes are added in tile order: the one-process value, exactly.
    """
    bx, by = _tile_shape(x.shape[0], y.shape[0], block)
    if same:
        bx = by = min(bx, by)
    xt, xsq, xv = _tiles_jit(x, bx, centre)
    yt, ysq, yv = (xt, xsq, xv) if same else _tiles_jit(y, by, centre)
    parts, tile = {}, -1
    for i in range(xt.shape[0]):
        for j in range(yt.shape[0]):
            if same and j < i:
                continue  # symmetric: the tile (j, i) holds the same pairs
            tile += 1
            if not share.owns(tile):
                continue
            g = _tile_gram_jit(xt[i], yt[j])
            parts[tile] = _tile_distance_sum_jit(g, xsq[i], ysq[j], xv[i], yv[j], i * bx,
                                                 j * by, upper=same)
    parts = dict(zip(parts, np.asarray(jax.device_get(list(parts.values())), np.float64)
                     .reshape(-1), strict=True))
    parts = share.gather(parts)
    total = float(np.sum(np.array([parts[t] for t in range(tile + 1)], np.float64)))
    return 2.0 * total if same else total


def _euclidean_sum_traced(x, y, *, block: int, same: bool):
    """The same tiles as one lax.map/lax.scan, for use inside a caller's jit."""
    acc = _acc_dtype()
    bx, by = _tile_shape(x.shape[0], y.shape[0], block)
    if same:
        bx = by = min(bx, by)
    xt, xsq, xv = _tiles(x, bx)
    yt, ysq, yv = _tiles(y, by)

    def row_block(args):
        xb, xsqb, xvb, i = args

        def col_step(total, args):
            yb, ysqb, yvb, j = args
            part = _tile_distance_sum(_tile_gram(xb, yb), xsqb, ysqb, xvb, yvb, i * bx, j * by,
                                      upper=same)
            return total + part, None

        total, _ = lax.scan(col_step, jnp.zeros((), acc), (yt, ysq, yv, jnp.arange(yt.shape[0])))
        return total

    total = jnp.sum(lax.map(row_block, (xt, xsq, xv, jnp.arange(xt.shape[0]))))
    return 2.0 * total if same else total


_CLOSED_FORM_KERNELS = {
    "sqeuclidean": jax.jit(_sqeuclidean_sum, static_argnums=2),
    "cosine": jax.jit(_cosine_sum, static_argnums=2),
    "cityblock": jax.jit(_cityblock_sum, static_argnums=2),
}


# --------------------------------------------------------------------------------------------
# Public API.
# --------------------------------------------------------------------------------------------


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")


def _check_block(block_size: int) -> None:
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")


def _check_nonzero_rows(x, name: str) -> None:
    if is_traced(x):
        return
    zero = int((~np.any(x != 0, axis=1)).sum())
    if zero:
        raise ValueError(
            f"cosine distance is undefined for all-zero rows: {name} has {zero} such row(s) "
            f"(of {x.shape[0]}, shape {tuple(x.shape)})"
        )


def _pair_sum(x, y, *, metric: str, same: bool, block_size: int, share=LOCAL):
    """Sum of distances over the pairs (see kernels); x, y validated, host or traced."""
    traced = is_traced(x, y)
    with host_x64(not traced):
        dtype = _compute_dtype(x.dtype if same else np.result_type(x.dtype, y.dtype))
        if metric == "euclidean":
            # Centre on a shared mean (in the widest float available) before the tile products.
            if traced:
                acc = _acc_dtype()
                xa = jnp.asarray(x, acc)
                ya = xa if same else jnp.asarray(y, acc)
                centre = xa.mean(axis=0) if same else (
                    xa.sum(axis=0) + ya.sum(axis=0)) / (xa.shape[0] + ya.shape[0])
                xc = (xa - centre).astype(dtype)
                yc = xc if same else (ya - centre).astype(dtype)
                return _euclidean_sum_traced(xc, yc, block=block_size, same=same)
            total = np.sum(x, axis=0, dtype=np.float64)
            if not same:
                total = total + np.sum(y, axis=0, dtype=np.float64)
            centre = (total / (x.shape[0] + (0 if same else y.shape[0]))).astype(dtype)
            xj = jnp.asarray(x, dtype)
            yj = xj if same else jnp.asarray(y, dtype)
            return _euclidean_sum_host(xj, yj, jnp.asarray(centre), block=block_size,
                                       same=same, share=share)
        xj = jnp.asarray(x, dtype)
        yj = None if same else jnp.asarray(y, dtype)
        total = _CLOSED_FORM_KERNELS[metric](xj, yj, same)
        return total if traced else float(total)


def _validated_pair(x, y, metric):
    _check_metric(metric)
    same = x is y
    x = as_features(x, "x", min_rows=1)
    y = x if same else as_features(y, "y", min_rows=1)
    check_same_dim(x, y)
    if metric == "cosine":
        _check_nonzero_rows(x, "x")
        if not same:
            _check_nonzero_rows(y, "y")
    return x, y, same


def average_distance(x, y, *, metric: str = "euclidean", block_size: int = _DEFAULT_BLOCK,
                    share=LOCAL):
    """Gu & Lee's average feature distance D(F_C, F_M): the mean of d(x_i, y_j) over all pairs.

    D(X, Y) = 1/(n m) sum_i sum_j d(x_i, y_j), including every one of the n * m pairs (if ``y``
    is the same object as ``x`` the diagonal pairs count with d = 0 exactly). D is not a
    distance between distributions: see ``energy_distance`` and ``distance_summary``.

    Args:
      x: float array of shape ``[n, d]`` (e.g. natural-image features).
      y: float array of shape ``[m, d]`` (e.g. medical-image features).
      metric: ``"euclidean"`` (default), ``"sqeuclidean"``, ``"cosine"`` (1 - cosine
        similarity; rows must be non-zero) or ``"cityblock"`` (L1), as in
        ``scipy.spatial.distance.cdist``.
      block_size: rows per tile of the euclidean kernel; tiles hold up to block_size x
        16 * block_size pairs (64 MiB of float32 at the default 1024).
      share: the processes of a ``jax.distributed`` run sharing the euclidean tiles
        (``featsim.parallel.process_share()``; any object with ``owns(tile)`` and
        ``gather({tile: sum})``). Every process passes the same arrays; each computes its
        tiles and all return the same value, equal to the one-process value (the per-tile
        sums are added in tile order). Default ``featsim.parallel.LOCAL``: every tile here.

    Returns:
      A Python float (a 0-d JAX array inside ``jax.jit``).

    Raises:
      ValueError: unknown metric, wrong ndim, mismatched feature dims (names both shapes),
        empty inputs, NaN/inf rows (with their count), all-zero rows for ``cosine``.

    Example:
      >>> import numpy as np
      >>> x, y = np.zeros((3, 2)), np.ones((4, 2))
      >>> round(average_distance(x, y), 6)
      1.414214
    """
    _check_block(block_size)
    x, y, same = _validated_pair(x, y, metric)
    n, m = x.shape[0], y.shape[0]
    if same:
        return _pair_sum(x, x, metric=metric, same=True, block_size=block_size,
                         share=share) / (n * n)
    return _pair_sum(x, y, metric=metric, same=False, block_size=block_size,
                     share=share) / (n * m)


def within_distance(x, *, metric: str = "euclidean", block_size: int = _DEFAULT_BLOCK,
                    share=LOCAL):
    """The within-domain baseline: mean of d(x_i, x_j) over ordered pairs i != j.

    This is the U-statistic 1/(n(n-1)) sum_{i != j} d(x_i, x_j); it relates to the
    all-pairs mean by ``average_distance(x, x) == within_distance(x) * (n - 1) / n``.

    Args:
      x: float array of shape ``[n, d]``, n >= 2.
      metric: as in ``average_distance``.
      block_size: as in ``average_distance``.
      share: as in ``average_distance``.

    Returns:
      A Python float (a 0-d JAX array inside ``jax.jit``).

    Raises:
      ValueError: as in ``average_distance``; also when n < 2.
    """
    _check_metric(metric)
    _check_block(block_size)
    x = as_features(x, "x", min_rows=2)
    if metric == "cosine":
        _check_nonzero_rows(x, "x")
    n = x.shape[0]
    return _pair_sum(x, x, metric=metric, same=True, block_size=block_size,
                     share=share) / (n * (n - 1))


@dataclasses.dataclass(frozen=True)
class DistanceSummary:
    """D between two sets, their within-set baselines, and scale-free forms of the comparison.

    Attributes:
      metric: the pairwise metric.
      n_x, n_y: sample counts.
      between: D(X, Y), Gu & Lee's average distance.
      within_x, within_y: mean d over pairs i != j inside X and inside Y (U-statistics).
      energy: E(X, Y) = 2 D(X, Y) - D(X, X) - D(Y, Y) with V-statistics (all pairs, diagonal
        included); >= 0, and 0 iff the distributions are equal (euclidean metric).
      ratio: D(X, Y) / ((within_x + within_y) / 2). Scale-free: about 1 when the sets are
        alike, larger when the between-set pairs are farther apart than within-set pairs.
      energy_coefficient: E(X, Y) / (2 D(X, Y)) in [0, 1] (Szekely & Rizzo's H); scale-free.
    """

    metric: str
    n_x: int
    n_y: int
    between: float
    within_x: float
    within_y: float
    energy: float
    ratio: float
    energy_coefficient: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _energy_parts(x, y, metric, block_size, share=LOCAL):
    n, m = x.shape[0], y.shape[0]
    sxy = _pair_sum(x, y, metric=metric, same=False, block_size=block_size, share=share)
    sxx = _pair_sum(x, x, metric=metric, same=True, block_size=block_size, share=share)
    syy = _pair_sum(y, y, metric=metric, same=True, block_size=block_size, share=share)
    between = sxy / (n * m)
    energy = 2.0 * between - sxx / (n * n) - syy / (m * m)
    return between, sxx / (n * (n - 1)), syy / (m * (m - 1)), energy


def energy_distance(x, y, *, metric: str = "euclidean", block_size: int = _DEFAULT_BLOCK,
                   share=LOCAL):
    """Energy distance E(X, Y) = 2 D(X, Y) - D(X, X) - D(Y, Y) (Szekely & Rizzo 2013).

    All three terms are V-statistics (means over all pairs, self-pairs included), so E >= 0
    and E(X, X) == 0. With the euclidean metric E is zero iff the two distributions are equal;
    with ``cityblock`` it only compares the per-coordinate marginals, and with
    ``sqeuclidean``/``cosine`` it reduces to a difference of (normalised) means.

    Args:
      x: float array ``[n, d]``; y: float array ``[m, d]``; n, m >= 2.
      metric: as in ``average_distance`` (default euclidean).
      block_size: as in ``average_distance``.
      share: as in ``average_distance``.

    Returns:
      A Python float (a 0-d JAX array inside ``jax.jit``). Tiny negative values from rounding
      are not clipped: they show the precision of the estimate.

    Raises:
      ValueError: as in ``average_distance``.
    """
    _check_block(block_size)
    x, y, same = _validated_pair(x, y, metric)
    if same:
        return 0.0 if not is_traced(x) else jnp.zeros(())
    for a, name in ((x, "x"), (y, "y")):
        if a.shape[0] < 2:
            raise ValueError(f"{name} needs at least 2 rows, got shape {tuple(a.shape)}")
    return _energy_parts(x, y, metric, block_size, share)[3]


def distance_summary(x, y, *, metric: str = "euclidean", block_size: int = _DEFAULT_BLOCK,
                    share=LOCAL):
    """Computes D(X, Y), both within-set baselines, energy distance and scale-free ratios.

    Fine-tuning rescales features, so compare D across two backbones (or before/after
    fine-tuning) through ``ratio`` and ``energy_coefficient`` too, not only ``between``.

    Args:
      x: float array ``[n, d]``; y: float array ``[m, d]``; n, m >= 2.
      metric: as in ``average_distance``.
      block_size: as in ``average_distance``.
      share: as in ``average_distance``.

    Returns:
      A ``DistanceSummary`` (host path only; inside ``jax.jit`` use the single functions).

    Raises:
      ValueError: as in ``average_distance``; if called under ``jax.jit``.
    """
    _check_block(block_size)
    x, y, _ = _validated_pair(x, y, metric)
    if is_traced(x, y):
        raise ValueError("distance_summary runs on concrete arrays; under jit use the "
                         "individual functions (average_distance, within_distance, ...)")
    for a, name in ((x, "x"), (y, "y")):
        if a.shape[0] < 2:
            raise ValueError(f"{name} needs at least 2 rows, got shape {tuple(a.shape)}")
    between, wx, wy, energy = _energy_parts(x, y, metric, block_size, share)
    baseline = 0.5 * (wx + wy)
    return DistanceSummary(
        metric=metric,
        n_x=int(x.shape[0]),
        n_y=int(y.shape[0]),
        between=between,
        within_x=wx,
        within_y=wy,
        energy=energy,
        ratio=between / baseline if baseline > 0 else math.inf,
        energy_coefficient=energy / (2.0 * between) if between > 0 else 0.0,
    )
