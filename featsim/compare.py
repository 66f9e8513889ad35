"""Pretrained vs fine-tuned: the same images through both backbones, what changed, and how sure.

Gu & Lee (2024, Bioengineering 11(4):406) state as their Proposition 5 that fine-tuning on
medical images lowers the average feature distance D(F_C, F_M) between natural (C) and medical
(M) features. :func:`compare_backbones` measures that claim on given images::

    before = pretrained_backbone("efficientnet_lite0")
    after = load_finetuned("runs/lite0_full")          # the trainer's DIR/model.msgpack
    result = compare_backbones(before, after, "imagenette_val_500", "chest_xray:test")
    print(result.to_table()); print(result.verdict); result.to_dict()
    plot_cka(result, "cka.png")

Fine-tuning rescales features, so a fall in raw D alone is no evidence that the domains moved
closer. Every change is therefore reported for D *and* for its scale-free forms (the ratio of D
to the mean within-domain distance, the energy coefficient E / (2 D), cosine D), each with

* a **paired bootstrap** interval: each resample draws source images and target images with
  replacement, and the *same* drawn images are used for both backbones, so the interval of the
  change ``after - before`` reflects the sampling of images, not a second, independent
  sampling per backbone (Efron & Tibshirani 1993, ch. 13-14: percentile and basic intervals);
* a **paired permutation test** (a randomisation test of exchangeability within pairs, the
  multivariate analogue of the sign-flip test; Good 2005, "Permutation, Parametric and
  Bootstrap Tests of Hypotheses"): every image has two feature vectors, ``a_k``
  (pretrained) and ``b_k`` (fine-tuned). H0: *fine-tuning did not change the representation*,
  i.e. the joint distribution of all features is unchanged when, for any image, ``a_k`` and
  ``b_k`` trade places. Each permutation flips a fair coin per image (source and target images
  alike) and swaps that image's two vectors, then recomputes the change of the statistic. The
  null distribution is symmetric about 0 (swapping every image negates the change), so the
  two-sided p-value is ``(1 + #{|change*| >= |change|}) / (1 + n_permutations)`` (Phipson &
  Smyth 2010: never 0, valid for a randomised test). A small p says the statistic differs
  between the backbones by more than any per-image relabelling produces; it says nothing about
  *why* (that is what comparing raw D with the scale-free forms is for). The swap needs both
  feature sets in the same space (same layer, same width), as after fine-tuning from the
  pretrained weights.

The two answer different questions. The permutation test is conditional on the images: its
null is sharp (the representation is unchanged), so any change that the statistic sees on
these images can reject it, however small. The bootstrap interval is about the population of
images the sample stands for: how far the change could move with another sample. On 500
ImageNet vs 624 chest X-ray images with a perturbed EfficientNet-Lite0 the ratio changed by
+0.011 with p = 0.005 (the swap null's spread: std 0.0033) while its interval was
[-0.007, +0.030] (bootstrap std 0.0094). Directions in the verdict ("fell", "rose") therefore
follow the intervals, and such disagreements are spelled out in it.

Both are computed from float64 pairwise-distance matrices built once (``O((n + m)^2)``
memory per pair of feature sets): a resample or permutation is then a set of weights on
their rows, and a statistic a batch of quadratic forms, so 200 resamples of seven statistics
for both backbones cost a few matrix products instead of 2800 metric calls. A resampled
statistic equals the statistic of the resampled rows in float64 (duplicated rows at distance
exactly 0; tested against ``scipy.spatial.distance.cdist``). The per-backbone reports come from
:func:`featsim.report.similarity_report`; their intervals (D, both within-domain baselines,
ratio, energy distance, energy coefficient, cosine D) come from the same paired resamples as
the intervals of the changes, and their ``energy_pvalue`` from a vectorised version of the same
pooled-relabelling energy test. FID and KID are reported as point values for both backbones
(an FID at d = 1280 costs about 2 s on two cores, so 200 resamples per backbone would take
minutes).

Representations are also compared directly, as Raghu et al. (2019, "Transfusion:
Understanding Transfer Learning for Medical Imaging", NeurIPS) do: linear CKA (Kornblith et
al. 2019) between the pretrained and the fine-tuned network at every tapped layer, on the
target (medical) images, and the full layer x layer CKA matrix.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import scipy.spatial.distance

import featsim
from featsim import metrics
from featsim.backbones.convert import check_variables
from featsim.backbones.registry import Backbone, get_backbone, list_backbones
from featsim.backbones.weights import load_variables
from featsim.features.extract import Features, extract_features, feature_layers
from featsim.report import Interval, SimilarityReport, similarity_report

__all__ = [
    "CI_METHODS",
    "PARTS",
    "SCALE_FREE",
    "STATISTICS",
    "ComparisonResult",
    "Delta",
    "FeatureChange",
    "compare_backbones",
    "feature_change",
    "load_finetuned",
    "plot_cka",
]

MODEL_FILENAME = "model.msgpack"

# Statistics whose change is estimated, bootstrapped and tested (SimilarityReport field names).
STATISTICS = (
    "distance",
    "distance_source",
    "distance_target",
    "ratio",
    "energy_distance",
    "energy_coefficient",
    "distance_cosine",
)
# Invariant to a common rescaling of all features: what a change of D must be read beside.
SCALE_FREE = ("ratio", "energy_coefficient", "distance_cosine")
CI_METHODS = ("basic", "percentile")
# Parts of a change: (from, to) representations. "total" = "normalisation" + "weights".
PARTS = {
    "total": ("before", "after"),
    "normalisation": ("before", "control"),
    "weights": ("control", "after"),
}
PART_LABELS = {
    "total": "total (pretrained -> fine-tuned)",
    "normalisation": "normalisation (pretrained -> BN-adapted)",
    "weights": "weights (BN-adapted -> fine-tuned)",
}

_LABELS = {
    "distance": "D",
    "distance_source": "D within source",
    "distance_target": "D within target",
    "ratio": "ratio D / mean within",
    "energy_distance": "energy distance",
    "energy_coefficient": "energy coefficient",
    "distance_cosine": "D [cosine]",
}
# Resamples per batch of quadratic forms: bounds the [batch, n] weight and product arrays.
_BATCH = 64
# Largest float64 distance matrices held at once (all blocks of one comparison).
_MAX_MATRIX_BYTES = 4 * 2**30


# --------------------------------------------------------------------------------------------
# Loading a fine-tuned checkpoint.
# --------------------------------------------------------------------------------------------


def load_finetuned(path: str | os.PathLike, *, backbone: str | None = None) -> Backbone:
    """A fine-tuned backbone from the trainer's output.

    The trainer writes ``DIR/model.msgpack`` with
    ``save_variables(path, variables, metadata={"backbone": NAME, "num_classes": str(K), ...})``
    where ``variables`` are the full Flax variables of ``get_backbone(NAME, num_classes=K)``.

    Args:
        path: the run directory (its ``model.msgpack`` is read) or the ``.msgpack`` file.
        backbone: the registry name the caller expects (``featsim compare --backbone``); a
            checkpoint of another backbone is an error.

    Returns:
        A :class:`~featsim.backbones.Backbone` built with the checkpoint's ``num_classes``,
        with ``variables`` (numpy arrays) and ``weights_file`` set; ``weights.description``
        names the checkpoint and its training strategy (it enters feature manifests).

    Raises:
        FileNotFoundError: no such file, or a directory without ``model.msgpack``.
        ValueError: not a featsim variables file, metadata without ``backbone`` or
            ``num_classes``, an unregistered or unexpected backbone name, or variables that
            do not match the module (every message names the file).
    """
    path = Path(path)
    if path.is_dir():
        file = path / MODEL_FILENAME
        if not file.is_file():
            others = sorted(p.name for p in path.glob("*.msgpack"))
            raise FileNotFoundError(
                f"no {MODEL_FILENAME} in {path} (the trainer writes the final fine-tuned "
                f"variables there); .msgpack files found: {others or 'none'}. Pass the run "
                "directory or a .msgpack file"
            )
        path = file
    elif not path.is_file():
        raise FileNotFoundError(f"no fine-tuned run directory or checkpoint at {path}")
    variables, metadata = load_variables(path, with_metadata=True)
    missing = [k for k in ("backbone", "num_classes") if not metadata.get(k)]
    if missing:
        raise ValueError(
            f"{path}: metadata lacks {missing} (found keys {sorted(metadata)}); a fine-tuned "
            "checkpoint needs metadata={'backbone': NAME, 'num_classes': str(K), ...} "
            "(featsim.backbones.save_variables)"
        )
    name = metadata["backbone"]
    if backbone is not None and name != backbone:
        raise ValueError(
            f"{path} holds a fine-tuned {name!r}, but --backbone/backbone= is {backbone!r}"
        )
    if name not in list_backbones():
        raise ValueError(
            f"{path}: metadata names backbone {name!r}, which is not registered; registered "
            f"backbones: {', '.join(list_backbones())}"
        )
    num_classes = _parse_num_classes(metadata["num_classes"], path)
    built = get_backbone(name, num_classes=num_classes)
    try:
        check_variables(variables, built.abstract_variables())
    except ValueError as err:
        raise ValueError(
            f"{path}: {err}\n(checked against get_backbone({name!r}, "
            f"num_classes={num_classes}) from the file's metadata)"
        ) from None
    weights = built.weights
    if weights is not None:
        strategy = metadata.get("strategy", "unknown strategy")
        weights = dataclasses.replace(
            weights, description=f"fine-tuned {name} ({strategy}) from {path}")
    return dataclasses.replace(built, variables=variables, weights_file=path, weights=weights)


def _parse_num_classes(value: str, path: Path) -> int | None:
    if value.strip().lower() in ("none", "0"):
        return None
    try:
        k = int(value)
    except ValueError:
        raise ValueError(
            f"{path}: metadata num_classes must be an integer string, got {value!r}"
        ) from None
    if k < 0:
        raise ValueError(f"{path}: metadata num_classes must be >= 0, got {k}")
    return k


def _checkpoint_metadata(backbone: Backbone) -> dict:
    file = backbone.weights_file
    if file is None or Path(file).suffix.lower() != ".msgpack":
        return {}
    try:
        return load_variables(file, with_metadata=True)[1]
    except (OSError, ValueError):
        return {}


# --------------------------------------------------------------------------------------------
# The change of every statistic between two feature sets of the same images.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Delta:
    """The change ``after - before`` of one statistic.

    Attributes:
        name: a :data:`STATISTICS` name (a :class:`~featsim.report.SimilarityReport` field).
        before, after: its value for the pretrained and the fine-tuned features.
        estimate: ``after - before``.
        low, high: paired bootstrap interval of the change (None without bootstrap).
        pvalue: two-sided paired permutation p-value (None without permutations).
        scale_free: whether the statistic is invariant to rescaling all features.
    """

    name: str
    before: float
    after: float
    estimate: float
    low: float | None
    high: float | None
    pvalue: float | None
    scale_free: bool

    @property
    def relative(self) -> float:
        """``after / before`` (inf or nan when ``before`` is 0)."""
        if self.before == 0:
            return math.inf if self.after else math.nan
        return self.after / self.before

    def direction(self) -> str:
        """``"fell"``/``"rose"`` when the interval excludes 0 (else ``"did not change
        detectably"``); with no interval, the sign of the estimate."""
        if self.low is not None and self.high is not None and math.isfinite(self.low) \
                and math.isfinite(self.high):
            if self.high < 0:
                return "fell"
            if self.low > 0:
                return "rose"
            return "did not change detectably"
        if self.estimate < 0:
            return "fell"
        if self.estimate > 0:
            return "rose"
        return "did not change"


@dataclasses.dataclass(frozen=True, eq=False)
class FeatureChange:
    """:func:`feature_change`'s result.

    Attributes:
        before, after: similarity reports of the pretrained and fine-tuned features, with
            paired bootstrap intervals in ``ci`` and the energy test in ``energy_pvalue``.
        deltas: :data:`STATISTICS` name -> :class:`Delta` (the total change, pretrained ->
            fine-tuned; the same objects as ``parts["total"]``).
        n_bootstrap, n_permutations, confidence, ci_method, seed: as passed.
        control: the report of the BN-adapted control's features (None without a control).
        parts: :data:`PARTS` name -> statistic -> :class:`Delta`: ``"total"`` always;
            ``"normalisation"`` (pretrained -> control) and ``"weights"`` (control ->
            fine-tuned) with a control. Every bootstrap resample uses the same images for all
            three representations, so the parts add up resample by resample.
        mixed: the report of the paper's second reading of D after fine-tuning,
            ``D(phi(X_C), phi'(X_M))``: pretrained source features against fine-tuned target
            features (None when their widths differ).
        mixed_deltas: its change from the pretrained ``D(phi(X_C), phi(X_M))``, per statistic.
    """

    before: SimilarityReport
    after: SimilarityReport
    deltas: dict[str, Delta]
    n_bootstrap: int
    n_permutations: int
    confidence: float
    ci_method: str
    seed: int
    control: SimilarityReport | None = None
    parts: dict[str, dict[str, Delta]] = dataclasses.field(default_factory=dict)
    mixed: SimilarityReport | None = None
    mixed_deltas: dict[str, Delta] = dataclasses.field(default_factory=dict)


def feature_change(
    before_source,
    before_target,
    after_source,
    after_target,
    *,
    metric: str = "euclidean",
    n_bootstrap: int = 200,
    n_permutations: int = 200,
    confidence: float = 0.95,
    ci_method: str = "basic",
    kid_subset_size: int = 1000,
    kid_subsets: int = 100,
    seed: int = 0,
    control_source=None,
    control_target=None,
) -> FeatureChange:
    """How every similarity statistic changed between two representations of the same images.

    Args:
        before_source: float array ``[n, d]``: source (natural) images, pretrained backbone.
        before_target: float array ``[m, d]``: target (medical) images, pretrained backbone.
        after_source: float array ``[n, d']``: the same source images, same order, fine-tuned.
        after_target: float array ``[m, d']``: the same target images, fine-tuned.
        metric: pairwise metric of D and the energy distance (see ``average_distance``).
        n_bootstrap: paired bootstrap resamples (0: no intervals).
        n_permutations: paired permutations for the change, and pooled relabellings for each
            report's energy test (0: no p-values). The paired test needs ``d == d'``.
        confidence: level of the intervals.
        ci_method: ``"basic"`` (default, as :func:`~featsim.report.similarity_report`:
            corrects the finite-sample bias the bootstrap sees) or ``"percentile"``.
        kid_subset_size, kid_subsets: KID (see ``similarity_report``).
        seed: seed of every random choice; bootstrap, paired permutations and energy
            relabellings draw from independent streams of ``np.random.SeedSequence(seed)``.
        control_source, control_target: optional float arrays ``[n, d]`` and ``[m, d]``: the
            same images through a control representation (the BN-adapted pretrained
            backbone, :func:`featsim.adapt.adapt_batch_stats`). With them, every change is
            also split into a normalisation part (before -> control) and a weight part
            (control -> after), resampled jointly with the total (``FeatureChange.parts``).

    Returns:
        A :class:`FeatureChange`. Deltas' estimates are ``after - before`` of the two
        reports' values, so identical inputs give exactly 0, a p-value of 1 and a zero-width
        interval.

    Raises:
        ValueError: bad shapes (different image counts before and after, or different widths
            with permutations), NaN/inf rows, an unknown metric or ``ci_method``, counts
            below 0, or distance matrices too large for memory.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> s, t = rng.normal(size=(40, 8)), rng.normal(0.5, size=(30, 8))
        >>> change = feature_change(s, t, 2 * s, 2 * t, n_bootstrap=50, n_permutations=50)
        >>> round(change.deltas["distance"].estimate / change.before.distance, 6)
        1.0
        >>> abs(change.deltas["ratio"].estimate) < 1e-12
        True
    """
    _check_options(metric=metric, n_bootstrap=n_bootstrap, n_permutations=n_permutations,
                   confidence=confidence, ci_method=ci_method)
    if (control_source is None) != (control_target is None):
        raise ValueError("pass both control_source and control_target, or neither")
    given = [(("before", "source"), before_source), (("before", "target"), before_target),
             (("after", "source"), after_source), (("after", "target"), after_target)]
    if control_source is not None:
        given += [(("control", "source"), control_source),
                  (("control", "target"), control_target)]
    sets = {}
    for key, value in given:
        a = np.asarray(value)
        if a.ndim != 2 or a.shape[0] < 2:
            raise ValueError(f"{'_'.join(key)} must have shape [n, d] with n >= 2, got "
                             f"shape {a.shape}")
        sets[key] = a
    sides = ("before", "control", "after") if control_source is not None else (
        "before", "after")
    for side in sides[1:]:
        for domain in ("source", "target"):
            b, a = sets["before", domain], sets[side, domain]
            if b.shape[0] != a.shape[0]:
                raise ValueError(
                    f"before_{domain}.shape[0] == {b.shape[0]} while {side}_{domain}.shape[0] "
                    f"== {a.shape[0]}: the same images must go through every backbone, in "
                    "the same order"
                )
            if (n_permutations or side == "control") and b.shape[1] != a.shape[1]:
                raise ValueError(
                    f"before_{domain}.shape[1] == {b.shape[1]} while {side}_{domain}.shape[1] "
                    f"== {a.shape[1]}: the paired permutation test swaps feature vectors "
                    "between the backbones (and a BN-adapted control has the pretrained "
                    "widths), so both need the same width (or pass n_permutations=0)"
                )
    parts = {k: v for k, v in PARTS.items() if set(v) <= set(sides)}
    # The paper's second reading: pretrained source features vs fine-tuned target features.
    mixed_ok = sets["before", "source"].shape[1] == sets["after", "target"].shape[1]

    report_options = dict(metric=metric, kid_subset_size=kid_subset_size,
                          kid_subsets=kid_subsets, seed=seed)
    # Validates the arrays (shapes, NaN/inf rows) before any matrix is built.
    base = {side: similarity_report(sets[side, "source"], sets[side, "target"],
                                    **report_options) for side in sides}
    if mixed_ok:
        base["mixed"] = similarity_report(sets["before", "source"], sets["after", "target"],
                                          **report_options)
    n, m = base["before"].n_source, base["before"].n_target
    boot_rng, perm_rng, energy_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))

    views = {side: (side, side) for side in sides}
    if mixed_ok:
        views["mixed"] = ("before", "after")
    intervals = {side: {} for side in views}
    part_ci: dict[str, dict[str, tuple[float, float]]] = {p: {} for p in parts}
    mixed_ci: dict[str, tuple[float, float]] = {}
    pvalues: dict[str, dict[str, float]] = {p: {} for p in parts}
    energy_p = dict.fromkeys(sides)
    if n_bootstrap or n_permutations:
        _check_memory(n, m, n_sides=len(sides), paired_swaps=bool(n_permutations))
        pairs = _Pairwise(sets, metric)
        full = {"source": np.ones((1, n)), "target": np.ones((1, m))}
        observed = {v: {k: float(x[0]) for k, x in pairs.statistics(v, full, *views[v]).items()}
                    for v in views}
        if n_bootstrap:
            dist = {v: [] for v in views}
            for counts in _bootstrap_counts(boot_rng, n, m, n_bootstrap):
                for v in views:  # the same resampled images for every representation
                    dist[v].append(pairs.statistics(v, counts, *views[v]))
            dist = {v: {k: np.concatenate([d[k] for d in chunks]) for k in STATISTICS}
                    for v, chunks in dist.items()}
            for name in STATISTICS:
                for v in views:
                    low, high = _interval(observed[v][name], dist[v][name], confidence,
                                          ci_method)
                    intervals[v][name] = Interval(low, high, confidence, n_bootstrap,
                                                  ci_method)
                for part, (first, second) in parts.items():
                    part_ci[part][name] = _interval(
                        observed[second][name] - observed[first][name],
                        dist[second][name] - dist[first][name], confidence, ci_method)
                if mixed_ok:
                    mixed_ci[name] = _interval(
                        observed["mixed"][name] - observed["before"][name],
                        dist["mixed"][name] - dist["before"][name], confidence, ci_method)
        if n_permutations:
            null = {p: [] for p in parts}
            for mask in _swap_masks(perm_rng, n, m, n_permutations):
                for part, (first, second) in parts.items():
                    null[part].append(pairs.swapped_changes(mask, first, second))
            for part, (first, second) in parts.items():
                for name in STATISTICS:
                    change = observed[second][name] - observed[first][name]
                    values = np.concatenate([c[name] for c in null[part]])
                    pvalues[part][name] = _two_sided_pvalue(change, values)
            for side in sides:
                values = np.concatenate([pairs.relabelled_energy(side, split) for split in
                                         _relabellings(energy_rng, n, m, n_permutations)])
                energy_p[side] = _greater_pvalue(observed[side]["energy_distance"], values)

    reports = {}
    for v, report in base.items():
        reports[v] = dataclasses.replace(
            report, ci=intervals[v], energy_pvalue=energy_p.get(v),
            n_permutations=int(n_permutations) if v in sides else 0)

    def delta(first, second, name, ci, pvalue):
        b, a = getattr(reports[first], name), getattr(reports[second], name)
        low, high = ci.get(name, (None, None))
        return Delta(name=name, before=float(b), after=float(a), estimate=float(a - b),
                     low=low, high=high, pvalue=pvalue, scale_free=name in SCALE_FREE)

    out_parts = {part: {name: delta(first, second, name, part_ci[part],
                                    pvalues[part].get(name)) for name in STATISTICS}
                 for part, (first, second) in parts.items()}
    mixed_deltas = ({name: delta("before", "mixed", name, mixed_ci, None)
                     for name in STATISTICS} if mixed_ok else {})
    return FeatureChange(before=reports["before"], after=reports["after"],
                         deltas=out_parts["total"], n_bootstrap=int(n_bootstrap),
                         n_permutations=int(n_permutations), confidence=float(confidence),
                         ci_method=ci_method, seed=int(seed), control=reports.get("control"),
                         parts=out_parts, mixed=reports.get("mixed"), mixed_deltas=mixed_deltas)


def _check_options(*, metric, n_bootstrap, n_permutations, confidence, ci_method) -> None:
    if ci_method not in CI_METHODS:
        raise ValueError(
            f"ci_method must be one of {CI_METHODS} for paired changes, got {ci_method!r}"
            + (" (BCa needs a jackknife of every statistic; not available here)"
               if str(ci_method).lower() == "bca" else "")
        )
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    for value, name in ((n_bootstrap, "n_bootstrap"), (n_permutations, "n_permutations")):
        if int(value) != value or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    if metric not in metrics.METRICS:
        raise ValueError(f"metric must be one of {metrics.METRICS}, got {metric!r}")


def _check_memory(n: int, m: int, *, n_sides: int = 2, paired_swaps: bool) -> None:
    # Within each backbone: [n, n], [n, m], [m, m]; swaps (and the mixed reading) add the
    # cross-backbone blocks.
    blocks = (n + m) ** 2 * (n_sides * n_sides if paired_swaps else n_sides + 1)
    if blocks * 8 > _MAX_MATRIX_BYTES:
        raise ValueError(
            f"n_source = {n} and n_target = {m} need {blocks * 8 / 2**30:.1f} GiB of float64 "
            f"distance matrices for the bootstrap/permutations (limit "
            f"{_MAX_MATRIX_BYTES / 2**30:.0f} GiB); subsample the images or pass "
            "n_bootstrap=0 and n_permutations=0"
        )


def _interval(estimate: float, distribution: np.ndarray, confidence: float, method: str):
    """Percentile or basic interval, as ``scipy.stats.bootstrap`` (linear quantiles)."""
    if not np.isfinite(distribution).all():
        warnings.warn(
            f"{int((~np.isfinite(distribution)).sum())} of {distribution.size} bootstrap "
            "values are not finite (degenerate resamples); the interval is NaN",
            UserWarning, stacklevel=3)
        return math.nan, math.nan
    alpha = (1 - confidence) / 2
    q_low, q_high = np.quantile(distribution, [alpha, 1 - alpha])
    if method == "percentile":
        return float(q_low), float(q_high)
    return float(2 * estimate - q_high), float(2 * estimate - q_low)


def _tolerance(observed: float) -> float:
    # Rounding of float64 sums over ~n^2 terms; as scipy's permutation_test, a null value
    # within this of the observed one counts as at least as extreme.
    return 1e-10 * max(abs(observed), np.finfo(np.float64).tiny)


def _two_sided_pvalue(observed: float, null: np.ndarray) -> float:
    if not math.isfinite(observed):
        return math.nan
    k = int(np.count_nonzero(np.abs(null) >= abs(observed) - _tolerance(observed)))
    return (k + 1) / (null.size + 1)


def _greater_pvalue(observed: float, null: np.ndarray) -> float:
    if not math.isfinite(observed):
        return math.nan
    k = int(np.count_nonzero(null >= observed - _tolerance(observed)))
    return (k + 1) / (null.size + 1)


def _batches(total: int):
    for start in range(0, total, _BATCH):
        yield min(_BATCH, total - start)


def _bootstrap_counts(rng, n: int, m: int, total: int):
    """Batches of ``{"source": [r, n], "target": [r, m]}`` multiplicities (resampled images)."""
    for r in _batches(total):
        out = {}
        for domain, size in (("source", n), ("target", m)):
            idx = rng.integers(0, size, size=(r, size)) + size * np.arange(r)[:, None]
            out[domain] = np.bincount(idx.ravel(), minlength=r * size).reshape(r, size)
            out[domain] = out[domain].astype(np.float64)
        yield out


def _swap_masks(rng, n: int, m: int, total: int):
    """Batches of ``{"source": [r, n], "target": [r, m]}`` 0/1 masks: 1 = swap that image."""
    for r in _batches(total):
        yield {"source": rng.integers(0, 2, size=(r, n)).astype(np.float64),
               "target": rng.integers(0, 2, size=(r, m)).astype(np.float64)}


def _relabellings(rng, n: int, m: int, total: int):
    """Batches of pooled relabellings: ``[r, n + m]`` 0/1, 1 = counted as source (n ones)."""
    for r in _batches(total):
        order = rng.permuted(np.tile(np.arange(n + m), (r, 1)), axis=1)
        yield (order < n).astype(np.float64)


def _pairwise(x: np.ndarray, y: np.ndarray, metric: str, *, same: bool) -> np.ndarray:
    """float64 ``[len(x), len(y)]`` distances; with ``same`` (y is x) the diagonal is 0."""
    if metric in ("euclidean", "sqeuclidean"):
        # Centring on a common mean removes the cancellation in |x|^2 + |y|^2 - 2 x.y.
        centre = x.mean(0) if same else np.concatenate([x, y]).mean(0)
        xc = x - centre
        yc = xc if same else y - centre
        sq = (xc * xc).sum(1)[:, None] + (yc * yc).sum(1)[None, :] - 2.0 * (xc @ yc.T)
        np.maximum(sq, 0.0, out=sq)
        out = np.sqrt(sq) if metric == "euclidean" else sq
    elif metric == "cosine":
        ux = x / np.linalg.norm(x, axis=1, keepdims=True)
        uy = ux if same else y / np.linalg.norm(y, axis=1, keepdims=True)
        out = np.clip(1.0 - ux @ uy.T, 0.0, 2.0)
    else:
        out = scipy.spatial.distance.cdist(x, y, metric)
    if same:
        np.fill_diagonal(out, 0.0)
    return out


class _Pairwise:
    """Distance blocks between the four feature sets, built on first use, float64.

    Sets are keyed ``(side, domain)``, side in ``before``/``after``, domain in
    ``source``/``target``. A resample is a weight per image: multiplicities (bootstrap) or a
    0/1 choice of which backbone's vector an image contributes (paired swaps). Every statistic
    is then a function of weighted pair sums ``w_1^T D w_2`` (diagonals are 0, so duplicated
    images add pairs at distance 0, exactly as the metric on the resampled rows) and of
    weighted means of unit rows (cosine D's closed form ``1 - mean(u) . mean(v)``).
    """

    def __init__(self, sets: Mapping[tuple[str, str], np.ndarray], metric: str):
        self.metric = metric
        self.sets = {k: np.asarray(v, np.float64) for k, v in sets.items()}
        self.units = {k: v / np.linalg.norm(v, axis=1, keepdims=True)
                      for k, v in self.sets.items()}
        self._blocks: dict = {}

    def block(self, a, b) -> np.ndarray:
        if (a, b) not in self._blocks:
            if (b, a) in self._blocks:
                return self._blocks[b, a].T
            self._blocks[a, b] = _pairwise(self.sets[a], self.sets[b], self.metric,
                                           same=a == b)
        return self._blocks[a, b]

    def pair_sum(self, left: Mapping, right: Mapping) -> np.ndarray:
        """``sum over blocks of (w_left @ D) . w_right`` for weights keyed like the sets."""
        total = 0.0
        for a, wl in left.items():
            for b, wr in right.items():
                total = total + np.einsum("rj,rj->r", wl @ self.block(a, b), wr)
        return total

    def mean_unit(self, weights: Mapping) -> np.ndarray:
        total = sum(w @ self.units[k] for k, w in weights.items())
        return total / sum(w.sum(1) for w in weights.values())[:, None]

    def _statistics(self, src: Mapping, tgt: Mapping) -> dict[str, np.ndarray]:
        n = sum(w.sum(1) for w in src.values())
        m = sum(w.sum(1) for w in tgt.values())
        s_st, s_ss, s_tt = (self.pair_sum(src, tgt), self.pair_sum(src, src),
                            self.pair_sum(tgt, tgt))
        with np.errstate(divide="ignore", invalid="ignore"):
            between = s_st / (n * m)
            within_s, within_t = s_ss / (n * (n - 1)), s_tt / (m * (m - 1))
            energy = 2.0 * between - s_ss / (n * n) - s_tt / (m * m)
            out = {
                "distance": between,
                "distance_source": within_s,
                "distance_target": within_t,
                "ratio": between / (0.5 * (within_s + within_t)),
                "energy_distance": energy,
                "energy_coefficient": energy / (2.0 * between),
            }
        out["distance_cosine"] = 1.0 - np.einsum("rd,rd->r", self.mean_unit(src),
                                                 self.mean_unit(tgt))
        return out

    def statistics(self, side: str, weights: Mapping[str, np.ndarray],
                   source_side: str | None = None, target_side: str | None = None):
        """Every statistic of one backbone's features, per row of image weights; with
        ``source_side``/``target_side``, source rows from one backbone and target rows from
        another (the mixed reading ``D(phi(X_C), phi'(X_M))``)."""
        return self._statistics({(source_side or side, "source"): weights["source"]},
                                {(target_side or side, "target"): weights["target"]})

    def swapped_changes(self, masks: Mapping[str, np.ndarray], first: str = "before",
                        second: str = "after") -> dict[str, np.ndarray]:
        """``second* - first*`` where each masked image's two feature vectors trade places."""
        def view(keep, swap):
            return [{(keep, d): 1.0 - masks[d], (swap, d): masks[d]}
                    for d in ("source", "target")]
        before = self._statistics(*view(first, second))
        after = self._statistics(*view(second, first))
        return {k: after[k] - before[k] for k in STATISTICS}

    def relabelled_energy(self, side: str, is_source: np.ndarray) -> np.ndarray:
        """Energy distance after pooling one backbone's source and target images and
        splitting them again by ``is_source`` ([r, n + m] 0/1, n ones per row)."""
        n = self.sets[side, "source"].shape[0]
        keys = ((side, "source"), (side, "target"))
        x = {keys[0]: is_source[:, :n], keys[1]: is_source[:, n:]}
        y = {keys[0]: 1.0 - is_source[:, :n], keys[1]: 1.0 - is_source[:, n:]}
        return self._statistics(x, y)["energy_distance"]


# --------------------------------------------------------------------------------------------
# Backbones in, comparison out.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class ComparisonResult:
    """:func:`compare_backbones`' result.

    Attributes:
        change: the two reports and every :class:`Delta` (see :func:`feature_change`).
        layer: the layer the reports and deltas use.
        layer_cka: layer -> linear CKA between pretrained and fine-tuned features of the
            target images at that layer (1 = the same representation up to rotation and
            isotropic scaling).
        cka: the full :class:`~featsim.metrics.CKAMatrix` (rows: pretrained layers, columns:
            fine-tuned layers) on the target images.
        before_source, before_target, after_source, after_target: the features, with their
            manifests (backbone, weights file, variables SHA-256, preprocessing, source).
        finetuned_metadata: the fine-tuned checkpoint's metadata (strategy, config), if any.
        control: the :class:`featsim.adapt.BNControl` (how the control was made), or None.
        control_source, control_target: the control's features, or None.
    """

    change: FeatureChange
    layer: str
    layer_cka: dict[str, float]
    cka: metrics.CKAMatrix
    before_source: Features
    before_target: Features
    after_source: Features
    after_target: Features
    finetuned_metadata: dict = dataclasses.field(default_factory=dict)
    control: object = None
    control_source: Features | None = None
    control_target: Features | None = None

    @property
    def before(self) -> SimilarityReport:
        return self.change.before

    @property
    def after(self) -> SimilarityReport:
        return self.change.after

    @property
    def deltas(self) -> dict[str, Delta]:
        return self.change.deltas

    @property
    def backbone(self) -> str:
        return self.before_source.manifest["backbone"]

    @property
    def verdict(self) -> str:
        """The measured answer to Proposition 5, stated whichever way it falls."""
        return _verdict(self)

    def to_dict(self) -> dict:
        """JSON-ready: both reports, the deltas with intervals and p-values, the CKA, and
        provenance (weights files, variables SHA-256, preprocessing, sources)."""
        c = self.change
        src, tgt = self.before_source.manifest, self.before_target.manifest

        def backbone_entry(source: Features, report: SimilarityReport, extra=None):
            entry = {"backbone": source.manifest["backbone"],
                     "weights": source.manifest["weights"], "report": report.to_dict()}
            entry.update(extra or {})
            return entry

        skipped = (self.before_source.skipped + self.before_target.skipped)
        control = None
        if self.control is not None:
            control = backbone_entry(self.control_source, c.control, self.control.to_dict())
        floor = 1 / (c.n_permutations + 1) if c.n_permutations else None
        readings = {"finetuned_both": {
            "formula": "D(phi'(X_C), phi'(X_M))",
            "description": "natural and medical images both through the fine-tuned backbone "
                           "(the 'finetuned' report; its change is deltas/parts.total)",
            "distance": c.after.distance}}
        if c.mixed is not None:
            readings["pretrained_source_finetuned_target"] = {
                "formula": "D(phi(X_C), phi'(X_M))",
                "description": "natural images through the pretrained backbone, medical "
                               "images through the fine-tuned one",
                "report": c.mixed.to_dict(),
                "deltas": {k: dataclasses.asdict(d) for k, d in c.mixed_deltas.items()}}
        return {
            "comparison": "pretrained vs fine-tuned" + (
                " (with a BN-adapted control)" if control else ""),
            "backbone": self.backbone,
            "layer": self.layer,
            "metric": c.before.metric,
            "n_source": len(self.before_source),
            "n_target": len(self.before_target),
            "pretrained": backbone_entry(self.before_source, c.before),
            "finetuned": backbone_entry(self.after_source, c.after,
                                        {"metadata": self.finetuned_metadata}),
            "control": control,
            "deltas": {k: dataclasses.asdict(d) for k, d in c.deltas.items()},
            "parts": {part: {k: dataclasses.asdict(d) for k, d in deltas.items()}
                      for part, deltas in c.parts.items()},
            "part_definitions": {part: f"{a} -> {b}" for part, (a, b) in PARTS.items()
                                 if part in c.parts},
            "readings": readings,
            "scale_free": list(SCALE_FREE),
            "bootstrap": {
                "n_resamples": c.n_bootstrap, "confidence": c.confidence,
                "method": c.ci_method,
                "scheme": "paired: each resample draws source and target images with "
                          "replacement and uses the same draws for every backbone "
                          "(pretrained, control, fine-tuned), so the parts add up per "
                          "resample",
            },
            "permutation_test": {
                "n_permutations": c.n_permutations, "alternative": "two-sided",
                "null_hypothesis": "fine-tuning did not change the representation: for every "
                                   "image, its pretrained and fine-tuned feature vectors are "
                                   "exchangeable",
                "scheme": "each permutation swaps the two feature vectors of every image "
                          "(source and target) with probability 1/2; p = (1 + #{|change*| >= "
                          "|change|}) / (1 + n_permutations)",
                "reading": "representation changed (not evidence for Prop. 5): any update "
                           "of the weights rejects this null; conditional on these images, a "
                           "small p says the statistic sees a change of representation on "
                           "them; whether the change would hold for another sample of "
                           "images is what the bootstrap interval says",
                "floor": floor,
                "floor_note": (f"no p-value can be below 1/(B+1) = {floor:.3g}"
                               if floor else None),
            },
            "fid": {"pretrained": c.before.fid, "finetuned": c.after.fid,
                    "change": c.after.fid - c.before.fid},
            "kid": {"pretrained": c.before.kid, "finetuned": c.after.kid,
                    "change": c.after.kid - c.before.kid},
            "cka": {
                "kernel": "linear", "images": "target", "n": len(self.before_target),
                "per_layer": dict(self.layer_cka),
                "matrix": {"rows": list(self.cka.rows), "cols": list(self.cka.cols),
                           "values": np.asarray(self.cka.values).tolist()},
            },
            "preprocessing": src["preprocessing"],
            "source": src["source"],
            "target": tgt["source"],
            "source_content_sha256": src["content_sha256"],
            "target_content_sha256": tgt["content_sha256"],
            "skipped": [dataclasses.asdict(s) for s in skipped],
            "n_skipped": len(skipped),
            "seed": c.seed,
            "verdict": self.verdict,
            "featsim_version": featsim.__version__,
        }

    def to_table(self) -> str:
        """A plain-text table: every statistic before and after, the change, its p-value, and
        the per-layer CKA."""
        c = self.change
        src, tgt = self.before_source.manifest["source"], self.before_target.manifest["source"]
        head = [
            f"backbone {self.backbone}, layer {self.layer}: pretrained vs fine-tuned",
            f"pretrained: {_weights_line(self.before_source)}",
            f"fine-tuned: {_weights_line(self.after_source)}",
            f"source: {src['spec']} ({len(self.before_source)} images"
            f"{_skips(self.before_source)})",
            f"target: {tgt['spec']} ({len(self.before_target)} images"
            f"{_skips(self.before_target)})",
        ]
        ctl = c.control is not None
        if ctl:
            head.append(f"BN-adapted control: {self.control.describe()}")
            rows = [("statistic", "pretrained", "BN-adapted", "fine-tuned", "total change",
                     "normalisation part", "weight part", "p(total)")]
        else:
            rows = [("statistic", "pretrained", "fine-tuned", "change", "p")]
        for name, d in c.deltas.items():
            label = _LABELS[name] + (f" [{c.before.metric}]" if name == "distance" else "")
            label += " *" if d.scale_free else ""
            cells = [label, _value(d.before, c.before.ci.get(name))]
            if ctl:
                cells.append(_value(c.parts["normalisation"][name].after,
                                    c.control.ci.get(name)))
            cells += [_value(d.after, c.after.ci.get(name)),
                      _value(d.estimate, None, d.low, d.high)]
            if ctl:
                cells += [_value(x.estimate, None, x.low, x.high) for x in
                          (c.parts["normalisation"][name], c.parts["weights"][name])]
            cells.append("-" if d.pvalue is None else f"{d.pvalue:.3g}")
            rows.append(tuple(cells))

        for name, label, fmt in (("fid", "FID", ".6g"), ("kid", "KID", ".4g")):
            values = [getattr(c.before, name)] + ([getattr(c.control, name)] if ctl else []) \
                + [getattr(c.after, name)]
            changes = [values[-1] - values[0]]
            if ctl:
                changes += [values[1] - values[0], values[2] - values[1]]
            rows.append((label, *(f"{v:{fmt}}" for v in values),
                         *(f"{v:{fmt}}" for v in changes), "-"))
        if c.before.energy_pvalue is not None:
            values = [c.before, *([c.control] if ctl else []), c.after]
            rows.append(("p(same distribution)", *(f"{r.energy_pvalue:.3g}" for r in values),
                         *[""] * (len(rows[0]) - 1 - len(values))))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = head + ["  ".join(f"{v:<{w}}" for v, w in zip(r, widths, strict=True)).rstrip()
                        for r in rows]
        notes = ["* scale-free (unchanged when all features are rescaled)"]
        if c.n_bootstrap:
            notes.append(f"[brackets: {c.confidence:.0%} paired bootstrap interval, "
                         f"{c.n_bootstrap} resamples, {c.ci_method}]")
        if c.n_permutations:
            notes.append(f"p: two-sided paired permutation test of 'fine-tuning did not change "
                         f"the representation' on these images ({c.n_permutations} per-image "
                         "swaps; floor 1/(B+1) = "
                         f"{1 / (c.n_permutations + 1):.3g}): representation changed (not "
                         "evidence for Prop. 5); the intervals speak for other samples of "
                         "images")
        if ctl:
            notes.append("total = normalisation part (pretrained -> BN-adapted) + weight part "
                         "(BN-adapted -> fine-tuned), each with a paired interval over the "
                         "same resampled images")
        if c.mixed is not None:
            m = c.mixed_deltas["distance"]
            notes.append("D read as D(phi(X_C), phi'(X_M)) (natural images pretrained, medical "
                         f"fine-tuned): {_value(m.after, c.mixed.ci.get('distance'))}, change "
                         f"from pretrained {_value(m.estimate, None, m.low, m.high)}; as "
                         f"D(phi'(X_C), phi'(X_M)): the fine-tuned column")
        lines += notes
        lines.append(f"linear CKA pretrained vs fine-tuned on the target images "
                     f"(n = {len(self.before_target)}):")
        lines.append("  " + ", ".join(f"{k} {v:.3f}" for k, v in self.layer_cka.items()))
        return "\n".join(lines)


def _weights_line(features: Features) -> str:
    w = features.manifest["weights"]
    return f"{w['file'] or w['description']} (variables sha256 {w['variables_sha256'][:12]})"


def _skips(features: Features) -> str:
    return f", {len(features.skipped)} skipped" if features.skipped else ""


def _value(value: float, interval: Interval | None, low=None, high=None) -> str:
    if interval is not None:
        low, high = interval.low, interval.high
    out = f"{value:.6g}"
    if low is not None and high is not None:
        out += f" [{low:.4g}, {high:.4g}]"
    return out


def compare_backbones(
    pretrained: Backbone,
    finetuned: Backbone,
    source,
    target,
    *,
    layer: str = "pre_logits",
    cka_layers: Sequence[str] | None = None,
    metric: str = "euclidean",
    n_bootstrap: int = 200,
    n_permutations: int = 200,
    confidence: float = 0.95,
    ci_method: str = "basic",
    kid_subset_size: int = 1000,
    kid_subsets: int = 100,
    seed: int = 0,
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
        finetuned: e.g. :func:`load_finetuned`; the same architecture.
        source, target: :class:`~featsim.data.Source` objects or specs (natural, medical).
        layer: the feature layer of the reports and deltas.
        cka_layers: layers for CKA; default every feature layer both backbones return
            (``logits`` excluded), from input to output (stem, stage1, ..., pre_logits).
        metric, n_bootstrap, n_permutations, confidence, ci_method, kid_subset_size,
            kid_subsets, seed: as :func:`feature_change`.
        control: a :class:`featsim.adapt.BNControl` (:func:`featsim.adapt.adapt_batch_stats`
            of ``pretrained``): its features split every change into a normalisation part
            and a weight part. None: the total change only.
        **extract_kwargs: for :func:`~featsim.features.extract_features` (``batch_size``,
            ``skip_bad``, ``cache_dir``, ``normalization``, ``progress``, ...).

    Returns:
        A :class:`ComparisonResult`.

    Raises:
        ValueError: a backbone without variables, unknown layers, the two backbones seeing
            different images (e.g. different preprocessing skipping different files), or
            anything :func:`feature_change` rejects.
    """
    # Checked before minutes of extraction, not after.
    _check_options(metric=metric, n_bootstrap=n_bootstrap, n_permutations=n_permutations,
                   confidence=confidence, ci_method=ci_method)
    if cka_layers is None:
        ours = feature_layers(pretrained)  # traces the model: ~1-3 s on CPU
        # A registry name fixes the feature taps whatever the head; trace again only if not.
        theirs = ours if finetuned.name == pretrained.name else feature_layers(finetuned)
        cka_layers = sorted((k for k in ours if k in set(theirs) and k != "logits"),
                            key=_depth_order)
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
        metric=metric, n_bootstrap=n_bootstrap, n_permutations=n_permutations,
        confidence=confidence, ci_method=ci_method, kid_subset_size=kid_subset_size,
        kid_subsets=kid_subsets, seed=seed, **controls)
    before_t, after_t = feats["before", "target"], feats["after", "target"]
    layer_cka = {k: float(metrics.linear_cka(before_t[k], after_t[k])) for k in cka_layers}
    matrix = metrics.cka_matrix({k: before_t[k] for k in cka_layers},
                                {k: after_t[k] for k in cka_layers})
    return ComparisonResult(
        change=change, layer=layer, layer_cka=layer_cka, cka=matrix,
        before_source=feats["before", "source"], before_target=before_t,
        after_source=feats["after", "source"], after_target=after_t,
        finetuned_metadata=_checkpoint_metadata(finetuned), control=control,
        control_source=feats.get(("control", "source")),
        control_target=feats.get(("control", "target")))


def _depth_order(layer: str):
    """stem, stage1, stage2, ..., other taps (head, conv5, ...), pre_logits: input to output.

    ``feature_layers`` comes back in sorted key order (``jax.eval_shape`` flattens dicts)."""
    if layer == "stem":
        return (0, 0, "")
    match = re.fullmatch(r"stage(\d+)", layer)
    if match:
        return (1, int(match.group(1)), "")
    return (3, 0, "") if layer == "pre_logits" else (2, 0, layer)


# --------------------------------------------------------------------------------------------
# The verdict and the CKA figure.
# --------------------------------------------------------------------------------------------


def _with_ci(value: float, interval: Interval | None) -> str:
    if interval is None:
        return f"{value:.4g}"
    return f"{value:.4g} [{interval.low:.4g}, {interval.high:.4g}]"


def _change_text(d: Delta) -> str:
    text = f"change {d.estimate:+.4g}"
    if d.low is not None:
        text += f" [{d.low:+.4g}, {d.high:+.4g}]"
    if d.pvalue is not None:
        text += f", p = {d.pvalue:.3g}"
    return text


def _part_text(d: Delta) -> str:
    text = f"{d.estimate:+.4g}"
    if d.low is not None:
        text += f" [{d.low:+.4g}, {d.high:+.4g}]"
    return text


def _movement(d: Delta, before: str, after: str) -> str:
    """``"fell from B to A"``, ``"rose from B to A"`` or ``"did not change detectably (B vs
    A)"``."""
    direction = d.direction()
    if direction in ("fell", "rose"):
        return f"{direction} from {before} to {after}"
    return f"{direction} ({before} vs {after})"


# A representation whose within-domain spread, relative to its own feature norm, is below this
# fraction of the other's is treated as collapsed (a near-constant output in inference mode).
COLLAPSE_FACTOR = 1e-3


def _relative_spread(report: SimilarityReport, source, target) -> float:
    """Mean within-domain distance over the RMS feature norm: invariant to rescaling, ~0 when
    the layer's output barely depends on the image."""
    rows = np.concatenate([np.asarray(source, np.float64), np.asarray(target, np.float64)])
    norm = float(np.sqrt(np.mean(np.sum(rows * rows, axis=1))))
    within = 0.5 * (report.distance_source + report.distance_target)
    return within / norm if norm > 0 else 0.0


def _collapse_note(result: ComparisonResult) -> str | None:
    """A sentence when one representation is (nearly) constant across images, else None."""
    layer = result.layer
    spread = {
        "pretrained": _relative_spread(result.change.before, result.before_source[layer],
                                       result.before_target[layer]),
        "fine-tuned": _relative_spread(result.change.after, result.after_source[layer],
                                       result.after_target[layer]),
    }
    for name, other in (("fine-tuned", "pretrained"), ("pretrained", "fine-tuned")):
        if spread[name] < COLLAPSE_FACTOR * spread[other]:
            return (f"The {name} features have collapsed: their within-domain spread relative "
                    f"to their norm is {spread[name]:.3g}, against {spread[other]:.3g} for the "
                    f"{other} ones, so at {layer} the output barely depends on the image and "
                    "every statistic compares near-constant vectors (for a network trained "
                    "briefly from random initialisation, a usual cause is BatchNorm running "
                    "statistics that have not converged; see "
                    "featsim.train.recompute_batch_stats). No verdict on Proposition 5 is "
                    "drawn from these numbers.")
    return None


def _verdict(result: ComparisonResult) -> str:
    c = result.change
    d = c.deltas["distance"]
    dir_d = d.direction()
    before = f"{_with_ci(d.before, c.before.ci.get('distance'))} (pretrained)"
    after = f"{_with_ci(d.after, c.after.ci.get('distance'))} (fine-tuned)"
    sentences = [f"D {_movement(d, before, after)}: {_change_text(d)}."]
    scale_free = [c.deltas[k] for k in SCALE_FREE]
    sentences.append("Scale-free forms: " + "; ".join(
        f"{_LABELS[s.name]} {_movement(s, f'{s.before:.4g}', f'{s.after:.4g}')} "
        f"({_change_text(s)})" for s in scale_free) + ".")
    within_before = 0.5 * (c.before.distance_source + c.before.distance_target)
    within_after = 0.5 * (c.after.distance_source + c.after.distance_target)
    scale = within_after / within_before if within_before > 0 else math.nan
    sentences.append(f"The mean within-domain distance changed by a factor {scale:.3g} "
                     f"({within_before:.4g} -> {within_after:.4g}).")
    groups = {}
    for s in scale_free:
        groups.setdefault(s.direction(), []).append(_LABELS[s.name])
    fell = groups.get("fell", [])
    others = "; ".join(f"{', '.join(v)} {k}" for k, v in groups.items() if k != "fell")
    collapse = _collapse_note(result)
    if collapse is not None:
        sentences.append(collapse)
    elif dir_d == "fell":
        if len(fell) == len(scale_free):
            sentences.append(
                "Every scale-free form fell too, so the fall of D is not only a rescaling of "
                "the features: on these images the natural and medical features moved closer, "
                "as Proposition 5 states.")
        elif not fell:
            sentences.append(
                "No scale-free form fell, so the fall of raw D is a change of feature scale, "
                "not the domains moving closer: these measurements do not support "
                "Proposition 5.")
        else:
            sentences.append(
                f"Of the scale-free forms only {', '.join(fell)} fell ({others}), so the fall "
                "of raw D is partly a change of feature scale; the support for Proposition 5 "
                "is partial.")
    elif dir_d == "rose":
        sentences.append("D rose, contrary to Proposition 5 on these images" + (
            f", although {', '.join(fell)} fell." if fell else "."))
    else:
        sentences.append(f"D {dir_d}, so these measurements do not show the fall Proposition 5 "
                         "states" + (f" ({', '.join(fell)} fell)." if fell else "."))
    alpha = 1 - c.confidence
    conditional = [_LABELS[x.name] for x in (d, *scale_free) if x.pvalue is not None
                   and x.pvalue < alpha and x.direction() == "did not change detectably"]
    if conditional:
        sentences.append(
            f"For {', '.join(conditional)} the permutation p is below {alpha:.2g} but the "
            "interval includes 0: the representation changed on these images in a way the "
            "statistic sees, by less than it varies between samples of images, so no "
            "population-level change is shown.")
    if c.parts.get("normalisation"):
        norm, weights = c.parts["normalisation"], c.parts["weights"]
        sentences.append(
            "Split of the change (total = normalisation + weights): D "
            f"{d.estimate:+.4g} = {_part_text(norm['distance'])} (BatchNorm statistics "
            f"adapted, pretrained weights) + {_part_text(weights['distance'])} (fine-tuned "
            "weights); " + "; ".join(
                f"{_LABELS[k]} {c.deltas[k].estimate:+.4g} = {_part_text(norm[k])} + "
                f"{_part_text(weights[k])}" for k in SCALE_FREE) + ".")
        if dir_d == "fell" and weights["distance"].direction() != "fell":
            sentences.append("The weight part of D does not fall: on these images the fall "
                             "comes from the adapted normalisation statistics, not from the "
                             "fine-tuned weights.")
    if c.mixed is not None:
        m = c.mixed_deltas["distance"]
        sentences.append(
            f"Read as D(phi(X_C), phi'(X_M)) (natural images pretrained, medical fine-tuned), "
            f"D is {_with_ci(m.after, c.mixed.ci.get('distance'))}: "
            f"{_movement(m, f'{m.before:.4g}', f'{m.after:.4g}')} ({_change_text(m)}).")
    if c.n_permutations:
        sentences.append(
            "Permutation p-values test 'the representation did not change' (floor "
            f"1/(B+1) = {1 / (c.n_permutations + 1):.3g}): representation changed (not "
            "evidence for Prop. 5).")
    if d.low is None:
        sentences.append("No bootstrap was run, so directions are the signs of the estimates, "
                         "untested.")
    n = len(result.before_source), len(result.before_target)
    sentences.append(f"({n[0]} source and {n[1]} target images, layer {result.layer}; "
                     f"CKA pretrained vs fine-tuned at {result.layer}: "
                     f"{result.layer_cka.get(result.layer, math.nan):.3f}.)")
    return " ".join(sentences)


def plot_cka(result: ComparisonResult, path: str | os.PathLike) -> Path:
    """Saves the layer x layer CKA matrix as a heatmap (PNG, or any format matplotlib writes).

    Rows are the pretrained network's layers, columns the fine-tuned one's; the colour map is
    ``cividis`` (perceptually uniform, readable with colour-vision deficiencies) on [0, 1].

    Args:
        result: from :func:`compare_backbones`.
        path: the image file to write (folders are created).

    Returns:
        The path written.
    """
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    path = Path(path)
    values = np.asarray(result.cka.values)
    rows, cols = list(result.cka.rows), list(result.cka.cols)
    size = max(4.5, 0.55 * max(len(rows), len(cols)) + 2.5)
    fig = Figure(figsize=(size + 1.2, size), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(values, cmap="cividis", vmin=0.0, vmax=1.0, origin="lower",
                      aspect="equal", interpolation="nearest")
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("fine-tuned layer")
    ax.set_ylabel("pretrained layer")
    if len(rows) * len(cols) <= 225:
        for i in range(len(rows)):
            for j in range(len(cols)):
                ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if values[i, j] > 0.6 else "white")
    target = result.before_target.manifest["source"]["spec"]
    ax.set_title(f"{result.backbone}: pretrained vs fine-tuned\n"
                 f"{Path(str(target)).name or target} (n = {len(result.before_target)})",
                 fontsize=10)
    fig.colorbar(image, ax=ax, label="linear CKA", shrink=0.8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    return path
