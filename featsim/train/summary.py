"""Mean and standard deviation of metrics over seeds: ``summarize_runs``."""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Mapping, Sequence

import numpy as np

from featsim.train.classification import UndefinedMetricWarning

__all__ = ["summarize_runs"]


def summarize_runs(runs: Sequence[Mapping[str, float]]) -> dict[str, tuple[float, float]]:
    """Mean and standard deviation of each metric over runs (e.g. ``--seeds 0,1,2``).

    ``std`` is the sample standard deviation (``ddof=1``, the unbiased variance estimator's
    root, as reported for "mean ± std over seeds"). Both are **NaN-aware**: a NaN value (e.g.
    an undefined ROC AUC in one run) is left out of that metric's statistics, and a
    :class:`UndefinedMetricWarning` names the metrics and how many values were left out.
    With fewer than two finite values ``std`` is NaN; with none, both are NaN.

    Args:
      runs: a non-empty sequence of metric dicts with the same keys and numeric values, e.g.
        from :func:`~featsim.train.classification.classification_metrics`.

    Returns:
      ``{key: (mean, std)}`` as Python floats, in the key order of ``runs[0]``.

    Raises:
      ValueError: ``runs`` is empty, the runs have different keys, or a value is not a
        real number.

    Example:
      >>> summarize_runs([{"accuracy": 0.8}, {"accuracy": 0.9}, {"accuracy": 1.0}])
      {'accuracy': (0.9, 0.09999999999999998)}
    """
    if isinstance(runs, Mapping) or not isinstance(runs, Sequence):
        raise ValueError(f"runs must be a sequence of metric dicts, got {type(runs).__name__}")
    if not runs:
        raise ValueError("runs is empty: need at least one metric dict")
    keys = list(runs[0])
    for i, run in enumerate(runs):
        if set(run) != set(keys):
            extra = sorted(set(run) - set(keys))
            lacking = sorted(set(keys) - set(run))
            raise ValueError(
                f"runs[{i}] has different keys from runs[0]: extra {extra}, missing {lacking}"
            )
    summary: dict[str, tuple[float, float]] = {}
    skipped: dict[str, int] = {}
    for key in keys:
        values = np.array(
            [_real(run[key], f"runs[{i}][{key!r}]") for i, run in enumerate(runs)]
        )
        finite = values[~np.isnan(values)]
        if finite.size < values.size:
            skipped[key] = values.size - finite.size
        mean = float(np.mean(finite)) if finite.size else math.nan
        std = float(np.std(finite, ddof=1)) if finite.size >= 2 else math.nan
        summary[key] = (mean, std)
    if skipped:
        detail = ", ".join(f"{k!r}: {v} of {len(runs)}" for k, v in skipped.items())
        warnings.warn(
            f"summarize_runs left NaN values out of the mean and std ({detail})",
            UndefinedMetricWarning,
            stacklevel=2,
        )
    return summary


def _real(value, name: str) -> float:
    """``float(value)`` for a real scalar (Python, NumPy or a size-1 array), else ValueError."""
    if isinstance(value, bool | str | bytes) or value is None:
        raise ValueError(f"{name} must be a real number, got {value!r}")
    if isinstance(value, numbers.Real):
        return float(value)
    arr = np.asarray(value)
    if arr.size != 1 or not (np.issubdtype(arr.dtype, np.floating)
                             or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{name} must be a real scalar, got {type(value).__name__} of shape "
                         f"{arr.shape} and dtype {arr.dtype}")
    return float(arr.reshape(()))
