"""Tests for featsim.metrics.stats: bootstrap intervals and permutation tests."""

from __future__ import annotations

import inspect
import itertools

import numpy as np
import pytest
import scipy.stats

from featsim.metrics.stats import (
    BootstrapResult,
    PermutationResult,
    bootstrap_ci,
    permutation_test,
)


def _mean_gap(a, b):
    """Euclidean norm of the difference of the row means."""
    return float(np.linalg.norm(a.mean(axis=0) - b.mean(axis=0)))


def _mean_diff(a, b):
    """Signed difference of the means of the first feature."""
    return float(a[:, 0].mean() - b[:, 0].mean())


def _linear_cka(a, b):
    a = a - a.mean(axis=0)
    b = b - b.mean(axis=0)
    return float(np.linalg.norm(b.T @ a) ** 2 / (np.linalg.norm(a.T @ a) * np.linalg.norm(b.T @ b)))


def _normal(seed, n, d, loc=0.0):
    return np.random.default_rng(seed).normal(loc, 1.0, size=(n, d))


def _rng_kwarg(generator):
    # SciPy >= 1.15 names it rng, older versions random_state.
    params = inspect.signature(scipy.stats.bootstrap).parameters
    return {"rng" if "rng" in params else "random_state": generator}


# --------------------------------------------------------------------------------------------
# bootstrap_ci
# --------------------------------------------------------------------------------------------


def test_bootstrap_fields_and_percentile_interval():
    x, y = _normal(0, 60, 3), _normal(1, 45, 3, loc=0.4)
    res = bootstrap_ci(_mean_gap, x, y, n_resamples=300, seed=1, confidence=0.9)
    assert isinstance(res, BootstrapResult)
    assert res.estimate == _mean_gap(x, y)
    assert (res.confidence, res.n_resamples, res.method) == (0.9, 300, "percentile")
    assert res.distribution.shape == (300,) and res.distribution.dtype == np.float64
    np.testing.assert_allclose(
        [res.low, res.high], np.quantile(res.distribution, [0.05, 0.95]), rtol=1e-12
    )
    np.testing.assert_allclose(res.std, np.std(res.distribution, ddof=1), rtol=1e-12)
    assert res.low < res.estimate < res.high


def test_bootstrap_basic_interval_reflects_percentiles():
    x, y = _normal(2, 50, 2), _normal(3, 50, 2, loc=0.3)
    res = bootstrap_ci(_mean_gap, x, y, n_resamples=200, seed=4, method="basic")
    q_low, q_high = np.quantile(res.distribution, [0.025, 0.975])
    np.testing.assert_allclose(
        [res.low, res.high], [2 * res.estimate - q_high, 2 * res.estimate - q_low], rtol=1e-12
    )


@pytest.mark.parametrize("method", ["percentile", "basic", "BCa"])
@pytest.mark.parametrize("paired", [False, True])
def test_bootstrap_matches_scipy_on_raw_samples(method, paired):
    # Index resampling must be invisible: SciPy run on the 1-D samples themselves, with the
    # same Generator, draws the same rows in the same order (one batch, as both use here).
    x, y = _normal(5, 30, 1), _normal(6, 30 if paired else 24, 1, loc=0.5)
    if paired:
        y = x + 0.5 * y

    def corr(a, b):
        return float(np.corrcoef(a, b)[0, 1])

    def diff(a, b):
        return float(a.mean() - b.mean())

    stat = corr if paired else diff
    ours = bootstrap_ci(
        lambda a, b: stat(a[:, 0], b[:, 0]),
        x,
        y,
        n_resamples=150,
        seed=11,
        paired=paired,
        method=method,
    )
    ref = scipy.stats.bootstrap(
        (x[:, 0], y[:, 0]),
        stat,
        n_resamples=150,
        vectorized=False,
        paired=paired,
        method=method,
        **_rng_kwarg(np.random.default_rng(11)),
    )
    np.testing.assert_allclose(ours.distribution, ref.bootstrap_distribution, rtol=1e-12)
    np.testing.assert_allclose([ours.low, ours.high], list(ref.confidence_interval), rtol=1e-12)


@pytest.mark.parametrize(("paired", "extra"), [(False, 30 + 20), (True, 30)])
def test_bootstrap_bca_jackknife_cost(paired, extra):
    # Documented cost: n_resamples + 1 (estimate) + 1 (SciPy's theta hat) + jackknife.
    calls = []

    def fn(a, b):
        calls.append(1)
        return _mean_gap(a, b)

    x, y = _normal(7, 30, 2), _normal(8, 30 if paired else 20, 2)
    bootstrap_ci(fn, x, y, n_resamples=40, method="bca", paired=paired)
    assert len(calls) == 40 + 2 + extra


def test_bootstrap_deterministic_per_seed():
    x, y = _normal(9, 40, 2), _normal(10, 35, 2, loc=0.2)
    a = bootstrap_ci(_mean_gap, x, y, n_resamples=100, seed=3)
    b = bootstrap_ci(_mean_gap, x, y, n_resamples=100, seed=3)
    c = bootstrap_ci(_mean_gap, x, y, n_resamples=100, seed=4)
    np.testing.assert_array_equal(a.distribution, b.distribution)
    assert (a.low, a.high) == (b.low, b.high)
    assert not np.array_equal(a.distribution, c.distribution)


def test_bootstrap_width_shrinks_with_n():
    def width(n):
        x, y = _normal(12, n, 2), _normal(13, n, 2, loc=1.0)
        res = bootstrap_ci(_mean_gap, x, y, n_resamples=200, seed=0)
        return res.high - res.low

    # Width ~ 1 / sqrt(n): 16x the rows, about a quarter of the width.
    assert width(640) < 0.5 * width(40)


def test_bootstrap_percentile_coverage():
    # True value of mean(x) - mean(y) is 0.5. Nominal 90% coverage; the percentile bootstrap
    # undercovers slightly at n = 30, and 40 trials have binomial sd ~0.05: 0.75 is loose.
    hits = 0
    trials = 40
    for t in range(trials):
        x, y = _normal(100 + t, 30, 1, loc=0.5), _normal(200 + t, 30, 1)
        res = bootstrap_ci(_mean_diff, x, y, n_resamples=199, seed=t, confidence=0.9)
        hits += res.low <= 0.5 <= res.high
    assert hits / trials >= 0.75


def test_bootstrap_paired_keeps_rows_together():
    x = _normal(14, 25, 3)
    paired = bootstrap_ci(_mean_gap, x, x.copy(), n_resamples=50, paired=True)
    unpaired = bootstrap_ci(_mean_gap, x, x.copy(), n_resamples=50, paired=False)
    np.testing.assert_array_equal(paired.distribution, 0.0)  # same rows on both sides
    assert np.all(unpaired.distribution[:10] > 0)


def test_bootstrap_paired_cka_interval():
    x = _normal(15, 80, 4)
    y = x @ np.random.default_rng(16).normal(size=(4, 6)) + 0.5 * _normal(17, 80, 6)
    res = bootstrap_ci(_linear_cka, x, y, n_resamples=200, paired=True)  # d differs: allowed
    assert 0 < res.low < res.estimate < res.high <= 1


def test_bootstrap_degenerate_bca_warns():
    x, y = _normal(18, 10, 2), _normal(19, 10, 2)
    with pytest.warns(UserWarning, match="BCa interval is NaN"):
        res = bootstrap_ci(lambda a, b: 1.0, x, y, n_resamples=30, method="BCa")
    assert np.isnan(res.low) and np.isnan(res.high)


def test_bootstrap_nan_from_fn_is_reported():
    x, y = _normal(20, 10, 2), _normal(21, 10, 2)

    def sometimes_nan(a, b):
        return np.nan if a[0, 0] > 0 else _mean_gap(a, b)

    with pytest.warns(UserWarning, match=r"NaN or inf on \d+ of 50 bootstrap resamples"):
        res = bootstrap_ci(sometimes_nan, x, y, n_resamples=50)
    assert np.isnan(res.low) and np.isnan(res.std)


# --------------------------------------------------------------------------------------------
# permutation_test
# --------------------------------------------------------------------------------------------


def test_permutation_pvalues_uniform_under_null():
    pvalues = []
    for t in range(50):
        x, y = _normal(300 + t, 12, 2), _normal(400 + t, 12, 2)
        pvalues.append(permutation_test(_mean_gap, x, y, n_permutations=99, seed=t).pvalue)
    pvalues = np.array(pvalues)
    # p-values live on the grid k / 100; loose checks of uniformity.
    assert scipy.stats.kstest(pvalues, "uniform").pvalue > 0.01
    assert 0.0 <= np.mean(pvalues <= 0.1) <= 0.25
    assert 0.35 < pvalues.mean() < 0.65


def test_permutation_separated_data():
    x, y = _normal(22, 20, 3), _normal(23, 25, 3, loc=2.0)
    res = permutation_test(_mean_gap, x, y, n_permutations=199, seed=0)
    assert isinstance(res, PermutationResult)
    assert res.statistic == pytest.approx(_mean_gap(x, y), rel=1e-12)
    assert res.pvalue == 1 / 200  # +1 correction: the observed split counts once
    assert res.pvalue <= 2 / (199 + 1)
    assert (res.n_permutations, res.exact, res.alternative) == (199, False, "greater")
    assert res.null_distribution.shape == (199,) and res.null_distribution.dtype == np.float64
    assert res.null_distribution.max() < res.statistic
    less = permutation_test(_mean_gap, x, y, n_permutations=199, alternative="less")
    assert less.pvalue == 1.0
    two = permutation_test(_mean_gap, x, y, n_permutations=199, alternative="two-sided")
    assert two.pvalue == 2 / 200


def test_permutation_pvalue_counts_extremes_plus_one():
    x, y = _normal(24, 15, 2), _normal(25, 15, 2, loc=0.3)
    res = permutation_test(_mean_gap, x, y, n_permutations=150, seed=2)
    k = np.sum(res.null_distribution >= res.statistic * (1 - 1e-12))
    assert res.pvalue == pytest.approx((k + 1) / (150 + 1), rel=1e-12)


def test_permutation_exact_enumerates_all_splits():
    x, y = _normal(26, 3, 2), _normal(27, 4, 2, loc=1.0)
    res = permutation_test(_mean_diff, x, y, n_permutations=1000)
    z = np.concatenate([x, y])
    splits = [
        _mean_diff(z[list(i)], z[[j for j in range(7) if j not in i]])
        for i in itertools.combinations(range(7), 3)
    ]
    assert res.exact and res.n_permutations == 35
    np.testing.assert_allclose(np.sort(res.null_distribution), np.sort(splits), rtol=1e-12)
    observed = _mean_diff(x, y)
    k = np.sum(np.array(splits) >= observed - 1e-12 * abs(observed))
    assert res.pvalue == pytest.approx(k / 35, rel=1e-12)  # no +1: exact test


def test_permutation_paired_destroys_association():
    x = _normal(28, 40, 4)
    rotation, _ = np.linalg.qr(np.random.default_rng(29).normal(size=(4, 4)))
    y = x @ rotation + 0.2 * _normal(30, 40, 4)  # CKA is invariant to the rotation: ~1
    res = permutation_test(_linear_cka, x, y, n_permutations=99, paired=True)
    assert res.statistic > 0.9
    assert res.pvalue == 1 / 100
    assert res.null_distribution.mean() < 0.5 * res.statistic
    unrelated = permutation_test(_linear_cka, x, _normal(31, 40, 4), n_permutations=99, paired=True)
    assert unrelated.pvalue > 0.05


def test_permutation_paired_exact_and_deterministic():
    x, y = _normal(32, 4, 2), _normal(33, 4, 2)
    exact = permutation_test(_linear_cka, x, y, n_permutations=100, paired=True)
    assert exact.exact and exact.n_permutations == 24  # 4!
    a = permutation_test(
        _linear_cka, _normal(34, 20, 2), _normal(35, 20, 2), paired=True, n_permutations=50, seed=5
    )
    b = permutation_test(
        _linear_cka, _normal(34, 20, 2), _normal(35, 20, 2), paired=True, n_permutations=50, seed=5
    )
    np.testing.assert_array_equal(a.null_distribution, b.null_distribution)


def test_permutation_deterministic_per_seed():
    x, y = _normal(36, 15, 2), _normal(37, 15, 2)
    a = permutation_test(_mean_gap, x, y, n_permutations=60, seed=1)
    b = permutation_test(_mean_gap, x, y, n_permutations=60, seed=1)
    c = permutation_test(_mean_gap, x, y, n_permutations=60, seed=2)
    np.testing.assert_array_equal(a.null_distribution, b.null_distribution)
    assert a.pvalue == b.pvalue
    assert not np.array_equal(a.null_distribution, c.null_distribution)


def test_permutation_nan_statistic_gives_nan_pvalue():
    x, y = _normal(38, 10, 2), _normal(39, 10, 2)
    with pytest.warns(UserWarning, match="original data"):
        res = permutation_test(lambda a, b: np.nan, x, y, n_permutations=20)
    assert np.isnan(res.pvalue)


# --------------------------------------------------------------------------------------------
# Errors (both functions)
# --------------------------------------------------------------------------------------------

X, Y = _normal(40, 10, 3), _normal(41, 12, 3)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(n_resamples=0), "n_resamples must be >= 1"),
        (dict(n_resamples=10.5), "n_resamples must be an integer"),
        (dict(confidence=0.0), r"confidence must be in \(0, 1\)"),
        (dict(confidence=1.0), r"confidence must be in \(0, 1\)"),
        (dict(confidence=1.5), r"confidence must be in \(0, 1\)"),
        (dict(method="student"), "method must be one of 'percentile', 'basic', 'BCa'"),
        (dict(paired=True), r"x.shape\[0\] == 10 while y.shape\[0\] == 12"),
    ],
)
def test_bootstrap_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bootstrap_ci(_mean_gap, X, Y, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(n_permutations=0), "n_permutations must be >= 1"),
        (dict(alternative="bigger"), "alternative must be one of 'greater', 'less', 'two-sided'"),
        (dict(paired=True), r"x.shape\[0\] == 10 while y.shape\[0\] == 12.*paired=True"),
    ],
)
def test_permutation_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        permutation_test(_mean_gap, X, Y, **kwargs)


def test_method_and_alternative_case_insensitive():
    assert bootstrap_ci(_mean_gap, X, Y, n_resamples=20, method="bca").method == "BCa"
    res = permutation_test(_mean_gap, X, Y, n_permutations=20, alternative="Two-Sided")
    assert res.alternative == "two-sided"


@pytest.mark.parametrize("test", [bootstrap_ci, permutation_test])
def test_bad_features_rejected(test):
    bad = X.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="x has 1 row"):
        test(_mean_gap, bad, Y)
    with pytest.raises(ValueError, match="y must have shape"):
        test(_mean_gap, X, np.ones(5))


def test_unpaired_permutation_needs_same_dim():
    with pytest.raises(ValueError, match=r"x.shape\[1\] == 3 while y.shape\[1\] == 4"):
        permutation_test(_mean_gap, X, _normal(42, 12, 4))


@pytest.mark.parametrize("test", [bootstrap_ci, permutation_test])
def test_fn_errors_propagate_and_non_scalars_rejected(test):
    class Boom(Exception):
        pass

    def boom(a, b):
        raise Boom("from fn")

    with pytest.raises(Boom, match="from fn"):
        test(boom, X, Y)
    with pytest.raises(TypeError, match="single number"):
        test(lambda a, b: a.mean(axis=0), X, Y)
