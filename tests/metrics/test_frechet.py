"""FID and FeatureStats against float64 references (scipy.linalg.sqrtm, np.cov, a QR / nuclear-norm
form computed from the data) and a high-precision mpmath reference."""

import math
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
    # The covariance form (pivoted Cholesky factors, nuclear norm of C1^T C2) stays exact too.
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    np.testing.assert_allclose(
        frechet_distance(x.mean(0), s1, y.mean(0), s2), ref, rtol=1e-9)


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
    x64 = x.astype(np.float64)
    one = FeatureStats.from_features(x)
    parts = [FeatureStats.from_features(p) for p in np.array_split(x, 5)]
    for order in ([0, 1, 2, 3, 4], [4, 2, 0, 3, 1]):
        merged = FeatureStats.empty(7)
        for i in order:
            merged = merged.merge(parts[i])
        assert merged.count == one.count
        # The shift differs with the order; mean and covariance must not.
        np.testing.assert_allclose(merged.mean(), one.mean(), rtol=1e-13)
        np.testing.assert_allclose(merged.cov(), one.cov(), rtol=1e-12)
        # sum / outer_sum are moments about shift: the raw moments follow from them.
        raw_sum = merged.sum + merged.count * merged.shift
        np.testing.assert_allclose(raw_sum, x64.sum(0), rtol=1e-12)
    tree = parts[0].merge(parts[1]).merge(parts[2].merge(parts[3].merge(parts[4])))
    np.testing.assert_allclose(tree.cov(), one.cov(), rtol=1e-12)
    np.testing.assert_allclose(one.mean(), x64.mean(0), rtol=1e-13)
    np.testing.assert_allclose(one.cov(), np.cov(x64, rowvar=False), rtol=1e-12)
    streamed = FeatureStats.empty(7)
    for p in np.array_split(x, 3):
        streamed = streamed.update(p)
    np.testing.assert_allclose(streamed.cov(), one.cov(), rtol=1e-12)
    back = FeatureStats.from_arrays(one.to_arrays())
    np.testing.assert_array_equal(back.outer_sum, one.outer_sum)
    np.testing.assert_array_equal(back.shift, one.shift)
    assert one.sum.dtype == np.float64 and one.outer_sum.dtype == np.float64
    # Raw moments (the pre-shift layout, e.g. an old saved file) still load and mean the same.
    raw = FeatureStats.from_arrays(
        {"count": np.asarray(103), "sum": x64.sum(0), "outer_sum": x64.T @ x64})
    np.testing.assert_array_equal(raw.shift, np.zeros(7))
    np.testing.assert_allclose(raw.cov(), one.cov(), rtol=1e-10)
    np.testing.assert_allclose(raw.merge(one).cov(), np.cov(np.vstack([x64, x64]), rowvar=False),
                               rtol=1e-10)


def _offset_data(seed, n, d, offset):
    rng = np.random.default_rng(seed)
    spread = rng.uniform(0.5, 2.0, size=d)
    x = rng.normal(size=(n, d)) @ (np.eye(d) + 0.3 * rng.normal(size=(d, d)) / np.sqrt(d))
    return offset + x * spread  # spread ~1, so the offset is ~offset x the spread


def _rel(a, b):
    return np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b))


def test_feature_stats_large_common_offset():
    # Offset 1e6 x the spread: raw moments S - n mu mu^T lose ~12 of 16 digits here.
    x = _offset_data(4, 2000, 12, 1e6)
    ref = np.cov(x, rowvar=False)  # two-pass (centred) float64 reference
    stats = FeatureStats.empty(12)
    for part in np.array_split(x, 7):
        stats = stats.update(part)
    assert _rel(stats.cov(), ref) < 1e-10
    assert _rel(stats.mean(), x.mean(0)) < 1e-14
    pairwise = FeatureStats.from_features(x[:300]).merge(
        FeatureStats.from_features(x[300:1100]).merge(FeatureStats.from_features(x[1100:])))
    assert _rel(pairwise.cov(), ref) < 1e-10
    # The test can fail: raw moments, the former layout, are far off on this data.
    raw = FeatureStats(len(x), x.sum(0), x.T @ x)
    assert _rel(raw.cov(), ref) > 1e-6


def _qr_reference(x, y):
    # Independent float64 FID, exact in the data (no covariance is formed): with centred
    # A_k = (x_k - mean) / sqrt(n_k - 1) = Q_k R_k, tr((S1 S2)^(1/2)) = ||A1 A2^T||_* =
    # ||R1 R2^T||_* (sum of singular values).
    a1 = (x - x.mean(0)) / np.sqrt(len(x) - 1)
    a2 = (y - y.mean(0)) / np.sqrt(len(y) - 1)
    r1, r2 = np.linalg.qr(a1, mode="r"), np.linalg.qr(a2, mode="r")
    tr_sqrt = scipy.linalg.svdvals(r1 @ r2.T).sum()
    diff = x.mean(0) - y.mean(0)
    return float(diff @ diff + (a1 * a1).sum() + (a2 * a2).sum() - 2 * tr_sqrt)


def _exact_mean(a):
    # Correctly rounded column sums: at offset 1e6, np.mean's own rounding (~1e-10) would
    # dominate the comparison.
    return np.array([math.fsum(col) for col in a.T]) / len(a)


def test_fid_large_common_offset():
    # A common offset 1e6 x the spread (the case): raw moments were off by ~1e-3.
    x = _offset_data(5, 1500, 16, 1e6)
    y = _offset_data(6, 1200, 16, 1e6)
    mu1, mu2 = _exact_mean(x), _exact_mean(y)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    ref = _sqrtm_reference(mu1, s1, mu2, s2)
    assert abs(fid(x, y) - ref) / ref < 1e-10
    assert abs(fid_details(x, y).value - ref) / ref < 1e-10
    assert abs(frechet_distance(mu1, s1, mu2, s2) - ref) / ref < 1e-10
    raw = [FeatureStats(len(a), a.sum(0), a.T @ a).cov() for a in (x, y)]
    assert abs(frechet_distance(mu1, raw[0], mu2, raw[1]) - ref) / ref > 1e-5  # can fail


def _floored_trace_sqrt(s1, s2):
    # The former rule: eigenvalues of L^T S2 L below d * eps * max dropped (kept as witness).
    low = np.linalg.cholesky(s1)
    ev = np.linalg.eigvalsh(low.T @ s2 @ low)
    return np.sqrt(ev[ev > len(ev) * np.finfo(float).eps * ev.max()]).sum()


def test_fid_keeps_small_eigenvalues_d512():
    # d = 512, n = 3000, spectra decaying from 1 to 1e-7 (axis-aligned, so the eigenvalues of
    # S1 S2 span ~1e14): a d * eps * lambda_max floor drops the smallest ones.
    rng = np.random.default_rng(7)
    n, d = 3000, 512
    scale = np.logspace(0, -3.5, d)
    x = rng.normal(size=(n, d)) * scale
    y = rng.normal(size=(n, d)) * scale * rng.uniform(0.8, 1.2, size=d) + 0.01
    ref = _qr_reference(x, y)
    details = fid_details(x, y)
    assert details.method == "eigh" and details.rank1 == d and details.rank2 == d
    assert abs(details.value - ref) / ref < 1e-11
    assert abs(fid(x, y) - ref) / ref < 1e-11
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    assert abs(frechet_distance(x.mean(0), s1, y.mean(0), s2) - ref) / ref < 1e-11
    diff = x.mean(0) - y.mean(0)
    floored = diff @ diff + np.trace(s1) + np.trace(s2) - 2 * _floored_trace_sqrt(s1, s2)
    assert abs(floored - ref) / ref > 1e-9  # what the floor cost: the test can fail


def test_fid_singular_covariances_with_n_above_d():
    # Dead units (constant features) and a duplicated feature make both covariances singular
    # although n > d; pivoted Cholesky finds the ranks and the value stays exact.
    rng = np.random.default_rng(8)
    x, y = _gaussians(rng, 400, 300, 30)
    x[:, [3, 9]] = 0.5
    y[:, [3, 20]] = 0.0
    x[:, 11] = 2.0 * x[:, 12]
    ref = _qr_reference(x, y)
    details = fid_details(x, y)
    assert (details.rank1, details.rank2, details.method) == (27, 28, "eigh")
    assert abs(details.value - ref) / ref < 1e-11
    assert fid(x, y) == details.value
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    got = frechet_distance(x.mean(0), s1, y.mean(0), s2)
    assert abs(got - ref) / ref < 1e-11


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
