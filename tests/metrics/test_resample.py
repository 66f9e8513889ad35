"""featsim.metrics.resample: weighted statistics equal the library metrics on repeated rows."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from featsim import metrics
from featsim.metrics.resample import TwoSampleResampler, fid_infinity, resampled_intervals


def _sets(n, m, d, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)), rng.normal(0.3, 1.2, size=(m, d))


def _fid(x, y):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", metrics.FIDRankWarning)
        return metrics.fid(x, y)


@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean", "cosine", "cityblock"])
def test_unweighted_statistics_equal_library(metric):
    x, y = _sets(40, 30, 8)
    p = TwoSampleResampler(x, y, metric=metric).pairwise(np.ones(40), np.ones(30))
    s = metrics.distance_summary(x, y, metric=metric)
    for key, ref in (("distance", s.between), ("distance_source", s.within_x),
                     ("distance_target", s.within_y), ("ratio", s.ratio),
                     ("energy_distance_v", s.energy),
                     ("energy_distance", 2 * s.between - s.within_x - s.within_y),
                     ("distance_cosine", metrics.average_distance(x, y, metric="cosine")),
                     ("kid", metrics.polynomial_mmd2(x, y))):
        assert p[key].shape == (1,) and p[key].dtype == np.float64
        assert p[key][0] == pytest.approx(ref, rel=1e-10, abs=1e-12), key


def test_resample_excludes_self_pairs_of_one_original_row():
    x, y = _sets(25, 20, 6, seed=1)
    rng = np.random.default_rng(2)
    w = rng.multinomial(25, np.full(25, 1 / 25)).astype(float)
    v = rng.multinomial(20, np.full(20, 1 / 20)).astype(float)
    p = TwoSampleResampler(x, y).pairwise(w, v)
    ix, iy = np.repeat(np.arange(25), w.astype(int)), np.repeat(np.arange(20), v.astype(int))
    dxx = cdist(x[ix], x[ix])
    distinct = ix[:, None] != ix[None, :]
    assert p["distance_source"][0] == pytest.approx(dxx[distinct].mean(), rel=1e-12)
    assert p["distance"][0] == pytest.approx(cdist(x[ix], y[iy]).mean(), rel=1e-12)
    k = (x[ix] @ x[ix].T / 6 + 1) ** 3
    ky = (y[iy] @ y[iy].T / 6 + 1) ** 3
    same_y = iy[:, None] != iy[None, :]
    ref = k[distinct].mean() + ky[same_y].mean() - 2 * ((x[ix] @ y[iy].T / 6 + 1) ** 3).mean()
    assert p["kid"][0] == pytest.approx(ref, rel=1e-10)


@pytest.mark.parametrize("shape", [(40, 30, 8), (20, 25, 50)])  # covariance / Gram route
def test_weighted_fid_equals_fid_of_repeated_rows(shape):
    n, m, d = shape
    x, y = _sets(n, m, d, seed=3)
    rs = TwoSampleResampler(x, y)
    assert rs.fid(np.ones(n), np.ones(m)) == pytest.approx(_fid(x, y), rel=1e-9)
    rng = np.random.default_rng(4)
    w = rng.multinomial(n, np.full(n, 1 / n)).astype(float)
    v = rng.multinomial(m, np.full(m, 1 / m)).astype(float)
    ref = _fid(np.repeat(x, w.astype(int), 0), np.repeat(y, v.astype(int), 0))
    assert rs.fid(w, v) == pytest.approx(ref, rel=1e-8)


def test_jackknife_values_equal_leave_one_out():
    x, y = _sets(15, 12, 5, seed=5)
    jack = TwoSampleResampler(x, y).pairwise_jackknife()
    for i in (0, 7):
        s = metrics.distance_summary(np.delete(x, i, 0), y)
        assert jack["ratio"][0][i] == pytest.approx(s.ratio, rel=1e-12)
        assert jack["kid"][1][i] == pytest.approx(
            metrics.polynomial_mmd2(x, np.delete(y, i, 0)), rel=1e-10)
        assert jack["distance_cosine"][0][i] == pytest.approx(
            metrics.average_distance(np.delete(x, i, 0), y, metric="cosine"), rel=1e-12)


def test_fid_jackknife_removes_the_first_order_bias():
    # Same population: FID's expectation is its bias only (~ c/n); the corrected value must
    # be much closer to 0 than plain FID, on average over draws.
    plain, corrected = [], []
    for seed in range(5):
        x, y = _sets(300, 300, 4, seed=seed)
        y = np.random.default_rng(seed + 50).normal(size=(300, 4))
        rs = TwoSampleResampler(x, y)
        fid_j, se, dof, evals = rs.fid_jackknife(groups=10, seed=seed, progress=False)
        plain.append(rs.fid(np.ones(300), np.ones(300)))
        corrected.append(fid_j)
        assert (dof, evals) == (9, 20) and se > 0
    assert abs(np.mean(corrected)) < 0.3 * np.mean(plain)


def test_intervals_clamped_noted_and_deterministic():
    x, y = _sets(60, 50, 4, seed=6)
    a = resampled_intervals(x, y, n_resamples=60, seed=1, progress=False)
    b = resampled_intervals(x, y, n_resamples=60, seed=1, progress=False)
    assert a == b
    for name, est in a.items():
        assert 0 <= est.low <= est.high, name
    assert a["fid"].method == "jackknife-t" and a["distance"].method == "basic"
    same = resampled_intervals(x, x + 1e-9, n_resamples=60, progress=False)
    assert same["energy_distance"].low == 0.0 and same["energy_distance"].clamped
    bca = resampled_intervals(x, y, n_resamples=200, method="bca", progress=False)
    assert bca["ratio"].method == "BCa" and bca["ratio"].low < bca["ratio"].high


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_resamples=0), "n_resamples"), (dict(confidence=1.0), "confidence"),
    (dict(method="studentized"), "method must be one of")])
def test_bad_options(kwargs, match):
    x, y = _sets(10, 10, 3)
    with pytest.raises(ValueError, match=match):
        resampled_intervals(x, y, progress=False, **kwargs)


def test_mismatched_dims_named():
    with pytest.raises(ValueError, match=r"x.shape\[1\] == 3 while y.shape\[1\] == 4"):
        TwoSampleResampler(np.zeros((5, 3)) + np.arange(3), np.ones((5, 4)))


def test_fid_infinity_fit_and_errors():
    # One population (FID = 0): plain FID at n = 120, d = 16 is ~1.2, all of it 1/N bias.
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(160, 16)), rng.normal(size=(120, 16))
    fi = fid_infinity(x, y, seed=0)
    assert len(fi.sizes) == len(fi.fids) == 9 and fi.sizes[-1] == 120
    assert fi.fids[-1] == pytest.approx(_fid(x, y), rel=1e-9)
    assert fi.slope > 0 and abs(fi.value) < 0.3 * _fid(x, y)
    with pytest.raises(ValueError, match="distinct sizes"):
        fid_infinity(x, y, fractions=(1.0,))
    with pytest.raises(ValueError, match="fractions"):
        fid_infinity(x, y, fractions=(0.0, 1.0))


def test_coverage_harness_quick(tmp_path):
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "coverage.py"
    spec = importlib.util.spec_from_file_location("coverage_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = module.main(["--quick", "--out", str(tmp_path / "c.json")])
    cell = out["populations"]["gaussian"]["by_n"]["30"]
    assert cell["trials"] == 3 and set(cell["basic"]) == set(module.STATISTICS)
    truth = out["populations"]["gaussian"]["population_values"]
    assert truth["fid"]["value"] == pytest.approx(4.0 + np.sum(
        (1 - np.sqrt(np.linspace(0.6, 1.6, 64))) ** 2), rel=1e-12)
    assert (tmp_path / "c.json").is_file()
