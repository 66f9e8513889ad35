"""The verdict on Gu & Lee's Proposition 5, in words, from a :class:`ComparisonResult`.

Directions ("fell", "rose") follow the paired bootstrap intervals; a permutation p below the
level with an interval that includes 0 is spelled out as a change of representation on these
images, not a population-level change. A representation whose output barely depends on the
image (collapsed) gets no verdict at all.
"""

from __future__ import annotations

import math

import numpy as np

from featsim.comparison.result import LABELS, SCALE_FREE, ComparisonResult, Delta
from featsim.report import Interval, SimilarityReport

__all__ = ["COLLAPSE_FACTOR", "change_text", "collapse_note", "verdict"]


def _with_ci(value: float, interval: Interval | None) -> str:
    if interval is None:
        return f"{value:.4g}"
    return f"{value:.4g} [{interval.low:.4g}, {interval.high:.4g}]"


def change_text(d: Delta) -> str:
    text = f"change {d.estimate:+.4g}"
    if d.low is not None:
        text += f" [{d.low:+.4g}, {d.high:+.4g}]"
    if d.pvalue is not None:
        text += f", p = {d.pvalue:.3g}"
    return text


def _part_text(d: Delta) -> str:
    text = f"{d.estimate:+.4g}"
    if d.low is not None:
        text += f" [{d.low:+.4g}, {d.high:+.4g}]"
    return text


def _movement(d: Delta, before: str, after: str) -> str:
    """``"fell from B to A"``, ``"rose from B to A"`` or ``"did not change detectably (B vs
    A)"``."""
    direction = d.direction()
    if direction in ("fell", "rose"):
        return f"{direction} from {before} to {after}"
    return f"{direction} ({before} vs {after})"


# A representation whose within-domain spread, relative to its own feature norm, is below this
# fraction of the other's is treated as collapsed (a near-constant output in inference mode).
COLLAPSE_FACTOR = 1e-3


def _relative_spread(report: SimilarityReport, source, target) -> float:
    """Mean within-domain distance over the RMS feature norm: invariant to rescaling, ~0 when
    the layer's output barely depends on the image."""
    rows = np.concatenate([np.asarray(source, np.float64), np.asarray(target, np.float64)])
    norm = float(np.sqrt(np.mean(np.sum(rows * rows, axis=1))))
    within = 0.5 * (report.distance_source + report.distance_target)
    return within / norm if norm > 0 else 0.0


def collapse_note(result: ComparisonResult) -> str | None:
    """A sentence when one representation is (nearly) constant across images, else None."""
    layer = result.layer
    spread = {
        "pretrained": _relative_spread(result.change.before, result.before_source[layer],
                                       result.before_target[layer]),
        "fine-tuned": _relative_spread(result.change.after, result.after_source[layer],
                                       result.after_target[layer]),
    }
    for name, other in (("fine-tuned", "pretrained"), ("pretrained", "fine-tuned")):
        if spread[name] < COLLAPSE_FACTOR * spread[other]:
            return (f"The {name} features have collapsed: their within-domain spread relative "
                    f"to their norm is {spread[name]:.3g}, against {spread[other]:.3g} for the "
                    f"{other} ones, so at {layer} the output barely depends on the image and "
                    "every statistic compares near-constant vectors (for a network trained "
                    "briefly from random initialisation, a usual cause is BatchNorm running "
                    "statistics that have not converged; see "
                    "featsim.train.recompute_batch_stats). No verdict on Proposition 5 is "
                    "drawn from these numbers.")
    return None


def verdict(result: ComparisonResult) -> str:
    """The measured answer to Proposition 5, stated whichever way it falls."""
    c = result.change
    d = c.deltas["distance"]
    dir_d = d.direction()
    before = f"{_with_ci(d.before, c.before.ci.get('distance'))} (pretrained)"
    after = f"{_with_ci(d.after, c.after.ci.get('distance'))} (fine-tuned)"
    sentences = [f"D {_movement(d, before, after)}: {change_text(d)}."]
    scale_free = [c.deltas[k] for k in SCALE_FREE]
    sentences.append("Scale-free forms: " + "; ".join(
        f"{LABELS[s.name]} {_movement(s, f'{s.before:.4g}', f'{s.after:.4g}')} "
        f"({change_text(s)})" for s in scale_free) + ".")
    within_before = 0.5 * (c.before.distance_source + c.before.distance_target)
    within_after = 0.5 * (c.after.distance_source + c.after.distance_target)
    scale = within_after / within_before if within_before > 0 else math.nan
    sentences.append(f"The mean within-domain distance changed by a factor {scale:.3g} "
                     f"({within_before:.4g} -> {within_after:.4g}).")
    groups = {}
    for s in scale_free:
        groups.setdefault(s.direction(), []).append(LABELS[s.name])
    fell = groups.get("fell", [])
    others = "; ".join(f"{', '.join(v)} {k}" for k, v in groups.items() if k != "fell")
    collapse = collapse_note(result)
    if collapse is not None:
        sentences.append(collapse)
    elif dir_d == "fell":
        if len(fell) == len(scale_free):
            sentences.append(
                "Every scale-free form fell too, so the fall of D is not only a rescaling of "
                "the features: on these images the natural and medical features moved closer, "
                "as Proposition 5 states.")
        elif not fell:
            sentences.append(
                "No scale-free form fell, so the fall of raw D is a change of feature scale, "
                "not the domains moving closer: these measurements do not support "
                "Proposition 5.")
        else:
            sentences.append(
                f"Of the scale-free forms only {', '.join(fell)} fell ({others}), so the fall "
                "of raw D is partly a change of feature scale; the support for Proposition 5 "
                "is partial.")
    elif dir_d == "rose":
        sentences.append("D rose, contrary to Proposition 5 on these images" + (
            f", although {', '.join(fell)} fell." if fell else "."))
    else:
        sentences.append(f"D {dir_d}, so these measurements do not show the fall Proposition 5 "
                         "states" + (f" ({', '.join(fell)} fell)." if fell else "."))
    alpha = 1 - c.stats.confidence
    conditional = [LABELS[x.name] for x in (d, *scale_free) if x.pvalue is not None
                   and x.pvalue < alpha and x.direction() == "did not change detectably"]
    if conditional:
        sentences.append(
            f"For {', '.join(conditional)} the permutation p is below {alpha:.2g} but the "
            "interval includes 0: the representation changed on these images in a way the "
            "statistic sees, by less than it varies between samples of images, so no "
            "population-level change is shown.")
    if c.parts.get("normalisation"):
        norm, weights = c.parts["normalisation"], c.parts["weights"]
        sentences.append(
            "Split of the change (total = normalisation + weights): D "
            f"{d.estimate:+.4g} = {_part_text(norm['distance'])} (BatchNorm statistics "
            f"adapted, pretrained weights) + {_part_text(weights['distance'])} (fine-tuned "
            "weights); " + "; ".join(
                f"{LABELS[k]} {c.deltas[k].estimate:+.4g} = {_part_text(norm[k])} + "
                f"{_part_text(weights[k])}" for k in SCALE_FREE) + ".")
        if dir_d == "fell" and weights["distance"].direction() != "fell":
            sentences.append("The weight part of D does not fall: on these images the fall "
                             "comes from the adapted normalisation statistics, not from the "
                             "fine-tuned weights.")
    if c.mixed is not None:
        m = c.mixed_deltas["distance"]
        sentences.append(
            f"Read as D(phi(X_C), phi'(X_M)) (natural images pretrained, medical fine-tuned), "
            f"D is {_with_ci(m.after, c.mixed.ci.get('distance'))}: "
            f"{_movement(m, f'{m.before:.4g}', f'{m.after:.4g}')} ({change_text(m)}).")
    if c.stats.n_permutations:
        sentences.append(
            "Permutation p-values test 'the representation did not change' (floor "
            f"1/(B+1) = {1 / (c.stats.n_permutations + 1):.3g}): representation changed (not "
            "evidence for Prop. 5).")
    if d.low is None:
        sentences.append("No bootstrap was run, so directions are the signs of the estimates, "
                         "untested.")
    n = len(result.before_source), len(result.before_target)
    sentences.append(f"({n[0]} source and {n[1]} target images, layer {result.layer}; "
                     f"CKA pretrained vs fine-tuned at {result.layer}: "
                     f"{result.layer_cka.get(result.layer, math.nan):.3f}.)")
    return " ".join(sentences)

