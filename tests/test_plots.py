"""featsim.plots: the reliability diagram (the CKA heatmap is tested in test_compare.py)."""

import numpy as np
import pytest

from featsim.plots import plot_reliability
from featsim.train.classification import reliability_diagram


def _binary_data(n, seed):
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.65).astype(np.int64)
    logits = 1.5 * (2 * labels - 1) + rng.normal(0.0, 1.5, n)
    return labels, 1.0 / (1.0 + np.exp(-logits))


def test_plot_reliability():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, p = _binary_data(n=100, seed=10)
    d = reliability_diagram(labels, p, n_bins=10)
    fig = plot_reliability(d)
    try:
        (ax,) = fig.axes
        assert "Confidence" in ax.get_xlabel() and ax.get_ylabel() == "Accuracy"
        assert f"ECE = {d['ece']:.3f}" in ax.get_title()
        assert ax.get_xlim() == (0.0, 1.0)
    finally:
        plt.close(fig)
    fig2, ax2 = plt.subplots()
    try:
        assert plot_reliability(d, ax=ax2) is fig2
    finally:
        plt.close(fig2)
    with pytest.raises(KeyError, match="count"):
        plot_reliability({k: v for k, v in d.items() if k != "count"})
