"""El Azhari (2022) on COVID-CT: random vs ImageNet init x frozen vs full training, and a small CNN.

M. El Azhari, "Transfer learning for Covid-19 detection in medical images"
(``../shared/papers/el-azhari-covid-transfer-learning.md``) initialises five ImageNet CNNs with
random or pretrained weights, trains them with the convolutional body frozen ("Integrated
Feature Extractor") or every layer trained, each with a new Flatten + Dense(1000) +
Dense(classes) head, and compares them with a small SeparableConv2D CNN trained from scratch
(her Table 1), on CT scans and chest X-rays, reporting precision, recall, F1, their
micro-averages and accuracy; training stops when validation accuracy reaches 0.89 and
validation loss is below 0.3. Her networks have no weights here, so this script runs the same
design on the backbone with real ImageNet weights that featsim.train can start from
(efficientnet_lite0) and on featsim's ``elazhari_cnn`` (her Table 1):

=====================  ================  ===========================================
cell                   TrainConfig       meaning
=====================  ================  ===========================================
``pretrained_frozen``  linear            ImageNet body frozen, new head trained
``pretrained_full``    finetune          ImageNet init, every layer trained
``random_frozen``      linear, init      random body frozen, head trained (a
                       ``"random"``      random-features probe)
``random_full``        scratch           random init, every layer trained
``small_cnn``          scratch           ``elazhari_cnn`` from random init
=====================  ================  ===========================================

Data: ``../shared/data/covid_ct_ucsd_100`` (UCSD COVID-CT, 50 CT_COVID + 50 CT_NonCOVID, mixed
PNG/JPEG, opened with ``featsim.data.open_source``). Each seed ``s`` draws its own stratified
train/test split (``StratifiedShuffleSplit(random_state=s)``, 70/30 by default) and trains
with seed ``s``; COVID is the positive class. Test metrics: accuracy, binary precision /
recall / F1 (COVID positive), micro-averaged precision / recall / F1 (her eqs. 4-6; for one
label per image they equal accuracy), specificity and ROC AUC with its stratified bootstrap
95% CI (``featsim.train.auc_ci``), reported as mean +- sample std over seeds.

Full design (every cell 5 seeds x 10 epochs, the paper's Flatten + Dense(1000) head,
augmentation; hours on a 2-core CPU, use a GPU)::

    python analysis/covid_ct.py --seeds 0,1,2,3,4 --epochs 10 --batch-size 16

What ``analysis/results/covid_ct/`` holds (a 2-core CPU, ~25 min; the cells trained end to
end cut to 3 seeds x 5 epochs, the small CNN at 40 epochs so its BatchNorm statistics
settle; linear head and no augmentation so ``pretrained_frozen`` trains on cached features;
the exact command and every reduction are in its ``results.json`` and ``table.md``)::

    python analysis/covid_ct.py --seeds 0,1,2,3,4 --epochs 10 --batch-size 16 \\
        --head linear --no-augment \\
        --cells pretrained_frozen,random_frozen,pretrained_full,random_full,small_cnn \\
        --cell-epochs small_cnn=40 --cell-seeds random_frozen=0,1,2 \\
        --cell-epochs random_frozen=5 --cell-seeds pretrained_full=0,1,2 \\
        --cell-epochs pretrained_full=5 --cell-seeds random_full=0,1,2 \\
        --cell-epochs random_full=5 --resume

The paper's early stopping (validation accuracy >= 0.89 and loss < 0.3) on a validation
share carved from each training split::

    python analysis/covid_ct.py --val-fraction 0.15

Quick (CI: 16 images, 1 epoch, seed 0, batch 8)::

    python analysis/covid_ct.py --quick

BatchNorm: the cells that train BatchNorm (``pretrained_full``, ``random_full``,
``small_cnn``) are tested, like every ``featsim.train`` run, with population statistics
recomputed on their un-augmented training images from the final weights
(``TrainConfig.recompute_bn_stats``; the frozen cells keep the body's statistics); each run
records which (``bn_stats`` in ``runs.csv``, and a note per cell). Results committed before
this (issue 12) tested the running averages; ``--resume`` does not reuse such runs.

Options: ``--data`` (a folder of class folders), ``--backbone NAME [--weights FILE]`` (the
transfer backbone, default efficientnet_lite0), ``--small-cnn NAME`` (default elazhari_cnn;
``none`` to leave it out), ``--cells``, ``--head`` (``flatten_mlp``, the paper's, default; or
``linear``), ``--seeds``, ``--epochs``, ``--batch-size``, ``--lr``, ``--body-lr-scale``,
``--test-fraction``, ``--val-fraction``, ``--no-stop-when``, ``--no-augment``,
``--no-recompute-bn`` (ablation: test the BatchNorm running averages), ``--runs DIR``
(default ``analysis/runs/covid_ct/``), ``--resume``, ``--out DIR``.

Writes to ``analysis/results/covid_ct/``: ``results.json`` (provenance, plan, per-run and
summarised metrics, the paper's quoted numbers, differences from the paper), ``results.csv``
(one row per cell), ``runs.csv`` (one row per cell and seed), ``table.md`` and
``test_metrics.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import sys
import warnings
from pathlib import Path

import _common as common
import numpy as np

from featsim.data.digest import source_digest
from featsim.data.subsets import balanced_subset
from featsim.rundir import RunDir
from featsim.train.predict import predict_binary

NAME = "covid_ct"
CELLS = ("pretrained_frozen", "pretrained_full", "random_frozen", "random_full", "small_cnn")
CELL_TEXT = {
    "pretrained_frozen": "ImageNet init, body frozen (strategy linear)",
    "pretrained_full": "ImageNet init, every layer trained (strategy finetune)",
    "random_frozen": "random init, body frozen: random-features probe (linear, init=random)",
    "random_full": "random init, every layer trained (strategy scratch)",
    "small_cnn": "El Azhari's small SeparableConv2D CNN, random init, full training (scratch)",
}
# Test metrics in the table, and the extra ones kept in the CSVs.
METRICS = ("accuracy", "precision", "recall", "f1", "micro_precision", "micro_recall",
           "micro_f1", "roc_auc")
EXTRA_METRICS = ("specificity", "loss", "auc_ci_low", "auc_ci_high", "epochs_run")
LABELS = {"accuracy": "Accuracy", "precision": "Precision", "recall": "Recall", "f1": "F1",
          "micro_precision": "Micro P", "micro_recall": "Micro R", "micro_f1": "Micro F1",
          "roc_auc": "ROC AUC", "specificity": "Specificity", "loss": "Test loss"}
PAPER_STOP = "val_accuracy>=0.89,val_loss<0.3"
PAPER = {"batch_size": 32, "learning_rate": 1e-3, "split": "80/10/10 train/val/test",
         "n_images": "2,482 CT scans (SARS-CoV-2 CT, Soares & Angelov) and ~17,100 augmented "
                     "X-ray + CT images; ~90,000 augmented images in all"}
# El Azhari reports her results only as bar charts (Figs. 5-7, not reproduced in the text we
# have); sec. 3.1.6 quotes these numbers without saying which data set (X-ray or CT) each is
# from. PUBLISHED, NOT MEASURED here, and on other networks and far more data.
PUBLISHED_QUOTES = (
    ("accuracy", 0.98, "DenseNet121 and ResNet-50, pretrained and random init (the maximum)"),
    ("recall", 1.00, "DenseNet121 (the highest)"),
    ("recall", 0.72, "her deep CNN from scratch (the lowest)"),
    ("precision", 0.96, "ResNet-50"),
    ("precision", 0.95, "VGG16"),
    ("epochs", 8, "her deep CNN (early stopping)"),
    ("epochs", 405, "VGG16, random init"),
    ("epochs", 5, "DenseNet121, pretrained"),
)


# --------------------------------------------------------------------------------------------
# Data.
# --------------------------------------------------------------------------------------------


def positive_class(class_names, given: str | None) -> int:
    """Index of the positive (COVID) class: ``given``, else the one named like COVID but not
    non-COVID, else class 1."""
    names = list(class_names)
    if given:
        if given not in names:
            raise SystemExit(f"--positive {given!r} is not a class ({', '.join(names)})")
        return names.index(given)
    covid = [i for i, n in enumerate(names) if "covid" in n.lower()
             and not re.search(r"non|neg|normal", n.lower())]
    return covid[0] if len(covid) == 1 else 1


def relabel(source, positive: int):
    """The source with the positive class as label 1 (so every binary metric, ROC AUC
    included, is about COVID) and the other as 0."""
    names = list(source.class_names)
    if len(names) != 2:
        raise SystemExit(f"{source.spec}: classes {names}; this script is binary")
    items = tuple(dataclasses.replace(it, label=int(it.label == positive))
                  for it in source.items)
    return dataclasses.replace(source, items=items,
                               class_names=(names[1 - positive], names[positive]))


def subset(source, index, what: str):
    return dataclasses.replace(source, items=tuple(source.items[i] for i in index),
                               spec=f"{source.spec} [{what}]")


def split(labels: np.ndarray, test_fraction: float, seed: int):
    """Stratified ``(train_index, test_index)`` of one seed, sorted."""
    from sklearn.model_selection import StratifiedShuffleSplit

    splitter = StratifiedShuffleSplit(n_splits=1, test_size=test_fraction, random_state=seed)
    train, test = next(splitter.split(np.zeros(len(labels)), labels))
    return np.sort(train), np.sort(test)


def figure_key(item_id: str) -> str:
    """The paper/figure a COVID-CT slice was cut from (its file name up to ``-p<page>`` or
    ``%``): slices of one figure can land on both sides of a split."""
    stem = Path(item_id).stem
    return re.split(r"-p\d+|%|_\d+$", stem)[0]


# --------------------------------------------------------------------------------------------
# Training and evaluation.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Cell:
    name: str
    backbone: str
    weights: str | None
    strategy: str
    init: str
    head: str


def make_plan(cells, backbone, weights, small_cnn, head) -> list[Cell]:
    spec = {
        "pretrained_frozen": (backbone, weights, "linear", "pretrained", head),
        "pretrained_full": (backbone, weights, "finetune", "pretrained", head),
        "random_frozen": (backbone, None, "linear", "random", head),
        "random_full": (backbone, None, "scratch", "pretrained", head),
        # her CNN's own classifier is Table 1's Flatten + Dense(1000) + Dense: head "linear"
        "small_cnn": (small_cnn, None, "scratch", "pretrained", "linear"),
    }
    return [Cell(c, *spec[c]) for c in cells if not (c == "small_cnn" and not small_cnn)]


def test_metrics(labels: np.ndarray, p: np.ndarray, seed: int, n_boot: int) -> dict:
    """Binary metrics (positive = 1), micro-averages over both classes (her eqs. 4-6: TP, FP,
    FN summed over the classes covid and non-covid), AUC + bootstrap CI: all from
    ``featsim.train.classification_metrics`` (positive iff P > 0.5, as in training)."""
    from featsim.train import auc_ci, classification_metrics

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # undefined precision etc. become NaN
        m = classification_metrics(labels, p, num_classes=2)
    out = {k: float(m[k]) for k in ("accuracy", "precision", "recall", "f1", "specificity")}
    out.update(micro_precision=m["precision_micro"], micro_recall=m["recall_micro"],
               micro_f1=m["f1_micro"], tp=m["tp"], fp=m["fp"], fn=m["fn"], tn=m["tn"],
               score_std=float(np.std(p)), predicted_positive=m["tp"] + m["fp"],
               saturated=float(np.mean((p == 0.0) | (p == 1.0))))
    if 0 < labels.sum() < len(labels):
        ci = auc_ci(labels, p, n_resamples=n_boot, seed=seed)
        out.update(roc_auc=ci.estimate, auc_ci_low=ci.low, auc_ci_high=ci.high)
    else:
        out.update(roc_auc=math.nan, auc_ci_low=math.nan, auc_ci_high=math.nan)
    return out


def train_cell(cell: Cell, seeds, epochs: int, args, source, splits, runs_dir: Path,
               digest) -> list[dict]:
    from featsim.train import AugmentConfig, TrainConfig, train_and_evaluate

    augment = (AugmentConfig(enabled=False) if args.no_augment else AugmentConfig(
        # her Keras ImageDataGenerator: rotation +-25 deg, horizontal flip, zoom 0.2 (here a
        # random crop of 70-100% of the area, zoom-in only); no colour jitter
        crop_scale=(0.7, 1.0), crop_ratio=(0.8, 1.25), brightness=0.0, contrast=0.0,
        saturation=0.0, hflip_prob=0.5, rotation_degrees=(-25.0, 25.0)))
    results = []
    for seed in seeds:
        train_idx, test_idx = splits[seed]
        train = subset(source, train_idx, f"seed {seed} train")
        test = subset(source, test_idx, f"seed {seed} test")
        config = TrainConfig(
            backbone=cell.backbone, strategy=cell.strategy, init=cell.init, head=cell.head,
            epochs=epochs, batch_size=args.batch_size, learning_rate=args.lr,
            body_lr_scale=args.body_lr_scale, normalization="backbone", augment=augment,
            val_fraction=args.val_fraction,
            stop_when=PAPER_STOP if args.val_fraction and not args.no_stop_when else None,
            recompute_bn_stats=not args.no_recompute_bn, seed=seed)
        workdir = runs_dir / cell.backbone / cell.name / f"seed_{seed}"
        record = {"cell": cell.name, "weights": cell.weights, "seed": seed, "quick": args.quick,
                  "data": digest, "test_ids": [it.id for it in test.items]}
        done = None
        run = RunDir(workdir)
        if args.resume and run.metrics_file.is_file():
            try:
                raw = run.read_config()
                saved = TrainConfig.from_dict(raw)
                test_ids = run.read_record()["test_ids"]
                # every field written out: a run saved before a field existed (e.g.
                # recompute_bn_stats, whose default changed what is tested) is not reused
                same = (saved == config and set(raw) == set(config.to_dict())
                        and test_ids == record["test_ids"])
            except (OSError, KeyError, TypeError, ValueError):
                same = False
            if same:
                done = run.read_metrics()
                print(f"[{NAME}] reusing {workdir}", flush=True)
        if done is None:
            print(f"[{NAME}] training {cell.name} ({cell.backbone}) seed {seed}: "
                  f"{len(train)} train / {len(test)} test -> {workdir}", flush=True)
            run.create().clear_metrics()
            run.write_record({
                **record, "backbone": cell.backbone, "strategy": cell.strategy,
                "learning_rate": args.lr, "label": cell.name,
                "written_by": common.command_line()})
            done = train_and_evaluate(config, workdir, train=train, test=test,
                                      weights=cell.weights, progress=not args.no_progress)
        # The cached-feature path (linear, no augmentation) trained and tested the head on
        # features of float pixels; the end-to-end loop holds uint8 pixels.
        cached = done.get("path") == "cached_features"
        labels, p, magnitude = predict_binary(config, workdir, test,
                                              dtype="float32" if cached else None)
        metrics = test_metrics(labels, p, seed, args.bootstrap)
        metrics["pre_logits_mean_abs"] = magnitude
        # train_and_evaluate's own test accuracy of the same model
        lib_acc = float(done["test_accuracy"])
        if abs(metrics["accuracy"] - lib_acc) > 1e-6:
            print(f"[{NAME}] note: {workdir}: accuracy {metrics['accuracy']:.4f} from the saved "
                  f"model vs train_and_evaluate's {lib_acc:.4f}", file=sys.stderr, flush=True)
        metrics.update(loss=float(done["test_loss"]), epochs_run=int(done["epochs_run"]),
                       bn_stats=done.get("bn_stats", "running averages of training"),
                       library_test_accuracy=lib_acc, training_path=done.get("path", "end_to_end"))
        results.append({"seed": seed, "workdir": str(workdir), "n_train": int(done["n_train"]),
                        "n_val": int(done["n_val"]), "n_test": len(test),
                        "stop_reason": done.get("stop_reason"),
                        "train_seconds": float(done["seconds"]), **metrics})
    return results


def summarise(runs: list[dict]) -> dict:
    from featsim.train import summarize_runs

    keys = [*METRICS, *EXTRA_METRICS]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NaN (undefined) values are left out, counted in n
        summary = summarize_runs([{k: float(r[k]) for k in keys} for r in runs])
    return {k: {"mean": m, "std": s, "n": sum(1 for r in runs if math.isfinite(float(r[k])))}
            for k, (m, s) in summary.items()}


# --------------------------------------------------------------------------------------------
# Table and figure.
# --------------------------------------------------------------------------------------------


def markdown(result: dict) -> str:
    cfg = result["config"]
    quick = result["quick"]
    header = ["Cell", "Backbone", "Init", "Body", "Head", "Seeds", "Epochs",
              *(LABELS[k] for k in METRICS), "AUC 95% CI (mean over seeds)"]
    rows = []
    for c in result["cells"]:
        s = c["summary"]
        rows.append([c["name"], c["backbone"], "ImageNet" if c["init_used"] == "pretrained"
                     else "random", "frozen" if c["strategy"] == "linear" else "trained",
                     c["head_text"], len(c["runs"]), c["epochs"],
                     *(common.fmt_mean_std(s[k]["mean"], s[k]["std"]) for k in METRICS),
                     f"[{common.fmt(s['auc_ci_low']['mean'])}, "
                     f"{common.fmt(s['auc_ci_high']['mean'])}]"])
    data = result["provenance"]["data"]["source"]
    lines = [f"# El Azhari (2022) design on {result['data_name']}: random vs ImageNet init, "
             "frozen vs full training, and her small CNN", ""]
    if quick:
        lines += ["**QUICK MODE**: a pipeline check on a few images, not a result. Do not "
                  "quote these numbers.", ""]
    lines += [
        f"**Small data, wide intervals.** {data['n_items']} images in all "
        f"({', '.join(f'{k}: {v}' for k, v in data['class_counts'].items())}); each seed "
        f"tests on {result['n_test']} held-out images "
        f"({cfg['test_fraction']:.0%} stratified split, a different split per seed), so one "
        f"image is {1 / result['n_test']:.1%} of accuracy. Values are mean ± sample std "
        "(ddof = 1) over seeds; the per-seed ROC AUC bootstrap 95% CIs (featsim.train.auc_ci, "
        f"{cfg['bootstrap']} stratified resamples) are wide: their mean bounds are in the last "
        "column. Differences smaller than about one std are not evidence of anything.", "",
        "Measured (featsim, this run" + (", QUICK" if quick else "") + "): "
        f"{cfg['epochs']} epoch{'s' * (cfg['epochs'] != 1)} (unless the Epochs column says "
        f"otherwise), batch {cfg['batch_size']}, "
        f"Adam lr {cfg['learning_rate']:g} (body x {cfg['body_lr_scale']:g} when fine-tuned), "
        f"COVID = positive class ({result['positive_class']}).", "",
        common.markdown_table(header, rows), "",
        "Micro-averaged precision, recall and F1 (her eqs. 4-6, TP/FP/FN summed over both "
        "classes) equal accuracy whenever every image gets exactly one of the two labels, as "
        "here; they are listed because the paper lists them. Precision, recall and F1 are "
        "binary with COVID positive.", "",
        "## Cells", ""]
    lines += [f"- `{c['name']}`: {CELL_TEXT[c['name']]}; `{c['backbone']}`" for c in
              result["cells"]]
    lines += ["", "## Published (El Azhari 2022): PUBLISHED, NOT MEASURED", "",
              "The paper gives its results only as bar charts (Figs. 5-7), so there is no "
              "table to type in. Section 3.1.6 quotes these numbers, without saying whether "
              "each is from the X-ray or the CT experiments, on DenseNet121 / ResNet-50 / "
              "VGG16 / her CNN trained on thousands of augmented images, not on this data:", ""]
    lines.append(common.markdown_table(
        ["Source", "Metric", "Value", "Model / setting"],
        [["PUBLISHED (El Azhari 2022, sec. 3.1.6), not measured", m,
          f"{v:.0%}" if isinstance(v, float) else v, what]
         for m, v, what in PUBLISHED_QUOTES]))
    lines += ["", "## Differences from the paper", ""]
    lines += [f"- {d}" for d in result["differences"]]
    if result["notes"]:
        lines += ["", "## Notes", ""]
        lines += [f"- {n}" for n in result["notes"]]
    lines += ["", common.provenance_markdown(result["provenance"]), ""]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> Path | None:
    from matplotlib.figure import Figure

    cells = result["cells"]
    if not cells:
        return None
    keys = ("accuracy", "precision", "recall", "f1", "micro_f1", "roc_auc")
    hatches = ("", "//", "..", "xx", "\\\\", "--")
    fig = Figure(figsize=(10, 4.8), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / len(cells)
    for i, c in enumerate(cells):
        means = [c["summary"][k]["mean"] for k in keys]
        stds = [c["summary"][k]["std"] for k in keys]
        stds = [0.0 if s is None or math.isnan(s) else s for s in stds]
        colour = common.OKABE_ITO[CELLS.index(c["name"]) % len(common.OKABE_ITO)]
        ax.bar([k + (i - (len(cells) - 1) / 2) * width for k in range(len(keys))], means, width,
               yerr=stds, capsize=3, color=colour, edgecolor="black", linewidth=0.6,
               hatch=hatches[CELLS.index(c["name"]) % len(hatches)],
               label=f"{c['name']} ({c['backbone']}; {len(c['runs'])} x {c['epochs']} ep)")
    ax.set_xticks(range(len(keys)), [LABELS[k] for k in keys])
    ax.set_ylim(0, 1.25)
    ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.axhline(0.5, color="grey", linewidth=0.8, linestyle=":")
    ax.set_ylabel("test value (mean ± std over seeds)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", ncol=3,
              title="cell (backbone; seeds x epochs)", title_fontsize=8)
    cfg = result["config"]
    backbones = ", ".join(dict.fromkeys(c["backbone"] for c in cells))
    ax.set_title(
        f"{backbones} on {result['data_name']}\n{result['n_images']} CT images, test n = "
        f"{result['n_test']} per seed: random vs ImageNet init, frozen vs fully trained\n"
        f"one stratified split per seed, batch {cfg['batch_size']}, head "
        f"{'Flatten+MLP' if cfg['head'] == 'flatten_mlp' else 'GAP+Dense'}; error bars: "
        "std over seeds" + (" [QUICK]" if result["quick"]
                                                             else ""), fontsize=10)
    fig.savefig(path, dpi=150)
    return path


# --------------------------------------------------------------------------------------------
# Main.
# --------------------------------------------------------------------------------------------


def result_why(args) -> str:
    return "; ".join(x for x in (common.accelerator_note(), args.note) if x)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=common.COVID_CT,
                   help="a folder of two class folders (default: covid_ct_ucsd_100)")
    p.add_argument("--positive", default=None,
                   help="the positive class folder (default: the one named COVID, not NonCOVID)")
    p.add_argument("--backbone", default="efficientnet_lite0",
                   help="the transfer backbone (default efficientnet_lite0, real ImageNet "
                        "weights)")
    p.add_argument("--weights", default=None, help="its weights (default: the registered ones)")
    p.add_argument("--small-cnn", default="elazhari_cnn",
                   help="the small CNN trained from scratch (default elazhari_cnn; 'none': "
                        "leave the cell out)")
    p.add_argument("--cells", default=",".join(CELLS),
                   help=f"comma-separated, of {', '.join(CELLS)} (default all)")
    p.add_argument("--head", default="flatten_mlp", choices=("flatten_mlp", "linear"),
                   help="the transfer backbone's head: flatten_mlp (the paper's Flatten + "
                        "Dense(1000) + Dense, default) or linear (global pool + Dense)")
    p.add_argument("--seeds", default=None, help="comma-separated (default 0,1,2,3,4; quick: 0)")
    p.add_argument("--epochs", type=int, default=None, help="default 10 (quick: 1)")
    p.add_argument("--cell-seeds", action="append", default=[], metavar="CELL=SEEDS",
                   help="seeds of one cell instead of --seeds, e.g. pretrained_full=0,1 "
                        "(repeatable; a reduction, recorded)")
    p.add_argument("--cell-epochs", action="append", default=[], metavar="CELL=N",
                   help="epochs of one cell instead of --epochs (repeatable; recorded)")
    p.add_argument("--batch-size", type=int, default=None, help="default 16 (quick: 8)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (paper: 1e-3)")
    p.add_argument("--body-lr-scale", type=float, default=1.0,
                   help="fine-tuned body's rate over the head's (default 1: one rate, as in "
                        "Keras)")
    p.add_argument("--test-fraction", type=float, default=0.3, help="default 0.3")
    p.add_argument("--val-fraction", type=float, default=0.0,
                   help="validation share of each training split; > 0 turns on the paper's "
                        f"early stopping ({PAPER_STOP}) unless --no-stop-when (default 0)")
    p.add_argument("--no-stop-when", action="store_true",
                   help="with --val-fraction: no early stopping, validation metrics only")
    p.add_argument("--no-augment", action="store_true", help="no augmentation")
    p.add_argument("--no-recompute-bn", action="store_true",
                   help="ablation: test the BatchNorm running averages of training instead of "
                        "population statistics recomputed on the un-augmented training images "
                        "(featsim.train's default)")
    p.add_argument("--bootstrap", type=int, default=1000, help="AUC bootstrap resamples")
    p.add_argument("--runs", type=Path, default=None,
                   help="training runs folder (default analysis/runs/covid_ct/)")
    p.add_argument("--resume", action="store_true",
                   help="reuse finished runs of the same config and split")
    p.add_argument("--note", default="", help="why the run was reduced, recorded as given")
    p.add_argument("--quick-n", type=int, default=16, help="quick: images in all")
    common.add_output_args(p, NAME)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    clock = common.Clock()
    args.epochs = args.epochs or (1 if args.quick else 10)
    args.batch_size = args.batch_size or (8 if args.quick else 16)
    seeds = common.parse_seeds(args.seeds or ("0" if args.quick else "0,1,2,3,4"))
    cells = [c.strip() for c in args.cells.split(",") if c.strip()]
    if not cells or any(c not in CELLS for c in cells):
        raise SystemExit(f"--cells takes {', '.join(CELLS)}; got {args.cells!r}")
    if not 0 < args.test_fraction < 1 or not 0 <= args.val_fraction < 1:
        raise SystemExit("--test-fraction must be in (0, 1) and --val-fraction in [0, 1)")
    cell_seeds, cell_epochs = {}, {}
    for text, target, parse in ((args.cell_seeds, cell_seeds, common.parse_seeds),
                                (args.cell_epochs, cell_epochs, int)):
        for item in text:
            name, _, value = item.partition("=")
            if name not in CELLS or not value:
                raise SystemExit(f"--cell-seeds/--cell-epochs take CELL=VALUE with CELL in "
                                 f"{', '.join(CELLS)}; got {item!r}")
            target[name] = parse(value)
    small_cnn = None if args.small_cnn.lower() in ("", "none") else args.small_cnn
    common.setup_caches(args)
    out = common.results_dir(NAME, args.out, quick=args.quick)
    runs_dir = args.runs or common.RUNS_ROOT / (f"{NAME}-quick" if args.quick else NAME)

    source = (balanced_subset(args.data, args.quick_n, seed=0) if args.quick
              else common.open_spec(args.data))
    digest = source_digest(source)
    positive = positive_class(source.class_names, args.positive)
    plan = make_plan(cells, args.backbone, args.weights, small_cnn, args.head)

    source = relabel(source, positive)
    labels = np.array([it.label for it in source.items])
    all_seeds = sorted(set(seeds).union(*cell_seeds.values()))
    splits = {s: split(labels, args.test_fraction, s) for s in all_seeds}
    ids = [it.id for it in source.items]
    shared = {}
    for s, (tr, te) in splits.items():
        train_keys = {figure_key(ids[i]) for i in tr}
        shared[s] = sum(figure_key(ids[i]) in train_keys for i in te)

    results_cells = []
    for cell in plan:
        c_seeds, c_epochs = cell_seeds.get(cell.name, seeds), cell_epochs.get(cell.name,
                                                                               args.epochs)
        runs = train_cell(cell, c_seeds, c_epochs, args, source, splits, runs_dir, digest)
        results_cells.append({
            **dataclasses.asdict(cell), "text": CELL_TEXT[cell.name], "epochs": c_epochs,
            "init_used": "pretrained" if cell.name.startswith("pretrained") else "random",
            "head_text": ("Flatten+Dense(1000)+Dense" if cell.head == "flatten_mlp" else
                          "own (Table 1: Flatten+Dense(1000)+Dense)"
                          if cell.backbone == "elazhari_cnn" else
                          "own classifier" if cell.name == "small_cnn" else "GAP+Dense"),
            "seeds": c_seeds, "summary": summarise(runs), "runs": runs})

    n_test = len(splits[seeds[0]][1])
    n_train = len(splits[seeds[0]][0])
    differences = [
        f"data: {digest['n_items']} UCSD COVID-CT slices cut from paper figures, not the "
        f"paper's {PAPER['n_images']}",
        f"split: {1 - args.test_fraction:.0%}/{args.test_fraction:.0%} stratified train/test"
        + (f", {args.val_fraction:.0%} of train for validation" if args.val_fraction else "")
        + f", one split per seed ({len(seeds)} seed{'s' * (len(seeds) != 1)}), instead of "
        f"one {PAPER['split']} split",
        f"networks: {args.backbone} (ImageNet weights) and {small_cnn or 'no small CNN'}, not "
        "DenseNet121 / ResNet-50 / ResNet101-V2 / VGG16 / Inception (no weights here)",
        f"batch size {args.batch_size} (paper: {PAPER['batch_size']}); Adam lr {args.lr:g} "
        f"(paper: 1e-3, VGG16 1e-5); {args.epochs} epochs at most (paper: until its stopping "
        "rule, 5-405 epochs)",
        ("early stopping: the paper's rule (val accuracy >= 0.89 and val loss < 0.3) on "
         f"{args.val_fraction:.0%} of each training split" if args.val_fraction
         and not args.no_stop_when else
         "no early stopping (the paper stops at val accuracy >= 0.89 and val loss < 0.3): "
         f"with {n_train} training images a validation share would be "
         f"~{round(0.15 * n_train)} images, so every run "
         "trains all epochs and the last epoch's model is tested; --val-fraction 0.15 runs "
         "the paper's rule"),
        ("no augmentation" if args.no_augment else
         "augmentation: rotation +-25 deg and horizontal flip as in the paper; her zoom 0.2 "
         "is a random crop of 70-100% of the area (zoom in only) here; images are also "
         "converted to 3-channel grey (CT slices are grey already)"),
        "pixels: each backbone's own scaling (efficientnet_lite0: its weights' own; "
        "elazhari_cnn: [0, 1] as in the paper), at each backbone's input size (224 / 200 px)",
        ("transfer head: the paper's Flatten + Dense(1000) + ReLU + Dense on the last "
         "feature map (TrainConfig.head='flatten_mlp'; the ReLU is featsim's choice)"
         if args.head == "flatten_mlp" else
         "transfer head: the backbone's global average pool + one Dense (TrainConfig.head="
         "'linear'), not the paper's Flatten + Dense(1000) + Dense"),
        "one sigmoid output with class-weighted binary cross-entropy (paper: two softmax "
        "outputs); the classes are balanced, so the weights are ~1",
        f"fine-tuning: the body at {args.body_lr_scale:g} x the head's learning rate",
    ]
    for c in results_cells:
        if c["seeds"] != seeds or c["epochs"] != args.epochs:
            differences.append(
                f"REDUCED: {c['name']} ran {len(c['seeds'])} seed"
                f"{'s' * (len(c['seeds']) != 1)} ({','.join(map(str, c['seeds']))}) x "
                f"{c['epochs']} epochs instead of {len(seeds)} x {args.epochs} (CPU time: "
                f"{result_why(args)})")
    notes = [
        "random_frozen uses TrainConfig(init='random', strategy='linear'), added for this "
        "script: the body keeps its random initialisation, BatchNorm running statistics at "
        "their initial values (mean 0, variance 1), and only the head trains",
        "slices cut from the same paper figure can fall on both sides of a split (file names "
        "share a prefix): test images whose prefix also occurs in training, per seed: "
        + ", ".join(f"seed {s}: {n}/{n_test}" for s, n in shared.items())
        + "; this can inflate every cell alike",
    ]
    for c in results_cells:
        one_class = [r["seed"] for r in c["runs"] if r["predicted_positive"] in (0, r["n_test"])]
        constant = [r["seed"] for r in c["runs"] if r["score_std"] < 1e-6
                    and r.get("saturated", 0.0) < 1.0]
        saturated = [r["seed"] for r in c["runs"] if r.get("saturated", 0.0) == 1.0]
        if saturated:
            notes.append(f"{c['name']}: every test score is exactly 0 or 1 for seed(s) "
                         f"{', '.join(map(str, saturated))}: the sigmoid saturates in float32 "
                         "(logits of tens: a diverged or badly scaled run), so the scores "
                         "cannot rank the test images (AUC 0.5 from ties), though the logits "
                         "may still depend on the image")
        if constant:
            size = np.mean([r["pre_logits_mean_abs"] for r in c["runs"]])
            notes.append(f"{c['name']}: the test scores are constant (std < 1e-6) for seed(s) "
                         f"{', '.join(map(str, constant))}: the network's output does not "
                         "depend on the image, so accuracy is the class share and AUC 0.5. "
                         f"Mean |pre_logits| on the test images: {size:.3g}"
                         + (" (vanished: a randomly initialised body whose BatchNorm layers "
                            "keep their initial statistics, mean 0 and variance 1, shrinks "
                            "the signal at every stage, so the head sees ~0)"
                            if c["init_used"] == "random" and c["strategy"] == "linear"
                            and size < 1e-4 else ""))
        if one_class:
            notes.append(f"{c['name']}: every test image got the same class for seed(s) "
                         f"{', '.join(map(str, one_class))} (accuracy = the class share, 0.5; "
                         "precision/recall 0 or 1 by which class); ROC AUC shows whether the "
                         "scores still rank COVID above non-COVID")
    for c in results_cells:
        kinds = sorted({r["bn_stats"] for r in c["runs"]})
        notes.append(f"{c['name']}: BatchNorm statistics of the tested model: "
                     + "; ".join(kinds))
    if args.note:
        notes.append(args.note)
    if "small_cnn" in cells and not small_cnn:
        notes.append("small_cnn was asked for but --small-cnn none left it out")

    data_name = ("UCSD COVID-CT (100-image subset)" if Path(args.data).resolve()
                 == common.COVID_CT.resolve() else str(args.data))
    result = {
        "experiment": "El Azhari (2022): random vs ImageNet init x frozen vs full training, "
                      "and a small CNN from scratch, on COVID-CT",
        "data_name": data_name,
        "quick": args.quick,
        "n_images": digest["n_items"],
        "n_test": n_test,
        "positive_class": source.class_names[1],
        "config": {"seeds": seeds, "epochs": args.epochs, "batch_size": args.batch_size,
                   "learning_rate": args.lr, "body_lr_scale": args.body_lr_scale,
                   "test_fraction": args.test_fraction, "val_fraction": args.val_fraction,
                   "stop_when": PAPER_STOP if args.val_fraction and not args.no_stop_when
                   else None, "augment": not args.no_augment, "head": args.head,
                   "cells": cells, "bootstrap": args.bootstrap, "runs_dir": str(runs_dir),
                   "recompute_bn_stats": not args.no_recompute_bn,
                   "normalization": "backbone"},
        "splits": {str(s): {"test_ids": [ids[i] for i in te],
                            "test_shares_figure_with_train": shared[s]}
                   for s, (_, te) in splits.items()},
        "cells": results_cells,
        "differences": differences,
        "notes": notes,
        "published": {"source": "El Azhari 2022, sec. 3.1.6 (quoted in the text; the "
                                "results are bar charts): PUBLISHED, NOT MEASURED",
                      "quotes": [{"metric": m, "value": v, "what": w}
                                 for m, v, w in PUBLISHED_QUOTES]},
        "why": result_why(args),
    }
    result["provenance"] = common.provenance(clock, data={"source": digest})

    rows = []
    for c in results_cells:
        row = {"cell": c["name"], "backbone": c["backbone"], "strategy": c["strategy"],
               "init": c["init_used"], "head": c["head_text"], "n_seeds": len(c["runs"]),
               "epochs": c["epochs"], "n_test": n_test, "quick": args.quick}
        for k, s in c["summary"].items():
            row[f"{k}_mean"], row[f"{k}_std"] = s["mean"], s["std"]
        rows.append(row)
    common.write_csv(out / "results.csv", rows)
    common.write_csv(out / "runs.csv", [
        {"cell": c["name"], "backbone": c["backbone"], "strategy": c["strategy"],
         "init": c["init_used"], **{k: v for k, v in r.items() if not isinstance(v, dict)}}
        for c in results_cells for r in c["runs"]])
    figure = plot(result, out / "test_metrics.png")
    result["figures"] = [figure.name] if figure else []
    return common.finish(out, result, markdown, NAME, clock)


if __name__ == "__main__":
    sys.exit(main())
