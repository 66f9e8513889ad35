"""Centered Kernel Alignment (CKA) between two representations of the same inputs.

CKA (Kornblith et al. 2019, "Similarity of Neural Network Representations Revisited",
ICML) compares two feature matrices ``x: [n, d1]`` and ``y: [n, d2]`` computed on the *same*
``n`` inputs, in the same row order::

    CKA(K, L) = HSIC(K, L) / sqrt(HSIC(K, K) * HSIC(L, L))

where ``K`` and ``L`` are ``[n, n]`` kernel (Gram) matrices of the rows. With the biased
estimator ``HSIC_0 = tr(K H L H) / (n - 1)^2`` (``H = I - 11^T / n``) linear CKA is
invariant to orthogonal transforms and isotropic scaling of either argument and lies in
``[0, 1]``. The debiased variant uses the unbiased estimator ``HSIC_1`` of Song et al. (2012,
"Feature Selection via Dependence Maximization", JMLR 13) and lies in ``[-1, 1]``. For ``n``
too large for an ``[n, n]`` Gram matrix, :class:`MinibatchCKA` / :func:`minibatch_cka`
average ``HSIC_1`` over row batches (Nguyen, Raghu & Kornblith 2021, "Do Wide and Deep
Networks Learn the Same Things?", ICLR), and :func:`cka_matrix` compares every layer of one
network with every layer of another (Raghu et al. 2017, SVCCA; Kornblith et al. 2019).

Numerics policy:

* Features are always centred (column means removed) before any kernel is formed; columns
  that are constant are set to exactly zero, so a constant representation is detected
  exactly rather than leaving rounding noise behind.
* **Host path** (concrete NumPy/JAX arrays, the normal case): inputs are validated
  (shape, NaN/inf rows counted) and converted with ``np.asarray(x, np.float64)``; everything
  runs in float64 NumPy and a Python ``float`` is returned. Undefined results are errors,
  never NaN: a constant representation (zero centred Gram, CKA = 0/0), a zero median RBF
  bandwidth, or a non-positive debiased self-similarity raise ``ValueError``.
* **Traced path** (inputs are tracers inside a user's ``jax.jit``): the same kernels run in
  ``jax.numpy`` at the inputs' float dtype (float32 unless x64 is enabled; float16/bfloat16
  are promoted to float32 because Gram sums in half precision are meaningless) and a 0-d
  array is returned. Only shapes can be checked there, so an undefined result comes back as
  NaN: validate on the host first if that matters.
* The kernels are written once against an array namespace ``xp`` (``numpy`` or
  ``jax.numpy``) so both paths share the same formulas.
* Results are clipped to their mathematical range (``[0, 1]`` biased, ``[-1, 1]``
  debiased, both by Cauchy-Schwarz) to remove last-bit rounding excursions.
* :class:`MinibatchCKA` is a host-side accumulator of float64 sums; :func:`minibatch_cka`
  also runs under ``jax.jit`` (a ``lax.scan`` over batches, accumulating in the input dtype).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from types import ModuleType

import jax
import jax.numpy as jnp
import numpy as np

from featsim.metrics._validation import as_features, check_same_rows, float_dtype, is_traced

__all__ = [
    "CKAMatrix",
    "MinibatchCKA",
    "cka_matrix",
    "linear_cka",
    "minibatch_cka",
    "rbf_cka",
]

_SAME_INPUTS = (
    "CKA compares two representations of the same inputs, so x and y need the same number "
    "of rows, in the same order"
)
_KERNELS = ("linear", "rbf")
# The unbiased HSIC estimator divides by n (n - 3) and (n - 1)(n - 2).
_MIN_ROWS_DEBIASED = 4


# --------------------------------------------------------------------------------------
# Kernels shared by the host (xp=numpy, float64) and traced (xp=jax.numpy) paths. They
# assume checked, centred input.
# --------------------------------------------------------------------------------------


def _centre(x, xp: ModuleType):
    """Removes column means; constant columns become exactly 0 (not rounding noise)."""
    xc = x - xp.mean(x, axis=0, keepdims=True)
    return xp.where(xp.max(x, axis=0) == xp.min(x, axis=0), 0, xc)


def _unit_frobenius(a, xp: ModuleType):
    # CKA is scale invariant; unit scale keeps float32 Gram sums far from overflow.
    return a / xp.sqrt(xp.vdot(a, a))


def _center_gram(gram, *, unbiased: bool, xp: ModuleType):
    """Kornblith et al.'s ``center_gram``: ``H K H``, or the U-statistic centring.

    With ``unbiased=True`` (Szekely & Rizzo 2014 form of Song et al.'s estimator),
    ``<center(K), center(L)>_F == n (n - 3) HSIC_1(K, L)``.
    """
    n = gram.shape[0]
    if unbiased:
        eye = xp.eye(n, dtype=bool)
        gram = xp.where(eye, 0, gram)
        means = xp.sum(gram, axis=0) / (n - 2)
        means = means - xp.sum(means) / (2 * (n - 1))
        return xp.where(eye, 0, gram - means[:, None] - means[None, :])
    means = xp.mean(gram, axis=0)
    means = means - xp.mean(means) / 2
    return gram - means[:, None] - means[None, :]


def _debiased_helper(xty, rows_x, rows_y, sq_x, sq_y, n: int, xp: ModuleType):
    """Kornblith et al.'s ``_debiased_dot_product_similarity_helper``: n (n-3) HSIC_1.

    Valid for centred features only (then ``1^T K = 0``).
    """
    return xty - n / (n - 2) * xp.vdot(rows_x, rows_y) + sq_x * sq_y / ((n - 1) * (n - 2))


def _linear_terms(xc, yc, *, debiased: bool, xp: ModuleType):
    """Scaled linear-kernel HSIC estimates ``(s_xy, s_xx, s_yy)`` for centred features.

    Biased: ``s = tr(K L) = (n - 1)^2 HSIC_0``; debiased: ``s = n (n - 3) HSIC_1``. Uses the
    ``[d, d]`` feature-space form when ``d1 + d2 < n`` (cost ``n (d1 + d2)^2``), otherwise
    the ``[n, n]`` Gram form (cost ``n^2 (d1 + d2)``); shapes are static under jit.
    """
    n = xc.shape[0]
    if xc.shape[1] + yc.shape[1] < n:
        xty = xc.T @ yc
        xtx = xc.T @ xc
        yty = yc.T @ yc
        s_xy, s_xx, s_yy = xp.vdot(xty, xty), xp.vdot(xtx, xtx), xp.vdot(yty, yty)
        if not debiased:
            return s_xy, s_xx, s_yy
        rows_x = xp.sum(xc * xc, axis=1)
        rows_y = xp.sum(yc * yc, axis=1)
        sq_x, sq_y = xp.sum(rows_x), xp.sum(rows_y)
        return (
            _debiased_helper(s_xy, rows_x, rows_y, sq_x, sq_y, n, xp),
            _debiased_helper(s_xx, rows_x, rows_x, sq_x, sq_x, n, xp),
            _debiased_helper(s_yy, rows_y, rows_y, sq_y, sq_y, n, xp),
        )
    # Centred features already give a centred Gram (H X X^T H = Xc Xc^T).
    kx = xc @ xc.T
    ky = yc @ yc.T
    if debiased:
        kx = _center_gram(kx, unbiased=True, xp=xp)
        ky = _center_gram(ky, unbiased=True, xp=xp)
    return xp.vdot(kx, ky), xp.vdot(kx, kx), xp.vdot(ky, ky)


def _hsic1_batch(xc, yc, xp: ModuleType):
    """Unbiased ``HSIC_1`` (Song et al. 2012) of one centred batch: ``(xy, xx, yy)``."""
    n = xc.shape[0]
    scale = n * (n - 3)
    s_xy, s_xx, s_yy = _linear_terms(xc, yc, debiased=True, xp=xp)
    return s_xy / scale, s_xx / scale, s_yy / scale


def _rbf_gram(xc, threshold, xp: ModuleType, name: str):
    """Kornblith et al.'s ``gram_rbf``: ``exp(-D^2 / (2 threshold^2 median(D^2)))``.

    The median runs over all ``n * n`` squared distances, diagonal zeros included.
    """
    sq = xp.sum(xc * xc, axis=1)
    d2 = sq[:, None] + sq[None, :] - 2 * (xc @ xc.T)
    # Clamp rounding negatives; the diagonal is exactly 0 by definition.
    d2 = xp.where(xp.eye(xc.shape[0], dtype=bool), 0, xp.maximum(d2, 0))
    median = xp.median(d2)
    if xp is np and not median > 0:
        raise ValueError(
            f"the median squared distance between rows of {name} is 0 (more than half of "
            f"the {xc.shape[0]}x{xc.shape[0]} pairs of rows are identical), so the RBF "
            "bandwidth is 0 and rbf_cka is undefined; deduplicate rows or use linear_cka"
        )
    return xp.exp(-d2 / (2 * threshold**2 * median))


def _normalised_gram(xc, *, kernel: str, threshold, debiased: bool, xp: ModuleType, name: str):
    """Centred Gram matrix of centred features, scaled to unit Frobenius norm."""
    if kernel == "linear":
        gram = xc @ xc.T
        if debiased:
            gram = _center_gram(gram, unbiased=True, xp=xp)
    else:
        gram = _center_gram(_rbf_gram(xc, threshold, xp, name), unbiased=debiased, xp=xp)
    norm = xp.sqrt(xp.vdot(gram, gram))
    if xp is np and not norm > 0:
        raise ValueError(
            f"the centred {'debiased ' if debiased else ''}Gram matrix of {name} is 0, so "
            f"CKA is undefined (0/0); {name} has shape {tuple(xc.shape)}"
        )
    return gram / norm


def _clip(value, *, debiased: bool, xp: ModuleType):
    return xp.clip(value, -1.0 if debiased else 0.0, 1.0)


# --------------------------------------------------------------------------------------
# Edge validation and the host/traced split.
# --------------------------------------------------------------------------------------


def _traced_dtype(*arrays) -> np.dtype:
    """The inputs' float dtype, at least float32 (half-precision Gram sums are useless)."""
    dtype = jnp.result_type(*(float_dtype(a) for a in arrays))
    return np.dtype(jnp.promote_types(dtype, jnp.float32))


def _check_debiased_rows(x, name: str, debiased: bool) -> None:
    if debiased and x.shape[0] < _MIN_ROWS_DEBIASED:
        raise ValueError(
            f"debiased=True needs at least {_MIN_ROWS_DEBIASED} rows (the unbiased HSIC "
            f"estimator divides by n (n - 3)), got {name}.shape == {tuple(x.shape)}"
        )


def _check_not_constant(xc, name: str) -> None:
    if not np.any(xc):
        raise ValueError(
            f"{name} is constant (all {xc.shape[0]} rows identical, shape {tuple(xc.shape)}): "
            "its centred Gram matrix is 0, so CKA is undefined (0/0)"
        )


def _prepare_pair(x, y, *, debiased: bool):
    """Validates ``x``, ``y``; returns them centred, with the namespace to compute in."""
    x = as_features(x, "x")
    y = as_features(y, "y")
    check_same_rows(x, y, why=_SAME_INPUTS)
    _check_debiased_rows(x, "x", debiased)
    if is_traced(x, y):
        dtype = _traced_dtype(x, y)
        xp = jnp
        x, y = jnp.asarray(x, dtype), jnp.asarray(y, dtype)
    else:
        xp = np
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    xc, yc = _centre(x, xp), _centre(y, xp)
    if xp is np:
        _check_not_constant(xc, "x")
        _check_not_constant(yc, "y")
    return xc, yc, xp


def _check_threshold(threshold) -> None:
    if is_traced(threshold):
        return
    t = float(threshold)
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"threshold must be a finite number > 0, got {threshold!r}")


def _check_self_terms(s_xx, s_yy, *, debiased: bool) -> None:
    for value, name in ((s_xx, "x"), (s_yy, "y")):
        if not value > 0:
            what = "debiased HSIC_1" if debiased else "HSIC"
            raise ValueError(
                f"the {what} of {name} with itself is {float(value):.3g} (<= 0), so CKA is "
                f"undefined; {name} is (nearly) degenerate"
                + ("; use more rows or debiased=False" if debiased else "")
            )


def _finish(value, xp: ModuleType):
    return float(value) if xp is np else value


# --------------------------------------------------------------------------------------
# Public API.
# --------------------------------------------------------------------------------------


def linear_cka(x, y, *, debiased: bool = False):
    """Linear CKA between two representations of the same ``n`` inputs.

    ``||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` for column-centred ``Xc``, ``Yc``
    (Kornblith et al. 2019, eq. 5). The feature-space ``[d, d]`` form is used when
    ``d1 + d2 < n`` and the ``[n, n]`` Gram form otherwise, whichever is cheaper; both give
    the same value. With ``debiased=True`` every HSIC is the unbiased estimator of Song et
    al. (2012), computed as in Kornblith et al.'s reference code
    (``feature_space_linear_cka(..., debiased=True)``).

    Args:
      x: float array of shape ``[n, d1]``.
      y: float array of shape ``[n, d2]``, same ``n`` and row order as ``x``; ``d2`` may
        differ from ``d1``.
      debiased: use the unbiased HSIC estimator (needs ``n >= 4``); removes the upward
        bias of CKA at small ``n`` / large ``d``, and can be negative.

    Returns:
      On the host a Python ``float`` in ``[0, 1]`` (``[-1, 1]`` debiased), computed in
      float64. Inside ``jax.jit`` a 0-d array of the inputs' float dtype.

    Raises:
      ValueError: ``x``/``y`` not 2-D, fewer than 2 rows (4 if debiased), different row
        counts, NaN/inf rows, or (host only) a constant representation or a non-positive
        debiased self-similarity, for which CKA is undefined.

    Reference:
      Kornblith, Norouzi, Lee & Hinton (2019), "Similarity of Neural Network
      Representations Revisited", ICML.

    Example:
      >>> rng = np.random.default_rng(0)
      >>> x = rng.normal(size=(100, 8))
      >>> round(linear_cka(x, 3.0 * x @ np.linalg.qr(rng.normal(size=(8, 8)))[0]), 6)
      1.0
      >>> import functools
      >>> jax.jit(functools.partial(linear_cka, debiased=True))(x, x).shape
      ()
    """
    xc, yc, xp = _prepare_pair(x, y, debiased=debiased)
    xc, yc = _unit_frobenius(xc, xp), _unit_frobenius(yc, xp)
    s_xy, s_xx, s_yy = _linear_terms(xc, yc, debiased=debiased, xp=xp)
    if xp is np:
        _check_self_terms(s_xx, s_yy, debiased=debiased)
    value = _clip(s_xy / (xp.sqrt(s_xx) * xp.sqrt(s_yy)), debiased=debiased, xp=xp)
    return _finish(value, xp)


def rbf_cka(x, y, *, threshold: float = 1.0, debiased: bool = False):
    """CKA with the RBF (Gaussian) kernel and Kornblith et al.'s median bandwidth.

    ``K_ij = exp(-||x_i - x_j||^2 / (2 threshold^2 median(D^2)))`` where the median runs
    over all ``n * n`` squared distances (diagonal zeros included), exactly as in Kornblith
    et al.'s ``gram_rbf``: the kernel bandwidth (sigma) is ``threshold`` times the root-median
    pairwise distance. Each Gram is centred (``H K H``, or the unbiased U-statistic
    centring when ``debiased``) and CKA is their normalised Frobenius inner product.
    Memory is ``O(n^2)``.

    Args:
      x: float array of shape ``[n, d1]``.
      y: float array of shape ``[n, d2]``, same ``n`` and row order as ``x``.
      threshold: bandwidth as a fraction of the median distance (> 0).
      debiased: use the unbiased HSIC estimator (needs ``n >= 4``).

    Returns:
      On the host a Python ``float`` in ``[0, 1]`` (``[-1, 1]`` debiased). Inside
      ``jax.jit`` a 0-d array of the inputs' float dtype.

    Raises:
      ValueError: as :func:`linear_cka`; also ``threshold <= 0`` and (host only) a zero
        median distance (more than half of the row pairs identical).

    Reference:
      Kornblith, Norouzi, Lee & Hinton (2019), "Similarity of Neural Network
      Representations Revisited", ICML, section 3 ("RBF CKA").

    Example:
      >>> x = np.random.default_rng(0).normal(size=(50, 4))
      >>> round(rbf_cka(x, 2.0 * x, threshold=0.5), 6)
      1.0
    """
    _check_threshold(threshold)
    xc, yc, xp = _prepare_pair(x, y, debiased=debiased)
    gx = _normalised_gram(xc, kernel="rbf", threshold=threshold, debiased=debiased, xp=xp, name="x")
    gy = _normalised_gram(yc, kernel="rbf", threshold=threshold, debiased=debiased, xp=xp, name="y")
    return _finish(_clip(xp.vdot(gx, gy), debiased=debiased, xp=xp), xp)


@dataclasses.dataclass(frozen=True)
class MinibatchCKA:
    """Immutable, mergeable streaming state for minibatch linear CKA.

    Holds the float64 sums over batches ``b`` of the unbiased ``HSIC_1`` (Song et al. 2012)
    of each batch of aligned rows ``(X_b, Y_b)``; then (Nguyen, Raghu & Kornblith 2021)::

        CKA = sum_b HSIC_1(X_b, Y_b) / sqrt(sum_b HSIC_1(X_b, X_b) * sum_b HSIC_1(Y_b, Y_b))

    Memory per update is ``O(b^2 + b d)`` for a batch of ``b`` rows. Because each batch's
    ``HSIC_1`` is unbiased, the result does not drift with the batch size the way averaged
    biased CKA would, but it is an estimate over within-batch pairs only: it is close to,
    not equal to, :func:`linear_cka` with ``debiased=True`` on all rows (equal with a
    single batch). Order of updates and merges does not matter (up to float rounding).

    Host only: ``update`` needs concrete arrays; inside ``jax.jit`` use
    :func:`minibatch_cka`, which shares the per-batch kernel.

    Attributes:
      hsic_xy: sum over batches of ``HSIC_1(X_b, Y_b)``.
      hsic_xx: sum over batches of ``HSIC_1(X_b, X_b)``.
      hsic_yy: sum over batches of ``HSIC_1(Y_b, Y_b)``.
      num_batches: number of batches accumulated.
      num_rows: total rows accumulated.
      x_dim: feature dimension of ``x`` (``None`` until the first batch).
      y_dim: feature dimension of ``y`` (``None`` until the first batch).

    Example:
      >>> rng = np.random.default_rng(0)
      >>> x = rng.normal(size=(1000, 16))
      >>> y = x @ rng.normal(size=(16, 8))
      >>> state = MinibatchCKA.empty()
      >>> for start in range(0, 1000, 250):
      ...     state = state.update(x[start:start + 250], y[start:start + 250])
      >>> 0.0 < state.compute() <= 1.0
      True
    """

    hsic_xy: float = 0.0
    hsic_xx: float = 0.0
    hsic_yy: float = 0.0
    num_batches: int = 0
    num_rows: int = 0
    x_dim: int | None = None
    y_dim: int | None = None

    @classmethod
    def empty(cls) -> MinibatchCKA:
        """The state before any batch (the identity of :meth:`merge`)."""
        return cls()

    @classmethod
    def from_features(cls, x_batch, y_batch) -> MinibatchCKA:
        """The state of a single batch: ``MinibatchCKA.empty().update(x_batch, y_batch)``."""
        return cls.empty().update(x_batch, y_batch)

    def update(self, x_batch, y_batch) -> MinibatchCKA:
        """Returns a new state with one more batch of aligned rows.

        Args:
          x_batch: float array of shape ``[b, d1]``, ``b >= 4``.
          y_batch: float array of shape ``[b, d2]``, the same inputs as ``x_batch``.

        Raises:
          ValueError: bad shapes, ``b < 4``, different row counts, NaN/inf rows, or feature
            dimensions that differ from earlier batches.
          TypeError: called with JAX tracers (inside ``jax.jit``).
        """
        if is_traced(x_batch, y_batch):
            raise TypeError(
                "MinibatchCKA is a host-side accumulator and cannot be updated inside "
                "jax.jit; use featsim.metrics.cka.minibatch_cka under jit instead"
            )
        x = as_features(x_batch, "x_batch")
        y = as_features(y_batch, "y_batch")
        check_same_rows(x, y, ("x_batch", "y_batch"), why=_SAME_INPUTS)
        if x.shape[0] < _MIN_ROWS_DEBIASED:
            raise ValueError(
                f"each batch needs at least {_MIN_ROWS_DEBIASED} rows (the unbiased HSIC "
                f"estimator divides by b (b - 3)), got x_batch.shape == {tuple(x.shape)}"
            )
        return self._add_batch(x, y)

    def _add_batch(self, x, y) -> MinibatchCKA:
        """``update`` for validated host arrays (any float dtype; computed in float64)."""
        self._check_dims(x.shape[1], y.shape[1], "this batch")
        xc = _centre(np.asarray(x, np.float64), np)
        yc = _centre(np.asarray(y, np.float64), np)
        h_xy, h_xx, h_yy = _hsic1_batch(xc, yc, np)
        return dataclasses.replace(
            self,
            hsic_xy=self.hsic_xy + float(h_xy),
            hsic_xx=self.hsic_xx + float(h_xx),
            hsic_yy=self.hsic_yy + float(h_yy),
            num_batches=self.num_batches + 1,
            num_rows=self.num_rows + x.shape[0],
            x_dim=x.shape[1],
            y_dim=y.shape[1],
        )

    def _check_dims(self, x_dim: int | None, y_dim: int | None, what: str) -> None:
        for mine, theirs, name in ((self.x_dim, x_dim, "x"), (self.y_dim, y_dim, "y")):
            if mine is not None and theirs is not None and mine != theirs:
                raise ValueError(
                    f"{name} has {theirs} features in {what} but {mine} in the batches "
                    "accumulated so far: every batch must come from the same representation"
                )

    def merge(self, other: MinibatchCKA) -> MinibatchCKA:
        """Combines two states (e.g. from different shards or hosts); order-free."""
        self._check_dims(other.x_dim, other.y_dim, "the merged state")
        return MinibatchCKA(
            hsic_xy=self.hsic_xy + other.hsic_xy,
            hsic_xx=self.hsic_xx + other.hsic_xx,
            hsic_yy=self.hsic_yy + other.hsic_yy,
            num_batches=self.num_batches + other.num_batches,
            num_rows=self.num_rows + other.num_rows,
            x_dim=self.x_dim if self.x_dim is not None else other.x_dim,
            y_dim=self.y_dim if self.y_dim is not None else other.y_dim,
        )

    def compute(self) -> float:
        """Minibatch CKA in ``[-1, 1]`` as a Python float.

        Raises:
          ValueError: no batches yet, or a representation with zero (or negative) summed
            self-HSIC, i.e. constant within every batch, for which CKA is undefined.
        """
        if self.num_batches == 0:
            raise ValueError("MinibatchCKA has no batches: call update() before compute()")
        for value, name in ((self.hsic_xx, "x"), (self.hsic_yy, "y")):
            if not value > 0:
                raise ValueError(
                    f"the summed HSIC_1 of {name} with itself over {self.num_batches} "
                    f"batch(es) is {value:.3g} (<= 0): {name} is constant (or degenerate) "
                    "within every batch, so CKA is undefined"
                )
        value = self.hsic_xy / (math.sqrt(self.hsic_xx) * math.sqrt(self.hsic_yy))
        return min(max(value, -1.0), 1.0)


def _batch_slices(n: int, batch_size: int) -> list[slice]:
    """Aligned row batches; a last batch of < 4 rows is merged into the previous one."""
    starts = list(range(0, n, batch_size))
    if len(starts) > 1 and n - starts[-1] < _MIN_ROWS_DEBIASED:
        starts.pop()
    ends = [*starts[1:], n]
    return [slice(s, e) for s, e in zip(starts, ends, strict=True)]


def _minibatch_traced(x, y, slices: list[slice]):
    """``minibatch_cka`` under jit: ``lax.scan`` over the equal-size batches."""
    dtype = _traced_dtype(x, y)
    x, y = jnp.asarray(x, dtype), jnp.asarray(y, dtype)
    size = slices[0].stop - slices[0].start
    # All batches but possibly the last have `size` rows; scan over that uniform prefix.
    num_uniform = len(slices) - int(slices[-1].stop - slices[-1].start != size)
    stop = num_uniform * size
    xs = x[:stop].reshape(num_uniform, size, x.shape[1])
    ys = y[:stop].reshape(num_uniform, size, y.shape[1])

    def step(carry, batch):
        xb, yb = batch
        terms = _hsic1_batch(_centre(xb, jnp), _centre(yb, jnp), jnp)
        return tuple(c + t for c, t in zip(carry, terms, strict=True)), None

    zero = jnp.zeros((), dtype)
    (h_xy, h_xx, h_yy), _ = jax.lax.scan(step, (zero, zero, zero), (xs, ys))
    if stop < x.shape[0]:
        last = _hsic1_batch(_centre(x[stop:], jnp), _centre(y[stop:], jnp), jnp)
        h_xy, h_xx, h_yy = h_xy + last[0], h_xx + last[1], h_yy + last[2]
    return _clip(h_xy / (jnp.sqrt(h_xx) * jnp.sqrt(h_yy)), debiased=True, xp=jnp)


def minibatch_cka(x, y, *, batch_size: int = 256):
    """Minibatch linear CKA over aligned row batches of ``x`` and ``y``.

    Splits the ``n`` rows into consecutive batches of ``batch_size`` and accumulates the
    per-batch unbiased ``HSIC_1`` as :class:`MinibatchCKA` does. If the last batch would
    have fewer than 4 rows (too few for ``HSIC_1``) it is merged into the previous batch,
    which then has up to ``batch_size + 3`` rows; no rows are dropped. Rows are taken in
    order: shuffle both arrays with the same permutation first if they are sorted (e.g. by
    class), since only within-batch pairs enter the estimate.

    Memory is ``O(batch_size^2 + batch_size * d)`` beyond the inputs: each batch is
    converted to float64 on its own.

    Args:
      x: float array of shape ``[n, d1]``, ``n >= 4``.
      y: float array of shape ``[n, d2]``, same ``n`` and row order as ``x``.
      batch_size: rows per batch (>= 4). With ``batch_size >= n`` this equals
        ``linear_cka(x, y, debiased=True)``.

    Returns:
      On the host a Python ``float`` in ``[-1, 1]``, accumulated in float64. Inside
      ``jax.jit`` a 0-d array of the inputs' float dtype (batches scanned with
      ``lax.scan``; sums accumulate in that dtype).

    Raises:
      ValueError: bad shapes, ``n < 4``, different row counts, NaN/inf rows,
        ``batch_size < 4``, or (host only) a representation constant within every batch.

    Reference:
      Nguyen, Raghu & Kornblith (2021), "Do Wide and Deep Networks Learn the Same Things?
      Uncovering How Neural Network Representations Vary with Width and Depth", ICLR.

    Example:
      >>> rng = np.random.default_rng(0)
      >>> x = rng.normal(size=(1030, 32))
      >>> y = x[:, :16] + 0.1 * rng.normal(size=(1030, 16))
      >>> 0.5 < minibatch_cka(x, y, batch_size=256) <= 1.0
      True
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer):
        raise ValueError(f"batch_size must be an int, got {batch_size!r}")
    if batch_size < _MIN_ROWS_DEBIASED:
        raise ValueError(
            f"batch_size must be >= {_MIN_ROWS_DEBIASED} (the unbiased HSIC estimator "
            f"divides by b (b - 3)), got {batch_size}"
        )
    x = as_features(x, "x", min_rows=_MIN_ROWS_DEBIASED)
    y = as_features(y, "y", min_rows=_MIN_ROWS_DEBIASED)
    check_same_rows(x, y, why=_SAME_INPUTS)
    slices = _batch_slices(x.shape[0], int(batch_size))
    if is_traced(x, y):
        return _minibatch_traced(x, y, slices)
    state = MinibatchCKA.empty()
    for s in slices:
        state = state._add_batch(x[s], y[s])
    return state.compute()


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class CKAMatrix:
    """Layer-by-layer CKA values, as returned by :func:`cka_matrix`.

    A JAX pytree (``values`` is the leaf), so it can be returned from ``jax.jit``.

    Attributes:
      values: float array of shape ``[len(rows), len(cols)]``; ``values[i, j]`` is the CKA
        between layer ``rows[i]`` of ``features_a`` and layer ``cols[j]`` of ``features_b``.
        A read-only float64 NumPy array on the host, a JAX array under jit.
      rows: layer names of ``features_a``, in its order (sorted order under ``jax.jit``,
        which flattens dicts by sorted key).
      cols: layer names of ``features_b``, likewise.
    """

    values: np.ndarray
    rows: tuple[str, ...] = dataclasses.field(metadata={"static": True})
    cols: tuple[str, ...] = dataclasses.field(metadata={"static": True})


def _layer_features(features: Mapping, which: str, *, debiased: bool) -> list:
    if not isinstance(features, Mapping):
        raise TypeError(
            f"{which} must be a mapping of layer name -> array [n, ...], "
            f"got {type(features).__name__}"
        )
    if not features:
        raise ValueError(f"{which} is empty: need at least one layer name -> array [n, ...]")
    out = []
    for key, value in features.items():
        name = f"{which}[{key!r}]"
        if not is_traced(value) and not isinstance(value, jax.Array):
            value = np.asarray(value)
        if value.ndim < 2:
            raise ValueError(
                f"{name} must have shape [n, ...] with at least 2 dimensions, got shape "
                f"{tuple(value.shape)}"
            )
        # Conv maps [n, h, w, c] -> [n, h * w * c]: each input's whole map is one vector.
        value = as_features(value.reshape(value.shape[0], -1), name)
        _check_debiased_rows(value, name, debiased)
        out.append((name, value))
    return out


def _stacked_grams(layers, *, kernel, threshold, debiased, xp: ModuleType, dtype):
    """``[len(layers), n * n]``: each layer's centred, unit-norm Gram, flattened."""
    out = []
    for name, value in layers:
        xc = _centre(xp.asarray(value, dtype), xp)
        if xp is np:
            _check_not_constant(xc, name)
        gram = _normalised_gram(
            xc, kernel=kernel, threshold=threshold, debiased=debiased, xp=xp, name=name
        )
        out.append(gram.reshape(-1))
    return xp.stack(out)


def cka_matrix(
    features_a: Mapping[str, object],
    features_b: Mapping[str, object],
    *,
    kernel: str = "linear",
    threshold: float = 1.0,
    debiased: bool = False,
) -> CKAMatrix:
    """CKA between every layer of ``features_a`` and every layer of ``features_b``.

    Each layer's centred Gram matrix is computed once and scaled to unit Frobenius norm;
    entry ``(i, j)`` is then their inner product, identical (up to rounding) to
    ``linear_cka``/``rbf_cka`` on that pair. Passing the same dict twice reuses the Grams.
    Memory is ``O((len(a) + len(b)) n^2)``: for large ``n`` use :func:`minibatch_cka` per
    pair.

    Args:
      features_a: mapping of layer name -> float array ``[n, ...]``; trailing dimensions
        are flattened (a conv map ``[n, h, w, c]`` becomes ``[n, h * w * c]``).
      features_b: the same for the other network (or the same one); all layers of both
        mappings must share ``n`` and row order.
      kernel: ``"linear"`` or ``"rbf"``.
      threshold: RBF bandwidth as a fraction of the median distance (see :func:`rbf_cka`).
      debiased: use the unbiased HSIC estimator (needs ``n >= 4``).

    Returns:
      A :class:`CKAMatrix` with ``values`` of shape ``[len(features_a), len(features_b)]``
      (float64 NumPy on the host; a JAX array of the inputs' float dtype under jit, where
      ``rows``/``cols`` come out in sorted key order because jit rebuilds dict arguments
      with sorted keys).

    Raises:
      ValueError: an empty mapping, an unknown ``kernel``, a layer with fewer than 2
        dimensions, layers with different ``n``, NaN/inf rows, or (host only) a constant
        layer.
      TypeError: ``features_a`` or ``features_b`` is not a mapping.

    Reference:
      Kornblith et al. (2019), "Similarity of Neural Network Representations Revisited";
      Raghu, Gilmer, Yosinski & Sohl-Dickstein (2017), "SVCCA", for layer-by-layer maps.

    Example:
      >>> rng = np.random.default_rng(0)
      >>> feats = {"stem": rng.normal(size=(64, 4, 4, 8)), "pre_logits": rng.normal(size=(64, 32))}
      >>> m = cka_matrix(feats, feats)
      >>> m.values.shape, m.rows
      ((2, 2), ('stem', 'pre_logits'))
    """
    if kernel not in _KERNELS:
        raise ValueError(f"kernel must be one of {_KERNELS}, got {kernel!r}")
    if kernel == "rbf":
        _check_threshold(threshold)
    layers_a = _layer_features(features_a, "features_a", debiased=debiased)
    same = features_b is features_a
    layers_b = layers_a if same else _layer_features(features_b, "features_b", debiased=debiased)
    ref_name, ref = layers_a[0]
    for name, value in layers_a[1:] + ([] if same else layers_b):
        check_same_rows(
            ref,
            value,
            (ref_name, name),
            why="CKA compares representations of the same inputs, so every layer needs the "
            "same number of rows",
        )
    arrays = [v for _, v in layers_a] + ([] if same else [v for _, v in layers_b])
    traced = is_traced(*arrays)
    xp, dtype = (jnp, _traced_dtype(*arrays)) if traced else (np, np.dtype(np.float64))
    options = dict(kernel=kernel, threshold=threshold, debiased=debiased, xp=xp, dtype=dtype)
    grams_a = _stacked_grams(layers_a, **options)
    grams_b = grams_a if same else _stacked_grams(layers_b, **options)
    values = _clip(grams_a @ grams_b.T, debiased=debiased, xp=xp)
    if xp is np:
        values.flags.writeable = False
    return CKAMatrix(values=values, rows=tuple(features_a), cols=tuple(features_b))
