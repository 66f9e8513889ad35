"""Frechet distance between Gaussian fits of two feature sets (FID), and streaming statistics.

FID (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
Equilibrium") is the Frechet (2-Wasserstein) distance between N(mu1, S1) and N(mu2, S2):

    FD = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2}).

Numerics policy:
  * Statistics (``FeatureStats``) are float64 moments about a reference point (the first
    batch's mean), merged with the pairwise update, so a common offset of the features costs
    no digits: the covariance of data offset by 1e6 times its spread matches ``np.cov`` to
    ~1e-13 (raw moments, S - n mu mu^T, lose ~2 log10(offset / spread) digits: 1e-3 there).
    ``fid`` centres the same way.
  * tr((S1 S2)^{1/2}) never uses ``scipy.linalg.sqrtm`` (slow, and complex output with
    rounding garbage in its imaginary part for singular S). Each covariance is factored,
    S = C C^T: by Cholesky when both are positive definite (the usual case for n > d), else
    both by pivoted Cholesky, C of numerical rank r (LAPACK ``dpstrf`` stops once every
    remaining pivot is <= d * u * max diag S, i.e. at the rounding level of S itself). Then:
      - if one of the two has full rank, the eigenvalues of the other's C^T S C (symmetric PSD,
        r x r) are the non-zero eigenvalues of S1 S2; rounding negatives are clamped at 0 and
        nothing else is dropped, so small true eigenvalues count (relative error ~1e-14 at
        d = 512 with eigenvalues of S1 S2 spanning 1e14, where a d * eps * lambda_max floor
        lost 1e-8);
      - if both are rank-deficient (n <= d, dead units), tr((S1 S2)^{1/2}) = ||C1^T C2||_*,
        the sum of singular values, which carries no sqrt(rounding noise) from exact zero
        eigenvalues.
  * When a set has fewer samples than dimensions (n <= d: its covariance is singular), ``fid``
    uses the exact sample form tr((S1 S2)^{1/2}) = ||A1 A2^T||_* (nuclear norm) with
    A = (features - mean) / sqrt(n - 1), an SVD of an n1 x n2 matrix: exact and real. It still
    warns (``FIDRankWarning``; ``fid_details`` adds both ranks): n < d makes FID strongly
    biased upwards, so such values are only comparable between runs with the same n.
  * ``fid`` computes no ranks. ``fid_details`` reads them off the pivoted Cholesky factors
    (n > d; computed for the ranks alone, at about half the cost of the two ``eigvalsh`` calls
    they replace, when plain Cholesky sufficed for the value) or off the singular values of A
    (n <= d).
  * All of this runs in float64 on the host. Inside a user's ``jax.jit`` the same formulas run
    in ``jax.numpy`` at the widest float JAX allows (float32 unless x64 is enabled), with an
    eigendecomposition factor of S1 (eigenvalues clamped at 0) in place of pivoted Cholesky.
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

    The moments are kept about a reference point ``shift`` (the mean of the first batch seen):
    ``sum`` and ``outer_sum`` are sums of ``x - shift`` and of its outer products. Raw moments
    (``shift`` = 0) lose about 2 log10(|mean| / spread) digits of the covariance to
    cancellation (all of them at a common offset 1e8 times the spread); shifted moments lose
    only 2 log10(|mean - shift| / spread), about nothing, since a batch mean is within a few
    spreads of the data mean. ``merge`` re-expresses the other operand's moments about this
    one's shift with the pairwise (Chan, Golub & LeVeque 1979) update, which adds only
    non-negative terms to the centred scatter.

    Attributes:
      count: number of feature vectors seen.
      sum: float64 array ``[d]``, sum of ``x - shift``.
      outer_sum: float64 array ``[d, d]``, sum of the outer products ``(x - shift)(x - shift)^T``.
      shift: float64 array ``[d]``, the reference point (zeros when omitted: ``sum`` and
        ``outer_sum`` are then raw moments, the meaning they had before ``shift`` existed).

    Example:
      >>> stats = FeatureStats.empty(2048)
      >>> for batch in batches:                      # doctest: +SKIP
      ...     stats = stats.update(batch)
      >>> mu, sigma = stats.mean(), stats.cov()     # doctest: +SKIP
    """

    count: int
    sum: np.ndarray
    outer_sum: np.ndarray
    shift: np.ndarray | None = None

    def __post_init__(self):
        s = np.asarray(self.sum, np.float64)
        o = np.asarray(self.outer_sum, np.float64)
        if s.ndim != 1 or o.shape != (s.shape[0], s.shape[0]):
            raise ValueError(
                f"FeatureStats needs sum [d] and outer_sum [d, d], got {s.shape} and {o.shape}"
            )
        shift = np.zeros_like(s) if self.shift is None else np.asarray(self.shift, np.float64)
        if shift.shape != s.shape:
            raise ValueError(
                f"FeatureStats shift must have shape [d] = {s.shape} like sum, got {shift.shape}"
            )
        if int(self.count) < 0:
            raise ValueError(f"FeatureStats count must be >= 0, got {self.count}")
        object.__setattr__(self, "count", int(self.count))
        object.__setattr__(self, "sum", s)
        object.__setattr__(self, "outer_sum", o)
        object.__setattr__(self, "shift", shift)

    @property
    def dim(self) -> int:
        return int(self.sum.shape[0])

    @classmethod
    def empty(cls, dim: int) -> FeatureStats:
        """Statistics of no samples in ``dim`` dimensions (the identity of ``merge``)."""
        return cls(0, np.zeros(dim), np.zeros((dim, dim)))

    @classmethod
    def from_features(cls, x) -> FeatureStats:
        """Statistics of ``x``: float array ``[n, d]`` (n >= 1; rows with NaN/inf rejected).

        Moments are taken about the batch mean; ``sum`` keeps the (rounding-level) residual, so
        ``cov`` is the corrected two-pass formula.
        """
        x = np.asarray(as_features(x, "features", min_rows=1), np.float64)
        shift = x.mean(axis=0)
        z = x - shift
        return cls(x.shape[0], z.sum(axis=0), z.T @ z, shift)

    def update(self, x) -> FeatureStats:
        """Returns the statistics of the samples seen so far plus the rows of ``x``."""
        return self.merge(FeatureStats.from_features(x))

    def merge(self, other: FeatureStats) -> FeatureStats:
        """Combines statistics of disjoint sample sets (associative and commutative up to
        rounding; the result keeps the shift of the first non-empty operand)."""
        if self.dim != other.dim:
            raise ValueError(
                f"cannot merge FeatureStats of dimension {self.dim} with dimension {other.dim}"
            )
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        n_a, n_b = self.count, other.count
        n = n_a + n_b
        m_a, m_b = self.sum / n_a, other.sum / n_b  # means relative to each shift
        # Centred scatter of each part, then Chan's update with delta = mean_b - mean_a.
        scatter_a = self.outer_sum - n_a * np.outer(m_a, m_a)
        scatter_b = other.outer_sum - n_b * np.outer(m_b, m_b)
        delta = (other.shift - self.shift) + (m_b - m_a)
        scatter = scatter_a + scatter_b + (n_a * n_b / n) * np.outer(delta, delta)
        m = m_a + (n_b / n) * delta  # merged mean relative to self.shift
        return FeatureStats(n, n * m, scatter + n * np.outer(m, m), self.shift)

    def merge_across(self, share) -> FeatureStats:
        """Every process's statistics merged, in process order (a ``jax.distributed`` run
        where each process saw some of the rows): the same result on every process.

        Args:
          share: ``featsim.parallel.process_share()``, or any object whose
            ``exchange(stats)`` returns every process's ``stats`` in process order.

        Example::

            share = featsim.parallel.process_share()
            local = FeatureStats.from_features(my_rows)        # this process's rows
            mu, sigma = local.merge_across(share).mean(), ...  # of all rows
        """
        merged = FeatureStats.empty(self.dim)
        for part in share.exchange(self):
            merged = merged.merge(part)
        return merged

    def mean(self) -> np.ndarray:
        """float64 ``[d]`` sample mean."""
        if self.count < 1:
            raise ValueError("mean of FeatureStats with count 0 is undefined")
        return self.shift + self.sum / self.count

    def cov(self) -> np.ndarray:
        """float64 ``[d, d]`` unbiased sample covariance (divides by n - 1)."""
        if self.count < 2:
            raise ValueError(f"covariance needs at least 2 samples, got count={self.count}")
        m = self.sum / self.count
        c = (self.outer_sum - self.count * np.outer(m, m)) / (self.count - 1)
        return 0.5 * (c + c.T)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays for ``np.savez``; inverse of ``from_arrays``."""
        return {"count": np.asarray(self.count), "sum": self.sum, "outer_sum": self.outer_sum,
                "shift": self.shift}

    @classmethod
    def from_arrays(cls, arrays) -> FeatureStats:
        """Inverse of ``to_arrays``; arrays saved without ``shift`` (raw moments) load too."""
        shift = arrays["shift"] if "shift" in arrays else None
        return cls(int(arrays["count"]), arrays["sum"], arrays["outer_sum"], shift)


# --------------------------------------------------------------------------------------------
# Kernels, written once against an array namespace (NumPy float64 on host, jnp when traced).
# --------------------------------------------------------------------------------------------


def _noise_floor(xp, values, dim):
    eps = xp.finfo(values.dtype).eps
    return dim * eps * xp.maximum(xp.max(xp.abs(values)), xp.finfo(values.dtype).tiny)


def _psd_factor(sigma, what: str | None = None):
    """Host: C [d, r] with C C^T = sigma, r its numerical rank, by pivoted Cholesky (LAPACK
    ``dpstrf``, which stops when every remaining pivot is <= d * u * max(diag sigma)).

    A full-rank sigma gets its exact Cholesky factor (up to a permutation); a singular one gets
    a factor of its range, with no sqrt(rounding noise) columns. With ``what`` (user-supplied
    covariances) the remainder sigma - C C^T is checked: an eigenvalue clearly below 0 raises.
    """
    d = sigma.shape[0]
    c, piv, rank, info = scipy.linalg.lapack.dpstrf(sigma, lower=1, tol=-1.0)
    if info < 0:
        raise ValueError(f"dpstrf rejected argument {-info} (sigma shape {sigma.shape})")
    rank = int(rank)
    factor = np.zeros((d, rank))
    factor[piv - 1] = np.tril(c)[:, :rank]
    if what is not None and rank < d:
        rest = np.sort(piv[rank:] - 1)
        remainder = sigma[np.ix_(rest, rest)] - factor[rest] @ factor[rest].T
        _check_psd(np.linalg.eigvalsh(remainder), what, scale=float(np.max(np.diag(sigma))))
    return factor, rank


def _factor_pair(sigma1, sigma2, *, check: bool):
    """Host: factors (C1, C2) of both covariances and their ranks (None when not computed).

    Plain Cholesky first (the usual case for n > d; success proves positive definiteness and
    costs ~40% of a pivoted one); if either fails, pivoted Cholesky of both (``_psd_factor``,
    which with ``check`` also verifies positive semi-definiteness).
    """
    try:
        c1 = scipy.linalg.cholesky(sigma1, lower=True, check_finite=False)
        c2 = scipy.linalg.cholesky(sigma2, lower=True, check_finite=False)
        return c1, None, c2, None
    except np.linalg.LinAlgError:
        pass
    c1, rank1 = _psd_factor(sigma1, "sigma1" if check else None)
    c2, rank2 = _psd_factor(sigma2, "sigma2" if check else None)
    return c1, rank1, c2, rank2


def _trace_sqrt_factored(c1, sigma1, c2, sigma2, what: str | None = None):
    """Host: tr((S1 S2)^{1/2}) from factors S_k = C_k C_k^T of ranks r1 <= ... (see below).

    If one covariance has full rank d, the other's factor C (rank r) gives the r x r symmetric
    PSD matrix C^T S C whose eigenvalues are the non-zero eigenvalues of S1 S2; negative
    rounding values are clamped at 0 (no floor: a small true eigenvalue is kept). If both are
    rank-deficient, C^T S C could have exact zero eigenvalues whose rounding noise would add
    sqrt(noise); the singular values of C1^T C2 (squares: the eigenvalues of S1 S2) avoid it.
    """
    d = sigma1.shape[0]
    r1, r2 = c1.shape[1], c2.shape[1]
    if min(r1, r2) == 0:
        return 0.0
    if max(r1, r2) == d:
        c, s = (c1, sigma2) if r1 <= r2 else (c2, sigma1)
        ev = np.linalg.eigvalsh(c.T @ s @ c)  # reads one triangle; symmetric up to rounding
        if what is not None:
            _check_psd(ev, what)
        return float(np.sum(np.sqrt(np.maximum(ev, 0.0))))
    return float(np.sum(scipy.linalg.svdvals(c1.T @ c2)))


def _trace_sqrt_traced(sigma1, sigma2):
    """Traced (jnp): tr((S1 S2)^{1/2}) via C = V diag(sqrt(max(w, 0))) from eigh(S1) and the
    eigenvalues of C^T S2 C clamped at 0."""
    w1, v1 = jnp.linalg.eigh(sigma1)
    c = v1 * jnp.sqrt(jnp.maximum(w1, 0.0))[None, :]
    ev = jnp.linalg.eigvalsh(c.T @ sigma2 @ c)
    return jnp.sum(jnp.sqrt(jnp.maximum(ev, 0.0)))


def _check_psd(values, what: str, scale: float | None = None) -> None:
    values = np.asarray(values)
    if not values.size:
        return
    if scale is None:
        scale = float(np.max(np.abs(values)))
    if values[0] < -1e-6 * max(scale, 1e-300):
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
      inside ``jax.jit``), computed from Cholesky factors (see module docstring).

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
    diff = mu1 - mu2
    if traced:
        tr1, tr2 = jnp.trace(sigma1), jnp.trace(sigma2)
        value = jnp.sum(diff * diff) + tr1 + tr2 - 2.0 * _trace_sqrt_traced(sigma1, sigma2)
        return _finish(value, tr1 + tr2, True)
    c1, _, c2, _ = _factor_pair(sigma1, sigma2, check=True)
    trace_sqrt = _trace_sqrt_factored(
        c1, sigma1, c2, sigma2, "sigma2 (seen through a factor of sigma1) or sigma1"
    )
    tr1, tr2 = float(np.trace(sigma1)), float(np.trace(sigma2))
    value = float(diff @ diff) + tr1 + tr2 - 2.0 * trace_sqrt
    return _finish(value, tr1 + tr2, False)


class FIDResult(NamedTuple):
    """FID with what is needed to judge it.

    Attributes:
      value: the Frechet distance.
      n1, n2: sample counts; dim: feature dimension.
      rank1, rank2: numerical ranks of the two sample covariances (<= min(n - 1, d)): pivoted
        Cholesky ranks for n > d, singular values of the centred data above
        max(n, d) * eps * max for n <= d.
      method: "eigh" (covariance form: Cholesky factors, eigenvalues of C^T S C) or "nuclear"
        (exact sample form for n <= d).
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
    return _fid_host(x, y, with_ranks=True)


def _fid_host(x, y, *, with_ranks: bool) -> FIDResult:
    """Checked concrete x [n1, d], y [n2, d] -> FIDResult (ranks -1 unless ``with_ranks``)."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    (n1, d), n2 = x.shape, y.shape[0]
    rank1 = rank2 = -1
    if min(n1, n2) <= d:
        trace_sqrt, tr1, tr2, a1, a2 = _trace_sqrt_from_samples(np, x, y)
        if with_ranks:
            s1 = np.linalg.svd(a1, compute_uv=False) ** 2
            s2 = np.linalg.svd(a2, compute_uv=False) ** 2
            rank1, rank2 = _rank(np, s1, max(n1, d)), _rank(np, s2, max(n2, d))
            _warn_rank(n1, n2, d, rank1, rank2, stacklevel=4)
        else:
            _warn_rank(n1, n2, d, stacklevel=4)
        method = "nuclear"
        diff = x.mean(axis=0) - y.mean(axis=0)
    else:
        # Centred moments (FeatureStats shifts by the mean): a common offset costs no digits.
        stats1, stats2 = FeatureStats.from_features(x), FeatureStats.from_features(y)
        s1, s2 = stats1.cov(), stats2.cov()
        c1, rank1, c2, rank2 = _factor_pair(s1, s2, check=False)
        trace_sqrt = _trace_sqrt_factored(c1, s1, c2, s2)
        if with_ranks and rank1 is None:
            # Plain Cholesky succeeded; the numerical ranks (<= d) come from pivoted Cholesky,
            # about half the price of the eigvalsh calls they replace.
            rank1, rank2 = _psd_factor(s1)[1], _psd_factor(s2)[1]
        tr1, tr2 = float(np.trace(s1)), float(np.trace(s2))
        method = "eigh"
        diff = stats1.mean() - stats2.mean()
    value = float(diff @ diff) + tr1 + tr2 - 2.0 * trace_sqrt
    return FIDResult(_finish(value, tr1 + tr2, False), n1, n2, d, rank1, rank2, method)


def _warn_rank(n1, n2, d, rank1=None, rank2=None, *, stacklevel=3):
    ranks = "" if rank1 is None else f" (covariance ranks {rank1} and {rank2})"
    warnings.warn(
        FIDRankWarning(
            f"FID with n1={n1}, n2={n2} samples in d={d} dimensions: a covariance with n <= d "
            f"is singular{ranks}, and FID is biased upwards strongly at small n. The value is "
            f"computed exactly, but compare it only with FIDs at the same n."
        ),
        stacklevel=stacklevel,
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
        return _fid_host(x, y, with_ranks=False).value
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
        trace_sqrt = _trace_sqrt_traced(s1, s2)
        tr1, tr2 = jnp.trace(s1), jnp.trace(s2)
    diff = x.mean(axis=0) - y.mean(axis=0)
    return _finish(jnp.sum(diff * diff) + tr1 + tr2 - 2.0 * trace_sqrt, tr1 + tr2, True)
