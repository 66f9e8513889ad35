"""Confidence intervals for two-set statistics from weights on precomputed float64 pieces.

A resample of two feature sets is a vector of counts ``w`` over the rows of x and ``v`` over
the rows of y (multinomial: the bootstrap; 0/1: jackknife groups and subsamples). Every
statistic here is a function of weighted sums over float64 matrices computed **once**, so a
resample costs matrix-vector work instead of recomputing the metric from the rows:

  * pairwise statistics (D, both within-set baselines, ratio, energy distance, energy
    coefficient) from the distance matrices ``Kxy [n, m]``, ``Kxx [n, n]``, ``Kyy [m, m]``
    (zero diagonals); cosine D from weighted means of unit rows; KID's MMD^2 from the cubic
    polynomial kernel matrices. Many resamples at once are the products ``W @ K``;
  * FID from centred Gram pieces (``n, m <= d``: tr sqrt(Sx Sy) is the nuclear norm of the
    weighted, re-centred cross Gram, an eigenproblem of size min(n, m)) or from weighted d x d
    covariances (``d < min(n, m)``).

Duplicates. Resampling with replacement puts copies of one original row into the sample. The
within-set terms are U-statistics over pairs i != j, and a copy paired with itself is a pair
at distance 0 that no sample of distinct draws contains; here such pairs are excluded:

    within_x(w) = sum_{i != j} w_i w_j Kxx_ij / ((sum w)^2 - sum w^2)

(the diagonal of Kxx is 0 and every remaining pair is two distinct original rows). The same
holds for the within-set kernel sums of MMD^2. Measured effect (benchmarks/coverage.py): the
ratio's interval covered its population value in 35 % of trials at n = 30 with the
duplicate-contaminated bootstrap; see benchmarks/results/coverage.json for these methods.

Targets. Each interval is for the **population** value of its statistic:

  * D, within D, ratio, cosine D: weighted bootstrap (above) of the U-statistics the report
    prints, basic (reverse percentile) interval by default (Efron & Tibshirani 1993, ch. 13).
  * energy distance and energy coefficient: the report prints the V-statistic
    ``2 D - D(X, X) - D(Y, Y)`` (self-pairs included, >= 0), whose expectation exceeds the
    population value by ``W_x / n + W_y / m`` (W the within-set mean distances). The interval
    is the bootstrap interval of the unbiased U-statistic ``2 D - W_x - W_y`` (and of
    ``E_U / (2 D)``), so it can lie below the printed V-statistic; it then carries a note.
  * KID: bootstrap of the all-rows unbiased MMD^2 (``polynomial_mmd2``), whose expectation is
    that of the report's subset mean.
  * FID: plain FID is biased upwards by O(1/n + 1/m). The interval is a delete-a-group
    jackknife (Quenouille 1956; Efron & Stein 1981): each set split into ``g`` random groups,
    FID recomputed without each group; bias-corrected estimate
    ``FID_J = FID - (g - 1) [(mean_k FID_(-k,x) - FID) + (mean_k FID_(-k,y) - FID)]`` (removes
    the 1/n and 1/m terms exactly), standard error from the same values, interval
    ``FID_J +- t_{g-1} se``. It usually lies below plain FID and carries a note.
    ``fid_infinity`` (Chong & Forsyth 2020, "Effectively Unbiased FID and Inception Score and
    where to find them", CVPR) extrapolates FID on subsamples to infinite n.

Every interval whose quantity cannot be negative is clamped at 0 (the energy coefficient also
at 1), recorded in ``clamped``; an interval that does not contain the printed estimate gets a
``note`` saying why.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import sys
import warnings

import numpy as np
import scipy.spatial.distance
import scipy.stats

from featsim.metrics._validation import as_features, check_same_dim
from featsim.parallel import LOCAL

__all__ = [
    "INTERVAL_METHODS",
    "PAIRWISE_STATISTICS",
    "FIDInfinity",
    "IntervalEstimate",
    "TwoSampleResampler",
    "distance_matrix_from_gram",
    "fid_infinity",
    "pairwise_forms",
    "resampled_intervals",
]

INTERVAL_METHODS = ("basic", "percentile", "BCa")
PAIRWISE_STATISTICS = ("distance", "distance_source", "distance_target", "ratio",
                       "energy_distance", "energy_coefficient", "distance_cosine", "kid")
# Population values that cannot be negative (all here) and those bounded by 1.
_UPPER_ONE = ("energy_coefficient",)
# float64 matrices the resampler may hold ((n + m)^2 entries twice: distances and KID kernel).
_MATRIX_BYTES = 3 * 2**30
_BATCH = 50  # resamples per matrix product


@dataclasses.dataclass(frozen=True)
class IntervalEstimate:
    """One statistic's interval.

    Attributes:
      centre: the estimate the interval is built around (the unbiased form: U-statistic,
        all-rows MMD^2_u, jackknife bias-corrected FID), float.
      low, high: interval ends after clamping.
      std: bootstrap (or jackknife) standard error.
      method: ``"basic"``, ``"percentile"``, ``"BCa"`` or ``"jackknife-t"``.
      n_resamples: bootstrap resamples (FID: jackknife evaluations).
      clamped: True when an end was moved to the quantity's range ([0, inf), [0, 1]).
      n_failed: resamples whose statistic was not finite (e.g. a within-set term with a
        single distinct row); they are left out of the quantiles and counted here.
    """

    centre: float
    low: float
    high: float
    std: float
    method: str
    n_resamples: int
    clamped: bool = False
    n_failed: int = 0


@dataclasses.dataclass(frozen=True)
class FIDInfinity:
    """Chong & Forsyth's FID_infinity: FID on subsamples, linear in 1/N, extrapolated.

    Attributes:
      value: the intercept (FID at 1/N = 0).
      slope: the fitted coefficient of 1/N (N = the smaller subsample's size).
      sizes: subsample sizes N (of the smaller set) used in the fit.
      fids: mean FID at each size.
    """

    value: float
    slope: float
    sizes: tuple[int, ...]
    fids: tuple[float, ...]


# --------------------------------------------------------------------------------------------
# Precomputed pieces.
# --------------------------------------------------------------------------------------------


def pairwise_forms(between, within_x, within_y, energy) -> dict:
    """D, both within-set distances, their ratio, the energy distance and its coefficient
    from the pair means (arrays of resamples or scalars); shared by both resampling engines,
    which differ only in how they estimate the terms."""
    return {
        "distance": between,
        "distance_source": within_x,
        "distance_target": within_y,
        "ratio": between / (0.5 * (within_x + within_y)),
        "energy_distance": energy,
        "energy_coefficient": energy / (2.0 * between),
    }


def distance_matrix_from_gram(a, b, gab, sqa, sqb, metric, same):
    """float64 distances ``[len(a), len(b)]`` from Gram pieces (the one builder of the
    resampling engines: :class:`TwoSampleResampler` and ``featsim.metrics.paired``).

    Args:
      a, b: the rows (used only by metrics without a Gram form, through ``cdist``).
      gab: ``a @ b.T`` (euclidean forms: of rows centred on a common mean; cosine: raw).
      sqa, sqb: the squared row norms of the same rows as ``gab``.
      metric: ``euclidean``, ``sqeuclidean``, ``cosine`` or a ``cdist`` metric.
      same: ``b`` is ``a`` (the diagonal is set to 0).
    """
    if metric in ("euclidean", "sqeuclidean"):
        sq = sqa[:, None] + sqb[None, :] - 2.0 * gab
        np.maximum(sq, 0.0, out=sq)
        out = np.sqrt(sq) if metric == "euclidean" else sq
    elif metric == "cosine":
        na, nb = np.sqrt(sqa), np.sqrt(sqb)
        out = np.clip(1.0 - gab / na[:, None] / nb[None, :], 0.0, 2.0)
    else:
        out = scipy.spatial.distance.cdist(a, b, metric)
    if same:
        np.fill_diagonal(out, 0.0)
    return out


class TwoSampleResampler:
    """Float64 pieces of two feature sets, and every statistic of a weighted resample.

    Built once (O((n + m)^2 d) for the Gram matrices); the statistics of ``r`` resamples then
    cost O(r (n + m)^2) (pairwise, KID) and one eigenproblem of size ``min(n', m', d)`` per
    resample for FID (n', m' the rows with non-zero weight).

    Args:
      x: float array ``[n, d]``, n >= 2; y: float array ``[m, d]``, m >= 2.
      metric: pairwise metric of D (``euclidean``, ``sqeuclidean``, ``cosine``, ``cityblock``).

    Raises:
      ValueError: bad shapes or values (see ``as_features``), different d, or matrices over
        ``_MATRIX_BYTES`` (the message gives the sizes).
    """

    def __init__(self, x, y, *, metric: str = "euclidean"):
        x = as_features(x, "x")
        y = as_features(y, "y")
        check_same_dim(x, y)
        n, m, d = x.shape[0], y.shape[0], x.shape[1]
        need = 2 * 8 * (n + m) ** 2
        if need > _MATRIX_BYTES:
            raise ValueError(
                f"resampled intervals hold float64 [n + m]^2 matrices: x {tuple(x.shape)} and "
                f"y {tuple(y.shape)} need {need / 2**30:.1f} GiB (> "
                f"{_MATRIX_BYTES / 2**30:.0f} GiB); subsample the sets or ask for no bootstrap")
        self.n, self.m, self.d, self.metric = n, m, d, metric
        x64, y64 = np.asarray(x, np.float64), np.asarray(y, np.float64)
        centre = (x64.sum(0) + y64.sum(0)) / (n + m)
        xc, yc = x64 - centre, y64 - centre  # removes cancellation in |a|^2 + |b|^2 - 2 a.b
        self.xc, self.yc = xc, yc
        self.gxx, self.gyy, self.gxy = xc @ xc.T, yc @ yc.T, xc @ yc.T
        sqx, sqy = np.diag(self.gxx).copy(), np.diag(self.gyy).copy()
        self.sqx, self.sqy = sqx, sqy
        if metric == "cosine":  # cosine is not translation invariant: raw Grams
            gxx, gyy, gxy = x64 @ x64.T, y64 @ y64.T, x64 @ y64.T
            rx, ry = np.diag(gxx).copy(), np.diag(gyy).copy()
        else:
            gxx, gyy, gxy, rx, ry = self.gxx, self.gyy, self.gxy, sqx, sqy
        self.kxx = distance_matrix_from_gram(x64, x64, gxx, rx, rx, metric, True)
        self.kyy = distance_matrix_from_gram(y64, y64, gyy, ry, ry, metric, True)
        self.kxy = distance_matrix_from_gram(x64, y64, gxy, rx, ry, metric, False)
        self.ux = x64 / np.linalg.norm(x64, axis=1, keepdims=True)
        self.uy = y64 / np.linalg.norm(y64, axis=1, keepdims=True)
        # KID's cubic kernel (a.b / d + 1)^3 on the raw rows: raw a.b from the centred Gram.
        cx, cy = xc @ centre, yc @ centre
        cc = centre @ centre
        self.pxx = _cubic(self.gxx + cx[:, None] + cx[None, :] + cc, d)
        self.pyy = _cubic(self.gyy + cy[:, None] + cy[None, :] + cc, d)
        self.pxy = _cubic(self.gxy + cx[:, None] + cy[None, :] + cc, d)
        np.fill_diagonal(self.pxx, 0.0)
        np.fill_diagonal(self.pyy, 0.0)

    # ---- pairwise statistics and KID ----------------------------------------------------

    def pairwise(self, w: np.ndarray, v: np.ndarray) -> dict[str, np.ndarray]:
        """Every pairwise statistic of resamples given as counts ``w [r, n]``, ``v [r, m]``.

        Returns float64 ``[r]`` arrays keyed by ``PAIRWISE_STATISTICS``, plus
        ``energy_distance_v`` (the V-statistic the report prints). Unweighted (all ones), the
        values equal ``distance_summary``'s U-statistics and ``polynomial_mmd2``.
        """
        w, v = np.atleast_2d(np.asarray(w, np.float64)), np.atleast_2d(np.asarray(v, np.float64))
        sw, sv = w.sum(1), v.sum(1)
        px, py = sw * sw - (w * w).sum(1), sv * sv - (v * v).sum(1)
        wk = w @ self.kxy
        sxy = np.einsum("rj,rj->r", wk, v)
        sxx = np.einsum("ri,ri->r", w @ self.kxx, w)
        syy = np.einsum("ri,ri->r", v @ self.kyy, v)
        kxy = np.einsum("rj,rj->r", w @ self.pxy, v)
        kxx = np.einsum("ri,ri->r", w @ self.pxx, w)
        kyy = np.einsum("ri,ri->r", v @ self.pyy, v)
        mux = (w @ self.ux) / sw[:, None]
        muy = (v @ self.uy) / sv[:, None]
        return _pairwise_from_sums(sw, sv, px, py, sxy, sxx, syy, kxy, kxx, kyy,
                                   1.0 - np.einsum("rd,rd->r", mux, muy))

    def pairwise_jackknife(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Leave-one-row-out values of every pairwise statistic: ``(over x [n], over y [m])``.

        Exact, from row sums (O((n + m)^2) in all).
        """
        n, m = self.n, self.m
        rxy, cxy = self.kxy.sum(1), self.kxy.sum(0)
        rxx, ryy = self.kxx.sum(1), self.kyy.sum(1)
        qxy, qyx = self.pxy.sum(1), self.pxy.sum(0)
        qxx, qyy = self.pxx.sum(1), self.pyy.sum(1)
        sxy, sxx, syy = rxy.sum(), rxx.sum(), ryy.sum()
        kxy, kxx, kyy = qxy.sum(), qxx.sum(), qyy.sum()
        ux_sum, uy_sum = self.ux.sum(0), self.uy.sum(0)
        out_x = _pairwise_from_sums(
            np.full(n, n - 1.0), np.full(n, float(m)), np.full(n, (n - 1.0) * (n - 2.0)),
            np.full(n, m * (m - 1.0)), sxy - rxy, sxx - 2 * rxx, np.full(n, syy),
            kxy - qxy, kxx - 2 * qxx, np.full(n, kyy),
            1.0 - ((ux_sum[None, :] - self.ux) / (n - 1.0)) @ (uy_sum / m))
        out_y = _pairwise_from_sums(
            np.full(m, float(n)), np.full(m, m - 1.0), np.full(m, n * (n - 1.0)),
            np.full(m, (m - 1.0) * (m - 2.0)), sxy - cxy, np.full(m, sxx), syy - 2 * ryy,
            kxy - qyx, np.full(m, kxx), kyy - 2 * qyy,
            1.0 - ((uy_sum[None, :] - self.uy) / (m - 1.0)) @ (ux_sum / n))
        return {k: (out_x[k], out_y[k]) for k in out_x}

    # ---- FID ------------------------------------------------------------------------------

    def fid(self, w, v) -> float:
        """FID of the resample with row counts ``w [n]`` and ``v [m]`` (each sum >= 2).

        The same number as ``featsim.metrics.fid`` on the rows repeated by their counts
        (covariances with the ``sum(w) - 1`` denominator), computed from the Gram pieces when
        ``d >= min(n', m')`` (n', m' rows with non-zero count) and from weighted d x d
        covariances otherwise.
        """
        w, v = np.asarray(w, np.float64), np.asarray(v, np.float64)
        ix, iy = np.flatnonzero(w), np.flatnonzero(v)
        w, v = w[ix], v[iy]
        sw, sv = w.sum(), v.sum()
        if self.d >= min(ix.size, iy.size):
            gxy = self.gxy[np.ix_(ix, iy)]
            gxx_w = self.gxx[np.ix_(ix, ix)] @ w
            gyy_v = self.gyy[np.ix_(iy, iy)] @ v
            mxx, myy = w @ gxx_w / sw**2, v @ gyy_v / sv**2  # |mean_x|^2, |mean_y|^2
            gv, wg = gxy @ v / sv, w @ gxy / sw
            mxy = wg @ v / sv
            mean_term = mxx + myy - 2.0 * mxy
            tr_x = (w @ self.sqx[ix] - sw * mxx) / (sw - 1.0)
            tr_y = (v @ self.sqy[iy] - sv * myy) / (sv - 1.0)
            cross = gxy - gv[:, None] - wg[None, :] + mxy
            cross *= np.sqrt(w)[:, None]
            cross *= np.sqrt(v)[None, :]
            small = cross @ cross.T if ix.size <= iy.size else cross.T @ cross
            ev = np.linalg.eigvalsh(small)
            trace_sqrt = np.sqrt(np.maximum(ev, 0.0)).sum() / math.sqrt((sw - 1.0) * (sv - 1.0))
        else:
            a, b = self.xc[ix], self.yc[iy]
            mx, my = w @ a / sw, v @ b / sv
            ac, bc = a - mx, b - my
            sx = (ac * w[:, None]).T @ ac / (sw - 1.0)
            sy = (bc * v[:, None]).T @ bc / (sv - 1.0)
            mean_term = float((mx - my) @ (mx - my))
            tr_x, tr_y = np.trace(sx), np.trace(sy)
            lam, vec = np.linalg.eigh(sx)
            half = vec * np.sqrt(np.maximum(lam, 0.0))
            ev = np.linalg.eigvalsh(half.T @ sy @ half)
            trace_sqrt = np.sqrt(np.maximum(ev, 0.0)).sum()
        return float(mean_term + tr_x + tr_y - 2.0 * trace_sqrt)

    def fid_jackknife(self, *, groups: int = 20, seed=0, progress=None, share=LOCAL):
        """Delete-a-group jackknife of FID: ``(fid_j, se, dof, n_evaluations)``.

        Each set is split into ``min(groups, rows)`` random groups of near-equal size; FID is
        recomputed without each group of x (all of y) and without each group of y. With
        ``theta`` the plain FID and ``g`` groups, ``fid_j = theta - (g - 1) sum_s (mean_k
        theta_(-k,s) - theta)`` and ``se^2 = sum_s (g - 1) / g sum_k (theta_(-k,s) -
        mean)^2``; ``dof = min(g_x, g_y) - 1`` (for a t quantile). ``share``: the
        processes of a distributed run split the deleted groups (see ``resampled_intervals``).
        """
        rng = np.random.default_rng(seed)
        full_x, full_y = np.ones(self.n), np.ones(self.m)
        theta = self.fid(full_x, full_y)
        parts, bias, var, dof = [], 0.0, 0.0, None
        for size in (self.n, self.m):
            g = min(groups, size)
            labels = rng.permutation(np.arange(size) % g)
            parts.append((size, g, labels))
            dof = g - 1 if dof is None else min(dof, g - 1)
        bar = _progress(sum(p[1] for p in parts), "FID jackknife", progress)
        tasks = [(side, k) for side, (_, g, _) in enumerate(parts) for k in range(g)]
        done = {}
        for task, (side, k) in enumerate(tasks):
            if share.owns(task):
                keep = (parts[side][2] != k).astype(np.float64)
                done[task] = self.fid(keep, full_y) if side == 0 else self.fid(full_x, keep)
            bar.update(1)
        done = share.gather(done)
        for side, (_size, g, _labels) in enumerate(parts):
            values = np.array([done[t] for t, (s, _) in enumerate(tasks) if s == side])
            bias += (g - 1) * (values.mean() - theta)
            var += (g - 1) / g * np.sum((values - values.mean()) ** 2)
        bar.close()
        return theta - bias, math.sqrt(var), dof, sum(p[1] for p in parts)


def _cubic(gram, d):
    t = gram / d + 1.0
    return t * t * t


def _pairwise_from_sums(sw, sv, px, py, sxy, sxx, syy, kxy, kxx, kyy, cosine):
    with np.errstate(divide="ignore", invalid="ignore"):
        between = sxy / (sw * sv)
        wx, wy = sxx / px, syy / py
        energy = 2.0 * between - wx - wy
        return {
            **pairwise_forms(between, wx, wy, energy),
            "distance_cosine": cosine,
            "kid": kxx / px + kyy / py - 2.0 * kxy / (sw * sv),
            "energy_distance_v": 2.0 * between - sxx / (sw * sw) - syy / (sv * sv),
        }


def _progress(total: int, desc: str, progress):
    """tqdm bar on stderr, shown only when ``progress`` is not False and stderr is a TTY."""
    from tqdm.auto import tqdm

    disable = progress is False or not sys.stderr.isatty()
    return tqdm(total=total, desc=desc, disable=disable, leave=False, file=sys.stderr)


# --------------------------------------------------------------------------------------------
# Intervals.
# --------------------------------------------------------------------------------------------


def _bootstrap_counts(rng, size: int, r: int) -> np.ndarray:
    return rng.multinomial(size, np.full(size, 1.0 / size), size=r).astype(np.float64)


def _interval_from(centre, dist, jack, confidence, method):
    """(low, high) of one statistic from its bootstrap distribution (finite values only)."""
    alpha = (1.0 - confidence) / 2.0
    if method == "percentile":
        return tuple(np.quantile(dist, [alpha, 1.0 - alpha]))
    if method == "basic":
        lo, hi = np.quantile(dist, [alpha, 1.0 - alpha])
        return 2.0 * centre - hi, 2.0 * centre - lo
    # BCa (Efron 1987) with the two-sample jackknife acceleration.
    prop = (np.sum(dist < centre) + 0.5 * np.sum(dist == centre)) / dist.size
    z0 = scipy.stats.norm.ppf(np.clip(prop, 1.0 / (2 * dist.size), 1 - 1.0 / (2 * dist.size)))
    num, den = 0.0, 0.0
    for values in jack:
        values = values[np.isfinite(values)]
        if values.size < 2:
            continue
        u = (values.size - 1) * (values.mean() - values)
        num += np.sum(u**3)
        den += np.sum(u**2)
    a = num / (6.0 * den**1.5) if den > 0 else 0.0
    z = scipy.stats.norm.ppf([alpha, 1.0 - alpha])
    adj = scipy.stats.norm.cdf(z0 + (z0 + z) / (1.0 - a * (z0 + z)))
    return tuple(np.quantile(dist, adj))


def _clamp(name, low, high):
    top = 1.0 if name in _UPPER_ONE else math.inf
    new_low, new_high = min(max(low, 0.0), top), min(max(high, 0.0), top)
    return new_low, new_high, (new_low, new_high) != (low, high)


def resampled_intervals(
    x,
    y,
    *,
    metric: str = "euclidean",
    n_resamples: int = 200,
    confidence: float = 0.95,
    method: str = "basic",
    fid_groups: int = 20,
    seed=0,
    progress=None,
    resampler: TwoSampleResampler | None = None,
    share=LOCAL,
) -> dict[str, IntervalEstimate]:
    """Intervals for the population values of every two-set statistic of the report.

    Pairwise statistics and KID: ``n_resamples`` bootstrap resamples of both sets (counts
    drawn independently per set), self-pairs of one original row excluded from the within-set
    terms, interval by ``method``: ``"basic"`` (reverse percentile, default), ``"percentile"``
    or ``"BCa"`` (acceleration from the exact leave-one-row-out jackknife). FID: the
    delete-a-group jackknife-t interval (see the module docstring), whatever ``method``.
    Measured coverage: benchmarks/results/coverage.json.

    Args:
      x: float array ``[n, d]``, n >= 2; y: float array ``[m, d]``, m >= 2.
      metric: pairwise metric of D.
      n_resamples: bootstrap resamples, >= 1.
      confidence: in (0, 1).
      method: one of ``INTERVAL_METHODS`` (case-insensitive).
      fid_groups: jackknife groups per set for FID (clamped to the row counts).
      seed: seed of the counts and the jackknife groups.
      progress: show a tqdm bar (None: only on a TTY).
      resampler: a ``TwoSampleResampler`` of (x, y, metric) to reuse.
      share: the processes of a ``jax.distributed`` run splitting the resamples
        (``featsim.parallel.process_share()``, or any object with ``owns(task)`` and
        ``gather({task: value})``). Every process draws the same counts from ``seed`` and
        evaluates its chunks of resamples and jackknife groups; all return the one-process
        intervals exactly. Default ``featsim.parallel.LOCAL``: all here.

    Returns:
      name -> :class:`IntervalEstimate` for ``PAIRWISE_STATISTICS`` and ``"fid"``.

    Raises:
      ValueError: bad inputs (see ``TwoSampleResampler``), ``n_resamples < 1``,
        ``confidence`` outside (0, 1), or an unknown ``method``.

    Example:
      >>> rng = np.random.default_rng(0)
      >>> x, y = rng.normal(size=(200, 8)), rng.normal(0.5, size=(150, 8))
      >>> ci = resampled_intervals(x, y, n_resamples=100, progress=False)
      >>> bool(ci["distance"].low < ci["distance"].centre < ci["distance"].high)
      True
    """
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, numbers.Integral) \
            or n_resamples < 1:
        raise ValueError(f"n_resamples must be an integer >= 1, got {n_resamples!r}")
    if not (isinstance(confidence, numbers.Real) and 0.0 < confidence < 1.0):
        raise ValueError(f"confidence must be in (0, 1) (exclusive), got {confidence!r}")
    matches = [mth for mth in INTERVAL_METHODS if str(method).lower() == mth.lower()]
    if not matches:
        raise ValueError(f"method must be one of {INTERVAL_METHODS}, got {method!r}")
    method = matches[0]
    rs = resampler if resampler is not None else TwoSampleResampler(x, y, metric=metric)
    rng = np.random.default_rng(seed)
    fid_seed = int(rng.integers(2**63))
    out = _pairwise_intervals(rs, rng, n_resamples, confidence, (method,), progress,
                              share)[method]
    out["fid"] = _fid_interval(rs, confidence, fid_groups, fid_seed, progress, share)
    return out


def _pairwise_intervals(rs, rng, n_resamples, confidence, methods, progress, share=LOCAL):
    """method -> name -> IntervalEstimate for PAIRWISE_STATISTICS, one set of resamples."""
    full = rs.pairwise(np.ones(rs.n), np.ones(rs.m))
    done = {}
    bar = _progress(n_resamples, "bootstrap", progress)
    for task, start in enumerate(range(0, n_resamples, _BATCH)):
        r = min(_BATCH, n_resamples - start)
        # Every process draws every chunk's counts (the same stream), computes its own.
        w, v = _bootstrap_counts(rng, rs.n, r), _bootstrap_counts(rng, rs.m, r)
        if share.owns(task):
            done[task] = rs.pairwise(w, v)
        bar.update(r)
    bar.close()
    done = share.gather(done)
    chunks = [done[t] for t in sorted(done)]
    jack = rs.pairwise_jackknife() if "BCa" in methods else {}
    out = {method: {} for method in methods}
    for name in PAIRWISE_STATISTICS:
        dist = np.concatenate([c[name] for c in chunks])
        ok = np.isfinite(dist)
        centre = float(full[name][0])
        for method in methods:
            if ok.sum() < 2 or not math.isfinite(centre):
                low = high = std = math.nan
            else:
                low, high = _interval_from(centre, dist[ok], jack.get(name, ()), confidence,
                                           method)
                std = float(np.std(dist[ok], ddof=1))
            low, high, clamped = _clamp(name, float(low), float(high)) \
                if math.isfinite(low) else (low, high, False)
            out[method][name] = IntervalEstimate(centre, low, high, std, method,
                                                 int(n_resamples), clamped, int((~ok).sum()))
    return out


def _fid_interval(rs, confidence, groups, seed, progress, share=LOCAL):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        fid_j, se, dof, evals = rs.fid_jackknife(groups=groups, seed=seed, progress=progress,
                                                 share=share)
    t = scipy.stats.t.ppf(0.5 + confidence / 2.0, max(dof, 1))
    low, high, clamped = _clamp("fid", fid_j - t * se, fid_j + t * se)
    return IntervalEstimate(float(fid_j), low, high, float(se), "jackknife-t", evals, clamped)


def fid_infinity(
    x,
    y,
    *,
    fractions=(0.5, 0.5625, 0.625, 0.6875, 0.75, 0.8125, 0.875, 0.9375, 1.0),
    draws: int = 2,
    seed=0,
    resampler: TwoSampleResampler | None = None,
    share=LOCAL,
) -> FIDInfinity:
    """FID_infinity (Chong & Forsyth 2020): FID extrapolated to infinitely many samples.

    FID of N-sample sets is, to first order, ``FID_inf + k / N``. For each fraction ``f``,
    ``draws`` random subsamples without replacement of ``round(f n)`` rows of x and
    ``round(f m)`` rows of y give a mean FID; a least-squares line in ``1 / N`` (N the
    smaller subsample) is extrapolated to ``1 / N = 0``. Chong & Forsyth fit 15 sizes of
    generated images against fixed real statistics; here both sets shrink by the same
    fraction, so both bias terms scale with ``1 / N``. Noisy for small n (it is an
    extrapolation); read it beside the plain FID, and compare values only at equal n when
    n <= d.

    Args:
      x: float array ``[n, d]``; y: float array ``[m, d]``; n, m >= 4.
      fractions: subsample fractions in (0, 1], at least two distinct sizes.
      draws: subsamples per fraction below 1.
      seed: seed of the subsamples.
      resampler: a ``TwoSampleResampler`` of (x, y) to reuse (its Gram pieces).
      share: processes splitting the subsamples, as in ``resampled_intervals``.

    Returns:
      A :class:`FIDInfinity`.

    Raises:
      ValueError: bad inputs, fewer than 4 rows, fractions outside (0, 1] or fewer than two
        distinct subsample sizes.
    """
    rs = resampler if resampler is not None else TwoSampleResampler(x, y)
    if min(rs.n, rs.m) < 4:
        raise ValueError(f"fid_infinity needs >= 4 rows per set, got n = {rs.n}, m = {rs.m}")
    fractions = np.asarray(fractions, np.float64)
    if fractions.ndim != 1 or np.any((fractions <= 0) | (fractions > 1)):
        raise ValueError(f"fractions must lie in (0, 1], got {fractions.tolist()}")
    rng = np.random.default_rng(seed)
    sizes, tasks, done = [], [], {}
    for f in fractions:
        nx, ny = max(2, round(f * rs.n)), max(2, round(f * rs.m))
        for _ in range(1 if (nx, ny) == (rs.n, rs.m) else draws):
            w, v = np.zeros(rs.n), np.zeros(rs.m)
            w[rng.choice(rs.n, nx, replace=False)] = 1.0
            v[rng.choice(rs.m, ny, replace=False)] = 1.0
            if share.owns(len(tasks)):
                done[len(tasks)] = rs.fid(w, v)
            tasks.append(len(sizes))
        sizes.append(min(nx, ny))
    done = share.gather(done)
    fids = [float(np.mean([done[t] for t, k in enumerate(tasks) if k == i]))
            for i in range(len(sizes))]
    if len(set(sizes)) < 2:
        raise ValueError(f"fractions {fractions.tolist()} give fewer than two distinct sizes")
    slope, intercept = np.polyfit(1.0 / np.asarray(sizes, np.float64), fids, 1)
    return FIDInfinity(float(intercept), float(slope), tuple(sizes), tuple(fids))
