"""How similar are ImageNet and medical-image features, before and after fine-tuning?

Gu & Lee (2024, Bioengineering 11(4):406) argue with the average feature distance
D(F_C, F_M) between natural (C) and medical (M) images, and state as their Proposition 5 that
fine-tuning on medical images lowers it. This script measures, for every backbone with real
ImageNet weights here (and any the user supplies), between Imagenette validation images
(``imagenette_val_500``: ImageNet validation images of 10 classes only) and chest X-rays (the
Kermany test split):

* with the pretrained backbone: D (euclidean) with its within-domain baselines and their
  ratio, cosine D (and its within-domain baselines), the energy distance with its permutation
  test of "same distribution", FID and KID, with bootstrap intervals
  (:func:`featsim.pipeline.feature_distance`); and split-half baselines (each domain's images
  split in two random halves and compared with the same statistics): what each statistic
  reads when both sets come from one domain at this sample size;
* after each training strategy of ``transfer_vs_scratch.py`` (its run folders, ``--runs``):
  every statistic before and after with paired bootstrap intervals and paired permutation tests
  of the change, and the Proposition 5 verdict as measured
  (:func:`featsim.comparison.compare_backbones`); each change split into a normalisation part
  (pretrained -> the BN-adapted control: pretrained weights, BatchNorm statistics recomputed on
  the run's training split, :func:`featsim.adapt.adapt_batch_stats`) and a weight part
  (control -> fine-tuned); both readings of D after fine-tuning, D(phi'(X_C), phi'(X_M)) and
  D(phi(X_C), phi'(X_M)); and the seed-level verdict per run group (mean change over seeds
  with a Student-t interval, :mod:`featsim.compare_seeds`);
* the same pretrained measurements with two further medical domains, CT
  (``covid_ct_ucsd_100``) and MRI (``brain_mri_253``); no model was fine-tuned on those, so
  they are pretrained only.

Full run (after ``transfer_vs_scratch.py``; about an hour on 2 CPU cores, most of it FID
bootstrap resamples)::

    python analysis/feature_similarity.py --bootstrap 200 --permutations 200

Quick (CI, a few minutes: 32 images per domain, 20 resamples, the quick runs)::

    python analysis/feature_similarity.py --quick

Options: ``--source``, ``--target`` (the domain the runs were trained on), ``--other-target
LABEL=SPEC`` (repeatable; replaces the CT and MRI defaults), ``--no-other-targets``,
``--backbone NAME [--weights FILE]``, ``--no-default-backbones``, ``--runs DIR`` (default
``analysis/runs/transfer_vs_scratch/``), ``--layer``, ``--normalization`` (``paper``, the
training runs' mean/std 0.5, by default), ``--bootstrap``, ``--permutations``, ``--out DIR``.

Writes to ``analysis/results/feature_similarity/``: ``results.json`` (every report, every
comparison with its verdict, provenance), ``distances.csv`` (pretrained and split-half rows),
``changes.csv`` (each statistic before/after each training run, with interval and p-value),
``parts.csv`` (its normalisation and weight parts), ``seed_level.csv`` (mean changes over seeds),
``table.md`` and the figures ``pretrained_<backbone>.png`` and ``change_<backbone>.png``.
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from pathlib import Path

import _common as common

from featsim.data.digest import source_digest
from featsim.data.subsets import balanced_subset

NAME = "feature_similarity"
CHANGE_STATS = ("distance", "ratio", "energy_coefficient", "distance_cosine")
STAT_LABELS = {
    "distance": "D (euclidean)",
    "distance_source": "D within natural",
    "distance_target": "D within medical",
    "ratio": "ratio D / mean within",
    "energy_distance": "energy distance",
    "energy_coefficient": "energy coefficient E/(2D)",
    "distance_cosine": "D (cosine)",
}
MODEL_NOTES = {
    "linear": "body frozen (BatchNorm statistics included), so its features equal the "
              "pretrained ones by construction: every change must be exactly 0 (a check)",
    "finetune": "every layer fine-tuned from the ImageNet weights: the case Proposition 5 is "
                "about",
    "scratch": "random initialisation, not a fine-tuning of the pretrained network: 'after' is "
               "an unrelated network trained on chest X-rays, so Proposition 5 does not speak "
               "to it; shown for scale",
}


# --------------------------------------------------------------------------------------------
# Measurements (all library calls).
# --------------------------------------------------------------------------------------------


def kid_size(args, n: int, m: int) -> int:
    return max(2, min(args.kid_subset_size, n, m))


def cosine_block(x, y, args) -> dict:
    """Cosine D with its within-domain baselines, and a bootstrap interval of cosine D."""
    from featsim import metrics

    s = metrics.distance_summary(x, y, metric="cosine")
    out = {"distance": s.between, "distance_source": s.within_x, "distance_target": s.within_y,
           "ratio": s.ratio, "energy_distance": s.energy,
           "energy_coefficient": s.energy_coefficient}
    if args.bootstrap:
        ci = metrics.bootstrap_ci(lambda a, b: metrics.average_distance(a, b, metric="cosine"),
                                  x, y, n_resamples=args.bootstrap, seed=args.seed,
                                  method="basic")
        out["distance_ci"] = [ci.low, ci.high]
    return out


def split_half(features, args, seed: int) -> dict | None:
    """Every statistic between two random halves of one domain's features (no resampling)."""
    import numpy as np

    from featsim.report import similarity_report

    n = len(features)
    if n < 8:
        return None
    order = np.random.default_rng(seed).permutation(n)
    a, b = features[order[: n // 2]], features[order[n // 2:]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FID rank warnings: n/2 < d is expected here
        report = similarity_report(a, b, stats=point_stats(args, len(a), len(b), seed))
    return report.to_dict()


def pretrained_measurements(backbone, label: str, source, target, args) -> dict:
    from featsim.pipeline import feature_distance

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FID rank warnings at n < d; recorded in the report
        result = feature_distance(
            backbone, source, target, layer=args.layer,
            stats=resampled_stats(args, len(source), len(target)), **extract_kwargs(args))
    src, tgt = result.source[args.layer], result.target[args.layer]
    return {
        "backbone": backbone.name, "domain": label, "model": "pretrained", "layer": args.layer,
        "normalization": args.normalization,
        "report": result.to_dict(),
        "cosine": cosine_block(src, tgt, args),
        "split_half": {"source": split_half(src, args, args.seed),
                       "target": split_half(tgt, args, args.seed)},
    }


def point_stats(args, n: int, m: int, seed: int):
    """Statistics options without resampling (KID subsets sized for n and m)."""
    from featsim.metrics import StatOptions

    return StatOptions(kid_subset_size=kid_size(args, n, m), kid_subsets=args.kid_subsets,
                       seed=seed)


def resampled_stats(args, n: int, m: int):
    """The script's statistics options: --bootstrap, --permutations, --seed, KID subsets."""
    return point_stats(args, n, m, args.seed).replace(n_bootstrap=args.bootstrap,
                                                      n_permutations=args.permutations)


def extract_kwargs(args, normalization: str | None = None) -> dict:
    return {"normalization": normalization or args.normalization,
            "batch_size": args.batch_size, "skip_bad": not args.strict,
            "progress": not args.no_progress}


def control_for(pretrained, run: common.Run, args, cache: dict):
    """The BN-adapted control of ``pretrained`` on the run's training split (or
    ``--adapt-bn``), one per backbone, weights, split and pixel scaling; None with
    ``--no-adapt-bn`` or when no split is known (said in the results)."""
    from featsim.adapt import adapt_batch_stats

    if args.no_adapt_bn:
        return None
    spec = args.adapt_bn or run.rundir.training_source()
    if spec is None:
        return None
    key = (run.backbone, run.weights, spec, run.normalization)
    if key not in cache:
        print(f"[{NAME}] {run.backbone}: BatchNorm statistics recomputed on {spec} "
              f"(at most {args.adapt_bn_images} images)", flush=True)
        cache[key] = adapt_batch_stats(
            pretrained, spec, max_images=args.adapt_bn_images, batch_size=args.batch_size,
            normalization=run.normalization, seed=args.seed, skip_bad=not args.strict)
    return cache[key]


def compare_run(pretrained, run: common.Run, source, target, args, control=None):
    """``(JSON-ready dict, ComparisonResult)`` of pretrained vs this run (and the control)."""
    from featsim.comparison import compare_backbones

    finetuned = run.rundir.load_model(backbone=run.backbone)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FID rank warnings at n < d
        result = compare_backbones(
            pretrained, finetuned, source, target, layer=args.layer,
            stats=resampled_stats(args, len(source), len(target)), control=control,
            **extract_kwargs(args, run.normalization))
    out = result.to_dict()
    out.update(model=run.name, strategy=run.strategy, seed=run.seed, label=run.label,
               learning_rate=run.learning_rate, run=str(run.path),
               normalization=run.normalization, note=MODEL_NOTES.get(run.strategy, ""))
    return out, result


def seed_level(comparisons: list[dict], results: list) -> list[dict]:
    """One seed-level summary (mean change over seeds, Student-t interval; total,
    normalisation and weight parts) per backbone and run group."""
    from featsim.compare_seeds import seed_summary
    from featsim.comparison.verdict import collapse_note

    groups: dict = {}
    for c, r in zip(comparisons, results, strict=True):
        groups.setdefault((c["backbone"], c["label"]), []).append((c, r))
    out = []
    for (backbone, label), members in groups.items():
        members.sort(key=lambda cr: cr[0]["seed"])
        control = members[0][1].control
        summary = seed_summary([r.change for _, r in members],
                               labels=[f"seed {c['seed']}" for c, _ in members],
                               notes=[collapse_note(r) for _, r in members],
                               control=None if control is None else control.describe())
        out.append({"backbone": backbone, "label": label,
                    "strategy": members[0][0]["strategy"], **summary.to_dict()})
    return out


def part_rows(comparison: dict) -> list[dict]:
    """Every statistic's normalisation and weight parts (the total is in changes.csv)."""
    rows = []
    for part in ("normalisation", "weights"):
        for name, d in comparison.get("parts", {}).get(part, {}).items():
            rows.append({"backbone": comparison["backbone"], "model": comparison["model"],
                         "strategy": comparison["strategy"], "seed": comparison["seed"],
                         "layer": comparison["layer"], "part": part, "statistic": name,
                         "before": d["before"], "after": d["after"], "change": d["estimate"],
                         "change_low": d["low"], "change_high": d["high"],
                         "pvalue": d["pvalue"]})
    return rows


def seed_rows(summary: dict) -> list[dict]:
    rows = []
    for part, stats in summary["changes"].items():
        for name, c in stats.items():
            rows.append({"backbone": summary["backbone"], "label": summary["label"],
                         "part": part, "statistic": name, "n_seeds": c["n"],
                         "mean_change": c["mean"], "t_low": c["low"], "t_high": c["high"]})
    return rows


# --------------------------------------------------------------------------------------------
# Rows, tables, figures.
# --------------------------------------------------------------------------------------------


def _ci(report: dict, name: str):
    ci = report.get(f"{name}_ci") or [None, None]
    return ci[0], ci[1]


def distance_rows(measurement: dict, source_name: str) -> list[dict]:
    r, cos = measurement["report"], measurement["cosine"]
    base = {"backbone": measurement["backbone"], "layer": measurement["layer"],
            "normalization": measurement["normalization"], "model": "pretrained"}
    row = dict(base, comparison=f"{source_name} vs {measurement['domain']}",
               kind="between domains", n_source=r["n_source"], n_target=r["n_target"],
               n_skipped=r["n_skipped"])
    for name in ("distance", "ratio", "energy_distance", "fid"):
        row[name] = r[name]
        row[f"{name}_low"], row[f"{name}_high"] = _ci(r, name)
    row.update(distance_source=r["distance_source"], distance_target=r["distance_target"],
               energy_coefficient=r["energy_coefficient"], energy_pvalue=r["energy_pvalue"],
               kid=r["kid"], kid_std=r["kid_std"], distance_cosine=cos["distance"],
               distance_cosine_low=(cos.get("distance_ci") or [None])[0],
               distance_cosine_high=(cos.get("distance_ci") or [None, None])[1],
               cosine_within_source=cos["distance_source"],
               cosine_within_target=cos["distance_target"], cosine_ratio=cos["ratio"])
    rows = [row]
    for side, name in (("source", source_name), ("target", measurement["domain"])):
        half = measurement["split_half"][side]
        if half is None:
            continue
        rows.append(dict(base, comparison=f"{name} half A vs half B",
                         kind=f"split-half baseline ({side})", n_source=half["n_source"],
                         n_target=half["n_target"], distance=half["distance"],
                         distance_source=half["distance_source"],
                         distance_target=half["distance_target"], ratio=half["ratio"],
                         energy_distance=half["energy_distance"],
                         energy_coefficient=half["energy_coefficient"],
                         distance_cosine=half["distance_cosine"], fid=half["fid"],
                         kid=half["kid"], kid_std=half["kid_std"]))
    return rows


def change_rows(comparison: dict) -> list[dict]:
    rows = []
    for name, d in comparison["deltas"].items():
        rows.append({"backbone": comparison["backbone"], "model": comparison["model"],
                     "strategy": comparison["strategy"], "seed": comparison["seed"],
                     "learning_rate": comparison["learning_rate"], "layer": comparison["layer"],
                     "statistic": name, "scale_free": d["scale_free"], "before": d["before"],
                     "after": d["after"], "change": d["estimate"], "change_low": d["low"],
                     "change_high": d["high"], "pvalue": d["pvalue"]})
    for name in ("fid", "kid"):
        v = comparison[name]
        rows.append({"backbone": comparison["backbone"], "model": comparison["model"],
                     "strategy": comparison["strategy"], "seed": comparison["seed"],
                     "learning_rate": comparison["learning_rate"], "layer": comparison["layer"],
                     "statistic": name, "scale_free": False, "before": v["pretrained"],
                     "after": v["finetuned"], "change": v["change"]})
    return rows


def _p(value) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def markdown(result: dict) -> str:
    f = common.fmt_ci
    lines = [f"# Feature similarity: {result['source_name']} vs medical images", ""]
    if result["quick"]:
        lines += ["**QUICK MODE**: small subsets and few resamples, a pipeline check, not a "
                  "result. Do not quote these numbers.", ""]
    lines += [f"Layer `{result['layer']}`; 95% bootstrap intervals in brackets "
              f"({result['bootstrap']} resamples, basic); p = permutation test "
              f"({result['permutations']} permutations). D is not a distance between "
              "distributions: read it beside the within-domain baselines and the scale-free "
              "forms (ratio, energy coefficient, cosine D), and beside the split-half rows, "
              "which show what each statistic reads for two halves of one domain.", ""]
    for backbone in result["backbones"]:
        rows = [r for r in result["distance_rows"] if r["backbone"] == backbone]
        if not rows:
            continue
        lines += [f"## {backbone}: pretrained features", ""]
        header = ["comparison", "n (1st / 2nd)", "D [CI]", "D within 1st / 2nd", "ratio [CI]",
                  "energy [CI]", "p (same distr.)", "energy coef.", "cosine D [CI]",
                  "cosine within", "FID [CI]", "KID ± std"]
        table = []
        for r in rows:
            table.append([
                r["comparison"], f"{r['n_source']} / {r['n_target']}",
                f(r["distance"], r.get("distance_low"), r.get("distance_high")),
                f"{r['distance_source']:.4g} / {r['distance_target']:.4g}",
                f(r["ratio"], r.get("ratio_low"), r.get("ratio_high")),
                f(r["energy_distance"], r.get("energy_distance_low"),
                  r.get("energy_distance_high")),
                _p(r.get("energy_pvalue")), f"{r['energy_coefficient']:.3f}",
                f(r["distance_cosine"], r.get("distance_cosine_low"),
                  r.get("distance_cosine_high")),
                (f"{r['cosine_within_source']:.3f} / {r['cosine_within_target']:.3f}"
                 if r.get("cosine_within_source") is not None else "-"),
                f(r["fid"], r.get("fid_low"), r.get("fid_high")),
                f"{r['kid']:.4g} ± {r['kid_std']:.2g}"])
        lines += [common.markdown_table(header, table), ""]
        comps = [c for c in result["comparisons"] if c["backbone"] == backbone]
        if comps:
            lines += [f"## {backbone}: before and after training on {result['target_name']}",
                      "", "Change = after - before, [paired 95% bootstrap interval], p = paired "
                      "permutation test of 'training did not change the representation'.", ""]
            header = ["model", *(STAT_LABELS[s] for s in CHANGE_STATS), "FID", "KID",
                      f"CKA at {result['layer']}"]
            table = []
            for c in comps:
                cells = [c["model"]]
                for s in CHANGE_STATS:
                    d = c["deltas"][s]
                    cells.append(f"{d['before']:.4g} → {d['after']:.4g}; "
                                 f"{common.fmt_ci(d['estimate'], d['low'], d['high'], 3)}, "
                                 f"p = {_p(d['pvalue'])}")
                cells += [f"{c['fid']['pretrained']:.4g} → {c['fid']['finetuned']:.4g}",
                          f"{c['kid']['pretrained']:.3g} → {c['kid']['finetuned']:.3g}",
                          f"{c['cka']['per_layer'].get(c['layer'], math.nan):.3f}"]
                table.append(cells)
            lines += [common.markdown_table(header, table), ""]
            split = [c for c in comps if c.get("control")]
            if split:
                lines += ["### Normalisation vs weights", "",
                          f"Control: {split[0]['control']['description']}. Total = "
                          "normalisation part (pretrained -> BN-adapted) + weight part "
                          "(BN-adapted -> fine-tuned), paired 95% bootstrap intervals.", ""]
                header = ["model", *(f"{STAT_LABELS[s]}: total = norm. + weights"
                                     for s in CHANGE_STATS),
                          "D(φ(X_C), φ'(X_M))"]
                table = []
                for c in split:
                    cells = [c["model"]]
                    for s in CHANGE_STATS:
                        p = {k: c["parts"][k][s] for k in ("total", "normalisation",
                                                             "weights")}
                        cells.append(" = ".join(
                            common.fmt_ci(p[k]["estimate"], p[k]["low"], p[k]["high"], 3)
                            for k in ("total", "normalisation")) + " + "
                            + common.fmt_ci(p["weights"]["estimate"], p["weights"]["low"],
                                            p["weights"]["high"], 3))
                    mixed = c["readings"].get("pretrained_source_finetuned_target")
                    cells.append("-" if mixed is None else f"{mixed['report']['distance']:.4g}")
                    table.append(cells)
                lines += [common.markdown_table(header, table), ""]
            levels = [s for s in result.get("seed_level", []) if s["backbone"] == backbone]
            if levels:
                lines += ["### Proposition 5 over seeds (the run as the unit)", "",
                          "Mean change over seeds [95% Student-t interval, n - 1 df].", ""]
                parts = ("total", "normalisation", "weights")
                header = ["runs", "n", *(f"{STAT_LABELS[s]} ({p})" for s in
                                         ("distance", "ratio", "distance_cosine")
                                         for p in parts)]
                table = []
                for lv in levels:
                    cells = [lv["label"], str(lv["n_seeds"])]
                    for s in ("distance", "ratio", "distance_cosine"):
                        for p in parts:
                            c = lv["changes"].get(p, {}).get(s)
                            cells.append("-" if c is None else
                                         common.fmt_ci(c["mean"], c["low"], c["high"], 3))
                    table.append(cells)
                lines += [common.markdown_table(header, table), ""]
                for lv in levels:
                    lines += [f"- **{lv['label']}**: {lv['verdict']}", ""]
            lines += ["### Proposition 5, as measured, per run (detail)", ""]
            for c in comps:
                lines += [f"- **{c['model']}** ({c['note']}): {c['verdict']}", ""]
    if not result["comparisons"]:
        lines += ["## Before and after training", "",
                  f"No finished training runs were found in `{result['runs_dir']}`; run "
                  "`analysis/transfer_vs_scratch.py` first for the before/after comparison "
                  "and the Proposition 5 verdict.", ""]
    if result["skipped"]:
        lines += ["## Skipped", ""] + [f"- {s}" for s in result["skipped"]] + [""]
    lines += [common.provenance_markdown(result["provenance"]), ""]
    return "\n".join(lines)


def plot_pretrained(result: dict, backbone: str, path: Path) -> Path | None:
    from matplotlib.figure import Figure

    rows = [r for r in result["distance_rows"] if r["backbone"] == backbone]
    between = [r for r in rows if r["kind"] == "between domains"]
    if not between:
        return None
    panels = (("ratio", "ratio D / mean within-domain D"),
              ("energy_coefficient", "energy coefficient E / (2D)"),
              ("distance_cosine", "cosine D"))
    fig = Figure(figsize=(13, 4.2), layout="constrained")
    axes = fig.subplots(1, 3)
    domains = [r["comparison"].split(" vs ", 1)[1] for r in between]
    for ax, (key, ylabel) in zip(axes, panels, strict=True):
        xs = range(len(between))
        common.plot_intervals(ax, xs, [r[key] for r in between],
                              [r.get(f"{key}_low") for r in between],
                              [r.get(f"{key}_high") for r in between],
                              colour=common.OKABE_ITO[0], marker=common.MARKERS[0],
                              label=f"{result['source_name']} vs medical")
        for j, (kind, label) in enumerate((("split-half baseline (source)",
                                            f"{result['source_name']} halves"),
                                           ("split-half baseline (target)",
                                            "medical halves"))):
            halves = {r["comparison"].split(" half A", 1)[0]: r[key] for r in rows
                      if r["kind"] == kind}
            ys = [halves.get(result["source_name"] if j == 0 else d) for d in domains]
            ax.plot([x for x, y in zip(xs, ys, strict=True) if y is not None],
                    [y for y in ys if y is not None], linestyle="none",
                    marker=common.MARKERS[j + 1], color=common.OKABE_ITO[j + 1],
                    markersize=7, label=label)
        ax.set_xticks(list(xs), domains)
        ax.set_xlabel("medical domain")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{backbone} (pretrained weights), layer {result['layer']}: "
                 f"{result['source_name']} vs medical images, 95% bootstrap intervals"
                 + (" [QUICK]" if result["quick"] else ""), fontsize=11)
    fig.savefig(path, dpi=150)
    return path


def plot_changes(result: dict, backbone: str, path: Path) -> Path | None:
    from matplotlib.figure import Figure

    comps = [c for c in result["comparisons"] if c["backbone"] == backbone]
    if not comps:
        return None
    fig = Figure(figsize=(max(8.0, 1.1 * len(comps) + 6), 6.5), layout="constrained")
    axes = fig.subplots(2, 2).ravel()
    for ax, stat in zip(axes, CHANGE_STATS, strict=True):
        for i, c in enumerate(comps):
            d = c["deltas"][stat]
            strategy = c["strategy"]
            k = ("linear", "finetune", "scratch").index(strategy) if strategy in (
                "linear", "finetune", "scratch") else 3
            common.plot_intervals(
                ax, [i], [d["estimate"]], [d["low"]], [d["high"]], colour=common.OKABE_ITO[k],
                marker=common.MARKERS[k],
                label=strategy if strategy not in [x["strategy"] for x in comps[:i]] else None)
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(comps)), [c["model"] for c in comps], rotation=30, ha="right",
                      fontsize=8)
        ax.set_ylabel(f"change of {STAT_LABELS[stat]}\n(after - before)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, title="strategy")
    fig.suptitle(f"{backbone}, layer {result['layer']}: {result['source_name']} vs "
                 f"{result['target_name']}" + (" [QUICK]" if result["quick"] else "")
                 + "\nchange of each statistic after training on "
                 f"{result['target_name']} (paired 95% bootstrap intervals)", fontsize=11)
    fig.savefig(path, dpi=150)
    return path


# --------------------------------------------------------------------------------------------
# Main.
# --------------------------------------------------------------------------------------------


def _labelled(text: str) -> tuple[str, str]:
    label, sep, spec = text.partition("=")
    if not sep or not label or not spec:
        raise argparse.ArgumentTypeError(f"expected LABEL=SPEC, got {text!r}")
    return label, spec


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default=str(common.IMAGENETTE),
                   help="natural images (default imagenette_val_500)")
    p.add_argument("--source-name", default="Imagenette val",
                   help="its name in tables (Imagenette: ImageNet validation images of 10 classes)")
    p.add_argument("--target", default=f"{common.KERMANY}:test",
                   help="medical images of the training runs' domain (default Kermany test)")
    p.add_argument("--target-name", default="chest X-ray", help="its name in tables")
    p.add_argument("--other-target", type=_labelled, action="append", default=None,
                   metavar="LABEL=SPEC",
                   help="a further medical domain, pretrained only (repeatable; default "
                        "CT=covid_ct_ucsd_100 and MRI=brain_mri_253)")
    p.add_argument("--no-other-targets", action="store_true")
    common.add_backbone_args(p)
    p.add_argument("--runs", type=Path, default=None,
                   help="transfer_vs_scratch.py's runs (default analysis/runs/"
                        "transfer_vs_scratch/; quick: .../transfer_vs_scratch-quick/)")
    p.add_argument("--adapt-bn", default=None, metavar="SPEC",
                   help="images for the BN-adapted control (default: each run's training "
                        "split, from its analysis_run.json)")
    p.add_argument("--adapt-bn-images", type=int, default=None,
                   help="at most this many images for the control (512; quick 32)")
    p.add_argument("--no-adapt-bn", action="store_true",
                   help="no control: total changes only")
    p.add_argument("--layer", default="pre_logits")
    p.add_argument("--normalization", default="paper", choices=("paper", "backbone"),
                   help="pixel scaling of the pretrained-only rows (runs use their own)")
    p.add_argument("--bootstrap", type=int, default=None, help="resamples (200; quick 20)")
    p.add_argument("--permutations", type=int, default=None,
                   help="permutations (200; quick 20)")
    p.add_argument("--kid-subset-size", type=int, default=1000)
    p.add_argument("--kid-subsets", type=int, default=None, help="(100; quick 10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--strict", action="store_true",
                   help="stop at an unreadable image (default: leave it out and list it)")
    p.add_argument("--quick-n", type=int, default=32, help="quick: images per domain")
    common.add_output_args(p, NAME)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    clock = common.Clock()
    args.bootstrap = 20 if args.quick and args.bootstrap is None else (
        200 if args.bootstrap is None else args.bootstrap)
    args.permutations = 20 if args.quick and args.permutations is None else (
        200 if args.permutations is None else args.permutations)
    args.kid_subsets = args.kid_subsets or (10 if args.quick else 100)
    args.adapt_bn_images = args.adapt_bn_images or (32 if args.quick else 512)
    common.setup_caches(args)
    out = common.results_dir(NAME, args.out, quick=args.quick)
    runs_dir = args.runs or common.default_runs_dir(args.quick)

    def load(spec):
        return balanced_subset(spec, args.quick_n, seed=0) if args.quick else \
            common.open_spec(spec)

    others = ([] if args.no_other_targets else
              args.other_target or [("CT", str(common.COVID_CT)),
                                    ("MRI", str(common.BRAIN_MRI))])
    source = load(args.source)
    domains = [(args.target_name, load(args.target), True)]
    skipped = []
    for label, spec in others:
        try:
            domains.append((label, load(spec), False))
        except (FileNotFoundError, ValueError) as err:
            skipped.append(f"domain {label} ({spec}): {err}")
    data = {args.source_name: source_digest(source)}
    data.update({label: source_digest(src) for label, src, _ in domains})

    from featsim.pipeline import pretrained_backbone

    runs = common.find_runs(runs_dir)
    backbones = common.chosen_backbones(args)
    for run in runs:
        if run.backbone not in [n for n, _ in backbones]:
            backbones.append((run.backbone, Path(run.weights) if run.weights else None))
    cache: dict = {}

    def pretrained(name, weights):
        key = (name, str(weights) if weights else None)
        if key not in cache:
            cache[key] = pretrained_backbone(name, weights)
        return cache[key]

    measurements, comparisons, results, controls = [], [], [], {}
    for name, weights in backbones:
        try:
            backbone = pretrained(name, weights)
        except (FileNotFoundError, ValueError, KeyError) as err:
            skipped.append(f"backbone {name} ({weights or 'registered weights'}): "
                           f"{str(err).splitlines()[0]}")
            print(f"[{NAME}] skipping {name}: {err}", file=sys.stderr, flush=True)
            continue
        for label, target, _ in domains:
            print(f"[{NAME}] {name}: {args.source_name} vs {label} (pretrained)", flush=True)
            measurements.append(pretrained_measurements(backbone, label, source, target, args))
        for run in [r for r in runs if r.backbone == name]:
            print(f"[{NAME}] {name}: pretrained vs {run.name} ({run.path})", flush=True)
            before = pretrained(name, Path(run.weights) if run.weights else None)
            control = control_for(before, run, args, controls)
            entry, res = compare_run(before, run, source, domains[0][1], args, control)
            comparisons.append(entry)
            results.append(res)

    rows, seen = [], set()
    for m in measurements:
        for row in distance_rows(m, args.source_name):
            key = (row["backbone"], row["comparison"])  # the source's halves come once
            if key not in seen:
                seen.add(key)
                rows.append(row)
    levels = seed_level(comparisons, results)
    order = {"linear": 0, "finetune": 1, "scratch": 2}
    comparisons.sort(key=lambda c: (c["backbone"], -c["learning_rate"],
                                    order.get(c["strategy"], 3), c["seed"]))
    result = {
        "experiment": "feature similarity of natural and medical images; Proposition 5",
        "quick": args.quick, "layer": args.layer, "source_name": args.source_name,
        "target_name": args.target_name, "bootstrap": args.bootstrap,
        "permutations": args.permutations, "runs_dir": str(runs_dir),
        "backbones": list(dict.fromkeys(m["backbone"] for m in measurements)),
        "domains": {label: {"spec": str(src.spec), "has_finetuned_runs": ft and bool(runs)}
                    for label, src, ft in domains},
        "measurements": measurements, "distance_rows": rows,
        "comparisons": comparisons, "seed_level": levels, "skipped": skipped,
        "adapt_bn": {"source": args.adapt_bn or "each run's training split",
                     "max_images": args.adapt_bn_images, "disabled": args.no_adapt_bn,
                     "missing": sorted({c["model"] for c in comparisons
                                        if not c.get("control")}) if not args.no_adapt_bn
                     else []},
        "notes": {"other_domains": "no model was trained on the further medical domains, so "
                                   "they are measured with the pretrained backbones only",
                  **{f"strategy {k}": v for k, v in MODEL_NOTES.items()}},
    }
    result["provenance"] = common.provenance(clock, data=data)
    common.write_csv(out / "distances.csv", rows)
    common.write_csv(out / "changes.csv", [row for c in comparisons for row in change_rows(c)])
    common.write_csv(out / "parts.csv", [row for c in comparisons for row in part_rows(c)])
    common.write_csv(out / "seed_level.csv", [row for lv in levels for row in seed_rows(lv)])
    figures = []
    for backbone in result["backbones"]:
        for fn, stem in ((plot_pretrained, "pretrained"), (plot_changes, "change")):
            path = fn(result, backbone, out / f"{stem}_{backbone}.png")
            if path is not None:
                figures.append(path.name)
    result["figures"] = figures
    return common.finish(out, result, markdown, NAME, clock)


if __name__ == "__main__":
    sys.exit(main())
