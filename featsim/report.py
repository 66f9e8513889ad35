"""One comparison of two feature sets: every metric, its confidence interval, as table or JSON.

``similarity_report`` composes the pure functions of ``featsim.metrics``; it adds no maths of its
own. Its JSON keys are the ones ``featsim distance`` writes (``distance``, ``distance_source``,
``distance_target``, ``energy_distance``, ``fid``, ``kid`` and their intervals), so a result can be
recomputed from features with the library alone.
"""

from __future__ import annotations

import dataclasses
import platform
import warnings

import jax
import numpy as np
import scipy

import featsim
from featsim import metrics

__all__ = ["Interval", "SimilarityReport", "similarity_report"]


@dataclasses.dataclass(frozen=True)
class Interval:
    """A bootstrap confidence interval."""

    low: float
    high: float
    confidence: float
    n_resamples: int
    method: str


@dataclasses.dataclass(frozen=True)
class SimilarityReport:
    """Similarity of a source (e.g. natural-image) and a target (medical) feature set.

    Attributes:
      metric: pairwise metric of the distance fields.
      n_source, n_target, dim: sample counts and feature dimension.
      distance: Gu & Lee's D(source, target); distance_source, distance_target: the
        within-domain baselines (mean over pairs i != j).
      ratio: D over the mean within-domain distance (scale-free).
      energy_distance: 2 D(s, t) - D(s, s) - D(t, t); energy_coefficient: its scale-free
        form E / (2 D) in [0, 1].
      distance_cosine: D with the cosine metric (scale-free).
      fid, fid_rank_source, fid_rank_target, fid_method: FID and its covariance ranks.
      kid, kid_std, kid_subset_size, kid_subsets: KID mean and std over subsets.
      ci: bootstrap intervals by field name (empty when no bootstrap was asked for).
      energy_pvalue: permutation-test p-value of "same distribution" (None if not run).
      n_permutations: permutations behind ``energy_pvalue``.
      seed: seed of every random choice (KID subsets, bootstrap, permutations).
      versions: featsim, numpy, jax, scipy and Python versions.
    """

    metric: str
    n_source: int
    n_target: int
    dim: int
    distance: float
    distance_source: float
    distance_target: float
    ratio: float
    energy_distance: float
    energy_coefficient: float
    distance_cosine: float
    fid: float
    fid_rank_source: int
    fid_rank_target: int
    fid_method: str
    kid: float
    kid_std: float
    kid_subset_size: int
    kid_subsets: int
    ci: dict[str, Interval]
    energy_pvalue: float | None
    n_permutations: int
    seed: int
    versions: dict[str, str]

    def to_dict(self) -> dict:
        """JSON-ready dict; intervals appear as ``<field>_ci: [low, high]`` and in ``ci``."""
        out = dataclasses.asdict(self)
        for name, interval in self.ci.items():
            out[f"{name}_ci"] = [interval.low, interval.high]
        return out

    def to_table(self) -> str:
        """A plain-text table for terminals."""
        rows = [
            ("n source / target", f"{self.n_source} / {self.n_target} (d = {self.dim})"),
            (f"D(source, target) [{self.metric}]", self._fmt("distance")),
            ("D within source (i != j)", self._fmt("distance_source")),
            ("D within target (i != j)", self._fmt("distance_target")),
            ("ratio D / mean within", self._fmt("ratio")),
            ("energy distance", self._fmt("energy_distance")),
            ("energy coefficient E/(2D)", self._fmt("energy_coefficient")),
            ("D [cosine]", self._fmt("distance_cosine")),
            ("FID", self._fmt("fid") + f"  (ranks {self.fid_rank_source}/"
             f"{self.fid_rank_target}, {self.fid_method})"),
            ("KID", f"{self.kid:.6g} +- {self.kid_std:.3g} (std over {self.kid_subsets} subsets "
             f"of {self.kid_subset_size})"),
        ]
        if self.energy_pvalue is not None:
            rows.append(("p(same distribution)", f"{self.energy_pvalue:.4g} (energy, "
                         f"{self.n_permutations} permutations)"))
        width = max(len(k) for k, _ in rows)
        lines = [f"{k:<{width}}  {v}" for k, v in rows]
        if self.ci:
            first = next(iter(self.ci.values()))
            lines.append(f"[brackets: {first.confidence:.0%} bootstrap interval, "
                         f"{first.n_resamples} resamples, {first.method}]")
        return "\n".join(lines)

    def _fmt(self, name: str) -> str:
        value = f"{getattr(self, name):.6g}"
        interval = self.ci.get(name)
        if interval is not None:
            value += f"  [{interval.low:.6g}, {interval.high:.6g}]"
        return value


def _ratio(metric):
    def fn(x, y):
        return metrics.distance_summary(x, y, metric=metric).ratio
    return fn


def _energy(metric):
    def fn(x, y):
        return metrics.energy_distance(x, y, metric=metric)
    return fn


def _distance(metric):
    def fn(x, y):
        return metrics.average_distance(x, y, metric=metric)
    return fn


def _fid_quiet(x, y):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", metrics.FIDRankWarning)  # reported once, not per resample
        return metrics.fid(x, y)


def similarity_report(
    source,
    target,
    *,
    metric: str = "euclidean",
    n_bootstrap: int = 0,
    n_permutations: int = 0,
    confidence: float = 0.95,
    ci_method: str = "basic",
    kid_subset_size: int = 1000,
    kid_subsets: int = 100,
    seed: int = 0,
) -> SimilarityReport:
    """Computes every featsim metric between two feature sets.

    Args:
      source: float array ``[n, d]`` (e.g. ImageNet-image features).
      target: float array ``[m, d]`` (e.g. chest X-ray features).
      metric: pairwise metric of D and the energy distance (see ``average_distance``).
      n_bootstrap: resamples for bootstrap intervals of D, ratio, energy distance and FID
        (0: none). Each resample recomputes those metrics, so cost grows linearly.
      n_permutations: permutations for the energy-distance test of equal distributions
        (0: none).
      confidence: level of the bootstrap intervals.
      ci_method: ``"basic"`` (default), ``"percentile"`` or ``"BCa"`` (see ``bootstrap_ci``).
        The default is the basic (reverse-percentile) interval because FID and the
        V-statistic energy distance are biased upwards at finite n and resampling with
        replacement adds duplicate rows that bias them further: percentile intervals of those
        then often exclude the estimate itself, while basic intervals correct for the bias the
        bootstrap sees and target the population value (they may lie below the estimate; D
        itself is unbiased and barely affected).
      kid_subset_size, kid_subsets: KID subsets (the size is clamped to the smaller set, with a
        warning).
      seed: seed of the KID subsets, bootstrap and permutations.

    Returns:
      A ``SimilarityReport``.

    Raises:
      ValueError: bad shapes, NaN/inf rows, mismatched dims (from ``featsim.metrics``).
    """
    summary = metrics.distance_summary(source, target, metric=metric)
    details = metrics.fid_details(source, target)
    kid = metrics.kid(source, target, subset_size=kid_subset_size, num_subsets=kid_subsets,
                      seed=seed)
    ci = {}
    if n_bootstrap:
        for name, fn in (("distance", _distance(metric)), ("ratio", _ratio(metric)),
                         ("energy_distance", _energy(metric)), ("fid", _fid_quiet)):
            r = metrics.bootstrap_ci(fn, source, target, n_resamples=n_bootstrap, seed=seed,
                                     confidence=confidence, method=ci_method)
            ci[name] = Interval(r.low, r.high, confidence, n_bootstrap, r.method)
    pvalue = None
    if n_permutations:
        pvalue = metrics.permutation_test(_energy(metric), source, target,
                                          n_permutations=n_permutations, seed=seed).pvalue
    return SimilarityReport(
        metric=metric,
        n_source=summary.n_x,
        n_target=summary.n_y,
        dim=details.dim,
        distance=summary.between,
        distance_source=summary.within_x,
        distance_target=summary.within_y,
        ratio=summary.ratio,
        energy_distance=summary.energy,
        energy_coefficient=summary.energy_coefficient,
        distance_cosine=metrics.average_distance(source, target, metric="cosine"),
        fid=details.value,
        fid_rank_source=details.rank1,
        fid_rank_target=details.rank2,
        fid_method=details.method,
        kid=float(kid.mean),
        kid_std=float(kid.std),
        kid_subset_size=int(kid.subset_size),
        kid_subsets=int(kid.num_subsets),
        ci=ci,
        energy_pvalue=None if pvalue is None else float(pvalue),
        n_permutations=int(n_permutations),
        seed=int(seed),
        versions={"featsim": featsim.__version__, "numpy": np.__version__,
                  "jax": jax.__version__, "scipy": scipy.__version__,
                  "python": platform.python_version()},
    )
