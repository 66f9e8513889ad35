"""Gu & Lee (2024) Table 2, re-run with featsim.train: ImageNet transfer vs training from scratch.

Gu & Lee (Bioengineering 11(4):406) train seven ImageNet CNNs on the Kermany pneumonia split
(5,216 train / 624 test chest X-rays) with a frozen convolutional body and a new sigmoid head
("Transfer Learning", sec. 5.4) and from random initialisation ("Scratch Model"), 20 epochs,
batch 64, and report test loss, accuracy, precision, recall, F1 and G-mean (Table 2), and the
same with the learning rate x 0.1 (Table 3). This script trains, for every backbone with real
ImageNet weights here and any the user supplies, the strategies ``linear`` (the paper's
transfer), ``finetune`` (every layer) and ``scratch``, over several seeds, and writes their test
metrics as mean +- std (sample std over seeds) beside the paper's published rows, which are
typed in from the paper (Tables 2 and 3) and labelled as published, not measured. The paper's
backbones (ResNet, DenseNet, ...) have no weights on this machine, so its rows and ours share
the protocol, not the networks.

Full run (the paper's protocol; hours per backbone on a 2-core CPU, use a GPU if there is one)::

    python analysis/transfer_vs_scratch.py --seeds 0,1,2 --epochs 20 \\
        --lr-variant efficientnet_lite0

Reduced run on a CPU (what was reduced and why is written into the results)::

    python analysis/transfer_vs_scratch.py --seeds 0,1,2 --epochs 3 --lr-variant \\
        efficientnet_lite0 --note "CPU only: 2 cores"

Quick (CI, a few minutes on 2 cores: 64 train / 32 test images, 1 epoch, seed 0, batch 8)::

    python analysis/transfer_vs_scratch.py --quick

Options: ``--data`` (a folder with ``train/`` and ``test/`` class folders, default
``../shared/data/chest_xray_kermany_224/chest_xray``), ``--backbone NAME [--weights FILE]``
(repeatable; added to the defaults efficientnet_lite0 and mobilenet_v1_025 with the TF.js
weights in ``../shared/data/models``; ``--no-default-backbones`` to run only those),
``--strategies``, ``--seeds``, ``--epochs``, ``--lr``, ``--no-augment``, ``--runs DIR``
(checkpoints; default ``analysis/runs/transfer_vs_scratch/``), ``--resume`` (reuse finished
runs, continue interrupted ones), ``--out DIR``.

A backbone that featsim.train cannot start from its weights is skipped with the reason
recorded (the TF.js MobileNetV1 0.25: see :data:`TFJS_REASON`).

Writes to ``analysis/results/transfer_vs_scratch/``: ``results.json`` (provenance, plan,
per-run and summarised metrics, the published rows, skipped backbones, reductions),
``results.csv`` (one row per backbone x strategy x learning rate), ``runs.csv`` (one row per
seed), ``table.md`` (measured and published rows side by side), ``test_metrics.png`` and
``histories/`` (each run's per-epoch ``history.csv`` and ``metrics.json``, for the training
curve notebook). ``feature_similarity.py`` and ``layer_similarity.py`` read the runs folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import warnings
from pathlib import Path

import _common as common

from featsim.data.digest import source_digest
from featsim.data.subsets import balanced_subset, proportional_subset
from featsim.rundir import RunDir

NAME = "transfer_vs_scratch"
STRATEGIES = ("linear", "finetune", "scratch")
# The paper's protocol (sec. 5.6-5.7); anything less is listed as a reduction.
PAPER_EPOCHS, PAPER_BATCH, PAPER_SEEDS, PAPER_TRAIN = 20, 64, 3, 5216
# Test metrics of the table (the paper's six, plus ROC AUC) and two more kept in the CSV.
METRICS = ("loss", "accuracy", "precision", "recall", "f1", "g_mean", "roc_auc")
EXTRA_METRICS = ("specificity", "ece")
LABELS = {"loss": "Test loss", "accuracy": "Test accuracy", "precision": "Precision",
          "recall": "Recall", "f1": "F1", "g_mean": "G-mean", "roc_auc": "ROC AUC",
          "specificity": "Specificity", "ece": "ECE"}
PERCENT = ("accuracy", "precision", "recall")  # the paper prints these in %
STRATEGY_TEXT = {
    "linear": "transfer: frozen ImageNet body, new head (the paper's 'Transfer Learning')",
    "finetune": "transfer: every layer fine-tuned (body at 0.1 x the head's rate)",
    "scratch": "scratch: random initialisation, same architecture",
}

TFJS_REASON = (
    "featsim.train cannot train from the TF.js MobileNetV1 graph: the trainer loads weights "
    "with featsim.backbones.load_pretrained, which reads .pth/.safetensors/.msgpack checkpoints "
    "of the registered module (convolutions + BatchNorm), while the TF.js graph has its "
    "BatchNorm folded into the convolutions (featsim reads it into a folded_bn=True module, "
    "which TrainConfig cannot ask for); and the mobilenet_v1 family registers no weights "
    "source, so skip_head cannot swap its 1001-way classifier for the paper's 1-output head. "
    "Training it needs a library change (module options in TrainConfig and a head mapping for "
    "MobileNetV1). Scratch alone would not answer transfer vs scratch, so the backbone is "
    "skipped"
)

# --------------------------------------------------------------------------------------------
# Gu & Lee (2024), Bioengineering 11(4):406, typed in from the paper's Tables 2 and 3 (as
# printed: test loss, accuracy %, precision %, recall %, F1, G-mean). PUBLISHED, NOT MEASURED.
# Their "Transfer Learning" is a frozen convolutional body with a new fully connected sigmoid
# layer (sec. 5.4), featsim's ``linear``. tests/test_analysis.py checks every row against the
# paper's text when ../shared/papers is present.
# --------------------------------------------------------------------------------------------

PUBLISHED = {
    "Table 2": {
        "caption": "Performance comparison of from-scratch training models vs. real-world "
                   "feature transfer learning models",
        "rows": (
            ("ResNet18", "Scratch Model", "0.272 89.6% 90.1% 93.6% 0.918 0.894"),
            ("ResNet18", "Transfer Learning", "0.168 93.1% 91.2% 98.5% 0.947 0.904"),
            ("ResNet50", "Scratch Model", "0.383 83.0% 88.4% 83.8% 0.861 0.858"),
            ("ResNet50", "Transfer Learning", "0.293 89.4% 85.7% 99.7% 0.922 0.827"),
            ("DenseNet161", "Scratch Model", "0.301 91.2% 89.2% 97.7% 0.933 0.885"),
            ("DenseNet161", "Transfer Learning", "0.162 93.6% 91.7% 98.7% 0.951 0.910"),
            ("ShuffleNet v2", "Scratch Model", "0.473 78.2% 79.8% 87.2% 0.833 0.788"),
            ("ShuffleNet v2", "Transfer Learning", "0.354 91.2% 91.0% 95.4% 0.931 0.908"),
            ("MobileNet v2", "Scratch Model", "0.437 80.0% 88.2% 78.5% 0.830 0.846"),
            ("MobileNet v2", "Transfer Learning", "0.245 90.9% 88.1% 98.7% 0.931 0.866"),
            ("ResNeXt50 (32x4d)", "Scratch Model", "0.426 81.1% 88.6% 80.0% 0.841 0.856"),
            ("ResNeXt50 (32x4d)", "Transfer Learning", "0.190 92.3% 90.9% 97.4% 0.941 0.907"),
            ("Wide ResNet50-2", "Scratch Model", "0.290 88.5% 90.8% 90.8% 0.908 0.885"),
            ("Wide ResNet50-2", "Transfer Learning", "0.307 89.7% 86.1% 99.7% 0.924 0.835"),
        ),
    },
    "Table 3": {
        "caption": "Performance comparison of from-scratch training models vs. real-world "
                   "feature transfer learning models with reduced learning rate (x 0.1)",
        "rows": (
            ("ResNet18", "Scratch Model", "0.288 89.1% 89.5% 93.3% 0.914 0.894"),
            ("ResNet18", "Transfer Learning", "0.183 92.6% 90.8% 98.2% 0.944 0.901"),
            ("ResNet50", "Scratch Model", "0.395 82.4% 88.1% 83.2% 0.856 0.855"),
            ("ResNet50", "Transfer Learning", "0.311 88.7% 85.3% 99.5% 0.919 0.823"),
            ("DenseNet161", "Scratch Model", "0.315 90.7% 88.8% 97.4% 0.929 0.881"),
            ("DenseNet161", "Transfer Learning", "0.176 92.9% 91.2% 98.4% 0.947 0.906"),
            ("ShuffleNet v2", "Scratch Model", "0.488 77.5% 79.2% 86.6% 0.827 0.782"),
            ("ShuffleNet v2", "Transfer Learning", "0.372 90.4% 90.5% 94.9% 0.926 0.903"),
            ("MobileNet v2", "Scratch Model", "0.453 79.3% 87.9% 77.8% 0.825 0.842"),
            ("MobileNet v2", "Transfer Learning", "0.261 90.1% 87.6% 98.4% 0.927 0.861"),
            ("ResNeXt50 (32x4d)", "Scratch Model", "0.441 80.4% 88.2% 79.3% 0.835 0.852"),
            ("ResNeXt50 (32x4d)", "Transfer Learning", "0.206 91.5% 90.3% 96.9% 0.935 0.901"),
            ("Wide ResNet50-2", "Scratch Model", "0.305 87.9% 90.4% 90.2% 0.903 0.881"),
            ("Wide ResNet50-2", "Transfer Learning", "0.322 89.0% 85.6% 99.5% 0.920 0.830"),
        ),
    },
}
PUBLISHED_METRICS = ("loss", "accuracy", "precision", "recall", "f1", "g_mean")


def published_rows(table: str) -> list[dict]:
    """The paper's rows of ``table`` as numbers (percentages as fractions)."""
    out = []
    for model, setting, text in PUBLISHED[table]["rows"]:
        values = text.split()
        row = {"model": model, "setting": setting, "table": table}
        for key, value in zip(PUBLISHED_METRICS, values, strict=True):
            row[key] = float(value.rstrip("%")) / (100.0 if value.endswith("%") else 1.0)
        out.append(row)
    return out


# --------------------------------------------------------------------------------------------
# Which backbones can be trained, and the plan.
# --------------------------------------------------------------------------------------------


def transfer_probe(name: str, weights) -> str | None:
    """None when featsim.train can start ``name`` from ``weights`` with a new 1-output head (as
    ``train_and_evaluate`` does); otherwise the reason it cannot."""
    import jax

    from featsim.backbones.registry import get_backbone, list_backbones, load_pretrained

    if name not in list_backbones():
        return f"{name!r} is not a registered backbone ({', '.join(list_backbones())})"
    tfjs = weights is not None and (Path(weights).is_dir() or str(weights).endswith(".json"))
    try:
        load_pretrained(get_backbone(name, num_classes=1), path=weights, skip_head=True,
                        rng=jax.random.key(0), download=True)
    except (FileNotFoundError, ValueError, OSError, KeyError) as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        detail = (f"load_pretrained(get_backbone({name!r}, num_classes=1), "
                  f"path={str(weights) if weights else None!r}, skip_head=True) failed: "
                  f"{type(err).__name__}: {message}")
        if tfjs and Path(weights).exists():
            return f"{TFJS_REASON} ({detail})"
        return detail
    return None


@dataclasses.dataclass(frozen=True)
class Group:
    """One row of the results: a backbone, a strategy and a learning rate, over seeds."""

    backbone: str
    weights: str | None
    strategy: str
    learning_rate: float
    lr_variant: bool  # the paper's Table 3 (learning rate x 0.1)

    @property
    def label(self) -> str:
        return f"{self.strategy}_lr{self.learning_rate:.0e}" if self.lr_variant else self.strategy


def make_plan(trainable, strategies, lr, lr_variant, variant_strategies=None) -> list[Group]:
    groups = [Group(n, None if w is None else str(w), s, lr, False)
              for n, w in trainable for s in strategies]
    if lr_variant is not None:
        groups += [Group(n, None if w is None else str(w), s, lr * 0.1, True)
                   for n, w in trainable if n == lr_variant
                   for s in (variant_strategies or strategies)]
    return groups


# --------------------------------------------------------------------------------------------
# Training.
# --------------------------------------------------------------------------------------------


def same_run(workdir: Path, config, data: dict) -> bool:
    """Whether ``workdir`` holds (part of) a run of exactly ``config`` on exactly ``data``."""
    from featsim.train import TrainConfig

    run = RunDir(workdir)
    try:
        saved = TrainConfig.from_dict(run.read_config())
        record = run.read_record()
    except (OSError, KeyError, TypeError, ValueError):
        return False
    return saved == config and record.get("data") == data


def finished_run(workdir: Path, config, data: dict) -> dict | None:
    """The metrics of a finished run of ``config`` on ``data`` in ``workdir``, else None."""
    run = RunDir(workdir)
    if not (run.is_finished and same_run(workdir, config, data)):
        return None
    return run.read_metrics()


def train_group(group: Group, seeds, args, train, test, runs_dir: Path, data) -> list[dict]:
    from featsim.train import AugmentConfig, TrainConfig, train_and_evaluate

    results = []
    for seed in seeds:
        config = TrainConfig(
            backbone=group.backbone, strategy=group.strategy, epochs=args.epochs,
            batch_size=args.batch_size, learning_rate=group.learning_rate,
            augment=AugmentConfig(enabled=not args.no_augment), seed=seed)
        workdir = runs_dir / group.backbone / group.label / f"seed_{seed}"
        result = finished_run(workdir, config, data) if args.resume else None
        if result is None:
            # Continue a checkpoint only of the same config and data; otherwise start over.
            resume = args.resume and same_run(workdir, config, data)
            print(f"[{NAME}] training {group.backbone} {group.label} seed {seed} -> {workdir}"
                  + (" (resuming)" if resume else ""), flush=True)
            run = RunDir(workdir).create()
            run.clear_metrics()
            run.write_record({
                "backbone": group.backbone, "weights": group.weights,
                "strategy": group.strategy, "learning_rate": group.learning_rate,
                "lr_variant": group.lr_variant, "seed": seed, "label": group.label,
                "quick": args.quick, "data": data, "written_by": common.command_line()})
            result = train_and_evaluate(config, workdir, train=train, test=test,
                                        weights=group.weights, resume=resume,
                                        progress=not args.no_progress)
        else:
            print(f"[{NAME}] reusing {workdir} (finished, same config and data)", flush=True)
        results.append({"seed": seed, "workdir": str(workdir), **result})
    return results


def copy_histories(runs: list[dict], group: Group, out: Path) -> None:
    for run in runs:
        target = out / "histories" / group.backbone / group.label / f"seed_{run['seed']}"
        RunDir(run["workdir"]).copy_records(target)


def summarise(runs: list[dict]) -> dict:
    from featsim.train import summarize_runs

    keys = [k for k in (*METRICS, *EXTRA_METRICS) if f"test_{k}" in runs[0]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an undefined AUC is NaN, left out and counted below
        summary = summarize_runs([{k: float(r[f"test_{k}"]) for k in keys} for r in runs])
    return {k: {"mean": m, "std": s,
                "n": sum(1 for r in runs if math.isfinite(float(r[f"test_{k}"])))}
            for k, (m, s) in summary.items()}


CONTRAST_METRICS = ("accuracy", "roc_auc", "g_mean", "f1", "loss")


def contrasts(groups: list[dict]) -> list[dict]:
    """Every pair of strategies of one backbone and learning rate with >= 2 seeds each:
    the difference of their mean test metrics with Welch's 95 % t-interval over seeds (the
    test set is shared, so this is the spread over training runs, not over test images)."""
    from featsim.compare_seeds import welch_interval

    rows = []
    for i, a in enumerate(groups):
        for b in groups[i + 1:]:
            if (a["backbone"], a["learning_rate"]) != (b["backbone"], b["learning_rate"]):
                continue
            if min(len(a["runs"]), len(b["runs"])) < 2:
                continue
            for key in CONTRAST_METRICS:
                x = [float(r[f"test_{key}"]) for r in a["runs"]]
                y = [float(r[f"test_{key}"]) for r in b["runs"]]
                if not all(map(math.isfinite, x + y)):
                    continue
                diff, low, high = welch_interval(x, y)
                rows.append({"backbone": a["backbone"], "learning_rate": a["learning_rate"],
                             "first": a["label"], "second": b["label"], "metric": key,
                             "difference": diff, "low": low, "high": high,
                             "seeds": f"{len(x)} vs {len(y)}",
                             "separated": bool(low > 0 or high < 0)})
    return rows


# --------------------------------------------------------------------------------------------
# Tables and figure.
# --------------------------------------------------------------------------------------------


def _cell(key: str, mean, std=None) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "n/a"
    if key in PERCENT:
        scale, digits, unit = 100.0, 1, "%"
    else:
        scale, digits, unit = 1.0, 3, ""
    text = f"{mean * scale:.{digits}f}{unit}"
    if std is not None and not math.isnan(std):
        text += f" ± {std * scale:.{digits}f}"
    return text


def markdown(result: dict) -> str:
    header = ["Source", "Model", "Strategy", "lr", "Seeds", "Epochs",
              *(LABELS[k] for k in METRICS)]
    quick = result["quick"]
    measured_label = ("measured (featsim, QUICK subset: not a result)" if quick
                      else "measured (featsim, this run)")

    def measured(lr_variant: bool):
        rows = []
        for g in result["groups"]:
            if g["lr_variant"] != lr_variant:
                continue
            s = g["summary"]
            rows.append([measured_label, g["backbone"], g["strategy"],
                         f"{g['learning_rate']:g}", len(g["seeds"]), result["config"]["epochs"],
                         *(_cell(k, s[k]["mean"], s[k]["std"]) if k in s else "n/a"
                           for k in METRICS)])
        return rows

    def published(table: str):
        lr = "not stated" + (" (x 0.1)" if table == "Table 3" else "")
        return [[f"published (Gu & Lee 2024, {table})", r["model"],
                 "scratch" if r["setting"] == "Scratch Model"
                 else "transfer (frozen body, = linear)", lr, "not stated", PAPER_EPOCHS,
                 *(_cell(k, r.get(k)) for k in METRICS)]
                for r in published_rows(table)]

    lines = [f"# Transfer vs scratch on {result['data_name']}", ""]
    if quick:
        lines += ["**QUICK MODE**: a pipeline check on a small subset, not a result. "
                  "Do not quote these numbers.", ""]
    lines += ["Measured rows: mean ± sample std (ddof = 1) over seeds of the final model's test "
              "metrics. Published rows are typed in from Gu & Lee (2024), *Bioengineering* "
              "11(4):406, Tables 2 and 3: **published, not measured here**, and on other "
              "backbones (the paper's networks have no weights on this machine).", "",
              f"## Table 2 protocol (learning rate {result['config']['learning_rate']:g})", "",
              common.markdown_table(header, measured(False) + published("Table 2")), ""]
    if any(g["lr_variant"] for g in result["groups"]):
        lines += ["## Table 3 protocol (learning rate x 0.1)", "",
                  common.markdown_table(header, measured(True) + published("Table 3")), ""]
    if result.get("contrasts"):
        def fmt(key, v):
            return f"{v * 100:+.1f} pp" if key in PERCENT else f"{v:+.3f}"
        lines += ["## Contrasts over seeds (Welch 95 % t-interval)", "",
                  "Difference of mean test metrics, first minus second; the interval is over "
                  "training runs (the test split is shared). *separated*: the interval "
                  "excludes 0.", "",
                  common.markdown_table(
                      ["Model", "lr", "first - second", "metric", "difference",
                       "95% interval", "seeds", "separated"],
                      [[c["backbone"], f"{c['learning_rate']:g}",
                        f"{c['first']} - {c['second']}", LABELS[c["metric"]],
                        fmt(c["metric"], c["difference"]),
                        f"[{fmt(c['metric'], c['low'])}, {fmt(c['metric'], c['high'])}]",
                        c["seeds"], "yes" if c["separated"] else "no"]
                       for c in result["contrasts"]]), ""]
    lines += ["## Notes", "",
              "- Strategies: " + "; ".join(f"`{k}` = {v}" for k, v in STRATEGY_TEXT.items()) + ".",
              "- The paper names no optimiser or learning rate; featsim uses Adam at 1e-3 "
              "(Table 3: 1e-4), batch 64, class-weighted BCE, section 5.7's augmentation and "
              "mean/std 0.5 normalisation unless listed under reductions.",
              "- The paper's G-mean cannot be recomputed from its own accuracy, precision and "
              "recall (see featsim.train.classification); featsim's is sqrt(recall x specificity). "
              "ROC AUC is featsim's addition (the paper reports none).", ""]
    if result["skipped"]:
        lines += ["## Skipped backbones", ""]
        lines += [f"- `{s['backbone']}` (weights `{s['weights']}`): {s['reason']}"
                  for s in result["skipped"]]
        lines.append("")
    lines += ["## Reductions against the paper's protocol", ""]
    if result["reductions"]:
        lines += [f"- {r}" for r in result["reductions"]]
        lines += ["", f"Why: {result['why_reduced']}"]
    else:
        lines.append("- none")
    lines += ["", common.provenance_markdown(result["provenance"]), ""]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> Path | None:
    from matplotlib.figure import Figure

    groups = result["groups"]
    if not groups:
        return None
    backbones = list(dict.fromkeys(g["backbone"] for g in groups))
    keys = ("accuracy", "f1", "g_mean", "roc_auc")
    fig = Figure(figsize=(5.2 * len(backbones), 4.2), layout="constrained")
    axes = fig.subplots(1, len(backbones), squeeze=False)[0]
    for ax, backbone in zip(axes, backbones, strict=True):
        mine = [g for g in groups if g["backbone"] == backbone]
        width = 0.8 / len(mine)
        for i, g in enumerate(mine):
            means = [g["summary"].get(k, {}).get("mean", math.nan) for k in keys]
            stds = [g["summary"].get(k, {}).get("std", math.nan) for k in keys]
            stds = [0.0 if math.isnan(s) else s for s in stds]
            colour = common.OKABE_ITO[STRATEGIES.index(g["strategy"]) % 8
                                      if g["strategy"] in STRATEGIES else 7]
            label = g["strategy"] + (f" (lr {g['learning_rate']:g})" if g["lr_variant"] else "")
            ax.bar([k + (i - (len(mine) - 1) / 2) * width for k in range(len(keys))], means,
                   width, yerr=stds, capsize=3, color=colour, label=label,
                   hatch="//" if g["lr_variant"] else None, edgecolor="black", linewidth=0.6)
        ax.set_xticks(range(len(keys)), [LABELS[k] for k in keys])
        ax.set_ylim(0, 1.2)
        ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
        ax.set_ylabel("test value (mean ± std over seeds)")
        epochs = result["config"]["epochs"]
        ax.set_title(f"{backbone}, new sigmoid head, on {result['data_name']}\n"
                     f"test n = {result['n_test']}, {epochs} epoch{'s' * (epochs != 1)}, "
                     f"seeds {','.join(map(str, result['config']['seeds']))}"
                     + (" [QUICK]" if result["quick"] else ""), fontsize=9)
        ax.legend(fontsize=8, loc="upper center", ncol=3, title="strategy",
                  title_fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Transfer (linear, finetune) vs scratch: final-epoch test metrics", fontsize=11)
    fig.savefig(path, dpi=150)
    return path


# --------------------------------------------------------------------------------------------
# Main.
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=common.KERMANY,
                   help="folder with train/ and test/ class folders (default: Kermany 224)")
    common.add_backbone_args(p)
    p.add_argument("--strategies", default=",".join(STRATEGIES),
                   help="comma-separated, of linear, finetune, scratch (default all three)")
    p.add_argument("--seeds", default=None, help="comma-separated (default 0,1,2; quick: 0)")
    p.add_argument("--epochs", type=int, default=None, help="default 20 (quick: 1)")
    p.add_argument("--batch-size", type=int, default=None, help="default 64 (quick: 8)")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate (default 1e-3)")
    p.add_argument("--lr-variant", nargs="?", const="", default=None, metavar="BACKBONE",
                   help="also run the paper's Table 3 (learning rate x 0.1) for BACKBONE "
                        "(default: the first trainable one)")
    p.add_argument("--no-augment", action="store_true",
                   help="no augmentation (the paper augments; linear then trains on cached "
                        "features, seconds instead of hours)")
    p.add_argument("--runs", type=Path, default=None,
                   help="training runs folder (default analysis/runs/transfer_vs_scratch/)")
    p.add_argument("--resume", action="store_true",
                   help="reuse finished runs with the same config, continue interrupted ones")
    p.add_argument("--note", default="", help="why the run was reduced, recorded as given")
    p.add_argument("--train-subset", type=int, default=None, metavar="N",
                   help="train on N training images, stratified in the split's class "
                        "proportions (a reduction, recorded; the test split stays whole)")
    p.add_argument("--variant-seeds", default=None,
                   help="seeds of the learning-rate x 0.1 variant (default: --seeds)")
    p.add_argument("--variant-strategies", default=None,
                   help="strategies of the learning-rate x 0.1 variant (default: --strategies;"
                        " the paper's Table 3 has linear and scratch)")
    p.add_argument("--quick-train", type=int, default=64, help="quick: training images")
    p.add_argument("--quick-test", type=int, default=32, help="quick: test images")
    common.add_output_args(p, NAME)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    clock = common.Clock()
    args.epochs = args.epochs or (1 if args.quick else PAPER_EPOCHS)
    args.batch_size = args.batch_size or (8 if args.quick else PAPER_BATCH)
    seeds = common.parse_seeds(args.seeds or ("0" if args.quick else "0,1,2"))
    variant_seeds = common.parse_seeds(args.variant_seeds) if args.variant_seeds else seeds
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    variant_strategies = ([s.strip() for s in args.variant_strategies.split(",") if s.strip()]
                          if args.variant_strategies else strategies)
    for flag, chosen in (("--strategies", strategies),
                         ("--variant-strategies", variant_strategies)):
        bad = [s for s in chosen if s not in STRATEGIES]
        if bad or not chosen:
            raise SystemExit(f"{flag} takes {', '.join(STRATEGIES)}; got {','.join(chosen)!r}")
    common.setup_caches(args)
    out = common.results_dir(NAME, args.out, quick=args.quick)
    runs_dir = args.runs or common.default_runs_dir(args.quick)

    train_spec, test_spec = f"{args.data}:train", f"{args.data}:test"
    if args.quick:
        train = balanced_subset(train_spec, args.quick_train, seed=0)
        test = balanced_subset(test_spec, args.quick_test, seed=0)
    else:
        train = (proportional_subset(train_spec, args.train_subset, seed=0)
                 if args.train_subset else common.open_spec(train_spec))
        test = common.open_spec(test_spec)
    data = {"train": source_digest(train), "test": source_digest(test)}

    backbones = common.chosen_backbones(args)
    trainable, skipped = [], []
    for name, weights in backbones:
        reason = transfer_probe(name, weights)
        if reason is None:
            trainable.append((name, weights))
        else:
            print(f"[{NAME}] skipping {name}: {reason}", file=sys.stderr, flush=True)
            skipped.append({"backbone": name, "weights": None if weights is None
                            else str(weights), "reason": reason})
    lr_variant = args.lr_variant
    if lr_variant == "":
        lr_variant = trainable[0][0] if trainable else None
    if lr_variant is not None and lr_variant not in [n for n, _ in trainable]:
        skipped.append({"backbone": lr_variant, "weights": None,
                        "reason": "--lr-variant names a backbone that is not trained here"})
        lr_variant = None

    groups = []
    for group in make_plan(trainable, strategies, args.lr, lr_variant, variant_strategies):
        group_seeds = variant_seeds if group.lr_variant else seeds
        runs = train_group(group, group_seeds, args, train, test, runs_dir, data)
        copy_histories(runs, group, out)
        groups.append({**dataclasses.asdict(group), "label": group.label, "seeds": group_seeds,
                       "strategy_text": STRATEGY_TEXT[group.strategy],
                       "summary": summarise(runs),
                       "runs": [{k: v for k, v in r.items() if k != "config"} for r in runs]})

    reductions = []
    if args.quick:
        reductions.append(f"QUICK MODE: {data['train']['n_items']} training and "
                          f"{data['test']['n_items']} test images (stratified subsets), a "
                          "pipeline check, not a result")
    if args.epochs < PAPER_EPOCHS:
        reductions.append(f"{args.epochs} epoch{'s' * (args.epochs != 1)} instead of the "
                          f"paper's {PAPER_EPOCHS}")
    if len(seeds) < PAPER_SEEDS:
        reductions.append(f"{len(seeds)} seed{'s' * (len(seeds) != 1)} instead of "
                          f"{PAPER_SEEDS}")
    if lr_variant is not None and len(variant_seeds) < PAPER_SEEDS:
        reductions.append(f"the learning rate x 0.1 variant with {len(variant_seeds)} seed"
                          f"{'s' * (len(variant_seeds) != 1)} instead of {PAPER_SEEDS}")
    if lr_variant is not None and set(variant_strategies) < set(strategies):
        reductions.append("the learning rate x 0.1 variant without "
                          + ", ".join(s for s in strategies if s not in variant_strategies))
    if args.train_subset and not args.quick:
        reductions.append(f"{data['train']['n_items']} of the {PAPER_TRAIN} training images "
                          "(stratified in the split's class proportions); the test split is "
                          "whole")
    if args.batch_size != PAPER_BATCH:
        reductions.append(f"batch size {args.batch_size} instead of the paper's {PAPER_BATCH}")
    if args.no_augment:
        reductions.append("no augmentation (the paper's section 5.7 augments)")
    missing = [s for s in STRATEGIES if s not in strategies]
    if missing:
        reductions.append(f"strategies not run: {', '.join(missing)}")
    defaults = [n for n, _ in common.DEFAULT_BACKBONES]
    not_run = [n for n in defaults if n not in [t for t, _ in trainable]]
    if not_run:
        reductions.append(f"backbones with real weights here not trained: {', '.join(not_run)}"
                          " (see the skipped backbones, or --no-default-backbones)")
    if lr_variant is None:
        reductions.append("the paper's Table 3 variant (learning rate x 0.1) was not run")
    why = "; ".join(x for x in (common.accelerator_note(), args.note) if x)

    n_test = data["test"]["n_items"]
    result = {
        "experiment": "Gu & Lee (2024) Table 2/3: ImageNet transfer vs scratch",
        "data_name": ("Kermany chest X-ray" if Path(args.data).resolve()
                      == common.KERMANY.resolve() else str(args.data)),
        "quick": args.quick,
        "n_test": n_test,
        "config": {"epochs": args.epochs, "batch_size": args.batch_size,
                   "learning_rate": args.lr, "seeds": seeds, "variant_seeds": variant_seeds,
                   "variant_strategies": variant_strategies,
                   "train_subset": args.train_subset, "strategies": strategies,
                   "augment": not args.no_augment, "lr_variant": lr_variant,
                   "runs_dir": str(runs_dir)},
        "groups": groups,
        "skipped": skipped,
        "reductions": [r for r in reductions if r],
        "why_reduced": why,
        "published": {t: {"caption": v["caption"], "source": "Gu & Lee 2024, Bioengineering "
                          "11(4):406, " + t + " (typed in; published, not measured)",
                          "rows": published_rows(t)} for t, v in PUBLISHED.items()},
    }
    result["contrasts"] = contrasts(groups)
    result["provenance"] = common.provenance(clock, data=data)

    rows = []
    for g in groups:
        row = {k: g[k] for k in ("backbone", "weights", "strategy", "learning_rate",
                                 "lr_variant")}
        row.update(n_seeds=len(g["seeds"]), seeds=",".join(map(str, g["seeds"])),
                   epochs=args.epochs, n_test=n_test, quick=args.quick)
        for k, s in g["summary"].items():
            row[f"{k}_mean"], row[f"{k}_std"] = s["mean"], s["std"]
        rows.append(row)
    common.write_csv(out / "results.csv", rows)
    common.write_csv(out / "runs.csv", [
        {"backbone": g["backbone"], "strategy": g["strategy"],
         "learning_rate": g["learning_rate"], **{k: v for k, v in r.items()
                                                 if not isinstance(v, dict)}}
        for g in groups for r in g["runs"]])
    if result["contrasts"]:
        common.write_csv(out / "contrasts.csv", result["contrasts"])
    figure = plot(result, out / "test_metrics.png")
    result["figures"] = [figure.name] if figure else []
    return common.finish(out, result, markdown, NAME, clock)


if __name__ == "__main__":
    sys.exit(main())
