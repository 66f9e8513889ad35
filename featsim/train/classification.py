"""Classification metrics for evaluating fine-tuned classifiers, computed on the host.

:func:`classification_metrics` turns integer labels and predicted probabilities into the
numbers Gu & Lee (2024, "Deep Transfer Learning Using Real-World Image Features for Medical
Image Classification", Bioengineering 11:406, sec. 5.9 and Tables 2-4) report per epoch
(accuracy, precision, recall, F1, G-mean) plus what clinical evaluations add (specificity,
ROC AUC and calibration; see the review of Trivedi et al., sec. 8.4 in ``shared/papers``).
:func:`reliability_diagram` bins calibration (drawn by :func:`featsim.plots.plot_reliability`)
and :func:`auc_ci` adds a bootstrap interval to the ROC AUC; the mean and std over seeds are
:func:`featsim.train.summary.summarize_runs`'s.

Everything here is NumPy in float64 on the host (``jax.Array`` inputs are copied to the
host); scikit-learn is not imported. Results are Python ``float`` (``int`` for counts). The
metric names are :mod:`featsim.train.metric_keys`' (no NumPy or SciPy: the CLI reads them).

Definitions (``y`` the true class, ``ŷ`` the predicted class):

* **Binary** (``probs`` of shape ``[n]`` or ``[n, 1]``: P(class 1), a sigmoid head; or
  ``[n, 2]``: class probabilities, of which column 1 is used): ``ŷ = 1`` iff
  ``P(class 1) > threshold`` (strictly; with ``threshold=0.5`` this is the ``argmax`` of
  ``[1 - p, p]`` with ties going to class 0). Class 1 is the positive class.
  ``precision = tp / (tp + fp)``, ``recall`` (sensitivity) ``= tp / (tp + fn)``,
  ``specificity = tn / (tn + fp)``, ``f1 = 2 tp / (2 tp + fp + fn)`` (the harmonic mean of
  precision and recall), ``*_micro`` from the counts summed over both classes, as
  scikit-learn's ``average="micro"`` (El Azhari reports these; on single-label binary data
  ``precision_micro == recall_micro == f1_micro == accuracy``),
  ``g_mean = sqrt(recall * specificity)`` (Kubat & Matwin 1997,
  "Addressing the Curse of Imbalanced Training Sets: One-Sided Selection", ICML; He & Garcia
  2009, "Learning from Imbalanced Data", IEEE TKDE 21:1263). Gu & Lee report a G-mean without
  giving its formula, and their values cannot be recomputed from their own accuracy,
  precision and recall on the 390/234 test set with this or another common formula (e.g.
  ResNet50 from scratch: 0.858 reported, 0.827 implied): compare trends with theirs, not
  digits.
* **Multi-class** (``probs`` of shape ``[n, C]``, ``C >= 3``): ``ŷ = argmax`` (ties to the
  lowest class). Per class ``c`` one-vs-rest counts give precision, recall, F1 and
  specificity; ``*_macro`` is their unweighted mean over all ``C`` classes and ``*_micro``
  uses the counts summed over classes (for single-label data ``precision_micro ==
  recall_micro == f1_micro == accuracy``), as scikit-learn's ``average="macro"/"micro"``
  with ``labels=range(C)``. ``g_mean`` is the ``C``-th root of the product of the per-class
  recalls, the multi-class G-mean of imbalanced-learn's ``geometric_mean_score`` (default
  ``average="multiclass"``; for ``C = 2`` it is the binary ``sqrt(recall * specificity)``).
* **ROC AUC**: the Mann-Whitney U statistic ``P(s_pos > s_neg) + 0.5 P(s_pos = s_neg)``
  from average ranks (ties count one half), which equals the trapezoidal area under the ROC
  curve and ``sklearn.metrics.roc_auc_score`` exactly (Hanley & McNeil 1982, Radiology
  143:29). Multi-class: ``roc_auc_macro`` is the unweighted mean of the one-vs-rest AUCs of
  ``probs[:, c]`` (Fawcett 2006, "An introduction to ROC analysis", PRL 27:861), as
  ``roc_auc_score(multi_class="ovr", average="macro")``. :func:`auc_ci` adds a stratified
  bootstrap percentile interval.
* **ECE** (expected calibration error; Guo, Pleiss, Sun & Weinberger 2017, "On Calibration
  of Modern Neural Networks", ICML, eq. 3): the confidence of an example is the probability
  of its ``argmax`` class (``max(p, 1 - p)`` for a sigmoid head, independent of
  ``threshold``); examples are put in ``n_bins`` equal-width bins ``B_m = (m-1)/M < conf <=
  m/M`` (the first bin also holds 0) and ``ECE = sum_m |B_m| / n * |acc(B_m) - conf(B_m)|``.

Conventions for undefined values (chosen so that per-epoch evaluation never crashes a run):

* A ratio whose denominator is zero is **0**, silently: no predicted positives gives
  ``precision = 0``, no actual positives ``recall = 0``, no actual negatives
  ``specificity = 0``, and ``f1 = 0`` when ``tp + fp + fn = 0``. This is scikit-learn's
  ``zero_division=0``; ``g_mean`` then follows (0 if any per-class recall is 0).
* ROC AUC is undefined when only one class is present (for a one-vs-rest AUC: when class
  ``c`` is absent, or is the only class). We return **NaN** and issue an
  :class:`UndefinedMetricWarning` naming the reason; ``roc_auc_macro`` is NaN if any class's
  AUC is undefined, and the warning names the classes. Recent scikit-learn does the same
  (1.9 warns and returns NaN); older releases raised ``ValueError``.
* Invalid input (length mismatch, labels outside ``[0, C)`` or not integers, probabilities
  outside ``[0, 1]``, NaN/inf, rows not summing to 1 within ``PROB_SUM_ATOL``) is never
  repaired: it raises ``ValueError`` saying what was received.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import TYPE_CHECKING

import numpy as np
import scipy.stats

from featsim.metrics.stats import BootstrapResult
from featsim.train.metric_keys import BINARY_METRIC_KEYS, MULTICLASS_METRIC_KEYS

if TYPE_CHECKING:
    from featsim.train.epoch import EpochOutputs

__all__ = [
    "BINARY_METRIC_KEYS",
    "MULTICLASS_METRIC_KEYS",
    "PROB_SUM_ATOL",
    "RELIABILITY_KEYS",
    "UndefinedMetricWarning",
    "auc_ci",
    "classification_metrics",
    "epoch_metrics",
    "reliability_diagram",
]

#: Keys of :func:`reliability_diagram`.
RELIABILITY_KEYS = ("bin_edges", "confidence", "accuracy", "count", "ece")

#: Largest accepted ``|sum(probs[i]) - 1|`` for ``[n, C]`` probabilities; loose enough for
#: float32 softmax outputs, tight enough to reject logits or unnormalised scores.
PROB_SUM_ATOL = 1e-4


class UndefinedMetricWarning(UserWarning):
    """A metric is undefined for this input (e.g. ROC AUC with one class) and is NaN."""


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def classification_metrics(
    labels,
    probs,
    *,
    num_classes: int | None = None,
    threshold: float = 0.5,
    n_bins: int = 15,
    loss: float | None = None,
) -> dict[str, float]:
    """Accuracy, precision, recall, specificity, F1, G-mean, ROC AUC and ECE.

    Args:
      labels: integer array of shape ``[n]`` with values in ``[0, C)`` (bool or
        integer-valued floats are accepted).
      probs: float array of predicted probabilities: shape ``[n]`` or ``[n, 1]`` (binary,
        P(class 1) from a sigmoid head), ``[n, 2]`` (binary, rows sum to 1, column 1 is used)
        or ``[n, C]`` with ``C >= 3`` (rows sum to 1).
      num_classes: if given, checked against the shape of ``probs`` (2 for the binary
        shapes, ``C`` for ``[n, C]``).
      threshold: binary only, ``ŷ = 1`` iff ``P(class 1) > threshold``; in ``[0, 1]``. A
        multi-class problem uses ``argmax`` and rejects a value other than 0.5.
      n_bins: number of equal-width confidence bins of the ECE, ``>= 1``.
      loss: passed through as ``float(loss)`` under the key ``"loss"`` when not None.

    Returns:
      A dict with the keys :data:`BINARY_METRIC_KEYS` or :data:`MULTICLASS_METRIC_KEYS` (in
      that order), then ``"loss"`` if given. Definitions and the zero-division conventions
      are in the module docstring.

    Raises:
      ValueError: invalid shapes or values (see the module docstring).

    Warns:
      UndefinedMetricWarning: when a ROC AUC is undefined and returned as NaN.

    Example:
      >>> m = classification_metrics([0, 1, 1, 0], [0.2, 0.9, 0.4, 0.1])
      >>> m["accuracy"], m["recall"], m["roc_auc"]
      (0.75, 0.5, 1.0)
    """
    labels, probs, c = _check_labels_probs(labels, probs, num_classes=num_classes)
    threshold = _check_threshold(threshold)
    n_bins = _check_n_bins(n_bins)
    if c == 2:
        metrics = _binary_metrics(labels, _positive_probs(probs), threshold, n_bins)
    else:
        if threshold != 0.5:
            raise ValueError(
                f"threshold={threshold} applies to binary problems only; probs of shape "
                f"{probs.shape} ({c} classes) are classified by argmax"
            )
        metrics = _multiclass_metrics(labels, probs, n_bins)
    if loss is not None:
        metrics["loss"] = _as_float(loss, "loss")
    return metrics


def reliability_diagram(labels, probs, *, n_bins: int = 15) -> dict[str, np.ndarray | float]:
    """Per-bin confidence and accuracy for a reliability diagram (Guo et al. 2017, sec. 2).

    Args:
      labels: integer array of shape ``[n]``, as in :func:`classification_metrics`.
      probs: probabilities of shape ``[n]``, ``[n, 1]``, ``[n, 2]`` or ``[n, C]``, as in
        :func:`classification_metrics`.
      n_bins: number of equal-width bins on ``[0, 1]``, ``>= 1``.

    Returns:
      A dict with the keys :data:`RELIABILITY_KEYS`: ``bin_edges`` float64 ``[n_bins + 1]``
      (``linspace(0, 1, n_bins + 1)``, bins closed on the right); ``confidence`` and
      ``accuracy`` float64 ``[n_bins]``, the mean confidence of the predicted class and the
      fraction of correct predictions in each bin (NaN for an empty bin); ``count`` int64
      ``[n_bins]``; ``ece`` the expected calibration error (a float, equal to
      ``classification_metrics(...)["ece"]``).

    Raises:
      ValueError: invalid shapes or values.

    Example:
      >>> d = reliability_diagram([1, 0, 0, 1], [0.9, 0.8, 0.3, 0.6], n_bins=5)
      >>> d["count"].tolist(), round(d["ece"], 6)
      ([0, 0, 1, 2, 1], 0.25)
    """
    labels, probs, c = _check_labels_probs(labels, probs, num_classes=None)
    n_bins = _check_n_bins(n_bins)
    if c == 2:
        conf, correct = _binary_confidence(labels, _positive_probs(probs))
    else:
        conf, correct = _multiclass_confidence(labels, probs)
    edges, mean_conf, acc, count = _calibration_bins(conf, correct, n_bins)
    return {
        "bin_edges": edges,
        "confidence": mean_conf,
        "accuracy": acc,
        "count": count,
        "ece": _ece_from_bins(mean_conf, acc, count),
    }


def auc_ci(labels, scores, *, n_resamples: int = 1000, seed: int = 0,
           confidence: float = 0.95):
    """ROC AUC with a stratified bootstrap percentile confidence interval.

    Each resample draws ``n_pos`` positives from the positives and ``n_neg`` negatives from
    the negatives, with replacement (class sizes fixed, so every resample has an AUC; the
    stratified bootstrap of pROC's ``ci.auc``, Robin et al. 2011, BMC Bioinformatics
    12:77). The draw is, for ``b = 0..n_resamples-1`` in order, with ``rng =
    np.random.default_rng(seed)``: ``rng.integers(0, n_pos, n_pos)`` (indices into the
    positives in data order) then ``rng.integers(0, n_neg, n_neg)`` (into the negatives).
    The AUC of a resample is the Mann-Whitney statistic (as in
    :func:`classification_metrics`, equal to ``sklearn.metrics.roc_auc_score``); the
    interval is the ``(1 -/+ confidence) / 2`` quantiles of the ``n_resamples`` AUCs
    (``np.quantile``, linear interpolation; Efron & Tibshirani 1993, ch. 13). The argument
    names are :func:`featsim.metrics.bootstrap_ci`'s.

    Args:
      labels: ``[n]`` binary labels (0/1, bool, or integer-valued floats); class 1 positive.
      scores: ``[n]`` real scores, higher meaning more likely positive (probabilities or
        logits); ``[n, 1]`` or ``[n, 2]`` probabilities use their last column.
      n_resamples: number of bootstrap resamples, ``>= 1``.
      seed: seed of ``np.random.default_rng``; the result is deterministic for a seed.
      confidence: confidence level in (0, 1).

    Returns:
      A :class:`featsim.metrics.stats.BootstrapResult`: ``estimate`` (the AUC of the data),
      ``low``, ``high``, ``std`` (``ddof=1`` over the resamples), ``confidence=confidence``,
      ``n_resamples=n_resamples``, ``method="percentile"`` and ``distribution`` (float64
      ``[n_resamples]``).

    Raises:
      ValueError: invalid shapes or values, labels other than 0/1, only one class present
        (the AUC is undefined), ``n_resamples < 1`` or ``confidence`` outside (0, 1).

    Example:
      >>> res = auc_ci([0, 0, 1, 1, 0, 1], [0.1, 0.4, 0.35, 0.8, 0.2, 0.9], n_resamples=200)
      >>> round(res.estimate, 4), bool(res.low <= res.estimate <= res.high)
      (0.8889, True)
    """
    scores_in = np.asarray(scores)
    if scores_in.ndim == 2 and scores_in.shape[1] in (1, 2):
        labels, probs, _ = _check_labels_probs(labels, scores_in, num_classes=2)
        scores = _positive_probs(probs)
    else:
        if scores_in.ndim != 1:
            raise ValueError(f"scores must have shape [n] (or [n, 1], [n, 2] probabilities), "
                             f"got shape {scores_in.shape}")
        if not (np.issubdtype(scores_in.dtype, np.floating)
                or np.issubdtype(scores_in.dtype, np.integer)):
            raise ValueError(f"scores must be a real array, got dtype {scores_in.dtype}")
        scores = scores_in.astype(np.float64)
        if not np.all(np.isfinite(scores)):
            raise ValueError(
                f"scores contains {int(np.sum(~np.isfinite(scores)))} NaN/inf values")
        # Probability-range checks do not apply to scores: validate labels against [n, 1].
        labels, _, _ = _check_labels_probs(labels, np.zeros((scores.size, 1)), num_classes=2)
    if (isinstance(n_resamples, bool) or not isinstance(n_resamples, numbers.Integral)
            or n_resamples < 1):
        raise ValueError(f"n_resamples must be an integer >= 1, got {n_resamples!r}")
    confidence = _as_float(confidence, "confidence")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1) (exclusive), got {confidence}")
    positive = labels == 1
    pos, neg = scores[positive], scores[~positive]
    if pos.size == 0 or neg.size == 0:
        raise ValueError(
            f"the AUC needs both classes; labels hold {pos.size} positives and {neg.size} "
            "negatives")
    is_pos = np.concatenate([np.ones(pos.size, bool), np.zeros(neg.size, bool)])
    estimate = _mann_whitney_auc(is_pos, np.concatenate([pos, neg]))
    rng = np.random.default_rng(seed)
    distribution = np.empty(int(n_resamples), np.float64)
    for b in range(int(n_resamples)):
        i = rng.integers(0, pos.size, pos.size)
        j = rng.integers(0, neg.size, neg.size)
        distribution[b] = _mann_whitney_auc(is_pos, np.concatenate([pos[i], neg[j]]))
    low, high = np.quantile(distribution, [(1.0 - confidence) / 2.0, (1.0 + confidence) / 2.0])
    return BootstrapResult(
        estimate=float(estimate), low=float(low), high=float(high),
        std=float(np.std(distribution, ddof=1)) if n_resamples > 1 else math.nan,
        confidence=confidence, n_resamples=int(n_resamples), method="percentile",
        distribution=distribution)


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _as_float(value, name: str) -> float:
    """``float(value)`` for a real scalar (Python, NumPy or a 0-d/size-1 JAX array)."""
    if isinstance(value, bool | str | bytes):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    if isinstance(value, numbers.Real):
        return float(value)
    try:
        arr = np.asarray(value)
    except Exception as err:  # e.g. a tracer: say what was received
        raise ValueError(f"{name} must be a real number, got {type(value).__name__}") from err
    if arr.size != 1 or not (
        np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
    ):
        raise ValueError(
            f"{name} must be a real scalar, got an array of shape {arr.shape} and dtype {arr.dtype}"
        )
    return float(arr.reshape(()))


def _check_threshold(threshold) -> float:
    t = _as_float(threshold, "threshold")
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"threshold must lie in [0, 1], got {threshold!r}")
    return t


def _check_n_bins(n_bins) -> int:
    if isinstance(n_bins, bool) or not isinstance(n_bins, numbers.Integral) or n_bins < 1:
        raise ValueError(f"n_bins must be an integer >= 1, got {n_bins!r}")
    return int(n_bins)


def _check_labels_probs(labels, probs, *, num_classes):
    """Validates and converts; returns ``(labels int64 [n], probs float64, C)``.

    ``probs`` keeps its shape (``[n]``, ``[n, 1]``, ``[n, 2]`` or ``[n, C]``).
    """
    probs_in = np.asarray(probs)
    if probs_in.dtype == object or not (
        np.issubdtype(probs_in.dtype, np.floating)
        or np.issubdtype(probs_in.dtype, np.integer)
        or probs_in.dtype == bool
    ):
        raise ValueError(f"probs must be a real array, got dtype {probs_in.dtype}")
    probs = probs_in.astype(np.float64)
    if probs.ndim == 1 or (probs.ndim == 2 and probs.shape[1] in (1, 2)):
        c = 2
    elif probs.ndim == 2 and probs.shape[1] >= 3:
        c = probs.shape[1]
    else:
        raise ValueError(
            f"probs must have shape [n] or [n, 1] (P(class 1)), [n, 2] or [n, C]; got "
            f"shape {probs.shape}"
        )
    if num_classes is not None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral):
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        if num_classes != c:
            raise ValueError(
                f"num_classes={num_classes} but probs of shape {probs.shape} describe {c} "
                "classes (binary: [n], [n, 1] or [n, 2]; C classes: [n, C])"
            )
    n = probs.shape[0]
    if n == 0:
        raise ValueError(f"need at least one example, got probs of shape {probs.shape}")

    bad = ~np.isfinite(probs)
    if bad.any():
        raise ValueError(
            f"probs contains {int(bad.sum())} NaN/inf values (of {probs.size}); first at "
            f"flat index {int(np.flatnonzero(bad)[0])}"
        )
    lo, hi = float(probs.min()), float(probs.max())
    if lo < 0.0 or hi > 1.0:
        outside = int(np.sum((probs < 0.0) | (probs > 1.0)))
        raise ValueError(
            f"probs must lie in [0, 1] (probabilities, not logits); got {outside} values "
            f"outside, min {lo:.6g}, max {hi:.6g}"
        )
    if probs.ndim == 2 and probs.shape[1] >= 2:
        err = np.abs(probs.sum(axis=1) - 1.0)
        worst = int(np.argmax(err))
        if err[worst] > PROB_SUM_ATOL:
            raise ValueError(
                f"rows of probs (shape {probs.shape}) must sum to 1 within {PROB_SUM_ATOL}; "
                f"{int(np.sum(err > PROB_SUM_ATOL))} rows do not, e.g. row {worst} sums to "
                f"{probs[worst].sum():.6g}"
            )

    labels_in = np.asarray(labels)
    if labels_in.ndim != 1 or labels_in.shape[0] != n:
        raise ValueError(
            f"labels must have shape [n] matching probs: labels.shape == {labels_in.shape} "
            f"while probs.shape == {probs.shape}"
        )
    if labels_in.dtype == bool:
        labels_int = labels_in.astype(np.int64)
    elif np.issubdtype(labels_in.dtype, np.integer):
        labels_int = labels_in.astype(np.int64)
    elif np.issubdtype(labels_in.dtype, np.floating):
        finite = np.isfinite(labels_in)
        integral = finite & (labels_in == np.round(np.where(finite, labels_in, 0.0)))
        if not integral.all():
            i = int(np.flatnonzero(~integral)[0])
            raise ValueError(
                f"labels must be class indices (integers); got {labels_in[i]!r} at index {i}"
            )
        labels_int = labels_in.astype(np.int64)
    else:
        raise ValueError(f"labels must be integer class indices, got dtype {labels_in.dtype}")
    out = (labels_int < 0) | (labels_int >= c)
    if out.any():
        raise ValueError(
            f"labels must lie in [0, {c}) for probs of shape {probs.shape}; got "
            f"{int(out.sum())} outside, e.g. {int(labels_int[np.flatnonzero(out)[0]])}"
        )
    return labels_int, probs, c


def _positive_probs(probs: np.ndarray) -> np.ndarray:
    """P(class 1), shape ``[n]``, from binary probs of shape ``[n]``, ``[n, 1]`` or ``[n, 2]``."""
    if probs.ndim == 1:
        return probs
    return probs[:, -1]  # column 0 of [n, 1], column 1 of [n, 2]


# --------------------------------------------------------------------------------------------
# Kernels (checked input)
# --------------------------------------------------------------------------------------------


def _ratio(num, den):
    """``num / den`` with 0 where ``den == 0`` (scikit-learn's ``zero_division=0``)."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)


def _undefined(message: str) -> float:
    warnings.warn(message, UndefinedMetricWarning, stacklevel=4)
    return math.nan


def _mann_whitney_auc(positive: np.ndarray, scores: np.ndarray) -> float | None:
    """ROC AUC from average ranks; None when one of the two groups is empty."""
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = scipy.stats.rankdata(scores)  # average ranks: a tie counts one half
    u = float(ranks[positive].sum()) - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


def _binary_confidence(labels, p_pos):
    """Confidence of the argmax class and whether it is right, for a sigmoid head."""
    pred = p_pos > 0.5
    conf = np.where(pred, p_pos, 1.0 - p_pos)
    return conf, pred == (labels == 1)


def _multiclass_confidence(labels, probs):
    pred = np.argmax(probs, axis=1)
    return probs[np.arange(probs.shape[0]), pred], pred == labels


def _calibration_bins(conf, correct, n_bins):
    """Equal-width bins ``(e[m], e[m+1]]`` (the first also holds 0): edges, mean conf, acc,
    count."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins).astype(np.int64)
    conf_sum = np.bincount(idx, weights=conf, minlength=n_bins)
    correct_sum = np.bincount(idx, weights=correct.astype(np.float64), minlength=n_bins)
    filled = count > 0
    safe = np.where(filled, count, 1)
    mean_conf = np.where(filled, conf_sum / safe, np.nan)
    acc = np.where(filled, correct_sum / safe, np.nan)
    return edges, mean_conf, acc, count


def _ece_from_bins(mean_conf, acc, count) -> float:
    filled = count > 0
    gaps = np.abs(acc[filled] - mean_conf[filled])
    return float(np.sum(count[filled] * gaps) / np.sum(count))


def _ece(conf, correct, n_bins) -> float:
    _, mean_conf, acc, count = _calibration_bins(conf, correct, n_bins)
    return _ece_from_bins(mean_conf, acc, count)


def _binary_metrics(labels, p_pos, threshold, n_bins) -> dict[str, float]:
    y = labels == 1
    pred = p_pos > threshold
    tp = int(np.sum(y & pred))
    fp = int(np.sum(~y & pred))
    tn = int(np.sum(~y & ~pred))
    fn = int(np.sum(y & ~pred))
    recall = float(_ratio(tp, tp + fn))
    specificity = float(_ratio(tn, tn + fp))
    auc = _mann_whitney_auc(y, p_pos)
    if auc is None:
        only = 1 if fn + tp else 0
        auc = _undefined(
            f"roc_auc is undefined (NaN): only class {only} is present in labels "
            f"({labels.size} examples)"
        )
    conf, correct = _binary_confidence(labels, p_pos)
    return {
        "accuracy": (tp + tn) / labels.size,
        "precision": float(_ratio(tp, tp + fp)),
        "recall": recall,
        "specificity": specificity,
        "f1": float(_ratio(2 * tp, 2 * tp + fp + fn)),
        # Counts summed over both classes: class 0's tp is tn, its fp is fn, its fn is fp.
        "precision_micro": float(_ratio(tp + tn, tp + tn + fp + fn)),
        "recall_micro": float(_ratio(tp + tn, tp + tn + fn + fp)),
        "f1_micro": float(_ratio(2 * (tp + tn), 2 * (tp + tn) + 2 * (fp + fn))),
        "g_mean": math.sqrt(recall * specificity),
        "roc_auc": auc,
        "ece": _ece(conf, correct, n_bins),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }


def _geometric_mean(values: np.ndarray) -> float:
    if np.any(values <= 0.0):
        return 0.0
    return float(np.exp(np.mean(np.log(values))))  # the C-th root without underflow


def _multiclass_metrics(labels, probs, n_bins) -> dict[str, float]:
    n, c = probs.shape
    pred = np.argmax(probs, axis=1)
    cm = np.bincount(labels * c + pred, minlength=c * c).reshape(c, c)  # [true, predicted]
    tp = np.diag(cm).astype(np.int64)
    fp = cm.sum(axis=0) - tp
    fn = cm.sum(axis=1) - tp
    tn = n - tp - fp - fn
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    f1 = _ratio(2 * tp, 2 * tp + fp + fn)
    specificity = _ratio(tn, tn + fp)
    tp_all, fp_all, fn_all = int(tp.sum()), int(fp.sum()), int(fn.sum())

    aucs = [_mann_whitney_auc(labels == k, probs[:, k]) for k in range(c)]
    undefined = [k for k, a in enumerate(aucs) if a is None]
    if undefined:
        counts = np.bincount(labels, minlength=c)
        absent = [k for k in undefined if counts[k] == 0]
        sole = [k for k in undefined if counts[k] == n]
        reason = f"classes {absent} are absent from labels" if absent else ""
        if sole:
            reason += (" and " if reason else "") + f"class {sole[0]} is the only one present"
        auc = _undefined(
            f"roc_auc_macro is undefined (NaN): a one-vs-rest AUC needs both positives and "
            f"negatives, but {reason} (examples per class {counts.tolist()})"
        )
    else:
        auc = float(np.mean(aucs))
    conf, correct = _multiclass_confidence(labels, probs)
    return {
        "accuracy": float(tp_all / n),
        "precision_macro": float(np.mean(precision)),
        "precision_micro": float(_ratio(tp_all, tp_all + fp_all)),
        "recall_macro": float(np.mean(recall)),
        "recall_micro": float(_ratio(tp_all, tp_all + fn_all)),
        "f1_macro": float(np.mean(f1)),
        "f1_micro": float(_ratio(2 * tp_all, 2 * tp_all + fp_all + fn_all)),
        "specificity_macro": float(np.mean(specificity)),
        "g_mean": _geometric_mean(recall),
        "roc_auc_macro": auc,
        "ece": _ece(conf, correct, n_bins),
    }


_AUX_SUMS = {"ce_sum": "class_loss", "aux_err_sum": "aux_mse"}  # step output -> metric


def epoch_metrics(outputs: EpochOutputs, labels: np.ndarray, num_classes: int) -> dict:
    """Loss and every classification metric of an epoch's outputs (one fetch). With an
    auxiliary head also the class-weighted cross-entropy alone and the regression MSE (mean
    over examples and targets), beside the total ``loss``.

    The loss is global (psum); with several processes the other metrics cover this
    process's share of the examples.
    """
    sums, collected, rows = outputs.fetch()
    count = sums["count"]
    metrics = classification_metrics(labels[rows], collected["probs"],
                                     num_classes=num_classes, loss=sums["loss_sum"] / count)
    metrics.update({name: sums[key] / count for key, name in _AUX_SUMS.items() if key in sums})
    return metrics
