"""The main job as one library call: images of two domains -> features -> every metric.

``featsim distance`` is a thin shim over :func:`feature_distance`; research code calls it
directly::

    backbone = pretrained_backbone("efficientnet_lite0")
    result = feature_distance(backbone, "imagenette_val_500", "chest_xray:test")
    print(result.to_table()); result.to_dict()  # JSON-ready, with provenance
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from featsim.backbones.registry import ENCODER_FILENAME, Backbone, get_backbone
from featsim.backbones.tfjs import load_tfjs_mobilenet_v1
from featsim.features.extract import Features, extract_features
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
    return f", {len(features.skipped)} skipped" if features.skipped else ""


def feature_distance(
    backbone: Backbone,
    source,
    target,
    *,
    layer: str = "pre_logits",
    metric: str = "euclidean",
    n_bootstrap: int = 0,
    n_permutations: int = 0,
    ci_method: str = "basic",
    kid_subset_size: int = 1000,
    kid_subsets: int = 100,
    seed: int = 0,
    **extract_kwargs,
) -> DistanceResult:
    """Extracts ``layer`` features of both sources and compares them with every metric.

    Args:
        backbone: with variables, e.g. from :func:`pretrained_backbone`.
        source, target: :class:`~featsim.data.Source` objects or specs for
            :func:`~featsim.data.open_source`; Gu & Lee's ``C`` (natural) and ``M`` (medical).
        layer: the feature layer.
        metric, n_bootstrap, n_permutations, ci_method, kid_subset_size, kid_subsets, seed:
            as :func:`featsim.report.similarity_report`.
        **extract_kwargs: for :func:`~featsim.features.extract_features` (``batch_size``,
            ``skip_bad``, ``cache_dir``, ``normalization``, ``progress``, ...); ``progress``
            also governs the bars of the interval phase (shown on a TTY only).
    """
    feats = [extract_features(backbone, s, layers=(layer,), **extract_kwargs)
             for s in (source, target)]
    report = similarity_report(
        feats[0][layer], feats[1][layer], metric=metric, n_bootstrap=n_bootstrap,
        n_permutations=n_permutations, ci_method=ci_method, kid_subset_size=kid_subset_size,
        kid_subsets=kid_subsets, seed=seed, progress=extract_kwargs.get("progress", True))
    return DistanceResult(report=report, source=feats[0], target=feats[1], layer=layer)
