"""featsim's figures: the layer CKA heatmap (matplotlib drawn on a ``Figure``: no pyplot
state, no GUI backend) and a classifier's reliability diagram. matplotlib is imported when a
figure is drawn, not at import."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from featsim.train.classification import RELIABILITY_KEYS

if TYPE_CHECKING:
    from featsim.comparison.result import ComparisonResult

__all__ = ["plot_cka", "plot_reliability"]


def plot_cka(result: ComparisonResult, path: str | os.PathLike) -> Path:
    """Saves the layer x layer CKA matrix as a heatmap (PNG, or any format matplotlib writes).

    Rows are the pretrained network's layers, columns the fine-tuned one's; the colour map is
    ``cividis`` (perceptually uniform, readable with colour-vision deficiencies) on [0, 1].

    Args:
        result: from :func:`featsim.comparison.compare_backbones`.
        path: the image file to write (folders are created).

    Returns:
        The path written.
    """
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    path = Path(path)
    values = np.asarray(result.cka.values)
    rows, cols = list(result.cka.rows), list(result.cka.cols)
    size = max(4.5, 0.55 * max(len(rows), len(cols)) + 2.5)
    fig = Figure(figsize=(size + 1.2, size), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(values, cmap="cividis", vmin=0.0, vmax=1.0, origin="lower",
                      aspect="equal", interpolation="nearest")
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("fine-tuned layer")
    ax.set_ylabel("pretrained layer")
    if len(rows) * len(cols) <= 225:
        for i in range(len(rows)):
            for j in range(len(cols)):
                ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if values[i, j] > 0.6 else "white")
    target = result.before_target.manifest["source"]["spec"]
    ax.set_title(f"{result.backbone}: pretrained vs fine-tuned\n"
                 f"{Path(str(target)).name or target} (n = {len(result.before_target)})",
                 fontsize=10)
    fig.colorbar(image, ax=ax, label="linear CKA", shrink=0.8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    return path


def plot_reliability(diagram: Mapping[str, object], ax=None):
    """Draws a reliability diagram from
    :func:`~featsim.train.classification.reliability_diagram`.

    Bars give the accuracy of each non-empty bin, hatched bars the gap to its mean
    confidence, and the dashed diagonal perfect calibration. matplotlib is imported here,
    not at module import.

    Args:
      diagram: the dict returned by
        :func:`~featsim.train.classification.reliability_diagram`.
      ax: a matplotlib ``Axes`` to draw on; a new ``4.5 x 4.5`` inch figure if None.

    Returns:
      The ``matplotlib.figure.Figure`` holding the axes.

    Raises:
      KeyError: ``diagram`` lacks one of
        :data:`~featsim.train.classification.RELIABILITY_KEYS`.
    """
    missing = [k for k in RELIABILITY_KEYS if k not in diagram]
    if missing:
        raise KeyError(
            f"diagram lacks {missing}; expected the keys {RELIABILITY_KEYS} of "
            "reliability_diagram()"
        )
    import matplotlib.pyplot as plt

    edges = np.asarray(diagram["bin_edges"], dtype=np.float64)
    conf = np.asarray(diagram["confidence"], dtype=np.float64)
    acc = np.asarray(diagram["accuracy"], dtype=np.float64)
    filled = np.asarray(diagram["count"]) > 0
    if ax is None:
        fig, ax = plt.subplots(figsize=(4.5, 4.5), layout="constrained")
    else:
        fig = ax.figure
    left, width = edges[:-1][filled], np.diff(edges)[filled]
    ax.bar(
        left,
        acc[filled],
        width=width,
        align="edge",
        color="tab:blue",
        edgecolor="black",
        linewidth=0.6,
        label="Accuracy",
    )
    ax.bar(
        left,
        conf[filled] - acc[filled],
        bottom=acc[filled],
        width=width,
        align="edge",
        color="tab:red",
        alpha=0.25,
        edgecolor="tab:red",
        hatch="//",
        linewidth=0.6,
        label="Gap to confidence",
    )
    ax.plot([0.0, 1.0], [0.0, 1.0], linestyle="--", color="gray", label="Perfect calibration")
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.0)
    ax.set_aspect("equal")
    ax.set_xlabel("Confidence (probability of the predicted class)")
    ax.set_ylabel("Accuracy")
    n = int(np.sum(diagram["count"]))
    ax.set_title(f"Reliability diagram (ECE = {float(diagram['ece']):.3f}, n = {n})")
    ax.legend(loc="upper left", fontsize="small")
    return fig
