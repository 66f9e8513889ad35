"""Frechet distance between Gaussian fits of two feature sets (FID), and streaming statistics.

FID (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
Equilibrium") is the Frechet (2-Wasserstein) distance between N(mu1, S1) and N(mu2, S2):

    FD = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2}).

Numerics policy:
  * Statistics (``FeatureStats``) are float64 sums (count, sum, sum of outer products); merging
    is addition, so any merge order equals one pass up to float64 rounding. The covariance
    (S - n mu mu^T) / (n - 1) loses about log10(|mu|^2 / var) digits to cancellation, harmless in
    float64 unless features have a mean 1e4 times larger than their spread.
  * tr((S1 S2)^{1/2}) never uses ``scipy.linalg.sqrtm`` (slow, and complex output with
    rounding garbage in its imaginary part for singular S). With any factor S1 = C C^T (the
    Cholesky factor when S1 is positive definite, else V diag(sqrt(w)) from the symmetric
    eigendecomposition with eigenvalues clamped at 0), the eigenvalues of the symmetric PSD
    matrix C^T S2 C equal those of S1 S2, so tr((S1 S2)^{1/2}) = sum sqrt(eigvalsh(C^T S2 C)).
    Eigenvalues below d * eps * max(eigenvalue) are rounding noise and count as 0 (otherwise
    each would add sqrt(noise), which dominates the error when covariances are singular). The
    price: a true eigenvalue below that floor is dropped too, so for ill-conditioned
    covariances tr((S1 S2)^{1/2}) carries an absolute error up to about
    rank * sqrt(d * eps * lambda_max(S1 S2)) (relative ~1e-8 at condition numbers ~1e7, far
    below the sampling error of FID; well-conditioned covariances agree with a float64
    ``sqrtm`` to ~1e-10, see benchmarks/metrics.py).
  * When a set has fewer samples than dimensions (n <= d: its covariance is singular), ``fid``
    uses the exact sample form tr((S1 S2)^{1/2}) = ||A1 A2^T||_* (nuclear norm) with
    A = (features - mean) / sqrt(n - 1), an SVD of an n1 x n2 matrix: exact and real. It still
    warns (``FIDRankWarning``, with both ranks): n < d makes FID strongly biased upwards, so
    such values are only comparable between runs with the same n.
  * All of this runs in float64 on the host. Inside a user's ``jax.jit`` the same formulas run
    in ``jax.numpy`` at the widest float JAX allows (float32 unless x64 is enabled).
  * Never a silent NaN: inputs are checked, negative results beyond rounding raise.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
import scipy.linalg

from featsim.metrics._validation import as_features, check_same_dim, is_traced

__all__ = [
    "FIDRankWarning",
    "FIDResult",
    "FeatureStats",
    "fid",
    "fid_details",
    "frechet_distance",
]


class FIDRankWarning(UserWarning):
    """A covariance is rank-deficient because a set has no more samples than dimensions."""


# --------------------------------------------------------------------------------------------
# Streaming statistics.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class FeatureStats:
    """Mergeable float64 sufficient statistics of a feature set (host-side, immutable).

    Attributes:
      count: number of feature vectors seen.
      sum: float64 array ``[d]``, sum of the vectors.
      outer_sum: float64 array ``[d, d]``, sum of their outer products x x^T.

    Example:
      >>> stats = FeatureStats.empty(2048)
      >>> for batch in batches:                      # doctest: +SKIP
      ...     stats = stats.update(batch)
      >>> mu, sigma = stats.mean(), stats.cov()     # doctest: +SKIP
    """

    count: int
    sum: np.ndarray
    outer_sum: np.ndarray

    def __post_init__(self):
        s = np.asarray(self.sum, np.float64)
        o = np.asarray(self.outer_sum, np.float64)
        if s.ndim != 1 or o.shape != (s.shape[0], s.shape[0]):
            raise ValueError(
                f"FeatureStats needs sum [d] and outer_sum [d, d], got {s.shape} and {o.shape}"
            )
        if int(self.count) < 0:
            raise ValueError(f"FeatureStats count must be >= 0, got {self.count}")
        object.__setattr__(self, "count", int(self.count))
        object.__setattr__(self, "sum", s)
        object.__setattr__(self, "outer_sum", o)

    @property
    def dim(self) -> int:
        return int(self.sum.shape[0])

    @classmethod
    def empty(cls, dim: int) -> FeatureStats:
        """Statistics of no samples in ``dim`` dimensions (the identity of ``merge``)."""
        return cls(0, np.zeros(dim), np.zeros((dim, dim)))

    @classmethod
    def from_features(cls, x) -> FeatureStats:
        """Statistics of ``x``: float array ``[n, d]`` (n >= 1; rows with NaN/inf rejected)."""
        x = np.asarray(as_features(x, "features", min_rows=1), np.float64)
        return cls(x.shape[0], x.sum(axis=0), x.T @ x)

    def update(self, x) -> FeatureStats:
        """Returns the statistics of the samples seen so far plus the rows of ``x``."""
        return self.merge(FeatureStats.from_features(x))

    def merge(self, other: FeatureStats) -> FeatureStats:
        """Combines statistics of disjoint sample sets (associative and commutative)."""
        if self.dim != other.dim:
            raise ValueError(
                f"cannot merge FeatureStats of dimension {self.dim} with dimension {other.dim}"
            )
        return FeatureStats(
            self.count + other.count, self.sum + other.sum, self.outer_sum + other.outer_sum
        )

    def mean(self) -> np.ndarray:
        """float64 ``[d]`` sample mean."""
        if self.count < 1:
            raise ValueError("mean of FeatureStats with count 0 is undefined")
        return self.sum / self.count

    def cov(self) -> np.ndarray:
        """float64 ``[d, d]`` unbiased sample covariance (divides by n - 1)."""
        if self.count < 2:
            raise ValueError(f"covariance needs at least 2 samples, got count={self.count}")
        mu = self.mean()
        c = (self.outer_sum - self.count * np.outer(mu, mu)) / (self.count - 1)
        return 0.5 * (c + c.T)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays for ``np.savez``; inverse of ``from_arrays``."""
        return {"count": np.asarray(self.count), "sum": self.sum, "outer_sum": self.outer_sum}

    @classmethod
    def from_arrays(cls, arrays) -> FeatureStats:
        return cls(int(arrays["count"]), arrays["sum"], arrays["outer_sum"])


# --------------------------------------------------------------------------------------------
# Kernels, written once against an array namespace (NumPy float64 on host, jnp when traced).
# --------------------------------------------------------------------------------------------


def _noise_floor(xp, values, dim):
    eps = xp.finfo(values.dtype).eps
    return dim * eps * xp.maximum(xp.max(xp.abs(values)), xp.finfo(values.dtype).tiny)


def _trace_sqrt_product(xp, sigma1, sigma2):
    """tr((S1 S2)^{1/2}) via a factor S1 = C C^T and the symmetric eigenvalues of C^T S2 C.

    On the host C is the Cholesky factor when S1 is numerically positive definite (the common
    case, ~3x cheaper than an eigendecomposition), else V diag(sqrt(w)) from ``eigh(S1)`` with
    eigenvalues below the noise floor set to 0. Returns the trace, the eigenvalues of S1 (None
    when Cholesky succeeded: S1 is then positive definite) and the raw eigenvalues of C^T S2 C
    (by Sylvester's law of inertia as many negative ones as S2 when S1 is non-singular).
    """
    d = sigma1.shape[0]
    c = None
    w1_raw = None
    if xp is np:
        try:
            c = scipy.linalg.cholesky(sigma1, lower=True, check_finite=False)
        except np.linalg.LinAlgError:
            c = None
    if c is None:
        w1_raw, v1 = xp.linalg.eigh(sigma1)
        w1 = xp.where(w1_raw > _noise_floor(xp, w1_raw, d), w1_raw, 0.0)
        c = v1 * xp.sqrt(w1)[None, :]
    m = c.T @ sigma2 @ c
    ev_raw = xp.linalg.eigvalsh(m)  # reads one triangle; m is symmetric up to rounding
    ev = xp.where(ev_raw > _noise_floor(xp, ev_raw, d), ev_raw, 0.0)
    return xp.sum(xp.sqrt(ev)), w1_raw, ev_raw


def _check_psd(values, what: str) -> None:
    if values is None:  # Cholesky succeeded: positive definite
        return
    values = np.asarray(values)
    if values.size and values[0] < -1e-6 * max(float(np.max(np.abs(values))), 1e-300):
        raise ValueError(
            f"{what} is not positive semi-definite: smallest eigenvalue {values[0]:.3e}, "
            f"largest {values[-1]:.3e}"
        )


def _trace_sqrt_from_samples(xp, x, y):
    """Exact tr((S1 S2)^{1/2}) = ||A1 A2^T||_* for sample covariances; plus tr S1, tr S2."""
    a1 = (x - x.mean(axis=0)) / np.sqrt(x.shape[0] - 1)
    a2 = (y - y.mean(axis=0)) / np.sqrt(y.shape[0] - 1)
    s = xp.linalg.svd(a1 @ a2.T, compute_uv=False)
    return xp.sum(s), xp.sum(a1 * a1), xp.sum(a2 * a2), a1, a2


def _finish(value, scale, traced):
    """Clamps rounding-level negatives to 0; larger negatives mean broken input: raise."""
    if traced:
        return jnp.maximum(value, 0.0)
    value = float(value)
    if not np.isfinite(value):
        raise FloatingPointError(f"Frechet distance evaluated to {value}")
    if value < 0:
        if value < -1e-8 * max(float(scale), 1e-300):
            raise FloatingPointError(
                f"Frechet distance evaluated to {value:.3e} (< 0 beyond rounding, scale "
                f"{float(scale):.3e}): are the covariances positive semi-definite?"
            )
        value = 0.0
    return value


def _rank(xp, values, dim):
    return int(np.sum(np.asarray(values) > np.asarray(_noise_floor(xp, values, dim))))


# --------------------------------------------------------------------------------------------
# Public API.
# --------------------------------------------------------------------------------------------


def _check_gaussian(mu, sigma, k: int):
    mu = as_features(mu, f"mu{k}", ndim=1)
    traced = is_traced(sigma)
    sigma = sigma if traced else np.asarray(sigma)
    d = mu.shape[0]
    if sigma.ndim != 2 or tuple(sigma.shape) != (d, d):
        raise ValueError(
            f"sigma{k} must have shape [d, d] = ({d}, {d}) to match mu{k}.shape == ({d},), "
            f"got shape {tuple(sigma.shape)}"
        )
    if traced:
        return mu, sigma
    sigma = np.asarray(sigma, np.float64)
    if not np.isfinite(sigma).all():
        raise ValueError(
            f"sigma{k} has {int((~np.isfinite(sigma)).sum())} NaN or inf value(s) "
            f"(shape {sigma.shape})"
        )
    asym = _max_asymmetry(sigma)
    scale = float(np.max(np.abs(sigma))) if d else 0.0
    if asym > 1e-6 * max(scale, 1e-300):
        raise ValueError(f"sigma{k} is not symmetric: max |S - S^T| = {asym:.3e} (max |S| = "
                         f"{scale:.3e})")
    # Not symmetrised: the factorisations read one triangle, and the asymmetry is negligible.
    return np.asarray(mu, np.float64), sigma


def _max_asymmetry(s, block: int = 256) -> float:
    """max |S - S^T| by blocks (a whole-matrix transpose is cache-hostile and 3x slower)."""
    worst = 0.0
    d = s.shape[0]
    for i in range(0, d, block):
        for j in range(i, d, block):
            diff = s[i : i + block, j : j + block] - s[j : j + block, i : i + block].T
            worst = max(worst, float(np.max(np.abs(diff))))
    return worst


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (the FID formula).

    Args:
      mu1, mu2: float arrays of shape ``[d]``.
      sigma1, sigma2: symmetric positive semi-definite float arrays of shape ``[d, d]``.

    Returns:
      ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2}) as a Python float (a 0-d array
      inside ``jax.jit``), computed by symmetric eigendecomposition (see module docstring).

    Raises:
      ValueError: mismatched shapes (named), NaN/inf, a non-symmetric sigma, or a sigma with
        eigenvalues clearly below 0 (not positive semi-definite).
      FloatingPointError: if the result is NaN or negative beyond rounding.

    Example:
      >>> import numpy as np
      >>> frechet_distance(np.zeros(2), np.eye(2), np.ones(2), np.eye(2))
      2.0
    """
    mu1, sigma1 = _check_gaussian(mu1, sigma1, 1)
    mu2, sigma2 = _check_gaussian(mu2, sigma2, 2)
    check_same_dim(mu1, mu2, ("mu1", "mu2"))
    traced = is_traced(mu1, sigma1, mu2, sigma2)
    xp = jnp if traced else np
    trace_sqrt, w1, ev = _trace_sqrt_product(xp, sigma1, sigma2)
    if not traced:
        _check_psd(w1, "sigma1")
        _check_psd(ev, "sigma2 (seen through sigma1^(1/2) sigma2 sigma1^(1/2))")
    diff = mu1 - mu2
    tr1, tr2 = xp.trace(sigma1), xp.trace(sigma2)
    value = xp.sum(diff * diff) + tr1 + tr2 - 2.0 * trace_sqrt
    return _finish(value, tr1 + tr2, traced)


class FIDResult(NamedTuple):
    """FID with what is needed to judge it.

    Attributes:
      value: the Frechet distance.
      n1, n2: sample counts; dim: feature dimension.
      rank1, rank2: numerical ranks of the two sample covariances (<= min(n - 1, d)).
      method: "eigh" (covariance form) or "nuclear" (exact sample form for n <= d).
    """

    value: float
    n1: int
    n2: int
    dim: int
    rank1: int
    rank2: int
    method: str


def fid_details(x, y) -> FIDResult:
    """FID between two feature sets, with sample counts, covariance ranks and method.

    Args:
      x: float array ``[n1, d]``; y: float array ``[n2, d]``; n1, n2 >= 2.

    Returns:
      ``FIDResult``. Warns ``FIDRankWarning`` when n1 <= d or n2 <= d (see module docstring).

    Raises:
      ValueError: wrong ndim, mismatched dims, fewer than 2 rows, NaN/inf rows (counted).
    """
    x = as_features(x, "x")
    y = as_features(y, "y")
    check_same_dim(x, y)
    if is_traced(x, y):
        raise ValueError("fid_details runs on concrete arrays; under jit use fid(x, y)")
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    (n1, d), n2 = x.shape, y.shape[0]
    if min(n1, n2) <= d:
        trace_sqrt, tr1, tr2, a1, a2 = _trace_sqrt_from_samples(np, x, y)
        s1 = np.linalg.svd(a1, compute_uv=False) ** 2
        s2 = np.linalg.svd(a2, compute_uv=False) ** 2
        rank1, rank2 = _rank(np, s1, max(n1, d)), _rank(np, s2, max(n2, d))
        method = "nuclear"
        _warn_rank(n1, n2, d, rank1, rank2)
    else:
        s1 = FeatureStats.from_features(x).cov()
        s2 = FeatureStats.from_features(y).cov()
        trace_sqrt, _, _ = _trace_sqrt_product(np, s1, s2)
        tr1, tr2 = np.trace(s1), np.trace(s2)
        rank1 = _rank(np, np.linalg.eigvalsh(s1), d)
        rank2 = _rank(np, np.linalg.eigvalsh(s2), d)
        method = "eigh"
    diff = x.mean(axis=0) - y.mean(axis=0)
    value = float(diff @ diff) + tr1 + tr2 - 2.0 * trace_sqrt
    return FIDResult(_finish(value, tr1 + tr2, False), n1, n2, d, rank1, rank2, method)


def _warn_rank(n1, n2, d, rank1=None, rank2=None):
    ranks = "" if rank1 is None else f" (covariance ranks {rank1} and {rank2})"
    warnings.warn(
        FIDRankWarning(
            f"FID with n1={n1}, n2={n2} samples in d={d} dimensions: a covariance with n <= d "
            f"is singular{ranks}, and FID is biased upwards strongly at small n. The value is "
            f"computed exactly, but compare it only with FIDs at the same n."
        ),
        stacklevel=3,
    )


def fid(x, y):
    """Frechet Inception Distance between two feature sets (features in, float out).

    Args:
      x: float array ``[n1, d]`` (e.g. pre-logits features of natural images).
      y: float array ``[n2, d]`` (e.g. of medical images). n1, n2 >= 2.

    Returns:
      A Python float (a 0-d array inside ``jax.jit``). Exact and real also when n <= d (see
      module docstring); warns ``FIDRankWarning`` in that case. ``fid_details`` also returns
      the covariance ranks.

    Raises:
      ValueError: wrong ndim, mismatched dims, fewer than 2 rows, NaN/inf rows (counted).

    Example:
      >>> import numpy as np
      >>> rng = np.random.default_rng(0)
      >>> x = rng.normal(size=(500, 8)); y = rng.normal(size=(500, 8)) + 1.0
      >>> 7.5 < fid(x, y) < 8.5
      True
    """
    x = as_features(x, "x")
    y = as_features(y, "y")
    check_same_dim(x, y)
    if not is_traced(x, y):
        return fid_details(x, y).value
    (n1, d), n2 = x.shape, y.shape[0]
    dtype = jnp.result_type(x.dtype, y.dtype, jnp.float32)
    x, y = x.astype(dtype), y.astype(dtype)
    if min(n1, n2) <= d:
        _warn_rank(n1, n2, d)
        trace_sqrt, tr1, tr2, _, _ = _trace_sqrt_from_samples(jnp, x, y)
    else:
        xc = x - x.mean(axis=0)
        yc = y - y.mean(axis=0)
        s1 = xc.T @ xc / (n1 - 1)
        s2 = yc.T @ yc / (n2 - 1)
        trace_sqrt, _, _ = _trace_sqrt_product(jnp, s1, s2)
        tr1, tr2 = jnp.trace(s1), jnp.trace(s2)
    diff = x.mean(axis=0) - y.mean(axis=0)
    return _finish(jnp.sum(diff * diff) + tr1 + tr2 - 2.0 * trace_sqrt, tr1 + tr2, True)
