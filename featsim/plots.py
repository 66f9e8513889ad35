"""featsim's figures: matplotlib drawn on ``Figure`` objects (no pyplot state, no GUI backend).

The reliability diagram of a classifier lives beside its metrics
(:func:`featsim.train.evaluation.plot_reliability`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from featsim.comparison.result import ComparisonResult

__all__ = ["plot_cka"]


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
