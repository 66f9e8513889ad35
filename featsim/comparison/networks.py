"""Pretrained vs fine-tuned: the same images through both backbones, what changed, and how sure.

Gu & Lee (2024, Bioengineering 11(4):406) state as their Proposition 5 that fine-tuning on
medical images lowers the average feature distance D(F_C, F_M) between natural (C) and medical
(M) features. :func:`compare_backbones` measures that claim on given images::

    before = pretrained_backbone("efficientnet_lite0")
    after = load_finetuned("runs/lite0_full")          # the trainer's DIR/model.msgpack
    result = compare_backbones(before, after, "imagenette_val_500", "chest_xray:test")
    print(result.to_table()); print(result.verdict); result.to_dict()
    plot_cka(result, "cka.png")                         # featsim.plots

Every change of D and of its scale-free forms gets a paired bootstrap interval and a paired
permutation test (:func:`featsim.comparison.feature_change`). Representations are also
compared directly, as Raghu et al. (2019, "Transfusion: Understanding Transfer Learning for
Medical Imaging", NeurIPS) do: linear CKA (Kornblith et al. 2019) between the pretrained and
the fine-tuned network at every tapped layer, on the target (medical) images, and the full
layer x layer CKA matrix.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import jax
import numpy as np

from featsim import metrics
from featsim.backbones.registry import Backbone
from featsim.comparison.change import PAIRED_DEFAULTS, check_paired_options, feature_change
from featsim.comparison.finetuned import checkpoint_metadata
from featsim.comparison.result import ComparisonResult
from featsim.features.extract import extract_features, feature_layers
from featsim.metrics.options import StatOptions

__all__ = ["compare_backbones", "depth_order", "same_batch_stats"]


def same_batch_stats(a: Backbone, b: Backbone) -> bool:
    """Whether two backbones hold the same BatchNorm statistics: every ``batch_stats`` leaf
    they share (by path) is bit-identical, and they share at least one. A frozen-body run
    (``linear``) keeps the pretrained statistics; a BN-adapted control then splits nothing."""
    def leaves(backbone):
        stats = (backbone.variables or {}).get("batch_stats", {})
        return {jax.tree_util.keystr(path): np.asarray(leaf)
                for path, leaf in jax.tree_util.tree_flatten_with_path(stats)[0]}

    ours, theirs = leaves(a), leaves(b)
    shared = ours.keys() & theirs.keys()
    return bool(shared) and all(ours[k].shape == theirs[k].shape
                                and np.array_equal(ours[k], theirs[k]) for k in shared)


def compare_backbones(
    pretrained: Backbone,
    finetuned: Backbone,
    source,
    target,
    *,
    layer: str = "pre_logits",
    cka_layers: Sequence[str] | None = None,
    stats: StatOptions = PAIRED_DEFAULTS,
    control=None,
    **extract_kwargs,
) -> ComparisonResult:
    """Pretrained vs fine-tuned on the same images: every metric, its change, and layer CKA.

    Both backbones see the same source and target images (features cached as
    :func:`~featsim.features.extract_features` does). For each backbone,
    :func:`~featsim.report.similarity_report` of ``layer``'s features; the change of D and of
    its scale-free forms with paired bootstrap intervals and a paired permutation test
    (:func:`feature_change`, the module docstring defines both); and linear CKA between the
    two networks at every layer on the target images, plus the full layer x layer matrix.

    Args:
        pretrained: e.g. :func:`featsim.pipeline.pretrained_backbone`.
        finetuned: e.g. :func:`featsim.comparison.load_finetuned`; the same architecture.
        source, target: :class:`~featsim.data.Source` objects or specs (natural, medical).
        layer: the feature layer of the reports and deltas.
        cka_layers: layers for CKA; default every feature layer both backbones return
            (``logits`` excluded), from input to output (stem, stage1, ..., pre_logits).
        stats: the statistics options (:class:`~featsim.metrics.StatOptions`; default
            :data:`~featsim.comparison.PAIRED_DEFAULTS`), as :func:`feature_change`.
        control: a :class:`featsim.adapt.BNControl` (:func:`featsim.adapt.adapt_batch_stats`
            of ``pretrained``): its features split every change into a normalisation part
            and a weight part. None: the total change only.
        **extract_kwargs: for :func:`~featsim.features.extract_features` (``batch_size``,
            ``skip_bad``, ``cache_dir``, ``normalization``, ``progress``, ...).

    Returns:
        A :class:`~featsim.comparison.ComparisonResult`.

    Raises:
        ValueError: a backbone without variables, unknown layers, the two backbones seeing
            different images (e.g. different preprocessing skipping different files), or
            anything :func:`feature_change` rejects.
    """
    # Checked before minutes of extraction, not after.
    check_paired_options(stats)
    control_skipped = None
    if control is not None and same_batch_stats(pretrained, finetuned):
        control, control_skipped = None, (
            "the fine-tuned network kept the pretrained BatchNorm statistics (frozen body), "
            "so the change has no normalisation part; the total change is the weight part")
    if cka_layers is None:
        ours = feature_layers(pretrained)  # traces the model: ~1-3 s on CPU
        # A registry name fixes the feature taps whatever the head; trace again only if not.
        theirs = ours if finetuned.name == pretrained.name else feature_layers(finetuned)
        cka_layers = sorted((k for k in ours if k in set(theirs) and k != "logits"),
                            key=depth_order)
    cka_layers = list(dict.fromkeys(cka_layers))
    if not cka_layers:
        raise ValueError("no layers to compare with CKA: the backbones share no feature layer")
    target_layers = tuple(dict.fromkeys([layer, *cka_layers]))
    feats = {}
    for side, backbone in (("before", pretrained), ("after", finetuned)):
        feats[side, "source"] = extract_features(backbone, source, layers=(layer,),
                                                 **extract_kwargs)
        feats[side, "target"] = extract_features(backbone, target, layers=target_layers,
                                                 **extract_kwargs)
    sides = ["after"]
    if control is not None:
        sides.append("control")
        for domain, src in (("source", source), ("target", target)):
            feats["control", domain] = extract_features(control.backbone, src, layers=(layer,),
                                                        **extract_kwargs)
    for side in sides:
        for domain in ("source", "target"):
            if feats["before", domain].ids != feats[side, domain].ids:
                raise ValueError(
                    f"the backbones saw different {domain} images ("
                    f"{len(feats['before', domain])} vs {len(feats[side, domain])}); compare "
                    "backbones with the same preprocessing"
                )
    controls = {}
    if control is not None:
        controls = dict(control_source=feats["control", "source"][layer],
                        control_target=feats["control", "target"][layer])
    change = feature_change(
        feats["before", "source"][layer], feats["before", "target"][layer],
        feats["after", "source"][layer], feats["after", "target"][layer],
        stats=stats, **controls)
    before_t, after_t = feats["before", "target"], feats["after", "target"]
    layer_cka = {k: float(metrics.linear_cka(before_t[k], after_t[k])) for k in cka_layers}
    matrix = metrics.cka_matrix({k: before_t[k] for k in cka_layers},
                                {k: after_t[k] for k in cka_layers})
    return ComparisonResult(
        change=change, layer=layer, layer_cka=layer_cka, cka=matrix,
        before_source=feats["before", "source"], before_target=before_t,
        after_source=feats["after", "source"], after_target=after_t,
        finetuned_metadata=checkpoint_metadata(finetuned), control=control,
        control_source=feats.get(("control", "source")), control_skipped=control_skipped,
        control_target=feats.get(("control", "target")))


def depth_order(layer: str):
    """stem, stage1, stage2, ..., other taps (head, conv5, ...), pre_logits: input to output.

    ``feature_layers`` comes back in sorted key order (``jax.eval_shape`` flattens dicts)."""
    if layer == "stem":
        return (0, 0, "")
    match = re.fullmatch(r"stage(\d+)", layer)
    if match:
        return (1, int(match.group(1)), "")
    return (3, 0, "") if layer == "pre_logits" else (2, 0, layer)

