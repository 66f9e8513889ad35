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
from featsim.metrics.options import DEFAULT_STATS, StatOptions
from featsim.parallel import LOCAL

__all__ = ["Interval", "SimilarityReport", "similarity_report"]


@dataclasses.dataclass(frozen=True)
class Interval:
    """A confidence interval for a statistic's population value.

    Attributes:
      low, high: the interval (after clamping to the quantity's range).
      confidence: its level.
      n_resamples: bootstrap resamples (FID: jackknife evaluations).
      method: ``"basic"``, ``"percentile"``, ``"BCa"`` or ``"jackknife-t"``.
      centre: the estimate the interval is built around when it is not the printed one (the
        U-statistic energy distance, the all-rows KID, the bias-corrected FID); None otherwise.
      clamped: an end was moved to the quantity's range ([0, inf), the energy coefficient
        [0, 1]).
      note: why the interval does not contain the printed estimate (or why it is not
        calibrated); empty otherwise.
    """

    low: float
    high: float
    confidence: float
    n_resamples: int
    method: str
    centre: float | None = None
    clamped: bool = False
    note: str = ""


@dataclasses.dataclass(frozen=True)
class SimilarityReport:
    """Similarity of a source (e.g. natural-image) and a target (medical) feature set.

    Attributes:
      metric: pairwise metric of the distance fields.
      n_source, n_target, dim: sample counts and feature dimension.
      distance: Gu & Lee's D(source, target); distance_source, distance_target: the
        within-domain baselines (mean over pairs i != j).
      ratio: D over the mean within-domain distance (scale-free).
      energy_distance: 2 D(s, t) - D(s, s) - D(t, t), V-statistics (self-pairs included,
        >= 0, biased upwards by W_s / n + W_t / m); energy_coefficient: its scale-free form
        E / (2 D) in [0, 1]; energy_distance_unbiased: the U-statistic 2 D - W_s - W_t
        (unbiased for the population value, can be < 0).
      distance_cosine: D with the cosine metric (scale-free).
      fid, fid_rank_source, fid_rank_target, fid_method: FID and its covariance ranks.
      fid_infinity: Chong & Forsyth's FID extrapolated to infinite n (None unless intervals
        were asked for or min(n, m) <= d with n + m <= 5000; see
        ``featsim.metrics.fid_infinity``).
      kid, kid_std, kid_subset_size, kid_subsets: KID mean and std over subsets.
      ci: intervals by field name (empty when no bootstrap was asked for); see
        ``featsim.metrics.resampled_intervals`` for the methods.
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
    energy_distance_unbiased: float | None = None
    fid_infinity: float | None = None
    kid_subset_size_requested: int | None = None

    @property
    def facts(self) -> tuple[str, ...]:
        """What a reader must know to compare these numbers with others (also in the JSON):
        facts of every small-sample run, stated here instead of warned about on each run."""
        out = []
        if min(self.n_source, self.n_target) <= self.dim:
            out.append(f"FID with n <= d ({self.n_source} / {self.n_target} images, d = "
                       f"{self.dim}): the covariances are singular (ranks "
                       f"{self.fid_rank_source} / {self.fid_rank_target}) and FID is biased "
                       "upwards at small n; compare it only with FIDs at the same n "
                       "(FID_infinity extrapolates to n -> infinity)")
        requested = self.kid_subset_size_requested
        if requested is not None and requested > self.kid_subset_size:
            out.append(f"KID subsets of {self.kid_subset_size} images: {requested} were asked "
                       "for, and the smaller set has only "
                       f"{min(self.n_source, self.n_target)}")
        return tuple(out)

    def to_dict(self) -> dict:
        """JSON-ready dict; intervals appear as ``<field>_ci: [low, high]`` and in ``ci``."""
        out = dataclasses.asdict(self)
        for name, interval in self.ci.items():
            out[f"{name}_ci"] = [interval.low, interval.high]
        out["facts"] = list(self.facts)
        return out

    def to_table(self) -> str:
        """A plain-text table for terminals; interval notes become numbered footnotes."""
        notes: list[str] = []
        fid = self._fmt("fid", notes) + (f"  (ranks {self.fid_rank_source}/"
                                         f"{self.fid_rank_target}, {self.fid_method})")
        rows = [
            ("n source / target", f"{self.n_source} / {self.n_target} (d = {self.dim})"),
            (f"D(source, target) [{self.metric}]", self._fmt("distance", notes)),
            ("D within source (i != j)", self._fmt("distance_source", notes)),
            ("D within target (i != j)", self._fmt("distance_target", notes)),
            ("ratio D / mean within", self._fmt("ratio", notes)),
            ("energy distance (V-stat)", self._fmt("energy_distance", notes)),
            ("energy coefficient E/(2D)", self._fmt("energy_coefficient", notes)),
            ("D [cosine]", self._fmt("distance_cosine", notes)),
            ("FID", fid),
            ("KID", f"{self.kid:.6g} +- {self.kid_std:.3g} (std over {self.kid_subsets} subsets "
             f"of {self.kid_subset_size})" + self._interval_text("kid", notes)),
        ]
        if self.energy_distance_unbiased is not None:
            rows.insert(6, ("energy distance (U-stat)", f"{self.energy_distance_unbiased:.6g}"))
        if self.fid_infinity is not None:
            rows.insert(rows.index(("FID", fid)) + 1,
                        ("FID_infinity (Chong & Forsyth)", f"{self.fid_infinity:.6g}"))
        if self.energy_pvalue is not None:
            rows.append(("p(same distribution)", f"{self.energy_pvalue:.4g} (energy, "
                         f"{self.n_permutations} permutations)"))
        width = max(len(k) for k, _ in rows)
        lines = [f"{k:<{width}}  {v}" for k, v in rows]
        if self.ci:
            first = self.ci.get("distance", next(iter(self.ci.values())))
            fid_ci = self.ci.get("fid")
            extra = (f"; FID: {fid_ci.method}, {fid_ci.n_resamples} jackknife evaluations"
                     if fid_ci is not None and fid_ci.method != first.method else "")
            lines.append(f"[brackets: {first.confidence:.0%} interval for the population value, "
                         f"{first.n_resamples} bootstrap resamples, {first.method}{extra}; "
                         "see featsim.metrics.resample]")
        lines += [f"  ({i}) {note}" for i, note in enumerate(notes, 1)]
        lines += [f"  note: {fact}" for fact in self.facts]
        return "\n".join(lines)

    def _interval_text(self, name: str, notes: list[str]) -> str:
        interval = self.ci.get(name)
        if interval is None:
            return ""
        text = f"  [{interval.low:.6g}, {interval.high:.6g}]"
        if interval.note:
            notes.append(f"{name}: {interval.note}")
            text += f" ({len(notes)})"
        return text

    def _fmt(self, name: str, notes: list[str]) -> str:
        return f"{getattr(self, name):.6g}" + self._interval_text(name, notes)


# Quantities whose population value cannot be negative: intervals are clamped at 0 there.
_INTERVAL_FIELDS = ("distance", "distance_source", "distance_target", "ratio",
                    "energy_distance", "energy_coefficient", "distance_cosine", "fid", "kid")


def _interval_note(name: str, estimate: float, est, *, n: int, m: int, dim: int) -> str:
    """Why an interval does not contain the printed estimate (empty when it does)."""
    notes = []
    if name == "fid" and min(n, m) <= dim:
        notes.append(f"n <= d ({min(n, m)} <= {dim}): FID's bias is not linear in 1/n here, "
                     "so the bias-corrected interval is not calibrated (see "
                     "benchmarks/results/coverage.json); compare FIDs only at equal n")
    if est.low <= estimate <= est.high or not np.isfinite(est.low):
        pass
    elif name == "fid":
        notes.append(f"plain FID is biased upwards at finite n; the interval is around the "
                     f"jackknife bias-corrected FID {est.centre:.6g}")
    elif name == "energy_distance":
        notes.append(f"the printed V-statistic is biased upwards by W_s/n + W_t/m; the "
                     f"interval is around the unbiased U-statistic {est.centre:.6g}")
    elif name == "energy_coefficient":
        notes.append(f"the printed E/(2D) uses the upward-biased V-statistic E; the interval "
                     f"is around the U-statistic form {est.centre:.6g}")
    elif name == "kid":
        notes.append(f"the printed KID averages random subsets; the interval is around the "
                     f"all-rows unbiased MMD^2 {est.centre:.6g}")
    else:
        notes.append(f"skewed bootstrap distribution: the {est.method} interval, which "
                     f"corrects the bias the bootstrap sees, excludes {estimate:.6g}")
    if est.clamped:
        notes.append("an end was clamped to the quantity's range (it cannot be negative)")
    if est.n_failed:
        notes.append(f"{est.n_failed} of {est.n_resamples} resamples had a within-set term "
                     "with one distinct row (not finite) and were left out")
    return "; ".join(notes)


def similarity_report(
    source,
    target,
    *,
    stats: StatOptions = DEFAULT_STATS,
    progress: bool | None = None,
    share=LOCAL,
) -> SimilarityReport:
    """Computes every featsim metric between two feature sets.

    Args:
      source: float array ``[n, d]`` (e.g. ImageNet-image features).
      target: float array ``[m, d]`` (e.g. chest X-ray features).
      stats: the statistics options (:class:`~featsim.metrics.StatOptions`; default: no
        intervals, no test):

        * ``metric``: pairwise metric of D and the energy distance (see ``average_distance``).
        * ``n_bootstrap``: resamples for the intervals of D, both baselines, ratio, energy
          distance and coefficient, cosine D and KID (0: no intervals at all). They reuse one
          set of float64 distance/kernel matrices (``featsim.metrics.TwoSampleResampler``), so
          200 resamples cost about as much as the metrics themselves. FID's interval is a
          20-group jackknife (40 FID evaluations from Gram pieces) whatever ``n_bootstrap``.
        * ``n_permutations``: permutations for the energy-distance test of equal
          distributions (0: none).
        * ``confidence``: level of the intervals.
        * ``ci_method``: ``"basic"`` (default), ``"percentile"`` or ``"BCa"`` for the bootstrap
          intervals (see ``featsim.metrics.resampled_intervals``; the coverage each reaches is
          in benchmarks/results/coverage.json). Every interval is for the population value;
          one that excludes the printed estimate (the biased V-statistic energy distance,
          plain FID) says why in its ``note``; nonnegative quantities are clamped at 0.
        * ``kid_subset_size``, ``kid_subsets``: KID subsets (the size is clamped to the smaller
          set, with a warning).
        * ``seed``: seed of the KID subsets, bootstrap and permutations.
      progress: progress bars for the resampling phases (shown only on a TTY; False: never).
      share: the processes of a ``jax.distributed`` run (``featsim.parallel.process_share()``)
        splitting the euclidean distance tiles, KID, the bootstrap resamples, the FID
        jackknife and FID_infinity; every process passes the same arrays and gets the
        one-process report exactly. The float64 Gram matrices of the intervals, FID and the
        permutation test run whole on every process. Default ``featsim.parallel.LOCAL``: all here.

    Returns:
      A ``SimilarityReport``.

    Raises:
      ValueError: bad shapes, NaN/inf rows, mismatched dims (from ``featsim.metrics``).
    """
    if not isinstance(stats, StatOptions):
        raise TypeError(f"stats must be a featsim.metrics.StatOptions, got "
                        f"{type(stats).__name__}")
    metric, n_bootstrap, n_permutations = stats.metric, stats.n_bootstrap, stats.n_permutations
    confidence, seed = stats.confidence, stats.seed
    summary = metrics.distance_summary(source, target, metric=metric, share=share)
    with warnings.catch_warnings():  # both facts go into the report (`facts`), not stderr
        warnings.simplefilter("ignore", metrics.FIDRankWarning)
        warnings.filterwarnings("ignore", message=r"subset_size=\d+ is larger than the smaller")
        details = metrics.fid_details(source, target)
        kid = metrics.kid(source, target, subset_size=stats.kid_subset_size,
                          num_subsets=stats.kid_subsets, seed=seed, share=share)
    ci = {}
    resampler = None
    n, m, dim = summary.n_x, summary.n_y, details.dim
    if n_bootstrap:
        resampler = metrics.TwoSampleResampler(source, target, metric=metric)
        estimates = metrics.resampled_intervals(
            source, target, metric=metric, n_resamples=n_bootstrap, confidence=confidence,
            method=stats.ci_method, seed=seed, progress=progress, resampler=resampler,
            share=share)
        printed = {"distance": summary.between, "distance_source": summary.within_x,
                   "distance_target": summary.within_y, "ratio": summary.ratio,
                   "energy_distance": summary.energy,
                   "energy_coefficient": summary.energy_coefficient, "fid": details.value,
                   "kid": float(kid.mean)}
        cosine = metrics.average_distance(source, target, metric="cosine")
        printed["distance_cosine"] = cosine
        for name in _INTERVAL_FIELDS:
            est = estimates[name]
            centre = est.centre if name in ("energy_distance", "energy_coefficient", "fid",
                                            "kid") else None
            ci[name] = Interval(est.low, est.high, confidence, est.n_resamples, est.method,
                                centre=centre, clamped=est.clamped,
                                note=_interval_note(name, printed[name], est, n=n, m=m,
                                                    dim=dim))
    else:
        cosine = metrics.average_distance(source, target, metric="cosine")
    fid_inf = None
    if min(n, m) >= 4 and (resampler is not None or (min(n, m) <= dim and n + m <= 5000)):
        fid_inf = metrics.fid_infinity(source, target, seed=seed, resampler=resampler,
                                       share=share).value
    pvalue = None
    if n_permutations:
        pvalue = metrics.permutation_test(_energy(metric), source, target,
                                          n_permutations=n_permutations, seed=seed).pvalue
    return SimilarityReport(
        metric=metric,
        n_source=n,
        n_target=m,
        dim=dim,
        distance=summary.between,
        distance_source=summary.within_x,
        distance_target=summary.within_y,
        ratio=summary.ratio,
        energy_distance=summary.energy,
        energy_coefficient=summary.energy_coefficient,
        distance_cosine=cosine,
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
        energy_distance_unbiased=2.0 * summary.between - summary.within_x - summary.within_y,
        fid_infinity=fid_inf,
        kid_subset_size_requested=int(stats.kid_subset_size),
    )


def _energy(metric):
    def fn(x, y):
        return metrics.energy_distance(x, y, metric=metric)
    return fn
