"""The main job as one library call: images of two domains -> features -> every metric.

``featsim distance`` is a thin shim over :func:`feature_distance`; research code calls it
directly::

    backbone = pretrained_backbone("efficientnet_lite0")
    result = feature_distance(backbone, "embedded:natural", "embedded:medical")
    print(result.to_table()); result.to_dict()  # JSON-ready, with provenance
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from featsim import parallel
from featsim.backbones.registry import ENCODER_FILENAME, Backbone, get_backbone
from featsim.backbones.tfjs import load_tfjs_mobilenet_v1
from featsim.data.sources import open_source
from featsim.features.extract import Features, extract_features
from featsim.metrics.options import DEFAULT_STATS, StatOptions
from featsim.report import SimilarityReport, similarity_report

__all__ = [
    "DEFAULT_SOURCE",
    "DEFAULT_TARGET",
    "DistanceResult",
    "feature_distance",
    "pretrained_backbone",
]

# With no --source/--target, `featsim distance` compares the sample images that ship inside
# installed wheels (see featsim.data.embedded): no download needed.
DEFAULT_SOURCE = "embedded:natural"
DEFAULT_TARGET = "embedded:medical"


def pretrained_backbone(
    name: str, weights: str | os.PathLike | None = None, *, download: bool = True
) -> Backbone:
    """A headless backbone with pretrained weights, never random ones.

    Args:
        name: registry name (``featsim backbones`` lists them).
        weights: a checkpoint (``.pth``, ``.safetensors``, featsim ``.msgpack``, a
            ``featsim pretrain`` output folder (its ``encoder.msgpack``), or a TF.js
            ``model.json`` or its folder for the MobileNetV1 family); default the registered
            weights, found locally or downloaded.
        download: allow downloading the registered weights.

    Raises:
        FileNotFoundError: no weights available; the message names ``--weights`` and
            ``featsim convert-weights``.
    """
    if weights is not None and (str(weights).endswith(".json") or (
            Path(weights).is_dir() and (Path(weights) / "model.json").is_file()
            and not (Path(weights) / ENCODER_FILENAME).is_file())):
        backbone = load_tfjs_mobilenet_v1(weights, name=name, num_classes=None)
        return dataclasses.replace(backbone, weights_file=Path(weights))
    if weights is not None:  # the user's file: its own errors name it
        return get_backbone(name, num_classes=None, pretrained=True, weights_path=weights)
    try:
        return get_backbone(name, num_classes=None, pretrained=True, download=download)
    except (FileNotFoundError, ValueError) as err:
        if isinstance(err, ValueError) and "no pretrained weights" not in str(err):
            raise
        raise FileNotFoundError(
            f"{err}\nNo pretrained weights for {name!r} are available here. Pass a checkpoint "
            "with --weights FILE (.pth, .safetensors, .msgpack, or a TF.js model.json), or "
            "convert one once with `featsim convert-weights IN.pth OUT.safetensors --backbone "
            f"{name}`. featsim never falls back to random weights."
        ) from None


@dataclasses.dataclass(frozen=True, eq=False)
class DistanceResult:
    """:func:`feature_distance`'s result: the metrics and where the features came from."""

    report: SimilarityReport
    source: Features
    target: Features
    layer: str

    def to_dict(self) -> dict:
        """JSON-ready: every metric with its interval, plus provenance of both feature sets."""
        out = self.report.to_dict()
        src, tgt = self.source.manifest, self.target.manifest
        out.update(
            backbone=src["backbone"],
            weights=src["weights"],
            layer=self.layer,
            preprocessing=src["preprocessing"],
            source=src["source"],
            target=tgt["source"],
            n_source=len(self.source),
            n_target=len(self.target),
            skipped=[dataclasses.asdict(s) for s in self.source.skipped + self.target.skipped],
            n_skipped=len(self.source.skipped) + len(self.target.skipped),
            small_images={"source": src.get("small_images"), "target": tgt.get("small_images")},
            source_content_sha256=src["content_sha256"],
            target_content_sha256=tgt["content_sha256"],
            featsim_version=src["featsim_version"],
        )
        return out

    def to_table(self) -> str:
        """A plain-text summary for terminals."""
        src, tgt = self.source.manifest["source"], self.target.manifest["source"]
        lines = [
            f"backbone {self.source.manifest['backbone']}, layer {self.layer}",
            f"source: {src['spec']} ({len(self.source)} images{_skips(self.source)})",
            f"target: {tgt['spec']} ({len(self.target)} images{_skips(self.target)})",
            self.report.to_table(),
        ]
        return "\n".join(lines)


def _skips(features: Features) -> str:
    """``, 2 skipped, 1 non-image file ignored (notes.txt), ...`` for the summary lines."""
    parts = [f"{len(features.skipped)} skipped"] if features.skipped else []
    source = features.manifest["source"]
    if source.get("ignored_files"):
        parts.append(f"{source['ignored_files']} non-image file(s) ignored: "
                     + ", ".join(source["ignored_examples"])
                     + (" ..." if source["ignored_files"] > len(source["ignored_examples"])
                        else ""))
    small = features.manifest.get("small_images") or {}
    if small.get("count"):
        parts.append(f"{small['count']} image(s) with a side below {small['below_px']} px, "
                     "upscaled")
    return "".join(f", {p}" for p in parts)


def feature_distance(
    backbone: Backbone,
    source,
    target,
    *,
    layer: str = "pre_logits",
    stats: StatOptions = DEFAULT_STATS,
    **extract_kwargs,
) -> DistanceResult:
    """Extracts ``layer`` features of both sources and compares them with every metric.

    Args:
        backbone: with variables, e.g. from :func:`pretrained_backbone`.
        source, target: :class:`~featsim.data.Source` objects or specs for
            :func:`~featsim.data.open_source`; Gu & Lee's ``C`` (natural) and ``M`` (medical).
        layer: the feature layer.
        stats: the statistics options (:class:`~featsim.metrics.StatOptions`), as
            :func:`featsim.report.similarity_report`; checked before any extraction.
        **extract_kwargs: for :func:`~featsim.features.extract_features` (``batch_size``,
            ``skip_bad``, ``cache_dir``, ``normalization``, ``progress``, ...); ``progress``
            also governs the bars of the interval phase (shown on a TTY only). In a
            ``jax.distributed`` run (:func:`featsim.parallel.initialize`) every process makes
            this call: extraction and the statistics are split over the processes
            (``share``, default :func:`featsim.parallel.process_share`) and every process
            returns the one-process result.
    """
    if not isinstance(stats, StatOptions):  # before minutes of extraction, not after
        raise TypeError(f"stats must be a featsim.metrics.StatOptions, got "
                        f"{type(stats).__name__}")
    sources = [open_source(s, data_dir=extract_kwargs.get("data_dir"))
               for s in (source, target)]
    for role, listed in zip(("source", "target"), sources, strict=True):
        if len(listed) < 2:  # before any extraction, in the user's words
            raise ValueError(
                f"{role} {listed.spec!r} has {len(listed)} image(s): D, its within-domain "
                "baselines, FID and KID need at least 2 images per domain")
    share = extract_kwargs.pop("share", None) or parallel.process_share()
    feats = [extract_features(backbone, s, layers=(layer,), share=share, **extract_kwargs)
             for s in sources]
    report = similarity_report(feats[0][layer], feats[1][layer], stats=stats,
                               progress=extract_kwargs.get("progress", True) and share.is_main,
                               share=share)
    return DistanceResult(report=report, source=feats[0], target=feats[1], layer=layer)
