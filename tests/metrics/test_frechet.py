"""FID and FeatureStats against float64 scipy.linalg.sqrtm and a high-precision mpmath reference."""

import warnings

import jax
import mpmath
import numpy as np
import pytest
import scipy.linalg
from hypothesis import given, settings
from hypothesis import strategies as st

from featsim.metrics.frechet import (
    FeatureStats,
    FIDRankWarning,
    fid,
    fid_details,
    frechet_distance,
)


def _sqrtm_reference(mu1, s1, mu2, s2):
    # The pytorch-fid formula, float64, only on well-conditioned (full-rank) covariances.
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    assert np.abs(np.imag(covmean)).max() < 1e-8
    covmean = np.real(covmean)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _mp_reference(x, y, digits=50):
    # High precision: eigenvalues of S1 S2 (real, >= 0) in 50-digit arithmetic.
    with mpmath.workdps(digits):
        def cov(a):
            a = mpmath.matrix(a.tolist())
            n, d = a.rows, a.cols
            mu = [mpmath.fsum(a[i, j] for i in range(n)) / n for j in range(d)]
            c = mpmath.matrix(d, d)
            for j in range(d):
                for k in range(d):
                    c[j, k] = mpmath.fsum(
                        (a[i, j] - mu[j]) * (a[i, k] - mu[k]) for i in range(n)) / (n - 1)
            return mu, c

        mu1, s1 = cov(x)
        mu2, s2 = cov(y)
        ev = mpmath.eig(s1 * s2, left=False, right=False)
        tr_sqrt = mpmath.fsum(mpmath.sqrt(max(mpmath.re(e), 0)) for e in ev)
        d = len(mu1)
        value = (mpmath.fsum((mu1[j] - mu2[j]) ** 2 for j in range(d))
                 + mpmath.fsum(s1[j, j] + s2[j, j] for j in range(d)) - 2 * tr_sqrt)
        return float(value)


def _gaussians(rng, n1, n2, d):
    a = rng.normal(size=(d, d)) / np.sqrt(d)
    x = rng.normal(size=(n1, d)) @ a + 1.0
    y = rng.normal(size=(n2, d)) @ (a + 0.3 * rng.normal(size=(d, d)) / np.sqrt(d)) + 1.4
    return x, y


def test_frechet_matches_sqrtm_full_rank():
    rng = np.random.default_rng(0)
    x, y = _gaussians(rng, 600, 500, 40)
    mu1, s1, mu2, s2 = x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False)
    got = frechet_distance(mu1, s1, mu2, s2)
    assert isinstance(got, float)
    np.testing.assert_allclose(got, _sqrtm_reference(mu1, s1, mu2, s2), rtol=1e-10)
    np.testing.assert_allclose(fid(x, y), got, rtol=1e-10)
    details = fid_details(x, y)
    assert details.method == "eigh" and details.rank1 == 40 and details.rank2 == 40


@pytest.mark.parametrize(("n1", "n2", "d"), [(6, 9, 20), (15, 15, 15), (4, 30, 12)])
def test_fid_n_below_d_is_exact_and_warns(n1, n2, d):
    rng = np.random.default_rng(n1 * 100 + d)
    x, y = _gaussians(rng, n1, n2, d)
    ref = _mp_reference(x, y)
    with pytest.warns(FIDRankWarning, match=r"covariance ranks \d+ and \d+"):
        details = fid_details(x, y)
    assert details.method == "nuclear"
    assert details.rank1 == min(n1 - 1, d) and details.rank2 == min(n2 - 1, d)
    np.testing.assert_allclose(details.value, ref, rtol=1e-11)
    # The covariance form (eigh with noise-floor clamping) stays real and close too.
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    np.testing.assert_allclose(
        frechet_distance(x.mean(0), s1, y.mean(0), s2), ref, rtol=1e-6)


def test_fid_of_identical_sets_is_zero():
    rng = np.random.default_rng(1)
    x, _ = _gaussians(rng, 300, 2, 16)
    assert abs(fid(x, x.copy())) < 1e-9
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FIDRankWarning)
        assert abs(fid(x[:8], x[:8].copy())) < 1e-9


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(3, 40), d=st.integers(1, 12),
       shift=st.floats(-5, 5))
def test_fid_properties(seed, n, d, shift):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) * rng.uniform(0.1, 3, size=d)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FIDRankWarning)
        same = fid(x, x + 0.0)
        moved = fid(x, x + shift)
    cov = np.cov(x, rowvar=False, ddof=1).reshape(d, d)
    # Documented precision of the eigenvalue route: eigenvalues of S1^(1/2) S2 S1^(1/2) below
    # d * eps * max count as 0, so each can move tr sqrt by sqrt(d * eps) * lambda_max(S)
    # (reached only for ill-conditioned covariances, e.g. n = d + 1).
    floor = d * np.sqrt(d * np.finfo(float).eps) * np.linalg.eigvalsh(cov)[-1]
    assert abs(same) <= 2 * floor + 1e-8 * max(1.0, np.trace(cov))
    # Translating one set moves only the mean term: FID == d * shift^2.
    np.testing.assert_allclose(moved, d * shift**2, rtol=1e-7, atol=1e-8)


def test_fid_under_jit():
    rng = np.random.default_rng(2)
    x, y = _gaussians(rng, 200, 150, 10)
    out = jax.jit(fid)(x.astype(np.float32), y.astype(np.float32))
    assert out.shape == () and out.dtype == np.float32
    # float32 eigendecomposition inside jit: looser than the float64 host path.
    np.testing.assert_allclose(float(out), fid(x, y), rtol=1e-4)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    out = jax.jit(frechet_distance)(
        x.mean(0).astype(np.float32), s1.astype(np.float32),
        y.mean(0).astype(np.float32), s2.astype(np.float32))
    np.testing.assert_allclose(float(out), fid(x, y), rtol=1e-4)
    with pytest.warns(FIDRankWarning):
        small = jax.jit(fid)(x[:5].astype(np.float32), y[:7].astype(np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FIDRankWarning)
        np.testing.assert_allclose(float(small), fid(x[:5], y[:7]), rtol=1e-4)


def test_feature_stats_merge_equals_one_pass():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(103, 7)).astype(np.float32) * 4 + 2
    one = FeatureStats.from_features(x)
    parts = [FeatureStats.from_features(p) for p in np.array_split(x, 5)]
    for order in ([0, 1, 2, 3, 4], [4, 2, 0, 3, 1]):
        merged = FeatureStats.empty(7)
        for i in order:
            merged = merged.merge(parts[i])
        assert merged.count == one.count
        np.testing.assert_allclose(merged.sum, one.sum, rtol=1e-13)
        np.testing.assert_allclose(merged.outer_sum, one.outer_sum, rtol=1e-13)
    tree = parts[0].merge(parts[1]).merge(parts[2].merge(parts[3].merge(parts[4])))
    np.testing.assert_allclose(tree.cov(), one.cov(), rtol=1e-12)
    np.testing.assert_allclose(one.mean(), x.astype(np.float64).mean(0), rtol=1e-13)
    np.testing.assert_allclose(one.cov(), np.cov(x.astype(np.float64), rowvar=False), rtol=1e-10)
    streamed = FeatureStats.empty(7)
    for p in np.array_split(x, 3):
        streamed = streamed.update(p)
    np.testing.assert_allclose(streamed.cov(), one.cov(), rtol=1e-12)
    back = FeatureStats.from_arrays(one.to_arrays())
    np.testing.assert_array_equal(back.outer_sum, one.outer_sum)
    assert one.sum.dtype == np.float64 and one.outer_sum.dtype == np.float64


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), cuts=st.lists(st.integers(1, 59), max_size=5))
def test_feature_stats_any_split(seed, cuts):
    x = np.random.default_rng(seed).normal(size=(60, 5))
    bounds = sorted(set(cuts))
    stats = FeatureStats.empty(5)
    for part in np.split(x, bounds):
        if len(part):
            stats = stats.merge(FeatureStats.from_features(part))
    np.testing.assert_allclose(stats.cov(), np.cov(x, rowvar=False), rtol=1e-10, atol=1e-13)


def test_errors():
    with pytest.raises(ValueError, match=r"x.shape\[1\] == 3 while y.shape\[1\] == 4"):
        fid(np.ones((5, 3)), np.ones((5, 4)))
    with pytest.raises(ValueError, match="at least 2 rows"):
        fid(np.ones((1, 3)), np.ones((5, 3)))
    bad = np.ones((5, 3))
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"1 row\(s\) with NaN"):
        fid(bad, np.ones((5, 3)))
    with pytest.raises(ValueError, match=r"sigma2 must have shape \[d, d\] = \(3, 3\)"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))
    with pytest.raises(ValueError, match="not symmetric"):
        frechet_distance(np.zeros(2), np.array([[1.0, 0.5], [0.0, 1.0]]), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="not positive semi-definite"):
        frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="not positive semi-definite"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.diag([1.0, -1.0]))
    with pytest.raises(ValueError, match="dimension 3 with dimension 4"):
        FeatureStats.empty(3).merge(FeatureStats.empty(4))
    with pytest.raises(ValueError, match="at least 2 samples"):
        FeatureStats.from_features(np.ones((1, 3))).cov()
