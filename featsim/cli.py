"""The ``featsim`` command: thin argparse shims over library calls, no logic of their own."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import featsim

__all__ = ["main"]


def _write_json(path: Path, value: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2) + "\n")
    print(f"wrote {path}")


def _metrics_command(args) -> int:
    from featsim.features import load_features
    from featsim.report import similarity_report

    source = load_features(args.source, key=args.key)
    target = load_features(args.target, key=args.key)
    report = similarity_report(
        source, target, metric=args.metric, n_bootstrap=args.bootstrap,
        n_permutations=args.permutations, ci_method=args.ci_method,
        kid_subset_size=args.kid_subset_size,
        kid_subsets=args.kid_subsets, seed=args.seed)
    print(f"source: {args.source}\ntarget: {args.target}")
    print(report.to_table())
    if args.json:
        out = report.to_dict()
        out.update(source=str(args.source), target=str(args.target))
        _write_json(args.json, out)
    return 0


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

    if (args.source is None) != (args.target is None):
        raise ValueError("give both --source and --target, or neither (embedded samples)")
    if args.source is None:
        args.source, args.target = DEFAULT_SOURCE, DEFAULT_TARGET
        print(f"no --source/--target: comparing the sample images shipped inside installed "
              f"wheels ({DEFAULT_SOURCE} vs {DEFAULT_TARGET}); a demonstration, not a study")
    backbone = pretrained_backbone(args.backbone, args.weights)
    result = feature_distance(
        backbone, args.source, args.target, layer=args.layer, metric=args.metric,
        n_bootstrap=args.bootstrap, n_permutations=args.permutations,
        ci_method=args.ci_method, kid_subset_size=args.kid_subset_size,
        kid_subsets=args.kid_subsets, seed=args.seed, **_extract_kwargs(args))
    print(result.to_table())
    for skipped in result.source.skipped + result.target.skipped:
        print(f"skipped {skipped.name}: {skipped.reason}", file=sys.stderr)
    if args.json:
        _write_json(args.json, result.to_dict())
    return 0


def _extract_command(args) -> int:
    from featsim.features import extract_features
    from featsim.pipeline import pretrained_backbone

    backbone = pretrained_backbone(args.backbone, args.weights)
    features = extract_features(backbone, args.source, layers=args.layer or ["pre_logits"],
                                pooling=args.pooling, **_extract_kwargs(args))
    out = features.save(args.out)
    shapes = ", ".join(f"{k} {v.shape}" for k, v in features.layers.items())
    print(f"wrote {out}: {len(features)} images, {shapes}; {len(features.skipped)} skipped")
    for skipped in features.skipped:
        print(f"skipped {skipped.name}: {skipped.reason}", file=sys.stderr)
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


def build_parser() -> argparse.ArgumentParser:
    from featsim.metrics import METRICS

    parser = argparse.ArgumentParser(
        prog="featsim",
        description="How similar are deep features of natural and medical images?")
    parser.add_argument("--version", action="version", version=f"featsim {featsim.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def add_stats_options(p):
        p.add_argument("--metric", default="euclidean", choices=METRICS,
                       help="distance d for D (default euclidean; cosine D is always reported)")
        p.add_argument("--bootstrap", type=int, default=200, metavar="N",
                       help="bootstrap resamples for confidence intervals (default 200; "
                            "0: none)")
        p.add_argument("--ci-method", default="basic", choices=("basic", "percentile", "BCa"),
                       help="bootstrap interval kind (default basic: corrects FID's and the "
                            "energy distance's finite-sample bias; see featsim.report)")
        p.add_argument("--permutations", type=int, default=0, metavar="N",
                       help="permutations for the equal-distribution test (default 0: none)")
        p.add_argument("--kid-subset-size", type=int, default=1000)
        p.add_argument("--kid-subsets", type=int, default=100)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--json", type=Path, default=None, metavar="OUT", help="write JSON here")

    def add_extract_options(p):
        p.add_argument("--backbone", required=True, help="registry name, see `featsim backbones`")
        p.add_argument("--weights", default=None, metavar="FILE",
                       help="checkpoint (.pth, .safetensors, .msgpack, TF.js model.json); "
                            "default the registered pretrained weights (never random ones)")
        p.add_argument("--batch-size", type=int, default=32)
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
    add_stats_options(m)
    m.set_defaults(func=_metrics_command)

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
    c.add_argument("--num-classes", type=int, default=None,
                   help="head size of the checkpoint (default: the registered one, 1000)")
    c.set_defaults(func=_convert_weights_command)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"featsim: {category.__name__}: {message}", file=file or sys.stderr)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    warnings.showwarning = _show_warning  # one readable line, not a source excerpt
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, KeyError, ImportError) as err:
        print(f"featsim {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
