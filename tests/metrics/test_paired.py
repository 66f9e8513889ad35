"""featsim.metrics.paired: the paired resampling engine, against float64 scipy references on
explicitly resampled, swapped and relabelled rows."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from featsim import metrics
from featsim.metrics.paired import (
    PAIRED_STATISTICS,
    PairedResampler,
    check_paired_memory,
    paired_resampling,
    pairwise_distances,
    resample_interval,
)

STATISTICS = PAIRED_STATISTICS


def _sets(seed=0, n=30, m=24, d=6):
    rng = np.random.default_rng(seed)
    s = rng.normal(size=(n, d))
    t = rng.normal(0.7, 1.3, size=(m, d))
    return s, t




def _pairwise_from(sets):
    return PairedResampler({("before", "source"): sets[0], ("before", "target"): sets[1],
                      ("after", "source"): sets[2], ("after", "target"): sets[3]}, "euclidean")


def _reference_statistics(x, y):
    """float64 scipy: every statistic on explicit rows (duplicates at distance 0)."""
    n, m = len(x), len(y)
    dxy, dxx, dyy = cdist(x, y), cdist(x, x), cdist(y, y)
    d, wx, wy = dxy.mean(), dxx.sum() / (n * (n - 1)), dyy.sum() / (m * (m - 1))
    e = 2 * d - dxx.mean() - dyy.mean()
    return {"distance": d, "distance_source": wx, "distance_target": wy,
            "ratio": d / (0.5 * (wx + wy)), "energy_distance": e,
            "energy_coefficient": e / (2 * d), "distance_cosine": cdist(x, y, "cosine").mean()}


def _reference_resampled(x, y, i, j):
    """float64 statistics of the resampled rows ``x[i]``, ``y[j]`` where a pair of copies of
    one original image is not a pair (excluded from the within-set means)."""
    xs, ys = x[i], y[j]
    n, m = len(i), len(j)
    d = cdist(xs, ys).mean()
    distinct_x, distinct_y = i[:, None] != i[None, :], j[:, None] != j[None, :]
    wx, wy = cdist(xs, xs)[distinct_x].mean(), cdist(ys, ys)[distinct_y].mean()
    e = 2 * d - wx * (n - 1) / n - wy * (m - 1) / m
    return {"distance": d, "distance_source": wx, "distance_target": wy,
            "ratio": d / (0.5 * (wx + wy)), "energy_distance": e,
            "energy_coefficient": e / (2 * d), "distance_cosine": cdist(xs, ys, "cosine").mean()}


def test_resampled_statistics_exclude_pairs_of_copies_of_one_image():
    rng = np.random.default_rng(4)
    s, t = _sets(4)
    sets = (s, t, np.tanh(s) + 1, np.tanh(t))
    pairs = _pairwise_from(sets)
    i, j = rng.integers(0, len(s), len(s)), rng.integers(0, len(t), len(t))
    counts = {"source": np.bincount(i, minlength=len(s))[None].astype(float),
              "target": np.bincount(j, minlength=len(t))[None].astype(float)}
    for side, (x, y) in (("before", sets[:2]), ("after", sets[2:])):
        got = pairs.statistics(side, counts)
        ref = _reference_resampled(x, y, i, j)
        assert len(set(i)) < len(i)  # the draw has copies: the case that matters
        for name in STATISTICS:
            np.testing.assert_allclose(got[name][0], ref[name], rtol=1e-12, err_msg=name)


def test_swapped_changes_equal_explicitly_swapped_features():
    rng = np.random.default_rng(5)
    s, t = _sets(5)
    sets = (s, t, 1.5 * s + 0.2, t - 0.1)
    pairs = _pairwise_from(sets)
    mask_s, mask_t = rng.integers(0, 2, len(s)), rng.integers(0, 2, len(t))
    got = pairs.swapped_changes({"source": mask_s[None].astype(float),
                                 "target": mask_t[None].astype(float)})
    swap_s, swap_t = mask_s[:, None] == 1, mask_t[:, None] == 1
    before = _reference_statistics(np.where(swap_s, sets[2], s), np.where(swap_t, sets[3], t))
    after = _reference_statistics(np.where(swap_s, s, sets[2]), np.where(swap_t, t, sets[3]))
    for name in STATISTICS:
        np.testing.assert_allclose(got[name][0], after[name] - before[name], rtol=1e-10,
                                   atol=1e-13, err_msg=name)


def test_relabelled_energy_equals_energy_of_relabelled_rows():
    s, t = _sets(6)
    pairs = _pairwise_from((s, t, s, t))
    pooled = np.concatenate([s, t])
    pick = np.random.default_rng(0).permutation(len(pooled)) < len(s)
    got = pairs.relabelled_energy("before", pick[None].astype(float))[0]
    np.testing.assert_allclose(got, metrics.energy_distance(pooled[pick], pooled[~pick]),
                               rtol=1e-10)




@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean", "cosine", "cityblock"])
def test_pairwise_distances_match_cdist(metric):
    s, t = _sets(7)
    s = s + 50.0  # a large common offset: the centring must keep float64 accuracy
    t = t + 50.0
    cross = pairwise_distances(s, t, metric, same=False)
    within = pairwise_distances(s, s, metric, same=True)
    assert cross.dtype == within.dtype == np.float64 and cross.shape == (30, 24)
    np.testing.assert_allclose(cross, cdist(s, t, metric), rtol=1e-9, atol=1e-9)
    ref = cdist(s, s, metric)
    np.fill_diagonal(ref, 0.0)
    np.testing.assert_allclose(within, ref, rtol=1e-9, atol=1e-9)
    assert np.all(np.diag(within) == 0.0)


def test_paired_resampling_intervals_p_values_and_streams():
    s, t = _sets(8)
    sets = {("before", "source"): s, ("before", "target"): t,
            ("after", "source"): 2.0 * s, ("after", "target"): 2.0 * t}
    views = {"before": ("before", "before"), "after": ("after", "after")}
    kw = dict(views=views, changes=[("before", "after")], swaps=[("before", "after")],
              energy_sides=["before", "after"], n_bootstrap=70, n_permutations=40, seed=5)
    est = paired_resampling(sets, **kw)
    # Observed values are the statistics of all rows.
    ref = _reference_statistics(s, t)
    for name in STATISTICS:
        np.testing.assert_allclose(est.observed["before"][name], ref[name], rtol=1e-12)
    # Rescaling every feature by 2 doubles D in every resample (the same resampled images for
    # both representations), leaves the ratio unchanged, and no swap can change the ratio.
    low, high = est.changes["before", "after"]["distance"]
    b_low, b_high = est.intervals["before"]["distance"]
    np.testing.assert_allclose([low, high], [b_low, b_high], rtol=1e-12)
    assert max(abs(x) for x in est.changes["before", "after"]["ratio"]) < 1e-12
    assert est.pvalues["before", "after"]["ratio"] > 0.5
    assert est.pvalues["before", "after"]["distance"] < 0.05
    assert set(est.energy_pvalues) == {"before", "after"}
    # The same seed repeats exactly; nothing asked for gives empty results.
    assert paired_resampling(sets, **kw) == est
    none = paired_resampling(sets, **(kw | dict(n_bootstrap=0, n_permutations=0)))
    assert none.observed == {} and none.intervals == {"before": {}, "after": {}}
    with pytest.raises(ValueError, match="ci_method"):
        paired_resampling(sets, **(kw | dict(ci_method="BCa")))


def test_resample_interval_basic_and_percentile_as_scipy_quantiles():
    values = np.random.default_rng(0).gamma(2.0, size=999)
    q = np.quantile(values, [0.05, 0.95])
    assert resample_interval(1.0, values, 0.9, "percentile") == pytest.approx(tuple(q))
    assert resample_interval(1.0, values, 0.9, "basic") == pytest.approx((2 - q[1], 2 - q[0]))
    with pytest.warns(UserWarning, match="not finite"):
        low, high = resample_interval(1.0, np.array([1.0, np.nan]), 0.9, "basic")
    assert np.isnan(low) and np.isnan(high)


def test_memory_limit_names_the_sizes():
    with pytest.raises(ValueError, match="n_source = 20000 and n_target = 20000"):
        check_paired_memory(20000, 20000, paired_swaps=True)
    check_paired_memory(100, 100, paired_swaps=True)
