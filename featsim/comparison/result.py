"""The results of comparing two representations of the same images, and their JSON.

:class:`Delta` is the change of one statistic, :class:`FeatureChange` every change between
feature arrays (:func:`featsim.comparison.feature_change`), :class:`ComparisonResult` a whole
pretrained-vs-fine-tuned comparison with provenance (:func:`featsim.comparison
.compare_backbones`): ``to_dict()`` (JSON-ready) and ``to_table()`` (terminal).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

import featsim
from featsim import metrics
from featsim.features.extract import Features
from featsim.metrics.options import StatOptions
from featsim.metrics.paired import PAIRED_STATISTICS
from featsim.report import Interval, SimilarityReport

__all__ = [
    "LABELS",
    "PARTS",
    "PART_LABELS",
    "SCALE_FREE",
    "STATISTICS",
    "ComparisonResult",
    "Delta",
    "FeatureChange",
]

# Statistics whose change is estimated, bootstrapped and tested (SimilarityReport field names).
STATISTICS = PAIRED_STATISTICS
# Invariant to a common rescaling of all features: what a change of D must be read beside.
SCALE_FREE = ("ratio", "energy_coefficient", "distance_cosine")
# Parts of a change: (from, to) representations. "total" = "normalisation" + "weights".
PARTS = {
    "total": ("before", "after"),
    "normalisation": ("before", "control"),
    "weights": ("control", "after"),
}
PART_LABELS = {
    "total": "total (pretrained -> fine-tuned)",
    "normalisation": "normalisation (pretrained -> BN-adapted)",
    "weights": "weights (BN-adapted -> fine-tuned)",
}

LABELS = {
    "distance": "D",
    "distance_source": "D within source",
    "distance_target": "D within target",
    "ratio": "ratio D / mean within",
    "energy_distance": "energy distance",
    "energy_coefficient": "energy coefficient",
    "distance_cosine": "D [cosine]",
}


@dataclasses.dataclass(frozen=True)
class Delta:
    """The change ``after - before`` of one statistic.

    Attributes:
        name: a :data:`STATISTICS` name (a :class:`~featsim.report.SimilarityReport` field).
        before, after: its value for the pretrained and the fine-tuned features.
        estimate: ``after - before``.
        low, high: paired bootstrap interval of the change (None without bootstrap).
        pvalue: two-sided paired permutation p-value (None without permutations).
        scale_free: whether the statistic is invariant to rescaling all features.
    """

    name: str
    before: float
    after: float
    estimate: float
    low: float | None
    high: float | None
    pvalue: float | None
    scale_free: bool

    @property
    def relative(self) -> float:
        """``after / before`` (inf or nan when ``before`` is 0)."""
        if self.before == 0:
            return math.inf if self.after else math.nan
        return self.after / self.before

    def direction(self) -> str:
        """``"fell"``/``"rose"`` when the interval excludes 0 (else ``"did not change
        detectably"``); with no interval, the sign of the estimate."""
        if self.low is not None and self.high is not None and math.isfinite(self.low) \
                and math.isfinite(self.high):
            if self.high < 0:
                return "fell"
            if self.low > 0:
                return "rose"
            return "did not change detectably"
        if self.estimate < 0:
            return "fell"
        if self.estimate > 0:
            return "rose"
        return "did not change"


@dataclasses.dataclass(frozen=True, eq=False)
class FeatureChange:
    """:func:`feature_change`'s result.

    Attributes:
        before, after: similarity reports of the pretrained and fine-tuned features, with
            paired bootstrap intervals in ``ci`` and the energy test in ``energy_pvalue``.
        deltas: :data:`STATISTICS` name -> :class:`Delta` (the total change, pretrained ->
            fine-tuned; the same objects as ``parts["total"]``).
        stats: the :class:`~featsim.metrics.StatOptions` of the comparison (metric,
            resamples, permutations, confidence, interval method, KID subsets, seed).
        control: the report of the BN-adapted control's features (None without a control).
        parts: :data:`PARTS` name -> statistic -> :class:`Delta`: ``"total"`` always;
            ``"normalisation"`` (pretrained -> control) and ``"weights"`` (control ->
            fine-tuned) with a control. Every bootstrap resample uses the same images for all
            three representations, so the parts add up resample by resample.
        mixed: the report of the paper's second reading of D after fine-tuning,
            ``D(phi(X_C), phi'(X_M))``: pretrained source features against fine-tuned target
            features (None when their widths differ).
        mixed_deltas: its change from the pretrained ``D(phi(X_C), phi(X_M))``, per statistic.
    """

    before: SimilarityReport
    after: SimilarityReport
    deltas: dict[str, Delta]
    stats: StatOptions
    control: SimilarityReport | None = None
    parts: dict[str, dict[str, Delta]] = dataclasses.field(default_factory=dict)
    mixed: SimilarityReport | None = None
    mixed_deltas: dict[str, Delta] = dataclasses.field(default_factory=dict)



@dataclasses.dataclass(frozen=True, eq=False)
class ComparisonResult:
    """:func:`compare_backbones`' result.

    Attributes:
        change: the two reports and every :class:`Delta` (see :func:`feature_change`).
        layer: the layer the reports and deltas use.
        layer_cka: layer -> linear CKA between pretrained and fine-tuned features of the
            target images at that layer (1 = the same representation up to rotation and
            isotropic scaling).
        cka: the full :class:`~featsim.metrics.CKAMatrix` (rows: pretrained layers, columns:
            fine-tuned layers) on the target images.
        before_source, before_target, after_source, after_target: the features, with their
            manifests (backbone, weights file, variables SHA-256, preprocessing, source).
        finetuned_metadata: the fine-tuned checkpoint's metadata (strategy, config), if any.
        control: the :class:`featsim.adapt.BNControl` (how the control was made), or None.
        control_source, control_target: the control's features, or None.
        control_skipped: why a control that was given was not applied (the fine-tuned
            network kept the pretrained BatchNorm statistics, so there is no normalisation
            part to split off), or None.
    """

    change: FeatureChange
    layer: str
    layer_cka: dict[str, float]
    cka: metrics.CKAMatrix
    before_source: Features
    before_target: Features
    after_source: Features
    after_target: Features
    finetuned_metadata: dict = dataclasses.field(default_factory=dict)
    control: object = None
    control_source: Features | None = None
    control_target: Features | None = None
    control_skipped: str | None = None

    @property
    def before(self) -> SimilarityReport:
        return self.change.before

    @property
    def after(self) -> SimilarityReport:
        return self.change.after

    @property
    def deltas(self) -> dict[str, Delta]:
        return self.change.deltas

    @property
    def backbone(self) -> str:
        return self.before_source.manifest["backbone"]

    @property
    def verdict(self) -> str:
        """The measured answer to Proposition 5, stated whichever way it falls."""
        from featsim.comparison.verdict import verdict  # the prose reads this type

        return verdict(self)

    def to_dict(self) -> dict:
        """JSON-ready: both reports, the deltas with intervals and p-values, the CKA, and
        provenance (weights files, variables SHA-256, preprocessing, sources)."""
        c = self.change
        src, tgt = self.before_source.manifest, self.before_target.manifest

        def backbone_entry(source: Features, report: SimilarityReport, extra=None):
            entry = {"backbone": source.manifest["backbone"],
                     "weights": source.manifest["weights"], "report": report.to_dict()}
            entry.update(extra or {})
            return entry

        skipped = (self.before_source.skipped + self.before_target.skipped)
        control = None
        if self.control is not None:
            control = backbone_entry(self.control_source, c.control, self.control.to_dict())
        floor = 1 / (c.stats.n_permutations + 1) if c.stats.n_permutations else None
        readings = {"finetuned_both": {
            "formula": "D(phi'(X_C), phi'(X_M))",
            "description": "natural and medical images both through the fine-tuned backbone "
                           "(the 'finetuned' report; its change is deltas/parts.total)",
            "distance": c.after.distance}}
        if c.mixed is not None:
            readings["pretrained_source_finetuned_target"] = {
                "formula": "D(phi(X_C), phi'(X_M))",
                "description": "natural images through the pretrained backbone, medical "
                               "images through the fine-tuned one",
                "report": c.mixed.to_dict(),
                "deltas": {k: dataclasses.asdict(d) for k, d in c.mixed_deltas.items()}}
        return {
            "comparison": "pretrained vs fine-tuned" + (
                " (with a BN-adapted control)" if control else ""),
            "backbone": self.backbone,
            "layer": self.layer,
            "metric": c.before.metric,
            "n_source": len(self.before_source),
            "n_target": len(self.before_target),
            "pretrained": backbone_entry(self.before_source, c.before),
            "finetuned": backbone_entry(self.after_source, c.after,
                                        {"metadata": self.finetuned_metadata}),
            "control": control,
            "control_skipped": self.control_skipped,
            "deltas": {k: dataclasses.asdict(d) for k, d in c.deltas.items()},
            "parts": {part: {k: dataclasses.asdict(d) for k, d in deltas.items()}
                      for part, deltas in c.parts.items()},
            "part_definitions": {part: f"{a} -> {b}" for part, (a, b) in PARTS.items()
                                 if part in c.parts},
            "readings": readings,
            "scale_free": list(SCALE_FREE),
            "bootstrap": {
                "n_resamples": c.stats.n_bootstrap, "confidence": c.stats.confidence,
                "method": c.stats.ci_method,
                "scheme": "paired: each resample draws source and target images with "
                          "replacement and uses the same draws for every backbone "
                          "(pretrained, control, fine-tuned), so the parts add up per "
                          "resample",
            },
            "permutation_test": {
                "n_permutations": c.stats.n_permutations, "alternative": "two-sided",
                "null_hypothesis": "fine-tuning did not change the representation: for every "
                                   "image, its pretrained and fine-tuned feature vectors are "
                                   "exchangeable",
                "scheme": "each permutation swaps the two feature vectors of every image "
                          "(source and target) with probability 1/2; p = (1 + #{|change*| >= "
                          "|change|}) / (1 + n_permutations)",
                "reading": "representation changed (not evidence for Prop. 5): any update "
                           "of the weights rejects this null; conditional on these images, a "
                           "small p says the statistic sees a change of representation on "
                           "them; whether the change would hold for another sample of "
                           "images is what the bootstrap interval says",
                "floor": floor,
                "floor_note": (f"no p-value can be below 1/(B+1) = {floor:.3g}"
                               if floor else None),
            },
            "fid": {"pretrained": c.before.fid, "finetuned": c.after.fid,
                    "change": c.after.fid - c.before.fid},
            "kid": {"pretrained": c.before.kid, "finetuned": c.after.kid,
                    "change": c.after.kid - c.before.kid},
            "cka": {
                "kernel": "linear", "images": "target", "n": len(self.before_target),
                "per_layer": dict(self.layer_cka),
                "matrix": {"rows": list(self.cka.rows), "cols": list(self.cka.cols),
                           "values": np.asarray(self.cka.values).tolist()},
            },
            "preprocessing": src["preprocessing"],
            "source": src["source"],
            "target": tgt["source"],
            "source_content_sha256": src["content_sha256"],
            "target_content_sha256": tgt["content_sha256"],
            "skipped": [dataclasses.asdict(s) for s in skipped],
            "n_skipped": len(skipped),
            "seed": c.stats.seed,
            "verdict": self.verdict,
            "featsim_version": featsim.__version__,
        }

    def to_table(self) -> str:
        """A plain-text table: every statistic before and after, the change, its p-value, and
        the per-layer CKA."""
        c = self.change
        src, tgt = self.before_source.manifest["source"], self.before_target.manifest["source"]
        head = [
            f"backbone {self.backbone}, layer {self.layer}: pretrained vs fine-tuned",
            f"pretrained: {_weights_line(self.before_source)}",
            f"fine-tuned: {_weights_line(self.after_source)}",
            f"source: {src['spec']} ({len(self.before_source)} images"
            f"{_skips(self.before_source)})",
            f"target: {tgt['spec']} ({len(self.before_target)} images"
            f"{_skips(self.before_target)})",
        ]
        ctl = c.control is not None
        if self.control_skipped:
            head.append(f"BN-adapted control not applied: {self.control_skipped}")
        if ctl:
            head.append(f"BN-adapted control: {self.control.describe()}")
            rows = [("statistic", "pretrained", "BN-adapted", "fine-tuned", "total change",
                     "normalisation part", "weight part", "p(total)")]
        else:
            rows = [("statistic", "pretrained", "fine-tuned", "change", "p")]
        for name, d in c.deltas.items():
            label = LABELS[name] + (f" [{c.before.metric}]" if name == "distance" else "")
            label += " *" if d.scale_free else ""
            cells = [label, _value(d.before, c.before.ci.get(name))]
            if ctl:
                cells.append(_value(c.parts["normalisation"][name].after,
                                    c.control.ci.get(name)))
            cells += [_value(d.after, c.after.ci.get(name)),
                      _value(d.estimate, None, d.low, d.high)]
            if ctl:
                cells += [_value(x.estimate, None, x.low, x.high) for x in
                          (c.parts["normalisation"][name], c.parts["weights"][name])]
            cells.append("-" if d.pvalue is None else f"{d.pvalue:.3g}")
            rows.append(tuple(cells))

        for name, label, fmt in (("fid", "FID", ".6g"), ("kid", "KID", ".4g")):
            values = [getattr(c.before, name)] + ([getattr(c.control, name)] if ctl else []) \
                + [getattr(c.after, name)]
            changes = [values[-1] - values[0]]
            if ctl:
                changes += [values[1] - values[0], values[2] - values[1]]
            rows.append((label, *(f"{v:{fmt}}" for v in values),
                         *(f"{v:{fmt}}" for v in changes), "-"))
        if c.before.energy_pvalue is not None:
            values = [c.before, *([c.control] if ctl else []), c.after]
            rows.append(("p(same distribution)", *(f"{r.energy_pvalue:.3g}" for r in values),
                         *[""] * (len(rows[0]) - 1 - len(values))))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = head + ["  ".join(f"{v:<{w}}" for v, w in zip(r, widths, strict=True)).rstrip()
                        for r in rows]
        notes = ["* scale-free (unchanged when all features are rescaled)"]
        if c.stats.n_bootstrap:
            notes.append(f"[brackets: {c.stats.confidence:.0%} paired bootstrap interval, "
                         f"{c.stats.n_bootstrap} resamples, {c.stats.ci_method}]")
        if c.stats.n_permutations:
            notes.append(f"p: two-sided paired permutation test of 'fine-tuning did not change "
                         f"the representation' on these images ({c.stats.n_permutations} per-image "
                         "swaps; floor 1/(B+1) = "
                         f"{1 / (c.stats.n_permutations + 1):.3g}): representation changed (not "
                         "evidence for Prop. 5); the intervals speak for other samples of "
                         "images")
        if ctl:
            notes.append("total = normalisation part (pretrained -> BN-adapted) + weight part "
                         "(BN-adapted -> fine-tuned), each with a paired interval over the "
                         "same resampled images")
        if c.mixed is not None:
            m = c.mixed_deltas["distance"]
            notes.append("D read as D(phi(X_C), phi'(X_M)) (natural images pretrained, medical "
                         f"fine-tuned): {_value(m.after, c.mixed.ci.get('distance'))}, change "
                         f"from pretrained {_value(m.estimate, None, m.low, m.high)}; as "
                         f"D(phi'(X_C), phi'(X_M)): the fine-tuned column")
        lines += notes
        lines.append(f"linear CKA pretrained vs fine-tuned on the target images "
                     f"(n = {len(self.before_target)}):")
        lines.append("  " + ", ".join(f"{k} {v:.3f}" for k, v in self.layer_cka.items()))
        return "\n".join(lines)


def _weights_line(features: Features) -> str:
    w = features.manifest["weights"]
    return f"{w['file'] or w['description']} (variables sha256 {w['variables_sha256'][:12]})"


def _skips(features: Features) -> str:
    return f", {len(features.skipped)} skipped" if features.skipped else ""


def _value(value: float, interval: Interval | None, low=None, high=None) -> str:
    if interval is not None:
        low, high = interval.low, interval.high
    out = f"{value:.6g}"
    if low is not None and high is not None:
        out += f" [{low:.4g}, {high:.4g}]"
    return out

