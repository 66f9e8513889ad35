"""featsim.train.summary: mean and std over seeds."""

import math
import warnings

import numpy as np
import pytest

from featsim.train.classification import (
    BINARY_METRIC_KEYS,
    UndefinedMetricWarning,
    classification_metrics,
)
from featsim.train.summary import summarize_runs


def _binary_data(n, seed):
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.65).astype(np.int64)
    logits = 1.5 * (2 * labels - 1) + rng.normal(0.0, 1.5, n)
    return labels, 1.0 / (1.0 + np.exp(-logits))


def _quiet(fn, *args, **kwargs):
    """Calls fn, failing on any warning (defined metrics must not warn)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn(*args, **kwargs)


def test_summarize_runs_mean_std():
    runs = [classification_metrics(*_binary_data(n=80, seed=s)) for s in range(3)]
    summary = _quiet(summarize_runs, runs)
    assert tuple(summary) == BINARY_METRIC_KEYS
    for key, (mean, std) in summary.items():
        values = np.array([r[key] for r in runs], dtype=np.float64)
        np.testing.assert_allclose(mean, values.mean(), rtol=1e-12)
        np.testing.assert_allclose(std, values.std(ddof=1), rtol=1e-12, atol=1e-15)
        assert type(mean) is float and type(std) is float


def test_summarize_runs_nan_aware():
    runs = [{"auc": 0.8, "acc": 0.5}, {"auc": math.nan, "acc": 0.6}, {"auc": 0.9, "acc": 0.7}]
    with pytest.warns(UndefinedMetricWarning, match=r"'auc': 1 of 3"):
        summary = summarize_runs(runs)
    assert summary["auc"][0] == pytest.approx(0.85)
    assert summary["auc"][1] == pytest.approx(np.std([0.8, 0.9], ddof=1))
    assert summary["acc"] == pytest.approx((0.6, 0.1))


def test_summarize_runs_degenerate():
    one = _quiet(summarize_runs, [{"acc": 0.5}])
    assert one["acc"][0] == 0.5 and math.isnan(one["acc"][1])
    with pytest.warns(UndefinedMetricWarning):
        none = summarize_runs([{"auc": math.nan}, {"auc": math.nan}])
    assert all(math.isnan(v) for v in none["auc"])
    with pytest.raises(ValueError, match="empty"):
        summarize_runs([])
    with pytest.raises(ValueError, match=r"runs\[1\] has different keys.*missing \['b'\]"):
        summarize_runs([{"a": 1.0, "b": 2.0}, {"a": 1.0}])
    with pytest.raises(ValueError, match="real number"):
        summarize_runs([{"model": "resnet18"}])
    with pytest.raises(ValueError, match="sequence"):
        summarize_runs({"acc": 0.5})
