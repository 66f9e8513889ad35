"""How every similarity statistic changed between representations of the same images.

Fine-tuning rescales features, so a fall in raw D alone is no evidence that the domains moved
closer. Every change is therefore reported for D *and* for its scale-free forms (the ratio of D
to the mean within-domain distance, the energy coefficient E / (2 D), cosine D), each with a
paired bootstrap interval and a paired permutation p-value from
:func:`featsim.metrics.paired.paired_resampling` (its module docstring defines both).

The two answer different questions. The permutation test is conditional on the images: its
null is sharp (the representation is unchanged), so any change that the statistic sees on
these images can reject it, however small. The bootstrap interval is about the population of
images the sample stands for: how far the change could move with another sample. On 500
ImageNet vs 624 chest X-ray images with a perturbed EfficientNet-Lite0 the ratio changed by
+0.011 with p = 0.005 (the swap null's spread: std 0.0033) while its interval was
[-0.007, +0.030] (bootstrap std 0.0094). Directions in the verdict ("fell", "rose") therefore
follow the intervals, and such disagreements are spelled out in it.

The per-representation reports come from :func:`featsim.report.similarity_report`; their
intervals (D, both within-domain baselines, ratio, energy distance, energy coefficient, cosine
D) come from the same paired resamples as the intervals of the changes, and their
``energy_pvalue`` from the pooled-relabelling energy test of the same engine. FID and KID are
reported as point values (an FID at d = 1280 costs about 2 s on two cores, so 200 resamples per
backbone would take minutes).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from featsim.comparison.result import PARTS, SCALE_FREE, STATISTICS, Delta, FeatureChange
from featsim.metrics.options import StatOptions
from featsim.metrics.paired import PAIRED_CI_METHODS, paired_resampling
from featsim.report import Interval, similarity_report

__all__ = ["PAIRED_DEFAULTS", "check_paired_options", "feature_change"]

# A comparison's point is its paired intervals and tests: on by default.
PAIRED_DEFAULTS = StatOptions(n_bootstrap=200, n_permutations=200)


def check_paired_options(stats: StatOptions) -> None:
    """Raises ValueError for options a paired comparison cannot honour (BCa intervals)."""
    if not isinstance(stats, StatOptions):
        raise TypeError(f"stats must be a featsim.metrics.StatOptions, got "
                        f"{type(stats).__name__}")
    if stats.ci_method not in PAIRED_CI_METHODS:
        raise ValueError(
            f"interval method (--ci-method) must be one of {', '.join(PAIRED_CI_METHODS)} for "
            f"paired changes, got {stats.ci_method!r}"
            + (" (BCa needs a jackknife of every statistic; not available here)"
               if stats.ci_method == "BCa" else ""))


def feature_change(
    before_source,
    before_target,
    after_source,
    after_target,
    *,
    stats: StatOptions = PAIRED_DEFAULTS,
    control_source=None,
    control_target=None,
) -> FeatureChange:
    """How every similarity statistic changed between two representations of the same images.

    Args:
        before_source: float array ``[n, d]``: source (natural) images, pretrained backbone.
        before_target: float array ``[m, d]``: target (medical) images, pretrained backbone.
        after_source: float array ``[n, d']``: the same source images, same order, fine-tuned.
        after_target: float array ``[m, d']``: the same target images, fine-tuned.
        stats: :class:`~featsim.metrics.StatOptions`: metric of D and the energy distance;
            ``n_bootstrap`` paired bootstrap resamples (0: no intervals); ``n_permutations``
            paired permutations for the change and pooled relabellings for each report's
            energy test (0: no p-values; the paired test needs ``d == d'``); ``confidence``;
            ``ci_method`` ``"basic"`` or ``"percentile"``; KID subsets; ``seed`` of every
            random choice (bootstrap, paired permutations and energy relabellings draw from
            independent streams of ``np.random.SeedSequence(seed)``). Default
            :data:`PAIRED_DEFAULTS` (200 resamples, 200 permutations).
        control_source, control_target: optional float arrays ``[n, d]`` and ``[m, d]``: the
            same images through a control representation (the BN-adapted pretrained
            backbone, :func:`featsim.adapt.adapt_batch_stats`). With them, every change is
            also split into a normalisation part (before -> control) and a weight part
            (control -> after), resampled jointly with the total (``FeatureChange.parts``).

    Returns:
        A :class:`~featsim.comparison.FeatureChange`. Deltas' estimates are ``after - before``
        of the two reports' values, so identical inputs give exactly 0, a p-value of 1 and a
        zero-width interval.

    Raises:
        ValueError: bad shapes (different image counts before and after, or different widths
            with permutations), NaN/inf rows, ``ci_method="BCa"``, or distance matrices too
            large for memory.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> s, t = rng.normal(size=(40, 8)), rng.normal(0.5, size=(30, 8))
        >>> change = feature_change(s, t, 2 * s, 2 * t,
        ...                         stats=StatOptions(n_bootstrap=50, n_permutations=50))
        >>> round(change.deltas["distance"].estimate / change.before.distance, 6)
        1.0
        >>> abs(change.deltas["ratio"].estimate) < 1e-12
        True
    """
    check_paired_options(stats)
    if (control_source is None) != (control_target is None):
        raise ValueError("pass both control_source and control_target, or neither")
    given = [(("before", "source"), before_source), (("before", "target"), before_target),
             (("after", "source"), after_source), (("after", "target"), after_target)]
    if control_source is not None:
        given += [(("control", "source"), control_source),
                  (("control", "target"), control_target)]
    sets = {}
    for key, value in given:
        a = np.asarray(value)
        if a.ndim != 2 or a.shape[0] < 2:
            raise ValueError(f"{'_'.join(key)} must have shape [n, d] with n >= 2, got "
                             f"shape {a.shape}")
        sets[key] = a
    sides = ("before", "control", "after") if control_source is not None else (
        "before", "after")
    for side in sides[1:]:
        for domain in ("source", "target"):
            b, a = sets["before", domain], sets[side, domain]
            if b.shape[0] != a.shape[0]:
                raise ValueError(
                    f"before_{domain}.shape[0] == {b.shape[0]} while {side}_{domain}.shape[0] "
                    f"== {a.shape[0]}: the same images must go through every backbone, in "
                    "the same order"
                )
            if (stats.n_permutations or side == "control") and b.shape[1] != a.shape[1]:
                raise ValueError(
                    f"before_{domain}.shape[1] == {b.shape[1]} while {side}_{domain}.shape[1] "
                    f"== {a.shape[1]}: the paired permutation test swaps feature vectors "
                    "between the backbones (and a BN-adapted control has the pretrained "
                    "widths), so both need the same width (or pass n_permutations=0)"
                )
    parts = {k: v for k, v in PARTS.items() if set(v) <= set(sides)}
    # The paper's second reading: pretrained source features vs fine-tuned target features.
    mixed_ok = sets["before", "source"].shape[1] == sets["after", "target"].shape[1]

    # Validates the arrays (shapes, NaN/inf rows) before any matrix is built.
    point = stats.replace(n_bootstrap=0, n_permutations=0)
    base = {side: similarity_report(sets[side, "source"], sets[side, "target"], stats=point)
            for side in sides}
    if mixed_ok:
        base["mixed"] = similarity_report(sets["before", "source"], sets["after", "target"],
                                          stats=point)
    views = {side: (side, side) for side in sides}
    if mixed_ok:
        views["mixed"] = ("before", "after")
    mixed_change = ("before", "mixed")
    est = paired_resampling(
        sets, views=views, changes=[*parts.values(), *([mixed_change] if mixed_ok else [])],
        swaps=list(parts.values()), energy_sides=sides, metric=stats.metric,
        n_bootstrap=stats.n_bootstrap, n_permutations=stats.n_permutations,
        confidence=stats.confidence, ci_method=stats.ci_method, seed=stats.seed)

    reports = {}
    for v, report in base.items():
        ci = {name: Interval(low, high, stats.confidence, stats.n_bootstrap, stats.ci_method)
              for name, (low, high) in est.intervals[v].items()}
        reports[v] = dataclasses.replace(
            report, ci=ci, energy_pvalue=est.energy_pvalues.get(v),
            n_permutations=stats.n_permutations if v in sides else 0)

    def delta(first, second, name, ci, pvalue):
        b, a = getattr(reports[first], name), getattr(reports[second], name)
        low, high = ci.get(name, (None, None))
        return Delta(name=name, before=float(b), after=float(a), estimate=float(a - b),
                     low=low, high=high, pvalue=pvalue, scale_free=name in SCALE_FREE)

    out_parts = {part: {name: delta(first, second, name, est.changes[first, second],
                                    est.pvalues[first, second].get(name))
                        for name in STATISTICS}
                 for part, (first, second) in parts.items()}
    mixed_deltas = ({name: delta("before", "mixed", name, est.changes[mixed_change], None)
                     for name in STATISTICS} if mixed_ok else {})
    return FeatureChange(before=reports["before"], after=reports["after"],
                         deltas=out_parts["total"], stats=stats,
                         control=reports.get("control"), parts=out_parts,
                         mixed=reports.get("mixed"), mixed_deltas=mixed_deltas)
