"""Proposition 5 with the fine-tuning run as the unit: several seeds, one verdict.

One fine-tuning run is one draw of everything random in training (head init, data order,
augmentation). A paired bootstrap interval of one run's change (:mod:`featsim.comparison`) speaks
for other samples of *images* through that one network; whether *fine-tuning* lowers D is a
statement about the distribution of runs. The seed-level estimate of a change is therefore
the mean of the per-run changes over ``n >= 3`` seeds with a Student-t interval on ``n - 1``
degrees of freedom (``mean +- t_{1-a/2, n-1} s / sqrt(n)``); the per-run bootstrap intervals
stay as detail.

Every change is split as in :func:`featsim.comparison.feature_change`: total (pretrained ->
fine-tuned) = normalisation (pretrained -> BN-adapted control) + weights (control ->
fine-tuned), per run exactly, hence also for the seed means. One control serves every seed,
so the normalisation part does not vary between seeds: its seed-level interval has zero width
and its uncertainty over images is the bootstrap interval.

The paired permutation test's null, "the representation did not change", is rejected by any
update of the weights, so its p-values are no evidence for Proposition 5. They are kept as a
check, labelled "representation changed (not evidence for Prop. 5)", Holm-adjusted over forms x
seeds (Holm 1979, "A simple sequentially rejective multiple test procedure"), with their floor
``1 / (B + 1)`` stated: with ``B`` permutations no p-value can be smaller.

    results = compare_runs(pretrained, [load_finetuned(d) for d in run_dirs], source, target,
                           control=adapt_batch_stats(pretrained, "chest_xray:train"))
    print(results.to_table()); print(results.verdict)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import scipy.stats

from featsim.comparison.change import PAIRED_DEFAULTS
from featsim.comparison.networks import compare_backbones
from featsim.comparison.result import (
    LABELS,
    PART_LABELS,
    PARTS,
    SCALE_FREE,
    STATISTICS,
    ComparisonResult,
    FeatureChange,
)
from featsim.comparison.verdict import collapse_note
from featsim.metrics.options import StatOptions
from featsim.rundir import MODEL_FILENAME, RunDir

__all__ = [
    "FORMS",
    "MIN_SEEDS",
    "RunsComparison",
    "SeedChange",
    "SeedSummary",
    "compare_runs",
    "find_finetuned",
    "holm",
    "seed_summary",
    "t_interval",
    "training_source",
    "welch_interval",
]

MIN_SEEDS = 3
# The forms the verdict reads: D and its scale-free forms.
FORMS = ("distance", *SCALE_FREE)
NOT_EVIDENCE = "representation changed (not evidence for Prop. 5)"


def t_interval(values, confidence: float = 0.95) -> tuple[float, float, float]:
    """``(mean, low, high)``: Student-t interval of the mean of ``values`` (``n - 1`` df).

    Args:
        values: float array ``[n]``, ``n >= 2``, finite.
        confidence: two-sided level in (0, 1).

    Raises:
        ValueError: fewer than 2 values, non-finite values, or a bad ``confidence``.
    """
    x = np.asarray(values, np.float64).ravel()
    if x.size < 2:
        raise ValueError(f"a t-interval needs at least 2 values, got {x.size}")
    if not np.isfinite(x).all():
        raise ValueError(f"values must be finite, got {x.tolist()}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    mean = float(x.mean())
    half = float(scipy.stats.t.ppf(0.5 + confidence / 2, x.size - 1)
                 * x.std(ddof=1) / math.sqrt(x.size))
    return mean, mean - half, mean + half


def welch_interval(a, b, confidence: float = 0.95) -> tuple[float, float, float]:
    """``(mean(a) - mean(b), low, high)``: Welch's t-interval of a difference of means, for
    two groups of runs (e.g. two training strategies over seeds; unequal variances).

    Args:
        a, b: float arrays of at least 2 finite values each.
        confidence: two-sided level in (0, 1).

    Raises:
        ValueError: fewer than 2 values in a group, non-finite values, a bad ``confidence``.
    """
    x, y = (np.asarray(v, np.float64).ravel() for v in (a, b))
    if min(x.size, y.size) < 2:
        raise ValueError(f"a Welch interval needs at least 2 values per group, got {x.size} "
                         f"and {y.size}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError(f"values must be finite, got {x.tolist()} and {y.tolist()}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    vx, vy = x.var(ddof=1) / x.size, y.var(ddof=1) / y.size
    diff = float(x.mean() - y.mean())
    se = math.sqrt(vx + vy)
    if se == 0.0:
        return diff, diff, diff
    df = (vx + vy) ** 2 / (vx**2 / (x.size - 1) + vy**2 / (y.size - 1))
    half = float(scipy.stats.t.ppf(0.5 + confidence / 2, df) * se)
    return diff, diff - half, diff + half


def holm(pvalues) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error), in the input's order.

    ``p_(i)`` sorted ascending becomes ``max_{j <= i} min(1, (k - j + 1) p_(j))``.
    """
    p = np.asarray(pvalues, np.float64).ravel()
    if p.size == 0:
        return p
    if np.isnan(p).any() or (p < 0).any() or (p > 1).any():
        raise ValueError(f"p-values must lie in [0, 1], got {p.tolist()}")
    order = np.argsort(p, kind="stable")
    k = p.size
    adjusted = np.minimum(1.0, np.maximum.accumulate((k - np.arange(k)) * p[order]))
    out = np.empty_like(adjusted)
    out[order] = adjusted
    return out


@dataclasses.dataclass(frozen=True)
class SeedChange:
    """The change of one statistic, one part, over seeds.

    Attributes:
        name: a :data:`~featsim.comparison.STATISTICS` name.
        part: a :data:`~featsim.comparison.PARTS` name.
        values: the per-run changes (estimates), in run order.
        mean: their mean.
        low, high: Student-t interval of the mean (None with fewer than 2 runs).
        confidence: its level.
    """

    name: str
    part: str
    values: tuple[float, ...]
    mean: float
    low: float | None
    high: float | None
    confidence: float

    @property
    def n(self) -> int:
        return len(self.values)

    def direction(self) -> str:
        if self.low is None or self.high is None:
            return "untested"
        if self.high < 0:
            return "fell"
        if self.low > 0:
            return "rose"
        return "did not change detectably"

    def text(self) -> str:
        out = f"{self.mean:+.4g}"
        if self.low is not None:
            out += f" [{self.low:+.4g}, {self.high:+.4g}]"
        return out


@dataclasses.dataclass(frozen=True, eq=False)
class SeedSummary:
    """:func:`seed_summary`'s result.

    Attributes:
        labels: one label per run (e.g. ``"seed 0"``).
        changes: part -> statistic -> :class:`SeedChange`.
        confidence: level of the t-intervals.
        pvalues: part -> list over (run, form) of ``{"run", "statistic", "p", "p_holm"}``:
            the paired permutation p-values of the :data:`FORMS`, Holm-adjusted within each
            part over forms x runs (empty without permutations).
        n_permutations: ``B``; every p-value is at least ``1 / (B + 1)``.
        notes: per-run notes (a collapsed representation), or None.
        control: how the control was made (or None).
    """

    labels: tuple[str, ...]
    changes: dict[str, dict[str, SeedChange]]
    confidence: float
    pvalues: dict[str, list[dict]]
    n_permutations: int
    notes: tuple[str | None, ...] = ()
    control: str | None = None

    @property
    def n_seeds(self) -> int:
        return len(self.labels)

    @property
    def has_verdict(self) -> bool:
        return self.n_seeds >= MIN_SEEDS and not any(self.notes)

    @property
    def verdict(self) -> str:
        return _seed_verdict(self)

    def to_dict(self) -> dict:
        floor = 1 / (self.n_permutations + 1) if self.n_permutations else None
        return {
            "unit": "fine-tuning run (seed)",
            "n_seeds": self.n_seeds,
            "labels": list(self.labels),
            "min_seeds_for_verdict": MIN_SEEDS,
            "has_verdict": self.has_verdict,
            "interval": f"Student-t, {self.confidence:.0%}, n_seeds - 1 degrees of freedom",
            "confidence": self.confidence,
            "control": self.control,
            "changes": {part: {name: dataclasses.asdict(c) | {"n": c.n}
                               for name, c in stats.items()}
                        for part, stats in self.changes.items()},
            "permutation_pvalues": {
                "reading": NOT_EVIDENCE,
                "adjustment": "Holm over forms x seeds, within each part",
                "forms": list(FORMS),
                "n_permutations": self.n_permutations,
                "floor": floor,
                "floor_note": (f"with {self.n_permutations} permutations no p-value is below "
                               f"1/(B+1) = {floor:.3g}") if floor else None,
                "by_part": self.pvalues,
            },
            "notes": [n for n in self.notes if n],
            "verdict": self.verdict,
        }

    def to_table(self) -> str:
        parts = [p for p in PARTS if p in self.changes]
        head = (f"seed level: {self.n_seeds} run(s) ({', '.join(self.labels)}); mean change "
                f"[{self.confidence:.0%} Student-t interval, {max(self.n_seeds - 1, 0)} df]")
        rows = [("statistic", *(PART_LABELS[p] for p in parts))]
        for name in STATISTICS:
            rows.append((LABELS[name] + (" *" if name in SCALE_FREE else ""),
                         *(self.changes[p][name].text() for p in parts)))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [head] + ["  ".join(f"{v:<{w}}" for v, w in zip(r, widths, strict=True))
                          .rstrip() for r in rows]
        if self.control:
            lines.append(f"BN-adapted control: {self.control}")
        if self.n_seeds < MIN_SEEDS:
            lines.append(f"fewer than {MIN_SEEDS} seeds: no seed-level verdict")
        return "\n".join(lines)


def seed_summary(changes: Sequence[FeatureChange], *, labels: Sequence[str] | None = None,
                 confidence: float = 0.95, notes: Sequence[str | None] = (),
                 control: str | None = None) -> SeedSummary:
    """Mean change over runs with a Student-t interval, per part and statistic, and the
    Holm-adjusted permutation p-values of :data:`FORMS`.

    Args:
        changes: one :class:`~featsim.comparison.FeatureChange` per fine-tuning run, all with
            the same parts (all with a control, or none).
        labels: one per run (default ``run 0``, ``run 1``, ...).
        confidence: level of the t-intervals.
        notes: per run, a reason its numbers carry no verdict (a collapse), or None.
        control: a description of the control, for the output.

    Raises:
        ValueError: no runs, labels or notes of the wrong length, or runs with different parts.
    """
    changes = list(changes)
    if not changes:
        raise ValueError("seed_summary needs at least one run")
    labels = tuple(labels) if labels is not None else tuple(f"run {i}"
                                                            for i in range(len(changes)))
    if len(labels) != len(changes):
        raise ValueError(f"{len(labels)} labels for {len(changes)} runs")
    notes = tuple(notes) or (None,) * len(changes)
    if len(notes) != len(changes):
        raise ValueError(f"{len(notes)} notes for {len(changes)} runs")
    parts = [p for p in PARTS if p in changes[0].parts]
    for label, c in zip(labels, changes, strict=True):
        if [p for p in PARTS if p in c.parts] != parts:
            raise ValueError(f"{label} has parts {sorted(c.parts)}, the first run {parts}: "
                             "compare every run with the same control (or none)")
    out: dict[str, dict[str, SeedChange]] = {}
    for part in parts:
        out[part] = {}
        for name in STATISTICS:
            values = tuple(float(c.parts[part][name].estimate) for c in changes)
            if len(values) >= 2 and np.isfinite(values).all():
                mean, low, high = t_interval(values, confidence)
            else:
                mean, low, high = float(np.mean(values)), None, None
            out[part][name] = SeedChange(name=name, part=part, values=values, mean=mean,
                                         low=low, high=high, confidence=float(confidence))
    pvalues: dict[str, list[dict]] = {}
    n_perm = changes[0].stats.n_permutations
    if n_perm:
        for part in parts:
            rows = [{"run": label, "statistic": name, "p": c.parts[part][name].pvalue}
                    for label, c in zip(labels, changes, strict=True) for name in FORMS
                    if c.parts[part][name].pvalue is not None
                    and math.isfinite(c.parts[part][name].pvalue)]
            for row, adjusted in zip(rows, holm([r["p"] for r in rows]), strict=True):
                row["p_holm"] = float(adjusted)
            pvalues[part] = rows
    return SeedSummary(labels=labels, changes=out, confidence=float(confidence),
                       pvalues=pvalues, n_permutations=int(n_perm), notes=notes,
                       control=control)


def _seed_verdict(s: SeedSummary) -> str:
    if s.n_seeds < MIN_SEEDS:
        return (f"fewer than {MIN_SEEDS} seeds: no seed-level verdict ({s.n_seeds} "
                f"fine-tuning run(s); see each run's bootstrap intervals for the images' "
                "sampling, which says nothing about other fine-tuning runs).")
    total = s.changes["total"]
    level = f"{s.confidence:.0%}"
    sentences = [
        f"Seed level ({s.n_seeds} fine-tuning runs, the run as the unit; mean change with a "
        f"{level} Student-t interval on {s.n_seeds - 1} df): D {_dir(total['distance'])}; "
        + "; ".join(f"{LABELS[k]} {_dir(total[k])}" for k in SCALE_FREE) + "."]
    collapsed = [f"{label}: {note}" for label, note in zip(s.labels, s.notes, strict=True)
                 if note]
    dir_d = total["distance"].direction()
    fell = [LABELS[k] for k in SCALE_FREE if total[k].direction() == "fell"]
    if collapsed:
        sentences.append("No seed-level verdict on Proposition 5: at least one run's features "
                         "collapsed (" + " ".join(collapsed) + ")")
    elif dir_d == "fell" and len(fell) == len(SCALE_FREE):
        sentences.append("D and every scale-free form fell over seeds: fine-tuning moved the "
                         "natural and medical features closer, as Proposition 5 states.")
    elif dir_d == "fell" and not fell:
        sentences.append("D fell over seeds but no scale-free form did: a change of feature "
                         "scale, not the domains moving closer; this does not support "
                         "Proposition 5.")
    elif dir_d == "fell":
        sentences.append(f"D fell over seeds, but of the scale-free forms only "
                         f"{', '.join(fell)} fell: partial support for Proposition 5.")
    elif dir_d == "rose":
        sentences.append("D rose over seeds, contrary to Proposition 5.")
    else:
        sentences.append(f"D {dir_d} over seeds: the seed-level interval does not show the "
                         "fall Proposition 5 states.")
    if "normalisation" in s.changes:
        norm, weights = s.changes["normalisation"], s.changes["weights"]
        sentences.append(
            "Split of the mean change (total = normalisation + weights): D "
            f"{total['distance'].mean:+.4g} = {norm['distance'].mean:+.4g} (BatchNorm "
            f"statistics adapted, pretrained weights) {weights['distance'].mean:+.4g} "
            f"(weights, {weights['distance'].text()}); "
            + "; ".join(f"{LABELS[k]} {total[k].mean:+.4g} = {norm[k].mean:+.4g} "
                        f"{weights[k].mean:+.4g} ({weights[k].text()})" for k in SCALE_FREE)
            + ". One control serves every seed, so the normalisation part does not vary "
              "between seeds (its uncertainty over images is each run's bootstrap interval).")
        if weights["distance"].direction() != "fell" and dir_d == "fell":
            sentences.append("The weight part of D does not fall over seeds: the fall of D is "
                             "explained by adapting the normalisation statistics (AdaBN), not "
                             "by what the fine-tuned weights learned.")
    elif s.control:
        sentences.append(f"Control: {s.control}.")
    if s.pvalues:
        floor = 1 / (s.n_permutations + 1)
        low = min((r["p_holm"] for rows in s.pvalues.values() for r in rows), default=None)
        sentences.append(
            f"Permutation p-values ({NOT_EVIDENCE}): Holm-adjusted over "
            f"{len(FORMS)} forms x {s.n_seeds} seeds within each part, smallest "
            f"{low:.3g}; with {s.n_permutations} permutations p cannot fall below "
            f"1/(B+1) = {floor:.3g}.")
    return " ".join(sentences)


def _dir(c: SeedChange) -> str:
    return f"{c.direction()} ({c.text()})"


# --------------------------------------------------------------------------------------------
# Several fine-tuned backbones against one pretrained backbone and one control.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class RunsComparison:
    """:func:`compare_runs`' result: one :class:`~featsim.comparison.ComparisonResult` per run
    and the seed-level summary."""

    results: tuple[ComparisonResult, ...]
    labels: tuple[str, ...]
    seeds: SeedSummary

    @property
    def verdict(self) -> str:
        return self.seeds.verdict

    def to_dict(self) -> dict:
        return {"comparison": "pretrained vs BN-adapted control vs fine-tuned, several runs",
                "runs": [dict(r.to_dict(), label=label)
                         for r, label in zip(self.results, self.labels, strict=True)],
                "seed_level": self.seeds.to_dict(), "verdict": self.verdict}

    def to_table(self) -> str:
        blocks = [f"== {label} ==\n{r.to_table()}\n{r.verdict}"
                  for r, label in zip(self.results, self.labels, strict=True)]
        return "\n\n".join([*blocks, self.seeds.to_table()])


def run_label(result: ComparisonResult, index: int) -> str:
    """``"seed S"`` from the checkpoint's training config, else ``"run I"``."""
    config = result.finetuned_metadata.get("config")
    try:
        seed = json.loads(config)["seed"] if isinstance(config, str) else None
    except (ValueError, KeyError, TypeError):
        seed = None
    return f"seed {seed}" if seed is not None else f"run {index}"


def compare_runs(pretrained, finetuned: Sequence, source, target, *, control=None,
                 labels: Sequence[str] | None = None, stats: StatOptions = PAIRED_DEFAULTS,
                 **kwargs) -> RunsComparison:
    """:func:`~featsim.comparison.compare_backbones` for each fine-tuned backbone (same images,
    same control, same seed of the resampling), then :func:`seed_summary` over them.

    Args:
        pretrained: the pretrained backbone.
        finetuned: fine-tuned backbones (e.g. one :func:`~featsim.comparison.load_finetuned` per
            seed).
        source, target: natural and medical images.
        control: a :class:`featsim.adapt.BNControl` (recommended) or None.
        labels: one per run (default ``"seed S"`` from each checkpoint's config).
        stats: statistics options of every run's comparison
            (:class:`~featsim.metrics.StatOptions`); ``stats.confidence`` is also the level
            of the t-intervals.
        **kwargs: for :func:`~featsim.comparison.compare_backbones`. Features of the
            pretrained and control backbones come from the feature cache after the first run.

    Raises:
        ValueError: no fine-tuned backbones, or as ``compare_backbones``.
    """
    finetuned = list(finetuned)
    if not finetuned:
        raise ValueError("compare_runs needs at least one fine-tuned backbone")
    results = tuple(compare_backbones(pretrained, f, source, target, control=control,
                                      stats=stats, **kwargs) for f in finetuned)
    labels = tuple(labels) if labels is not None else tuple(
        run_label(r, i) for i, r in enumerate(results))
    if len(set(labels)) != len(labels):
        labels = tuple(f"{label} ({i})" for i, label in enumerate(labels))
    summary = seed_summary([r.change for r in results], labels=labels,
                           confidence=stats.confidence,
                           notes=[collapse_note(r) for r in results],
                           control=None if control is None else control.describe())
    return RunsComparison(results=results, labels=labels, seeds=summary)


def find_finetuned(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Fine-tuned checkpoints named by ``paths``: a ``.msgpack`` file, a run directory (its
    ``model.msgpack``), or a run root (every run with a model below it, sorted), in order,
    without duplicates.

    Raises:
        FileNotFoundError: a path that does not exist, or a directory with no
            ``model.msgpack`` at or below it.
    """
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_file() or RunDir(path).has_model:
            found.append(path)
        elif path.is_dir():
            below = [run.path for run in RunDir.find(path, finished=False)]
            if not below:
                raise FileNotFoundError(
                    f"no {MODEL_FILENAME} in or below {path}: pass fine-tuned run directories, "
                    "a run root holding them, or .msgpack files")
            found.extend(below)
        else:
            raise FileNotFoundError(f"no fine-tuned run directory or checkpoint at {path}")
    return list(dict.fromkeys(found))


def training_source(run: str | os.PathLike) -> str | None:
    """The training split a run directory's records name (e.g. ``"chest_xray:train"``), or
    None when none does (then the control's source must be given explicitly); a ``.msgpack``
    file stands for its folder (:meth:`featsim.rundir.RunDir.training_source`)."""
    run = Path(run)
    return RunDir(run.parent if run.is_file() else run).training_source()
