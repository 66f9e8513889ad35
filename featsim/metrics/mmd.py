"""Kernel Inception Distance (KID): unbiased polynomial-kernel MMD^2 averaged over subsets.

Binkowski, Sutherland, Arbel & Gretton (2018), "Demystifying MMD GANs", ICLR, appendix D,
define KID as the squared maximum mean discrepancy (Gretton et al. 2012, "A kernel two-sample
test", JMLR 13:723, lemma 6 for the unbiased estimator) between two feature sets under the
cubic polynomial kernel

    k(a, b) = (a.b / d + 1)^3,                       a, b in R^d,

    MMD^2_u = sum_{i != j} k(x_i, x_j) / (m (m - 1)) + sum_{i != j} k(y_i, y_j) / (m (m - 1))
              - 2 sum_{i, j} k(x_i, y_j) / m^2,

estimated on ``num_subsets`` random subsets of ``subset_size`` rows of each set and reported as
the mean and the (population, ``ddof=0``) standard deviation over subsets, as clean-fid
(``kernel_distance``) and torchmetrics (``KernelInceptionDistance``) do. Unlike FID, the
estimator is unbiased, so KID of two samples of one distribution is ~0 (it can be slightly
negative) whatever the sample size.

Subsets: ``rng = np.random.default_rng(seed)``; subset ``k`` takes the rows
``rng.choice(n_x, m, replace=False)`` of x, then ``rng.choice(n_y, m, replace=False)`` of y,
for k = 0, 1, ... The indices are drawn on the host even inside ``jax.jit`` (``seed`` is a
static Python int), so the jitted and host results use the same subsets.

Numerics policy:
  * Host path (concrete inputs): every kernel value, every sum and the result are float64.
    The Gram products a.b inside the kernel run as float32 BLAS products over blocks of
    ``_GRAM_BLOCK`` (256) feature columns, each block's product added into a float64
    accumulator (about 1.7x faster than float64 products at d = 2048, see
    benchmarks/metrics.py). The inputs are first scaled by one power of two (exact) so that
    max |entry| lies in [0.5, 1): float32 can neither overflow nor lose them to underflow.
    Error bound, to first order in u = 2^-24 with b = ``_GRAM_BLOCK``: rounding an entry to
    float32 and a b-term float32 dot product give |fl(a.b) - a.b| <= (b + 2) u |a| |b| (the
    float64 accumulation of the d / b blocks adds 2^-53 per block, negligible). With
    k = (gamma a.b + coef0)^p this moves each kernel value by at most
    p (gamma |a||b| + coef0)^(p - 1) gamma (b + 2) u |a||b| <= p (b + 2) u kbar(a, b), where
    kbar(a, b) = (gamma |a||b| + coef0)^p >= |k(a, b)|, so for each subset

        |MMD^2_computed - MMD^2| <= p (b + 2) u (mean kbar_xx + mean kbar_yy + 2 mean kbar_xy),

    4.6e-5 times that kernel scale for the cubic kernel. This worst case needs every rounding
    to go the same way; the observed error is ~1e-9 relative to that scale (roundings are
    independent and average out over m^2 pairs), far below the spread of MMD^2 over subsets.
    The float32 products are used only where this bound is at most ``_MAX_GRAM_REL_ERROR``
    (1e-4) times the kernel scale, i.e. for p (b + 2) u <= 1e-4 (degree <= 6 at b = 256);
    otherwise the products run in float64 as well.
  * Host strategies. Two give the same numbers (to rounding) and are picked by a
    multiply-add count:
      - "subsets": gather each subset and run the kernel on it, in vectorised chunks of
        subsets whose working set stays under ``_HOST_CHUNK_BYTES``; three BLAS products per
        subset (two of them symmetric rank-k updates), O(num_subsets m^2 d).
      - "gram": when the feature sets are not much larger than a subset (n_x + n_y below about
        2 m sqrt(num_subsets), e.g. 20000 rows in total at the defaults), build the kernel over
        all pairs of rows once, in tiles, and read every subset's sums off it with 0/1
        indicator products: O((n_x + n_y)^2 (d + num_subsets)).
  * ``polynomial_mmd2`` (every row, no subsets) runs its products in float64 on the host.
  * Traced path (inside a user's ``jax.jit``): the same kernel, written once against an array
    namespace, runs with ``jax.numpy`` in the widest float JAX allows (float32 unless x64 is
    enabled), over subsets with ``lax.map`` in batches sized by the same memory budget, always
    the "subsets" strategy. float32 loses about 1e-6 relative on each kernel sum, and MMD^2
    is a difference of sums, so near-zero KIDs are noisier there.
  * The off-diagonal sums subtract the diagonal of the very kernel matrix they summed, so the
    unbiased correction cancels exactly rather than up to a recomputation.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from featsim.metrics._validation import as_features, check_same_dim, is_traced, widest_float
from featsim.parallel import LOCAL

__all__ = ["KIDResult", "kid", "polynomial_mmd2"]

# Working-set budget of one vectorised chunk of subsets on the host (gathered rows plus kernel
# matrices, float64). Chunking only changes speed and memory, never the result.
_HOST_CHUNK_BYTES = 256 * 2**20
# Tile edge of the all-pairs ("gram") host strategy: a 1024 x 1024 float64 tile is 8 MiB.
_GRAM_TILE = 1024
# Host Gram products: float32 products over blocks of this many feature columns, accumulated
# in float64, where the error bound p (b + 2) u of the module docstring is at most
# _MAX_GRAM_REL_ERROR (relative to the kernel scale); float64 products otherwise.
_GRAM_BLOCK = 256
_MAX_GRAM_REL_ERROR = 1e-4
_U32 = 2.0**-24  # unit roundoff of float32


class KIDResult(NamedTuple):
    """Result of :func:`kid`.

    On the traced path (inside ``jax.jit``) every field is a JAX array.

    Attributes:
      mean: KID, the mean of ``mmd2`` over subsets.
      std: population standard deviation (``ddof=0``) of ``mmd2`` over subsets, as reported by
        clean-fid and torchmetrics. It describes the spread of one subset's estimate; the
        standard error of ``mean`` is roughly ``std / sqrt(num_subsets)`` only if the subsets
        were independent, which they are not (they share rows).
      subset_size: rows per subset actually used (after clamping to ``min(n_x, n_y)``).
      num_subsets: number of subsets.
      mmd2: float array of shape ``[num_subsets]``, the unbiased MMD^2 of each subset.
    """

    mean: float
    std: float
    subset_size: int
    num_subsets: int
    mmd2: np.ndarray


# --------------------------------------------------------------------------------------------
# Kernel, written once against an array namespace ``xp`` (numpy or jax.numpy). Inputs are
# checked, in the computation dtype, with any number of leading batch dimensions.
# --------------------------------------------------------------------------------------------


def _polynomial_kernel(xp, a, b, degree: int, gamma: float, coef0: float):
    """(gamma a.b + coef0)^degree for all pairs of rows: [..., n, d], [..., m, d] -> [..., n, m]."""
    # For a is b, NumPy's matmul sees a @ a^T and uses a symmetric rank-k update (half the work).
    return _int_power(gamma * (a @ xp.swapaxes(b, -1, -2)) + coef0, degree)


def _int_power(t, degree: int):
    """t ** degree by repeated multiplication (NumPy's ``** 3`` calls pow(): ~25x slower)."""
    out = t
    for _ in range(degree - 1):
        out = out * t
    return out


def _offdiag_sum(xp, k):
    """Sum of k[..., i, j] over i != j."""
    return xp.sum(k, axis=(-2, -1)) - xp.sum(xp.diagonal(k, axis1=-2, axis2=-1), axis=-1)


def _unbiased_mmd2(xp, x, y, degree: int, gamma: float, coef0: float):
    """Unbiased MMD^2 for [..., n, d] and [..., m, d] (n, m >= 2) -> [...]."""
    n, m = x.shape[-2], y.shape[-2]
    kxx = _offdiag_sum(xp, _polynomial_kernel(xp, x, x, degree, gamma, coef0))
    kyy = _offdiag_sum(xp, _polynomial_kernel(xp, y, y, degree, gamma, coef0))
    kxy = xp.sum(_polynomial_kernel(xp, x, y, degree, gamma, coef0), axis=(-2, -1))
    return kxx / (n * (n - 1.0)) + kyy / (m * (m - 1.0)) - 2.0 * kxy / (n * float(m))


# --------------------------------------------------------------------------------------------
# Argument checks.
# --------------------------------------------------------------------------------------------


def _check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _kernel_params(d: int, degree, gamma, coef0) -> tuple[int, float, float]:
    degree = _check_int(degree, "degree", 1)
    if gamma is None:
        gamma = 1.0 / d
    elif isinstance(gamma, bool) or not isinstance(gamma, numbers.Real):
        raise ValueError(f"gamma must be None or a positive number, got {gamma!r}")
    elif not (math.isfinite(gamma) and gamma > 0):
        raise ValueError(f"gamma must be None or a positive finite number, got {gamma}")
    if isinstance(coef0, bool) or not isinstance(coef0, numbers.Real):
        raise ValueError(f"coef0 must be a non-negative number, got {coef0!r}")
    if not (math.isfinite(coef0) and coef0 >= 0):
        # gamma > 0 and coef0 >= 0 keep the kernel positive semi-definite.
        raise ValueError(f"coef0 must be a non-negative finite number, got {coef0}")
    return degree, float(gamma), float(coef0)


_traced_dtype = widest_float  # float32 unless x64 is enabled


# --------------------------------------------------------------------------------------------
# Public API.
# --------------------------------------------------------------------------------------------


def polynomial_mmd2(x, y, *, degree: int = 3, gamma: float | None = None, coef0: float = 1.0):
    """Unbiased squared MMD between two feature sets under a polynomial kernel.

    Uses every row (no subsetting) and the kernel ``k(a, b) = (gamma a.b + coef0)^degree``:

        sum_{i != j} k(x_i, x_j) / (n (n - 1)) + sum_{i != j} k(y_i, y_j) / (m (m - 1))
        - 2 sum_{i, j} k(x_i, y_j) / (n m)

    (Gretton et al. 2012, JMLR 13:723, lemma 6). With the defaults this is the per-subset
    quantity of :func:`kid` (Binkowski et al. 2018). Cost: O((n + m)^2 d) time and
    O((n + m)^2) memory.

    Args:
      x: float array of shape ``[n, d]``, n >= 2.
      y: float array of shape ``[m, d]``, m >= 2.
      degree: integer >= 1, the kernel degree.
      gamma: positive scale of the inner product; ``None`` means ``1 / d``.
      coef0: non-negative offset.

    Returns:
      The unbiased MMD^2 (can be slightly negative when the distributions are equal): a Python
      float computed in float64 on the host path, a 0-d JAX array in the widest float JAX
      allows when traced.

    Raises:
      ValueError: if an input is not a finite ``[n, d]`` array with n >= 2 (NaN/inf only
        detected on the host path), the feature dimensions differ, or a kernel parameter is
        out of range.

    Example:
      >>> rng = np.random.default_rng(0)
      >>> x = rng.normal(size=(200, 8))
      >>> polynomial_mmd2(x, rng.normal(size=(300, 8))) < 0.01 < polynomial_mmd2(x, x + 1.0)
      True
    """
    x = as_features(x, "x")
    y = as_features(y, "y")
    check_same_dim(x, y)
    degree, gamma, coef0 = _kernel_params(x.shape[1], degree, gamma, coef0)
    if is_traced(x, y):
        dtype = _traced_dtype()
        return _unbiased_mmd2(
            jnp, jnp.asarray(x, dtype), jnp.asarray(y, dtype), degree, gamma, coef0
        )
    x64 = x.astype(np.float64, copy=False)
    y64 = y.astype(np.float64, copy=False)
    return float(_unbiased_mmd2(np, x64, y64, degree, gamma, coef0))


def kid(x, y, *, subset_size: int = 1000, num_subsets: int = 100, seed: int = 0,
        share=LOCAL) -> KIDResult:
    """Kernel Inception Distance between two feature sets (Binkowski et al. 2018).

    For each of ``num_subsets`` subsets, draws ``subset_size`` rows of ``x`` and of ``y``
    without replacement (``np.random.default_rng(seed)``; see the module docstring for the exact
    draw order, the same convention as clean-fid and torchmetrics) and computes
    ``polynomial_mmd2`` with the default cubic kernel ``(a.b / d + 1)^3``. Deterministic for a
    given ``seed``.

    If ``subset_size`` exceeds ``min(n_x, n_y)`` it is clamped to ``min(n_x, n_y)`` with a
    ``UserWarning`` naming both row counts (clean-fid clamps silently, torchmetrics raises).
    When it equals ``n_x == n_y`` every subset holds all rows, so all subsets agree and
    ``std`` is ~0.

    Inside ``jax.jit`` the options must be static, e.g.
    ``jax.jit(functools.partial(kid, subset_size=500, num_subsets=50, seed=1))(x, y)``;
    the subsets are then baked into the compiled function as constants.

    Args:
      x: float array of shape ``[n_x, d]``, n_x >= 2.
      y: float array of shape ``[n_y, d]``, n_y >= 2, same ``d``.
      subset_size: integer >= 2, rows per subset (clamped, see above).
      num_subsets: integer >= 1.
      seed: seed for ``np.random.default_rng`` (must be a concrete value, also under jit).
      share: the processes of a ``jax.distributed`` run sharing the work (host path;
        ``featsim.parallel.process_share()``, or any object with ``owns(task)`` and
        ``gather({task: value})``): each computes its kernel tiles or subset chunks, and
        the parts are combined in the one-process order, so every process returns the
        one-process result exactly. Default ``featsim.parallel.LOCAL``: all here.

    Returns:
      A :class:`KIDResult` ``(mean, std, subset_size, num_subsets, mmd2)``: Python floats and a
      float64 ``[num_subsets]`` NumPy array on the host path; JAX arrays in the widest float
      JAX allows (float32 unless x64 is enabled) when traced.

    Raises:
      ValueError: if an input is not a finite ``[n, d]`` array with n >= 2 (NaN/inf only
        detected on the host path), the feature dimensions differ, ``subset_size < 2`` or
        ``num_subsets < 1``.

    Example:
      >>> rng = np.random.default_rng(0)
      >>> x, y = rng.normal(size=(500, 16)), rng.normal(size=(400, 16))
      >>> same = kid(x, y, subset_size=200, num_subsets=20)
      >>> shifted = kid(x, y + 0.5, subset_size=200, num_subsets=20)
      >>> abs(same.mean) < 0.01 < shifted.mean
      True
    """
    x = as_features(x, "x")
    y = as_features(y, "y")
    check_same_dim(x, y)
    subset_size = _check_int(subset_size, "subset_size", 2)
    num_subsets = _check_int(num_subsets, "num_subsets", 1)
    n_x, n_y = int(x.shape[0]), int(y.shape[0])
    m = subset_size
    if m > min(n_x, n_y):
        m = min(n_x, n_y)
        warnings.warn(
            f"subset_size={subset_size} is larger than the smaller feature set "
            f"(x has {n_x} rows, y has {n_y} rows); using subset_size={m}",
            UserWarning,
            stacklevel=2,
        )
    degree, gamma, coef0 = _kernel_params(x.shape[1], 3, None, 1.0)
    ix, iy = _subset_indices(n_x, n_y, m, num_subsets, seed)

    if is_traced(x, y):
        values = _kid_traced(x, y, ix, iy, degree, gamma, coef0)
        return KIDResult(jnp.mean(values), jnp.std(values), m, num_subsets, values)
    values = _kid_host(x, y, ix, iy, degree, gamma, coef0, share)
    return KIDResult(float(values.mean()), float(values.std()), m, num_subsets, values)


# --------------------------------------------------------------------------------------------
# Private helpers of kid.
# --------------------------------------------------------------------------------------------


def _subset_indices(n_x: int, n_y: int, m: int, num_subsets: int, seed):
    """Row indices [num_subsets, m] of x and of y; x then y for each subset in turn."""
    rng = np.random.default_rng(seed)
    ix = np.empty((num_subsets, m), dtype=np.intp)
    iy = np.empty((num_subsets, m), dtype=np.intp)
    for k in range(num_subsets):
        ix[k] = rng.choice(n_x, m, replace=False)
        iy[k] = rng.choice(n_y, m, replace=False)
    return ix, iy


def _host_strategy(n_x: int, n_y: int, m: int, num_subsets: int, d: int) -> str:
    """Returns "gram" when one pass over all pairs of rows beats the per-subset products."""
    n = n_x + n_y
    # Multiply-adds: per subset, two symmetric m x m products and one full (2 m^2 d); for the
    # Gram strategy, all pairs once (n^2 d / 2) plus the indicator products (s n^2 / 2).
    gram = n * n * (d + num_subsets) / 2
    subsets = 2 * num_subsets * m * m * d
    return "gram" if gram < subsets else "subsets"


def _subsets_per_chunk(num_subsets: int, m: int, d: int, itemsize: int = 8) -> int:
    # Gathered rows of x and y (operand dtype) plus three float64 m x m kernels and one
    # temporary per subset.
    per_subset = itemsize * 2 * m * d + 8 * 4 * m * m
    return max(1, min(num_subsets, _HOST_CHUNK_BYTES // per_subset))


def _gram_dtype(degree: int) -> np.dtype:
    """float32 where the Gram error bound p (b + 2) u allows it (module docstring)."""
    bound = degree * (_GRAM_BLOCK + 2) * _U32
    return np.dtype(np.float32 if bound <= _MAX_GRAM_REL_ERROR else np.float64)


def _host_operands(x, y, dtype):
    """x, y times one power of two 2^-e putting max |entry| in [0.5, 1), cast to ``dtype``.

    Returns the scaled arrays and 2^(2e), the factor that takes their Gram back to x's units.
    """
    top = max(float(np.max(np.abs(x))), float(np.max(np.abs(y))))
    e = int(np.frexp(top)[1]) if top > 0 else 0
    scale = np.ldexp(1.0, -e)

    def scaled(a):
        # One pass (float64 arithmetic), straight into the target dtype. Scaling by 2^-e is exact;
        # in float32 only entries below 2^-126 of the largest lose bits (<= 2^-149 absolute).
        out = np.empty(a.shape, dtype)
        np.multiply(a, np.float64(scale), out=out, casting="unsafe")
        return out

    return scaled(x), scaled(y), float(np.ldexp(1.0, 2 * e))


def _host_gram(a, b, *, same: bool) -> np.ndarray:
    """float64 a @ b^T for [..., n, d], [..., m, d]: float32 operands in ``_GRAM_BLOCK`` column
    blocks, each block product added into a float64 accumulator; float64 operands at once."""
    d = a.shape[-1]
    block = _GRAM_BLOCK if a.dtype == np.float32 else d
    out = None
    for k0 in range(0, d, block):
        ak = a[..., k0 : k0 + block]
        bk = ak if same else b[..., k0 : k0 + block]
        part = ak @ np.swapaxes(bk, -1, -2)  # same: NumPy runs a symmetric rank-k update
        if out is None:
            out = part.astype(np.float64, copy=False)
        else:
            out += part
    return out


def _host_kernel(a, b, params, unscale: float, *, same: bool) -> np.ndarray:
    """float64 polynomial kernel of the scaled operands (see ``_host_operands``)."""
    degree, gamma, coef0 = params
    t = _host_gram(a, b, same=same)
    t *= gamma * unscale
    t += coef0
    return _int_power(t, degree)


def _kid_host(x, y, ix, iy, degree, gamma, coef0, share=LOCAL) -> np.ndarray:
    num_subsets, m = ix.shape
    strategy = _host_strategy(x.shape[0], y.shape[0], m, num_subsets, x.shape[1])
    xs, ys, unscale = _host_operands(x, y, _gram_dtype(degree))
    params = (degree, gamma, coef0)
    if strategy == "gram":
        return _kid_host_gram(xs, ys, ix, iy, params, unscale, share)
    return _kid_host_subsets(xs, ys, ix, iy, params, unscale, share)


def _kid_host_subsets(x, y, ix, iy, params, unscale, share=LOCAL) -> np.ndarray:
    """Gathers each subset and runs the kernel on it, a vectorised chunk of subsets at a time."""
    num_subsets, m = ix.shape
    chunk = _subsets_per_chunk(num_subsets, m, x.shape[1], x.dtype.itemsize)
    parts = {}
    for task, start in enumerate(range(0, num_subsets, chunk)):
        if not share.owns(task):
            continue
        stop = min(start + chunk, num_subsets)
        xs = x[ix[start:stop]]  # [chunk, m, d]
        ys = y[iy[start:stop]]
        kxx = _offdiag_sum(np, _host_kernel(xs, xs, params, unscale, same=True))
        kyy = _offdiag_sum(np, _host_kernel(ys, ys, params, unscale, same=True))
        kxy = np.sum(_host_kernel(xs, ys, params, unscale, same=False), axis=(-2, -1))
        parts[task] = (kxx + kyy) / (m * (m - 1.0)) - 2.0 * kxy / (m * float(m))
    parts = share.gather(parts)
    return np.concatenate([parts[t] for t in sorted(parts)]).astype(np.float64)


def _kid_host_gram(x, y, ix, iy, params, unscale, share=LOCAL) -> np.ndarray:
    """All subsets at once from kernel tiles over all rows.

    With ``w`` the 0/1 indicator of a subset, sum_{i, j in S} K_ij = w^T K w, so for the
    indicator matrices ``W [num_subsets, n]`` every subset's kernel sum is a row sum of
    ``(W K) * W``. K is never held whole: it is built in ``_GRAM_TILE`` x ``_GRAM_TILE`` tiles
    (upper triangle only for K_xx, K_yy). Cost O((n_x + n_y)^2 (d + num_subsets)) instead of
    O(num_subsets m^2 d); cheaper whenever the sets are not much larger than the subsets.
    """
    num_subsets, m = ix.shape
    rows = np.arange(num_subsets)[:, None]
    wx = np.zeros((num_subsets, x.shape[0]))
    wx[rows, ix] = 1.0
    wy = np.zeros((num_subsets, y.shape[0]))
    wy[rows, iy] = 1.0
    sxx, dxx = _indicator_kernel_sums(x, x, wx, wx, params, unscale, same=True, share=share)
    syy, dyy = _indicator_kernel_sums(y, y, wy, wy, params, unscale, same=True, share=share)
    sxy, _ = _indicator_kernel_sums(x, y, wx, wy, params, unscale, same=False, share=share)
    return (sxx - dxx) / (m * (m - 1.0)) + (syy - dyy) / (m * (m - 1.0)) - 2.0 * sxy / (m * m)


def _indicator_kernel_sums(a, b, wa, wb, params, unscale, *, same: bool, share=LOCAL):
    """Per subset k: sum_{i, j} wa[k, i] wb[k, j] K(a_i, b_j), and (``same``) the diagonal part.

    With a ``share``, each process computes its tiles and the tile parts of all processes
    are added in tile order (the one-process sums, exactly)."""
    parts, tile = {}, -1
    t = _GRAM_TILE
    for i0 in range(0, a.shape[0], t):
        wa_i = wa[:, i0 : i0 + t]
        for j0 in range(i0 if same else 0, b.shape[0], t):
            tile += 1
            if not share.owns(tile):
                continue
            on_diagonal = same and j0 == i0
            k = _host_kernel(a[i0 : i0 + t], b[j0 : j0 + t], params, unscale, same=on_diagonal)
            part = np.sum((wa_i @ k) * wb[:, j0 : j0 + t], axis=1)
            if on_diagonal:
                parts[tile] = (part, wa_i @ np.diagonal(k))
            else:  # same: the mirrored tile (j, i) sums to the same value
                parts[tile] = (2.0 * part if same else part, None)
    parts = share.gather(parts)
    total = np.zeros(wa.shape[0])
    diag = np.zeros(wa.shape[0])
    for t_ in range(tile + 1):
        part, on_diag = parts[t_]
        total += part
        if on_diag is not None:
            diag += on_diag
    return total, diag


def _kid_traced(x, y, ix, iy, degree, gamma, coef0):
    dtype = _traced_dtype()
    x = jnp.asarray(x, dtype)
    y = jnp.asarray(y, dtype)
    num_subsets, m = ix.shape
    # Same memory budget as the host path, in the traced dtype.
    batch = max(1, _subsets_per_chunk(num_subsets, m, x.shape[1]) * 8 // dtype.itemsize)

    def one_subset(idx):
        i, j = idx
        return _unbiased_mmd2(jnp, x[i], y[j], degree, gamma, coef0)

    idx = (jnp.asarray(ix, jnp.int32), jnp.asarray(iy, jnp.int32))
    return jax.lax.map(one_subset, idx, batch_size=min(batch, num_subsets))
