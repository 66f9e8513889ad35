"""Paired resampling of two-set statistics across representations of the same images.

The same images go through several representations (a pretrained backbone, a BN-adapted
control, a fine-tuned backbone). Feature sets are keyed ``(side, domain)``: side names the
representation, domain is ``"source"`` or ``"target"``. As in
:class:`featsim.metrics.TwoSampleResampler`, every resample is a weight vector over the rows
of float64 distance matrices built **once**, and every statistic a batch of quadratic forms
``w_1^T D w_2``; here the matrices also join the representations, so that

* a **paired bootstrap** resample draws source and target images with replacement and uses
  the *same* draws for every representation: the interval of a change ``after - before``
  reflects the sampling of images, not a second, independent sampling per representation
  (Efron & Tibshirani 1993, ch. 13-14: percentile and basic intervals). Weights are
  multiplicities. As in :class:`~featsim.metrics.TwoSampleResampler`, a copy of an image
  paired with another copy of itself is not a pair of two images (it sits at distance 0,
  which no sample of distinct images contains): within-set terms are over pairs of distinct
  original images, ``sum_{i != j} w_i w_j D_ij / ((sum w)^2 - sum w^2)``, and the energy
  distance is the V-statistic built from them, ``2 D - W_s (N - 1) / N - W_t (M - 1) / M``
  (on all images, w = 1, both are exactly the printed statistics). Counting the copies as
  pairs at 0 biased the resampled within-set distances downwards (the ratio's interval
  covered 35 % at n = 30 in the two-sample case, benchmarks/coverage.py);
* a **paired permutation test** (Good 2005, "Permutation, Parametric and Bootstrap Tests of
  Hypotheses") flips a fair coin per image and swaps that image's two feature vectors
  between two representations (weights 0/1 on each), H0: the representations are
  exchangeable per image. Two-sided p = ``(1 + #{|change*| >= |change|}) / (1 + B)``
  (Phipson & Smyth 2010);
* the **energy test** of one representation pools its source and target rows and splits them
  again at random (weights 0/1, n of them on the source side); one-sided p.

Statistics (:data:`PAIRED_STATISTICS`): D, both within-domain baselines (U-statistics), their
ratio, the energy distance and coefficient (V-statistics, as the report prints them), cosine D
(closed form ``1 - mean(u) . mean(v)`` of unit rows).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping, Sequence

import numpy as np

from featsim.metrics.resample import distance_matrix_from_gram, pairwise_forms

__all__ = [
    "PAIRED_CI_METHODS",
    "PAIRED_STATISTICS",
    "PairedEstimates",
    "PairedResampler",
    "check_paired_memory",
    "paired_resampling",
    "pairwise_distances",
    "resample_interval",
]

PAIRED_STATISTICS = ("distance", "distance_source", "distance_target", "ratio",
                     "energy_distance", "energy_coefficient", "distance_cosine")
PAIRED_CI_METHODS = ("basic", "percentile")
# Resamples per batch of quadratic forms: bounds the [batch, n] weight and product arrays.
_BATCH = 64
# Largest float64 distance matrices held at once (all blocks of one comparison).
_MAX_MATRIX_BYTES = 4 * 2**30


def pairwise_distances(x: np.ndarray, y: np.ndarray, metric: str, *, same: bool) -> np.ndarray:
    """float64 ``[len(x), len(y)]`` distances; with ``same`` (y is x) the diagonal is 0.

    Args:
      x: float64 array ``[n, d]``; y: float64 array ``[m, d]``.
      metric: ``euclidean``, ``sqeuclidean``, ``cosine`` or any ``scipy.spatial.distance.cdist``
        metric.
      same: y is x (the within-set block).
    """
    if metric in ("euclidean", "sqeuclidean"):
        # Centring on a common mean removes the cancellation in |x|^2 + |y|^2 - 2 x.y.
        centre = x.mean(0) if same else np.concatenate([x, y]).mean(0)
        x = x - centre
        y = x if same else y - centre
    gram = x @ y.T if metric in ("euclidean", "sqeuclidean", "cosine") else None
    sq_x = (x * x).sum(1)
    sq_y = sq_x if same else (y * y).sum(1)
    return distance_matrix_from_gram(x, y, gram, sq_x, sq_y, metric, same)  # one builder for both


class PairedResampler:
    """Distance blocks between feature sets keyed ``(side, domain)``, built on first use.

    A resample is a weight per image: multiplicities (bootstrap) or a 0/1 choice of which
    representation's vector an image contributes (paired swaps). Every statistic is then a
    function of weighted pair sums ``w_1^T D w_2`` (diagonals are 0, so pairs of copies of one
    image add nothing, and within-set sums are normalised by the number of pairs of distinct
    images, ``N^2 - sum_i w_i^2`` with ``w_i`` an image's total weight) and of weighted means
    of unit rows.

    Args:
      sets: ``(side, domain)`` -> float array ``[rows, d]``; sets of one domain have the same
        rows (the same images, in the same order).
      metric: pairwise metric of D and the energy distance.
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
            self._blocks[a, b] = pairwise_distances(self.sets[a], self.sets[b], self.metric,
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
            within_s = s_ss / (n * n - _sum_sq_per_image(src))
            within_t = s_tt / (m * m - _sum_sq_per_image(tgt))
            energy = 2.0 * between - within_s * (n - 1) / n - within_t * (m - 1) / m
            out = pairwise_forms(between, within_s, within_t, energy)
        out["distance_cosine"] = 1.0 - np.einsum("rd,rd->r", self.mean_unit(src),
                                                 self.mean_unit(tgt))
        return out

    def statistics(self, side: str, weights: Mapping[str, np.ndarray],
                   source_side: str | None = None, target_side: str | None = None):
        """Every statistic of one representation, per row of image weights
        (``{"source": [r, n], "target": [r, m]}``); with ``source_side``/``target_side``,
        source rows from one representation and target rows from another."""
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
        return {k: after[k] - before[k] for k in PAIRED_STATISTICS}

    def relabelled_energy(self, side: str, is_source: np.ndarray) -> np.ndarray:
        """Energy distance after pooling one representation's source and target images and
        splitting them again by ``is_source`` ([r, n + m] 0/1, n ones per row)."""
        n = self.sets[side, "source"].shape[0]
        keys = ((side, "source"), (side, "target"))
        x = {keys[0]: is_source[:, :n], keys[1]: is_source[:, n:]}
        y = {keys[0]: 1.0 - is_source[:, :n], keys[1]: 1.0 - is_source[:, n:]}
        return self._statistics(x, y)["energy_distance"]


@dataclasses.dataclass(frozen=True)
class PairedEstimates:
    """:func:`paired_resampling`'s result (empty dicts for what was not asked for).

    Attributes:
      observed: view -> statistic -> value on all images.
      intervals: view -> statistic -> ``(low, high)`` paired bootstrap interval.
      changes: ``(first, second)`` view pair -> statistic -> ``(low, high)`` interval of
        ``second - first`` over the same resamples.
      pvalues: ``(first, second)`` side pair -> statistic -> two-sided swap p-value.
      energy_pvalues: side -> one-sided p-value of the pooled-relabelling energy test.
    """

    observed: dict[str, dict[str, float]]
    intervals: dict[str, dict[str, tuple[float, float]]]
    changes: dict[tuple[str, str], dict[str, tuple[float, float]]]
    pvalues: dict[tuple[str, str], dict[str, float]]
    energy_pvalues: dict[str, float]


def paired_resampling(
    sets: Mapping[tuple[str, str], np.ndarray],
    *,
    views: Mapping[str, tuple[str, str]],
    changes: Sequence[tuple[str, str]] = (),
    swaps: Sequence[tuple[str, str]] = (),
    energy_sides: Sequence[str] = (),
    metric: str = "euclidean",
    n_bootstrap: int = 200,
    n_permutations: int = 200,
    confidence: float = 0.95,
    ci_method: str = "basic",
    seed: int = 0,
) -> PairedEstimates:
    """Paired bootstrap intervals, swap tests and energy tests over shared images.

    Args:
      sets: ``(side, domain)`` -> float array; every side has a ``"source"`` set of n rows and
        a ``"target"`` set of m rows (the same images in the same order), n, m >= 2, finite.
      views: view name -> ``(source side, target side)``: whose source rows are compared with
        whose target rows (``{"before": ("before", "before"), "mixed": ("before",
        "after")}``).
      changes: view pairs whose change ``second - first`` gets a bootstrap interval.
      swaps: side pairs tested by per-image swaps (their sets need equal widths).
      energy_sides: sides whose source and target get the energy test.
      metric: pairwise metric of D and the energy distance.
      n_bootstrap, n_permutations: resamples (0: none of that kind).
      confidence: level of the intervals, in (0, 1).
      ci_method: ``"basic"`` or ``"percentile"``.
      seed: bootstrap, swaps and relabellings draw from independent streams of
        ``np.random.SeedSequence(seed)``.

    Returns:
      A :class:`PairedEstimates`.

    Raises:
      ValueError: an unknown ``ci_method``, or distance matrices too large for memory.
    """
    if ci_method not in PAIRED_CI_METHODS:
        raise ValueError(f"ci_method must be one of {PAIRED_CI_METHODS} for paired resampling, "
                         f"got {ci_method!r}")
    sides = list(dict.fromkeys(side for side, _ in sets))
    n, m = sets[sides[0], "source"].shape[0], sets[sides[0], "target"].shape[0]
    boot_rng, perm_rng, energy_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))
    out = PairedEstimates({}, {v: {} for v in views}, {c: {} for c in changes},
                          {s: {} for s in swaps}, {})
    if not (n_bootstrap or n_permutations):
        return out
    check_paired_memory(n, m, n_sides=len(sides), paired_swaps=bool(n_permutations))
    pairs = PairedResampler(sets, metric)
    full = {"source": np.ones((1, n)), "target": np.ones((1, m))}
    observed = {v: {k: float(x[0]) for k, x in pairs.statistics(v, full, *views[v]).items()}
                for v in views}
    out.observed.update(observed)
    if n_bootstrap:
        dist = {v: [] for v in views}
        for counts in _bootstrap_counts(boot_rng, n, m, n_bootstrap):
            for v in views:  # the same resampled images for every representation
                dist[v].append(pairs.statistics(v, counts, *views[v]))
        dist = {v: {k: np.concatenate([d[k] for d in chunks]) for k in PAIRED_STATISTICS}
                for v, chunks in dist.items()}
        for name in PAIRED_STATISTICS:
            for v in views:
                out.intervals[v][name] = resample_interval(
                    observed[v][name], dist[v][name], confidence, ci_method)
            for first, second in changes:
                out.changes[first, second][name] = resample_interval(
                    observed[second][name] - observed[first][name],
                    dist[second][name] - dist[first][name], confidence, ci_method)
    if n_permutations:
        null = {s: [] for s in swaps}
        for mask in _swap_masks(perm_rng, n, m, n_permutations):
            for first, second in swaps:
                null[first, second].append(pairs.swapped_changes(mask, first, second))
        for first, second in swaps:
            for name in PAIRED_STATISTICS:
                change = observed[second][name] - observed[first][name]
                values = np.concatenate([c[name] for c in null[first, second]])
                out.pvalues[first, second][name] = _two_sided_pvalue(change, values)
        for side in energy_sides:
            values = np.concatenate([pairs.relabelled_energy(side, split) for split in
                                     _relabellings(energy_rng, n, m, n_permutations)])
            out.energy_pvalues[side] = _greater_pvalue(observed[side]["energy_distance"],
                                                       values)
    return out


def _sum_sq_per_image(weights: Mapping) -> np.ndarray:
    """``sum_i w_i^2`` per resample, ``w_i`` the total weight of image i over the
    representations it appears in (keys ``(side, domain)``: one domain's sets share images)."""
    per_domain: dict[str, np.ndarray] = {}
    for (_, domain), w in weights.items():
        per_domain[domain] = per_domain.get(domain, 0.0) + w
    return sum((w * w).sum(1) for w in per_domain.values())


def check_paired_memory(n: int, m: int, *, n_sides: int = 2, paired_swaps: bool) -> None:
    """Raises ValueError when the distance blocks of ``n_sides`` representations of n source
    and m target images would exceed the memory limit (the message gives the sizes)."""
    # Within each representation: [n, n], [n, m], [m, m]; swaps (and the mixed reading) add
    # the cross-representation blocks.
    blocks = (n + m) ** 2 * (n_sides * n_sides if paired_swaps else n_sides + 1)
    if blocks * 8 > _MAX_MATRIX_BYTES:
        raise ValueError(
            f"n_source = {n} and n_target = {m} need {blocks * 8 / 2**30:.1f} GiB of float64 "
            f"distance matrices for the bootstrap/permutations (limit "
            f"{_MAX_MATRIX_BYTES / 2**30:.0f} GiB); subsample the images or pass "
            "n_bootstrap=0 and n_permutations=0"
        )


def resample_interval(estimate: float, distribution: np.ndarray, confidence: float,
                      method: str) -> tuple[float, float]:
    """Percentile or basic interval, as ``scipy.stats.bootstrap`` (linear quantiles); NaN
    with a warning when a resampled value is not finite."""
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
