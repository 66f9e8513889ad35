"""featsim.comparison's three-way split (total = normalisation + weights) and featsim.compare_seeds:
the seed-level t-interval, Holm's adjustment and the seed-level verdict, on synthetic features
(float64 numpy/scipy references; no backbone, a few seconds)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats

from featsim.compare_seeds import (
    FORMS,
    MIN_SEEDS,
    find_finetuned,
    holm,
    seed_summary,
    t_interval,
    training_source,
    welch_interval,
)
from featsim.comparison import PARTS, SCALE_FREE, STATISTICS, feature_change
from featsim.metrics import StatOptions
from featsim.metrics.paired import PairedResampler

FAST = dict(stats=StatOptions(n_bootstrap=60, n_permutations=40, kid_subset_size=10,
                              kid_subsets=5))


def _three(seed=0, n=24, m=20, d=5, shift=0.0):
    """Pretrained, control and fine-tuned features of the same images."""
    rng = np.random.default_rng(seed)
    s, t = rng.normal(size=(n, d)), rng.normal(0.8, 1.2, size=(m, d))
    # The control re-normalises the target domain (as AdaBN does); fine-tuning adds more.
    control = (0.95 * s + 0.1, (t - t.mean(0)) / t.std(0) * 0.9 + 0.4)
    after = (1.1 * control[0] + 0.05 * rng.normal(size=s.shape),
             control[1] * (0.8 - shift) + 0.1 * rng.normal(size=t.shape))
    return (s, t), control, after


def _change(seed=0, shift=0.0, **kwargs):
    before, control, after = _three(seed, shift=shift)
    return feature_change(*before, *after, control_source=control[0],
                          control_target=control[1],
                          stats=FAST["stats"].replace(seed=seed, **kwargs))


def test_parts_add_up_for_every_statistic():
    c = _change()
    assert set(c.parts) == set(PARTS) and c.deltas is c.parts["total"]
    for name in STATISTICS:
        total, norm, weights = (c.parts[p][name] for p in PARTS)
        # The chain: pretrained -> control -> fine-tuned, reading the same reports.
        assert norm.before == total.before and norm.after == weights.before
        assert weights.after == total.after
        np.testing.assert_allclose(norm.estimate + weights.estimate, total.estimate,
                                   rtol=1e-12, atol=1e-15, err_msg=name)
        assert norm.low < norm.high and weights.low < weights.high, name
        assert all(0 < x.pvalue <= 1 for x in (total, norm, weights)), name
    assert c.control.distance == c.parts["normalisation"]["distance"].after


def test_parts_add_up_per_bootstrap_resample():
    before, control, after = _three(1)
    sets = {("before", "source"): before[0], ("before", "target"): before[1],
            ("control", "source"): control[0], ("control", "target"): control[1],
            ("after", "source"): after[0], ("after", "target"): after[1]}
    pairs = PairedResampler(sets, "euclidean")
    rng = np.random.default_rng(0)
    counts = {"source": rng.multinomial(24, np.full(24, 1 / 24), size=5).astype(float),
              "target": rng.multinomial(20, np.full(20, 1 / 20), size=5).astype(float)}
    stats = {side: pairs.statistics(side, counts) for side in ("before", "control", "after")}
    for name in STATISTICS:
        total = stats["after"][name] - stats["before"][name]
        parts = (stats["control"][name] - stats["before"][name]) + (
            stats["after"][name] - stats["control"][name])
        np.testing.assert_allclose(parts, total, rtol=1e-12, atol=1e-15, err_msg=name)


def test_control_equal_to_one_end_puts_the_whole_change_in_the_other_part():
    before, _, after = _three(2)
    at_before = feature_change(*before, *after, control_source=before[0].copy(),
                               control_target=before[1].copy(), **FAST)
    at_after = feature_change(*before, *after, control_source=after[0].copy(),
                              control_target=after[1].copy(), **FAST)
    for name in STATISTICS:
        zero, whole = at_before.parts["normalisation"][name], at_before.parts["weights"][name]
        assert (zero.estimate, zero.low, zero.high, zero.pvalue) == (0.0, 0.0, 0.0, 1.0)
        total = at_before.parts["total"][name]
        assert (whole.estimate, whole.low, whole.high) == (total.estimate, total.low,
                                                           total.high)
        zero = at_after.parts["weights"][name]
        assert (zero.estimate, zero.low, zero.high, zero.pvalue) == (0.0, 0.0, 0.0, 1.0)


def test_mixed_reading_is_pretrained_source_against_finetuned_target():
    from scipy.spatial.distance import cdist

    (s, t), _, (s2, t2) = _three(3)
    c = feature_change(s, t, s2, t2, **FAST)
    np.testing.assert_allclose(c.mixed.distance, cdist(s, t2).mean(), rtol=1e-12)
    d = c.mixed_deltas["distance"]
    assert d.before == c.before.distance and d.after == c.mixed.distance
    assert d.low < d.high and d.pvalue is None
    assert set(c.parts) == {"total"}  # no control: the total change only
    with pytest.raises(ValueError, match="both control_source and control_target"):
        feature_change(s, t, s2, t2, control_source=s)


def test_t_interval_matches_scipy():
    values = np.array([-1.3, -0.2, -0.9, -1.7, 0.4])
    mean, low, high = t_interval(values, 0.9)
    ref = scipy.stats.t.interval(0.9, len(values) - 1, loc=values.mean(),
                                 scale=scipy.stats.sem(values))
    np.testing.assert_allclose([low, high], ref, rtol=1e-12)
    assert mean == pytest.approx(values.mean(), rel=1e-15)
    with pytest.raises(ValueError, match="at least 2 values"):
        t_interval([1.0])


def test_welch_interval_matches_scipy():
    a = np.array([0.838, 0.851, 0.862])
    b = np.array([0.803, 0.816, 0.816, 0.79])
    diff, low, high = welch_interval(a, b, 0.95)
    ref = scipy.stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    np.testing.assert_allclose([low, high], [ref.low, ref.high], rtol=1e-12)
    assert diff == pytest.approx(a.mean() - b.mean(), rel=1e-15)
    with pytest.raises(ValueError, match="at least 2 values per group"):
        welch_interval([1.0], [1.0, 2.0])


def _holm_reference(p):
    """Holm (1979), step by step: sort, multiply by (k - rank), running maximum, cap at 1."""
    k, order, out, running = len(p), sorted(range(len(p)), key=lambda i: p[i]), [0.0] * len(p), 0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (k - rank) * p[i]))
        out[i] = running
    return out


def test_holm_matches_a_reference():
    rng = np.random.default_rng(0)
    for p in (rng.uniform(0, 0.2, 12), np.array([0.01, 0.04, 0.03, 0.005, 0.5]),
              np.array([0.02, 0.02, 0.9])):
        np.testing.assert_allclose(holm(p), _holm_reference(list(p)), rtol=1e-15)
    assert holm([]).size == 0


def test_seed_summary_means_intervals_and_verdicts():
    changes = [_change(seed, shift=0.05 * seed) for seed in range(4)]
    s = seed_summary(changes, labels=[f"seed {i}" for i in range(4)], confidence=0.95)
    assert s.n_seeds == 4 and s.has_verdict
    for name in STATISTICS:
        total, norm, weights = (s.changes[p][name] for p in PARTS)
        values = [c.deltas[name].estimate for c in changes]
        ref = scipy.stats.t.interval(0.95, 3, loc=np.mean(values), scale=scipy.stats.sem(values))
        np.testing.assert_allclose([total.low, total.high], ref, rtol=1e-10, err_msg=name)
        np.testing.assert_allclose(norm.mean + weights.mean, total.mean, rtol=1e-12, atol=1e-15)
    # Holm over forms x seeds within each part; the floor 1/(B+1) is stated.
    rows = s.pvalues["total"]
    assert len(rows) == len(FORMS) * 4
    np.testing.assert_allclose([r["p_holm"] for r in rows],
                               _holm_reference([r["p"] for r in rows]))
    out = s.to_dict()
    assert out["permutation_pvalues"]["floor"] == pytest.approx(1 / 41)
    assert "not evidence for Prop. 5" in out["permutation_pvalues"]["reading"]
    assert "Seed level (4 fine-tuning runs" in s.verdict and "1/(B+1) = 0.0244" in s.verdict
    assert "total = normalisation + weights" in s.verdict
    for name in SCALE_FREE:
        assert s.changes["total"][name].text() in s.verdict

    few = seed_summary(changes[:2])
    assert not few.has_verdict and few.verdict.startswith(
        f"fewer than {MIN_SEEDS} seeds: no seed-level verdict")
    assert "no seed-level verdict" in few.to_table()
    assert few.changes["total"]["distance"].low is not None  # the interval is still shown
    with pytest.raises(ValueError, match="same control"):
        seed_summary([changes[0], feature_change(*_three(0)[0], *_three(0)[2], **FAST)])


def test_seed_verdict_reads_the_seed_interval_whichever_way_it_falls():
    # Fine-tuning that only rescales: D falls at every seed, no scale-free form moves.
    changes = []
    for seed in range(3):
        (s, t), _, _ = _three(seed)
        k = 0.5 + 0.1 * seed
        changes.append(feature_change(s, t, k * s, k * t, control_source=s, control_target=t,
                                      **FAST))
    v = seed_summary(changes).verdict
    assert "D fell" in v and "no scale-free form did" in v and "does not support" in v


def test_run_discovery_and_training_source(tmp_path):
    import json

    for seed in (1, 0):
        run = tmp_path / "root" / f"seed_{seed}"
        run.mkdir(parents=True)
        (run / "model.msgpack").write_bytes(b"x")
    (tmp_path / "root" / "seed_0" / "analysis_run.json").write_text(
        json.dumps({"data": {"train": {"spec": "chest_xray:train"}}}))
    found = find_finetuned([tmp_path / "root", tmp_path / "root" / "seed_0"])
    assert found == [tmp_path / "root" / "seed_0", tmp_path / "root" / "seed_1"]
    assert training_source(found[0]) == "chest_xray:train" and training_source(found[1]) is None
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no model\.msgpack in or below"):
        find_finetuned([tmp_path / "empty"])
    with pytest.raises(FileNotFoundError, match="no fine-tuned run"):
        find_finetuned([tmp_path / "nope"])
