"""Layer by layer: how much does training on chest X-rays change each layer's representation?

Raghu et al. (2019, "Transfusion: Understanding Transfer Learning for Medical Imaging",
NeurIPS) compare representations layer by layer with CCA-type similarity and find that
fine-tuning from ImageNet changes the lower layers little, and that two networks trained from
different random initialisations agree less than a pretrained network and its fine-tuned copy.
This script measures that with linear CKA (Kornblith et al. 2019; ``featsim.metrics``) on
the chest X-ray test images, at every feature layer of each backbone (stem, stage1, ...,
pre_logits; spatial maps averaged over positions), for the runs ``transfer_vs_scratch.py``
wrote:

* pretrained vs fine-tuned (``finetune``), per seed: how far fine-tuning moved each layer;
* pretrained vs ``linear``: the body is frozen, so this is 1 at every layer (a check);
* pretrained vs ``scratch``: an ImageNet network vs one trained only on X-rays;
* scratch seed a vs scratch seed b: the baseline, how similar two networks trained from
  different random initialisations on the same data are (Raghu et al.'s comparison);
* fine-tuned seed a vs fine-tuned seed b: how much fine-tuning depends on the seed;

each with a paired bootstrap interval over images, and the full layer x layer CKA matrices of
pretrained vs fine-tuned and of the scratch pair (heatmaps), plus the pretrained network's own
layer x layer matrix.

Full run (after ``transfer_vs_scratch.py``; minutes on 2 CPU cores)::

    python analysis/layer_similarity.py

Quick (CI: 32 test images, 20 resamples, the quick runs)::

    python analysis/layer_similarity.py --quick

Options: ``--target`` (default the Kermany test split), ``--runs DIR`` (default
``analysis/runs/transfer_vs_scratch/``), ``--backbone NAME`` (only these; repeatable),
``--bootstrap``, ``--out DIR``.

Writes to ``analysis/results/layer_similarity/``: ``results.json`` (every CKA value and
matrix, provenance), ``cka_per_layer.csv`` (one row per pair of models and layer),
``table.md``, ``cka_layers_<backbone>.png`` (CKA against depth for each kind of pair) and
``cka_matrix_<backbone>_<pair>.png`` heatmaps.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import _common as common

from featsim.data.digest import source_digest
from featsim.data.subsets import balanced_subset

NAME = "layer_similarity"
PAIR_KINDS = (
    ("pretrained vs finetune", "pretrained vs fine-tuned (every layer)"),
    ("pretrained vs linear", "pretrained vs linear probe (frozen body: 1 by construction)"),
    ("pretrained vs scratch", "pretrained vs trained from scratch"),
    ("scratch vs scratch", "scratch seed a vs scratch seed b (baseline)"),
    ("finetune vs finetune", "fine-tuned seed a vs fine-tuned seed b"),
)


# --------------------------------------------------------------------------------------------
# Measurements.
# --------------------------------------------------------------------------------------------


def layer_features(backbone, target, layers, args, normalization):
    from featsim.features import extract_features

    return extract_features(backbone, target, layers=layers, normalization=normalization,
                            batch_size=args.batch_size, skip_bad=not args.strict,
                            progress=not args.no_progress)


def per_layer_cka(a, b, layers, args) -> list[dict]:
    """Linear CKA at each layer between two feature sets of the same images, with a paired
    bootstrap interval (images resampled, rows kept together)."""
    from featsim import metrics

    if a.ids != b.ids:
        raise ValueError("the two models saw different images (a --strict run would say which)")
    out = []
    for layer in layers:
        value = float(metrics.linear_cka(a[layer], b[layer]))
        low = high = None
        if args.bootstrap:
            ci = metrics.bootstrap_ci(metrics.linear_cka, a[layer], b[layer],
                                      n_resamples=args.bootstrap, seed=args.seed, paired=True,
                                      method="percentile")
            low, high = float(ci.low), float(ci.high)
        out.append({"layer": layer, "cka": value, "low": low, "high": high})
    return out


def cka_matrix(a, b, layers) -> dict:
    from featsim import metrics

    m = metrics.cka_matrix({k: a[k] for k in layers}, {k: b[k] for k in layers})
    return {"rows": list(m.rows), "cols": list(m.cols), "values": m.values.tolist()}


def pairs_of(runs: list[common.Run]):
    """(kind, model a, model b) for every comparison; None stands for the pretrained model."""
    by_strategy: dict[str, list[common.Run]] = {}
    for run in runs:
        by_strategy.setdefault(run.strategy, []).append(run)
    out = []
    for strategy in ("finetune", "linear", "scratch"):
        out += [(f"pretrained vs {strategy}", None, r) for r in by_strategy.get(strategy, [])]
    for strategy in ("scratch", "finetune"):
        out += [(f"{strategy} vs {strategy}", a, b)
                for a, b in itertools.combinations(by_strategy.get(strategy, []), 2)]
    return out


# --------------------------------------------------------------------------------------------
# Figures and tables.
# --------------------------------------------------------------------------------------------


def plot_layers(result: dict, backbone: str, path: Path) -> Path | None:
    from matplotlib.figure import Figure

    entries = [p for p in result["pairs"] if p["backbone"] == backbone]
    if not entries:
        return None
    layers = result["layers"][backbone]
    fig = Figure(figsize=(max(7.0, 0.7 * len(layers) + 3), 4.6), layout="constrained")
    ax = fig.add_subplot()
    xs = list(range(len(layers)))
    for k, (kind, label) in enumerate(PAIR_KINDS):
        mine = [p for p in entries if p["kind"] == kind]
        for j, pair in enumerate(mine):
            ys = [v["cka"] for v in pair["per_layer"]]
            ax.plot(xs, ys, color=common.OKABE_ITO[k], linestyle=common.LINESTYLES[k],
                    marker=common.MARKERS[k], markersize=5, linewidth=1.6,
                    label=label if j == 0 else None, alpha=0.9)
            lows = [v["low"] for v in pair["per_layer"]]
            highs = [v["high"] for v in pair["per_layer"]]
            if all(v is not None for v in lows + highs):
                ax.fill_between(xs, lows, highs, color=common.OKABE_ITO[k], alpha=0.12,
                                linewidth=0)
    ax.set_xticks(xs, layers, rotation=30, ha="right")
    ax.set_xlabel("layer (input → output)")
    ax.set_ylabel("linear CKA (same images)")
    ax.set_ylim(-0.02, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    ax.set_title(f"{backbone}: layer-by-layer linear CKA on {result['target_name']} "
                 f"(n = {result['n_images']})" + (" [QUICK]" if result["quick"] else "")
                 + "\none line per seed or seed pair; bands: 95% paired bootstrap "
                 f"({result['bootstrap']} resamples)", fontsize=10)
    fig.savefig(path, dpi=150)
    return path


def plot_matrix(matrix: dict, title: str, xlabel: str, ylabel: str, path: Path) -> Path:
    import numpy as np
    from matplotlib.figure import Figure

    values = np.asarray(matrix["values"])
    rows, cols = matrix["rows"], matrix["cols"]
    size = max(4.5, 0.55 * max(len(rows), len(cols)) + 2.5)
    fig = Figure(figsize=(size + 1.2, size), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(values, cmap="cividis", vmin=0.0, vmax=1.0, origin="lower",
                      interpolation="nearest")
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if len(rows) * len(cols) <= 225:
        for i in range(len(rows)):
            for j in range(len(cols)):
                ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if values[i, j] > 0.6 else "white")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label="linear CKA", shrink=0.8)
    fig.savefig(path, dpi=150)
    return path


def _slug(text: str) -> str:
    import re

    return re.sub(r"[^0-9A-Za-z.]+", "_", text).strip("_")


def markdown(result: dict) -> str:
    lines = [f"# Layer-by-layer CKA on {result['target_name']}", ""]
    if result["quick"]:
        lines += ["**QUICK MODE**: a small subset, a pipeline check, not a result. Do not quote "
                  "these numbers.", ""]
    lines += [f"Linear CKA between two models' features of the same {result['n_images']} "
              "images at each layer (spatial maps averaged over positions); mean over seeds "
              "(or seed pairs), with the range over them in brackets when there are several. "
              "1 = the same representation up to rotation and isotropic scaling.", ""]
    for backbone, layers in result["layers"].items():
        entries = [p for p in result["pairs"] if p["backbone"] == backbone]
        kinds = [k for k, _ in PAIR_KINDS if any(p["kind"] == k for p in entries)]
        lines += [f"## {backbone}", ""]
        if not kinds:
            lines += ["No pairs of runs to compare for this backbone.", ""]
            continue
        header = ["layer", *(f"{k} (n = {sum(p['kind'] == k for p in entries)})"
                             for k in kinds)]
        table = []
        for i, layer in enumerate(layers):
            cells = [layer]
            for k in kinds:
                values = [p["per_layer"][i]["cka"] for p in entries if p["kind"] == k]
                mean = sum(values) / len(values)
                cells.append(f"{mean:.3f}" + (f" [{min(values):.3f}, {max(values):.3f}]"
                                              if len(values) > 1 else ""))
            table.append(cells)
        lines += [common.markdown_table(header, table), ""]
    if result["notes"]:
        lines += ["## Notes", ""] + [f"- {n}" for n in result["notes"]] + [""]
    lines += ["Figures: " + ", ".join(f"`{f}`" for f in result["figures"]), "",
              common.provenance_markdown(result["provenance"]), ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Main.
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default=f"{common.KERMANY}:test",
                   help="images the models are compared on (default Kermany test)")
    p.add_argument("--target-name", default="chest X-ray test", help="its name in titles")
    p.add_argument("--runs", type=Path, default=None,
                   help="transfer_vs_scratch.py's runs (default analysis/runs/"
                        "transfer_vs_scratch/; quick: .../transfer_vs_scratch-quick/)")
    p.add_argument("--backbone", action="append", default=None,
                   help="only runs of this backbone (repeatable; default all found)")
    p.add_argument("--bootstrap", type=int, default=None,
                   help="paired bootstrap resamples per layer (100; quick 20)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--strict", action="store_true",
                   help="stop at an unreadable image (default: leave it out and list it)")
    p.add_argument("--quick-n", type=int, default=32, help="quick: images")
    common.add_output_args(p, NAME)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    clock = common.Clock()
    if args.bootstrap is None:
        args.bootstrap = 20 if args.quick else 100
    common.setup_caches(args)
    out = common.results_dir(NAME, args.out, quick=args.quick)
    runs_dir = args.runs or common.default_runs_dir(args.quick)
    target = (balanced_subset(args.target, args.quick_n, seed=0) if args.quick
              else common.open_spec(args.target))

    from featsim.comparison import depth_order
    from featsim.features import feature_layers
    from featsim.pipeline import pretrained_backbone

    found = common.find_runs(runs_dir)
    # The Table 2 runs only: the learning-rate variants (Table 3) stay out of the pairs.
    runs = [r for r in found if r.label == r.strategy
            and (not args.backbone or r.backbone in args.backbone)]
    if not runs:
        raise SystemExit(f"[{NAME}] no finished training runs in {runs_dir}"
                         + (f" for {', '.join(args.backbone)}" if args.backbone else "")
                         + ": run analysis/transfer_vs_scratch.py first (or pass --runs DIR)")
    notes = []
    if len(runs) < len(found):
        notes.append(f"{len(found) - len(runs)} runs left out (learning-rate variants or other "
                     "backbones): " + ", ".join(sorted({f"{r.backbone} {r.label}" for r in found
                                                      if r not in runs})))

    result = {"experiment": "layer-by-layer linear CKA (Raghu et al. 2019)",
              "quick": args.quick, "target_name": args.target_name, "bootstrap": args.bootstrap,
              "runs_dir": str(runs_dir), "layers": {}, "pairs": [], "matrices": [],
              "n_images": None, "notes": notes, "figures": []}
    for backbone in dict.fromkeys(r.backbone for r in runs):
        mine = [r for r in runs if r.backbone == backbone]
        weights = {r.weights for r in mine}
        if len(weights) > 1:
            notes.append(f"{backbone}: runs started from different weights "
                         f"{sorted(map(str, weights))}; 'pretrained' uses the first")
        w = mine[0].weights
        pretrained = pretrained_backbone(backbone, Path(w) if w else None)
        layers = sorted((k for k in feature_layers(pretrained) if k != "logits"),
                        key=depth_order)
        result["layers"][backbone] = layers
        normalization = mine[0].normalization
        feats = {None: layer_features(pretrained, target, layers, args, normalization)}
        result["n_images"] = len(feats[None])
        if feats[None].skipped:
            notes.append(f"{len(feats[None].skipped)} unreadable images left out: "
                         + ", ".join(s.name for s in feats[None].skipped[:5]))
        for run in mine:
            print(f"[{NAME}] {backbone}: features of {run.name}", flush=True)
            feats[run] = layer_features(run.rundir.load_model(backbone=backbone), target,
                                        layers, args, run.normalization)

        def name(model):
            return "pretrained" if model is None else model.name

        for kind, a, b in pairs_of(mine):
            result["pairs"].append({"backbone": backbone, "kind": kind, "a": name(a),
                                    "b": name(b),
                                    "per_layer": per_layer_cka(feats[a], feats[b], layers,
                                                               args)})
        matrices = [("pretrained", None, None)]
        finetuned = [r for r in mine if r.strategy == "finetune"]
        scratch = [r for r in mine if r.strategy == "scratch"]
        if finetuned:
            matrices.append(("pretrained vs finetune", None, finetuned[0]))
        if len(scratch) >= 2:
            matrices.append(("scratch vs scratch", scratch[0], scratch[1]))
        elif scratch:
            notes.append(f"{backbone}: one scratch seed only, so no scratch vs scratch "
                         "baseline (train with --seeds 0,1[,2])")
        for kind, a, b in matrices:
            matrix = cka_matrix(feats[a], feats[b], layers)
            label = (f"{name(a)} vs {name(b)}" if kind != "pretrained"
                     else "pretrained, layer x layer")
            file = out / f"cka_matrix_{backbone}_{_slug(label)}.png"
            plot_matrix(matrix, f"{backbone}: {label}\n{args.target_name} "
                        f"(n = {len(feats[None])})" + (" [QUICK]" if args.quick else ""),
                        f"{name(b) if kind != 'pretrained' else 'pretrained'} layer",
                        f"{name(a)} layer", file)
            result["matrices"].append({"backbone": backbone, "kind": kind, "label": label,
                                       "matrix": matrix, "figure": file.name})
            result["figures"].append(file.name)
        path = plot_layers(result, backbone, out / f"cka_layers_{backbone}.png")
        if path is not None:
            result["figures"].append(path.name)

    rows = [{"backbone": p["backbone"], "kind": p["kind"], "model_a": p["a"],
             "model_b": p["b"], "layer": v["layer"], "depth": i, "cka": v["cka"],
             "ci_low": v["low"], "ci_high": v["high"]}
            for p in result["pairs"] for i, v in enumerate(p["per_layer"])]
    common.write_csv(out / "cka_per_layer.csv", rows, [
        "backbone", "kind", "model_a", "model_b", "layer", "depth", "cka", "ci_low", "ci_high"])
    result["provenance"] = common.provenance(clock, data={
        args.target_name: source_digest(target)})
    return common.finish(out, result, markdown, NAME, clock)


if __name__ == "__main__":
    sys.exit(main())
