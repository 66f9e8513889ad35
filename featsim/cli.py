"""The ``featsim`` command: thin argparse shims over library calls, no logic of their own."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import featsim

__all__ = ["main"]


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
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.json}")
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
            print("  weights: none registered")
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
    m.add_argument("--metric", default="euclidean", choices=METRICS)
    m.add_argument("--bootstrap", type=int, default=0, metavar="N",
                   help="bootstrap resamples for confidence intervals (default 0: none)")
    m.add_argument("--ci-method", default="basic", choices=("basic", "percentile", "BCa"),
                   help="bootstrap interval kind (default basic: corrects FID's and the energy "
                        "distance's finite-sample bias; see featsim.report)")
    m.add_argument("--permutations", type=int, default=0, metavar="N",
                   help="permutations for the equal-distribution test (default 0: none)")
    m.add_argument("--kid-subset-size", type=int, default=1000)
    m.add_argument("--kid-subsets", type=int, default=100)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--json", type=Path, default=None, metavar="OUT", help="write JSON here")
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
    c.add_argument("source", type=Path, help="IN.pth (needs the [torch] extra) or .safetensors")
    c.add_argument("destination", type=Path, help="OUT.safetensors or OUT.msgpack")
    c.add_argument("--backbone", required=True, help="registry name, see `featsim backbones`")
    c.add_argument("--num-classes", type=int, default=None,
                   help="head size of the checkpoint (default: the registered one, 1000)")
    c.set_defaults(func=_convert_weights_command)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, KeyError, ImportError) as err:
        print(f"featsim {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
