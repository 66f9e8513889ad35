"""Bootstrap confidence intervals and permutation tests for any two-set metric.

Both functions take a metric ``fn(x, y) -> float`` (average distance, energy distance, FID, KID
mean, CKA, ...) and two feature sets, and resample **rows**. They are thin wrappers around
``scipy.stats.bootstrap`` (Efron & Tibshirani 1993, "An Introduction to the Bootstrap",
ch. 13-14 for the percentile, basic and BCa intervals) and ``scipy.stats.permutation_test``
(Phipson & Smyth 2010, "Permutation p-values should never be zero", Stat. Appl. Genet. Mol.
Biol. 9(1):39): SciPy resamples 1-D arrays of row *indices* and the statistic indexes into
``x`` and ``y``, so ``fn`` always sees whole feature matrices.

Choosing ``paired``:
  * ``paired=False`` (distances between two feature sets: average distance, energy distance,
    FID, KID): the rows of x and of y are independent samples, possibly of different sizes.
  * ``paired=True`` (CKA and other comparisons of two representations of the *same* inputs):
    row i of x and row i of y describe the same image and must stay together (bootstrap), or
    the test asks whether that pairing matters (permutation).

Numerics and cost policy:
  * ``fn`` runs on the host once per resample (``vectorized=False``), on NumPy arrays gathered
    with the resampled indices; its exceptions propagate unchanged. It must return one number
    (a Python/NumPy float or a 0-d array); the results are stored as float64.
  * Resamples are drawn in batches so the index arrays stay under ``_INDEX_BYTES``; the batch
    size depends only on the row counts, so results are deterministic for a seed and the
    input shapes.
  * A NaN/inf from ``fn`` is never silent: a ``UserWarning`` counts the non-finite values and
    the affected interval endpoints come back NaN.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import numbers
import warnings
from collections.abc import Callable

import numpy as np
import scipy.stats

from featsim.metrics._validation import as_features, check_same_dim, check_same_rows

__all__ = [
    "ALTERNATIVES",
    "BOOTSTRAP_METHODS",
    "BootstrapResult",
    "PermutationResult",
    "bootstrap_ci",
    "permutation_test",
]

BOOTSTRAP_METHODS = ("percentile", "basic", "BCa")
ALTERNATIVES = ("greater", "less", "two-sided")

# Upper bound on the int64 index arrays SciPy holds per batch of resamples.
_INDEX_BYTES = 64 * 2**20

Metric = Callable[[np.ndarray, np.ndarray], float]


@dataclasses.dataclass(frozen=True, eq=False)
class BootstrapResult:
    """Result of :func:`bootstrap_ci`.

    Attributes:
      estimate: ``fn(x, y)`` on the original data.
      low: lower end of the two-sided confidence interval.
      high: upper end of the two-sided confidence interval.
      std: bootstrap standard error, the standard deviation (``ddof=1``, as SciPy's
        ``standard_error``) of ``distribution``.
      confidence: confidence level of ``[low, high]``, in (0, 1).
      n_resamples: number of bootstrap resamples.
      method: ``"percentile"``, ``"basic"`` or ``"BCa"``.
      distribution: float64 array of shape ``[n_resamples]``, ``fn`` on each resample.
    """

    estimate: float
    low: float
    high: float
    std: float
    confidence: float
    n_resamples: int
    method: str
    distribution: np.ndarray = dataclasses.field(repr=False)


@dataclasses.dataclass(frozen=True, eq=False)
class PermutationResult:
    """Result of :func:`permutation_test`.

    Attributes:
      statistic: ``fn(x, y)`` on the original data (for ``paired=False`` on x and y promoted
        to a common dtype).
      pvalue: p-value for ``alternative``; ``(k + 1) / (n_permutations + 1)`` for a randomised
        test, ``k / n_permutations`` for an exact one (see :func:`permutation_test`).
      null_distribution: float64 array of shape ``[n_permutations]``, ``fn`` on each
        permutation.
      n_permutations: permutations evaluated (all distinct ones when ``exact``).
      alternative: ``"greater"``, ``"less"`` or ``"two-sided"``.
      exact: True when every distinct permutation was enumerated instead of sampled.
    """

    statistic: float
    pvalue: float
    null_distribution: np.ndarray = dataclasses.field(repr=False)
    n_permutations: int
    alternative: str
    exact: bool


# --------------------------------------------------------------------------------------------
# Public API.
# --------------------------------------------------------------------------------------------


def bootstrap_ci(
    fn: Metric,
    x,
    y,
    *,
    n_resamples: int = 1000,
    seed=0,
    confidence: float = 0.95,
    paired: bool = False,
    method: str = "percentile",
) -> BootstrapResult:
    """Bootstrap confidence interval of a two-set metric ``fn(x, y)``.

    ``paired=False``: the rows of ``x`` and the rows of ``y`` are resampled with replacement,
    independently (two-sample bootstrap; n and m may differ). ``paired=True``: one set of row
    indices, drawn with replacement, is applied to both, keeping row i of x with row i of y
    (needed for CKA, which compares two representations of the same inputs).

    Methods (``scipy.stats.bootstrap``; Efron & Tibshirani 1993):
      * ``"percentile"``: the ``(1 -/+ confidence) / 2`` quantiles of ``distribution``
        (``np.quantile``, linear interpolation).
      * ``"basic"``: ``2 estimate - `` those quantiles (reverse percentile).
      * ``"BCa"``: bias-corrected and accelerated percentile; the acceleration needs a
        jackknife, i.e. ``n + m`` extra evaluations of ``fn`` unpaired (``n`` paired) on
        leave-one-row-out data, on top of the ``n_resamples``. It is NaN (with a warning) when
        the bootstrap distribution is degenerate.

    Cost: ``n_resamples + 1`` calls of ``fn`` (plus one more for ``"basic"`` and BCa, plus
    the jackknife for BCa). Note that duplicated rows from resampling can make
    covariance-based metrics (FID) singular for small n.

    Args:
      fn: metric ``fn(x, y) -> float`` on feature matrices ``[n', d]`` and ``[m', d]``.
      x: float array of shape ``[n, d]``, n >= 2.
      y: float array of shape ``[m, d']``, m >= 2 (``m == n`` when ``paired``). The feature
        dimensions are not checked here (CKA compares representations of different widths);
        ``fn`` checks what it needs.
      n_resamples: integer >= 1, number of bootstrap resamples.
      seed: seed for ``np.random.default_rng``; results are deterministic for a seed.
      confidence: confidence level in (0, 1).
      paired: resample the same row indices for x and y.
      method: one of ``BOOTSTRAP_METHODS`` (case-insensitive).

    Returns:
      A :class:`BootstrapResult` ``(estimate, low, high, std, confidence, n_resamples,
      method, distribution)``.

    Raises:
      ValueError: invalid x or y (see ``as_features``), ``paired`` with different row
        counts, ``n_resamples < 1``, ``confidence`` outside (0, 1), or an unknown ``method``.
      TypeError: ``fn`` returned something that is not a single number.
      Exception: whatever ``fn`` raises, unchanged.

    Example:
      >>> rng = np.random.default_rng(0)
      >>> x, y = rng.normal(size=(100, 4)), rng.normal(0.5, size=(80, 4))
      >>> mean_gap = lambda a, b: float(np.linalg.norm(a.mean(0) - b.mean(0)))
      >>> res = bootstrap_ci(mean_gap, x, y, n_resamples=200)
      >>> bool(res.low < res.estimate < res.high)
      True
    """
    x, y = _check_sets(x, y, paired=paired, pooled=False)
    n_resamples = _check_count(n_resamples, "n_resamples")
    confidence = _check_confidence(confidence)
    method = _check_choice(method, "method", BOOTSTRAP_METHODS)

    estimate = _scalar(fn(x, y))
    n, m = x.shape[0], y.shape[0]
    if paired:

        def statistic(i):
            return _scalar(fn(x[i], y[i]))

        data = (np.arange(n),)
    else:

        def statistic(i, j):
            return _scalar(fn(x[i], y[j]))

        data = (np.arange(n), np.arange(m))

    with warnings.catch_warnings():
        # SciPy's own messages on a NaN interval (a BCa-specific text whatever the method, a
        # 0/0 in the acceleration) are replaced by the more specific warnings below.
        warnings.simplefilter("ignore", scipy.stats.DegenerateDataWarning)
        warnings.filterwarnings(
            "ignore", category=RuntimeWarning, module=r"scipy\.stats\._resampling"
        )
        res = scipy.stats.bootstrap(
            data,
            statistic,
            n_resamples=n_resamples,
            batch=_batch_size(n_resamples, n if paired else n + m),
            vectorized=False,
            paired=False,  # pairing is already encoded by the single index sample
            confidence_level=confidence,
            method=method.lower(),
            **_rng_kwarg(scipy.stats.bootstrap, seed),
        )
    distribution = np.asarray(res.bootstrap_distribution, dtype=np.float64)
    low = float(res.confidence_interval.low)
    high = float(res.confidence_interval.high)
    bad = _count_non_finite(distribution)
    if bad:
        warnings.warn(
            f"fn returned NaN or inf on {bad} of {n_resamples} bootstrap resamples; the "
            "interval and std computed from them are not finite",
            UserWarning,
            stacklevel=2,
        )
    elif not (math.isfinite(low) and math.isfinite(high)):
        warnings.warn(
            f"the {method} interval is NaN: the bootstrap distribution is degenerate "
            "(e.g. fn is constant on the resamples); try method='percentile'",
            UserWarning,
            stacklevel=2,
        )
    return BootstrapResult(
        estimate=estimate,
        low=low,
        high=high,
        std=float(res.standard_error),
        confidence=confidence,
        n_resamples=n_resamples,
        method=method,
        distribution=distribution,
    )


def permutation_test(
    fn: Metric,
    x,
    y,
    *,
    n_permutations: int = 1000,
    seed=0,
    alternative: str = "greater",
    paired: bool = False,
) -> PermutationResult:
    """Permutation test of a two-set metric ``fn(x, y)``.

    ``paired=False`` ("independent" permutations): the rows of x and y are pooled and split at
    random into sets of the original sizes n and m. Null hypothesis: x and y are samples of the
    same distribution. With a distance as ``fn`` and ``alternative="greater"``, a small p-value
    says the observed distance is larger than relabelling the rows produces by chance. x and y
    must have the same feature dimension.

    ``paired=True`` (``permutation_type="pairings"``): the rows of y are shuffled against the
    rows of x. Null hypothesis: the pairing of row i of x with row i of y carries no
    information. Use it for CKA (is the similarity of two representations of the same inputs
    larger than for unrelated inputs?).

    p-values (``scipy.stats.permutation_test``): with ``k`` the number of null values at least
    as extreme as the observed statistic (within a relative 100 eps tolerance),

      * randomised test (``n_permutations`` below the number of distinct permutations):
        ``p = (k + 1) / (n_permutations + 1)``, counting the observed arrangement once
        (Phipson & Smyth 2010), so ``p >= 1 / (n_permutations + 1)`` and the test is valid;
      * exact test (``n_permutations`` >= the number of distinct permutations,
        ``comb(n + m, n)`` unpaired or ``n!`` paired): every permutation is enumerated,
        the observed one among them, and ``p = k / n_distinct``; ``exact`` is then True;
      * ``"two-sided"``: twice the smaller one-sided p-value, clipped to 1.

    Cost: ``n_permutations + 1`` calls of ``fn``.

    Args:
      fn: metric ``fn(x, y) -> float`` on feature matrices ``[n, d]`` and ``[m, d']``.
      x: float array of shape ``[n, d]``, n >= 2.
      y: float array of shape ``[m, d]`` (unpaired: same d) or ``[n, d']`` (paired), m >= 2.
      n_permutations: integer >= 1, number of random permutations.
      seed: seed for ``np.random.default_rng``; results are deterministic for a seed.
      alternative: one of ``ALTERNATIVES``: ``"greater"`` (the observed statistic is larger
        than under the null), ``"less"`` or ``"two-sided"``.
      paired: permute the pairing of rows instead of the assignment of rows to sets.

    Returns:
      A :class:`PermutationResult` ``(statistic, pvalue, null_distribution, n_permutations,
      alternative, exact)``.

    Raises:
      ValueError: invalid x or y (see ``as_features``), different feature dimensions
        (unpaired), different row counts (paired), ``n_permutations < 1``, or an unknown
        ``alternative``.
      TypeError: ``fn`` returned something that is not a single number.
      Exception: whatever ``fn`` raises, unchanged.

    Example:
      >>> rng = np.random.default_rng(0)
      >>> x, y = rng.normal(size=(30, 4)), rng.normal(2.0, size=(30, 4))
      >>> mean_gap = lambda a, b: float(np.linalg.norm(a.mean(0) - b.mean(0)))
      >>> permutation_test(mean_gap, x, y, n_permutations=99).pvalue
      0.01
    """
    x, y = _check_sets(x, y, paired=paired, pooled=not paired)
    n_permutations = _check_count(n_permutations, "n_permutations")
    alternative = _check_choice(alternative, "alternative", ALTERNATIVES)

    n, m = x.shape[0], y.shape[0]
    if paired:

        def statistic(j):
            return _scalar(fn(x, y[j]))

        data = (np.arange(n),)
        permutation_type = "pairings"
    else:
        z = np.concatenate([x, y])

        def statistic(i, j):
            return _scalar(fn(z[i], z[j]))

        data = (np.arange(n), np.arange(n, n + m))
        permutation_type = "independent"

    res = scipy.stats.permutation_test(
        data,
        statistic,
        permutation_type=permutation_type,
        vectorized=False,
        n_resamples=n_permutations,
        batch=_batch_size(n_permutations, n + m),
        alternative=alternative,
        **_rng_kwarg(scipy.stats.permutation_test, seed),
    )
    null = np.asarray(res.null_distribution, dtype=np.float64)
    statistic_value, pvalue = float(res.statistic), float(res.pvalue)
    if math.isnan(statistic_value):
        # SciPy would count no null value as extreme and report the smallest p-value.
        warnings.warn(
            "fn returned NaN on the original data; the p-value is NaN", UserWarning, stacklevel=2
        )
        pvalue = math.nan
    elif np.isnan(null).any():
        warnings.warn(
            f"fn returned NaN on {int(np.isnan(null).sum())} of {null.shape[0]} permutations; "
            "they count as not extreme, so the p-value may be too small",
            UserWarning,
            stacklevel=2,
        )
    return PermutationResult(
        statistic=statistic_value,
        pvalue=pvalue,
        null_distribution=null,
        n_permutations=int(null.shape[0]),
        alternative=alternative,
        exact=_n_distinct_at_most(n, m, paired, n_permutations) is not None,
    )


# --------------------------------------------------------------------------------------------
# Private helpers.
# --------------------------------------------------------------------------------------------


def _check_sets(x, y, *, paired: bool, pooled: bool):
    x = as_features(x, "x")
    y = as_features(y, "y")
    if paired:
        check_same_rows(x, y, why="paired=True needs one row of y per row of x")
    if pooled:
        check_same_dim(x, y)
    return x, y


def _check_count(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def _check_confidence(value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"confidence must be a number in (0, 1), got {value!r}")
    if not 0.0 < value < 1.0:
        raise ValueError(f"confidence must be in (0, 1) (exclusive), got {value}")
    return float(value)


def _check_choice(value, name: str, choices: tuple[str, ...]) -> str:
    if isinstance(value, str):
        for choice in choices:
            if value.lower() == choice.lower():
                return choice
    raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def _scalar(value) -> float:
    """fn's result as a Python float; TypeError unless it is exactly one number."""
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"fn must return a single number, got {type(value).__name__} "
            "(for kid use e.g. `lambda x, y: kid(x, y).mean`)"
        ) from err
    if arr.ndim != 0:
        raise TypeError(f"fn must return a single number, got an array of shape {arr.shape}")
    return float(arr)


def _batch_size(n_resamples: int, n_indices: int) -> int:
    # SciPy holds a [batch, n_indices] int64 index array (and a copy while splitting it).
    return max(1, min(n_resamples, _INDEX_BYTES // (16 * n_indices)))


def _rng_kwarg(scipy_fn, seed) -> dict:
    """SciPy >= 1.15 takes ``rng``; older versions only ``random_state`` (same Generator)."""
    name = "rng" if "rng" in inspect.signature(scipy_fn).parameters else "random_state"
    return {name: np.random.default_rng(seed)}


def _n_distinct_at_most(n: int, m: int, paired: bool, limit: int) -> int | None:
    """Number of distinct permutations (``n!`` or ``comb(n + m, n)``) if <= limit, else None.

    SciPy enumerates them all (an exact test) exactly when ``n_resamples`` reaches this number.
    Computed incrementally: the full number has ~n log n digits for large n.
    """
    count = 1
    if paired:
        for k in range(2, n + 1):
            count *= k
            if count > limit:
                return None
        return count
    k_max = min(n, m)
    for k in range(1, k_max + 1):
        count = count * (n + m - k_max + k) // k  # comb(n + m - k_max + k, k), increasing
        if count > limit:
            return None
    return count


def _count_non_finite(values: np.ndarray) -> int:
    return int(np.count_nonzero(~np.isfinite(values)))
