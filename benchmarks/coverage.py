"""Do the report's intervals cover the population values? Coverage of nominal 95 % intervals.

Claim measured (issue 12): for every statistic of ``featsim.report.similarity_report`` (D,
both within-set baselines, ratio, energy distance, energy coefficient, cosine D, KID, FID),
the interval of ``featsim.metrics.resampled_intervals`` contains the population value in at
least 90 % of trials at n >= 200 (nominal 95 %).

Populations (d = 64; x and y independent, n = m rows each):
  * ``gaussian``: x ~ N(0.1, I), y ~ N(0.35, diag(s)) (means in every coordinate),
    s = linspace(0.6, 1.6, d);
  * ``student_t5``: the same location and scale with multivariate Student-t (5 dof) rows,
    heavier tails (covariance 5/3 of the scale matrix).
Population values: FID in closed form from the population means and covariances (FID is a
function of the first two moments, also for the t population); D, within D, cosine D and KID
(cubic kernel (a.b / d + 1)^3) by Monte Carlo over ``--mc`` independent pairs, each with its
Monte Carlo standard error in the JSON; ratio, energy distance and energy coefficient from
those.

Each trial draws fresh sets and computes the intervals once per method from the same
bootstrap resamples (basic, percentile, BCa; FID's jackknife-t is one method for all).
Reported per population, n and statistic: coverage, its binomial standard error
sqrt(p (1 - p) / trials), mean width, and how often the interval's low end was clamped at 0.

Usage:
  python benchmarks/coverage.py                   # writes benchmarks/results/coverage.json
  python benchmarks/coverage.py --quick           # seconds: checks the harness only
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
import zlib
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    # Small matrices: one BLAS thread per process was 5-25x faster on the shared 2-core box.
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

from featsim.metrics.resample import (  # noqa: E402
    INTERVAL_METHODS,
    TwoSampleResampler,
    _fid_interval,
    _pairwise_intervals,
)

ROOT = Path(__file__).resolve().parents[1]
DIM = 64
STATISTICS = ("distance", "distance_source", "distance_target", "ratio", "energy_distance",
              "energy_coefficient", "distance_cosine", "kid", "fid")


def _scale(d):
    return np.linspace(0.6, 1.6, d)


def sample(population: str, rng, n: int, d: int = DIM):
    """x [n, d], y [n, d] from ``population``."""
    mu, s = np.full(d, 0.25), _scale(d)
    zx, zy = rng.normal(size=(n, d)), rng.normal(size=(n, d))
    if population == "student_t5":
        zx /= np.sqrt(rng.chisquare(5, size=(n, 1)) / 5)
        zy /= np.sqrt(rng.chisquare(5, size=(n, 1)) / 5)
    elif population != "gaussian":
        raise ValueError(f"unknown population {population!r}")
    return 0.1 + zx, 0.1 + mu + zy * np.sqrt(s)


def population_values(population: str, mc: int, seed: int = 12345, chunk: int = 200_000):
    """Population value and Monte Carlo standard error of every statistic."""
    rng = np.random.default_rng(seed)
    d = DIM
    sums = {k: [] for k in ("dxy", "dxx", "dyy", "kxy", "kxx", "kyy")}
    ux_sum, uy_sum = np.zeros(d), np.zeros(d)
    done = 0
    while done < mc:
        r = min(chunk, mc - done)
        x1, y1 = sample(population, rng, r)
        x2, y2 = sample(population, rng, r)
        sums["dxy"].append(np.linalg.norm(x1 - y1, axis=1))
        sums["dxx"].append(np.linalg.norm(x1 - x2, axis=1))
        sums["dyy"].append(np.linalg.norm(y1 - y2, axis=1))
        sums["kxy"].append(((x1 * y2).sum(1) / d + 1) ** 3)
        sums["kxx"].append(((x1 * x2).sum(1) / d + 1) ** 3)
        sums["kyy"].append(((y1 * y2).sum(1) / d + 1) ** 3)
        ux = x1 / np.linalg.norm(x1, axis=1, keepdims=True)
        uy = y1 / np.linalg.norm(y1, axis=1, keepdims=True)
        ux_sum += ux.sum(0)
        uy_sum += uy.sum(0)
        done += r
    vals = {k: np.concatenate(v) for k, v in sums.items()}
    mean = {k: float(v.mean()) for k, v in vals.items()}
    se = {k: float(v.std(ddof=1) / math.sqrt(v.size)) for k, v in vals.items()}
    dxy, dxx, dyy = mean["dxy"], mean["dxx"], mean["dyy"]
    energy = 2 * dxy - dxx - dyy
    mu, s = np.full(d, 0.25), _scale(d)
    var = 5 / 3 if population == "student_t5" else 1.0  # covariance = var * scale matrix
    fid = float(mu @ mu + var * np.sum(1 + s - 2 * np.sqrt(s)))
    out = {
        "distance": (dxy, se["dxy"]),
        "distance_source": (dxx, se["dxx"]),
        "distance_target": (dyy, se["dyy"]),
        "ratio": (dxy / (0.5 * (dxx + dyy)), None),
        "energy_distance": (energy, math.sqrt(4 * se["dxy"] ** 2 + se["dxx"] ** 2
                                              + se["dyy"] ** 2)),
        "energy_coefficient": (energy / (2 * dxy), None),
        "distance_cosine": (float(1 - (ux_sum / mc) @ (uy_sum / mc)), None),
        "kid": (mean["kxx"] + mean["kyy"] - 2 * mean["kxy"],
                math.sqrt(se["kxx"] ** 2 + se["kyy"] ** 2 + 4 * se["kxy"] ** 2)),
        "fid": (fid, 0.0),
    }
    return {k: {"value": v, "mc_se": e} for k, (v, e) in out.items()}


def run(population, n, trials, n_resamples, truth, seed):
    rng = np.random.default_rng([seed, n, zlib.crc32(population.encode())])
    methods = INTERVAL_METHODS
    hits = {m: {k: 0 for k in STATISTICS} for m in methods}
    width = {m: {k: 0.0 for k in STATISTICS} for m in methods}
    clamped = {m: {k: 0 for k in STATISTICS} for m in methods}
    for _ in range(trials):
        x, y = sample(population, rng, n)
        rs = TwoSampleResampler(x, y)
        res = _pairwise_intervals(rs, rng, n_resamples, 0.95, methods, False)
        fid = _fid_interval(rs, 0.95, 20, int(rng.integers(2**63)), False)
        for m in methods:
            res[m]["fid"] = fid
            for k in STATISTICS:
                iv = res[m][k]
                hits[m][k] += int(iv.low <= truth[k]["value"] <= iv.high)
                width[m][k] += (iv.high - iv.low) / trials
                clamped[m][k] += int(iv.clamped)
    out = {}
    for m in methods:
        out[m] = {}
        for k in STATISTICS:
            p = hits[m][k] / trials
            out[m][k] = {"coverage": p, "se": math.sqrt(p * (1 - p) / trials),
                         "mean_width": width[m][k], "clamped": clamped[m][k]}
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sizes", default="30,200,1000")
    parser.add_argument("--trials", default="200,400,400", help="per size")
    parser.add_argument("--resamples", type=int, default=200)
    parser.add_argument("--mc", type=int, default=4_000_000)
    parser.add_argument("--populations", default="gaussian,student_t5")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path,
                        default=ROOT / "benchmarks" / "results" / "coverage.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.trials, args.resamples, args.mc = "30", "3", 20, 20_000
    sizes = [int(s) for s in args.sizes.split(",")]
    trials = [int(t) for t in args.trials.split(",")]
    if len(trials) != len(sizes):
        raise ValueError(f"--trials {args.trials} needs one count per size in {args.sizes}")
    t0 = time.perf_counter()
    result = {
        "claim": "nominal 0.95 intervals cover the population value in >= 0.90 of trials "
                 "for every statistic at n >= 200",
        "dim": DIM, "confidence": 0.95, "n_resamples": args.resamples, "fid_groups": 20,
        "estimators": {
            "distance, distance_source, distance_target": "U-statistics (within: pairs "
            "i != j); bootstrap excludes self-pairs of one original row",
            "energy_distance, energy_coefficient": "interval around the U-statistic "
            "2D - W_x - W_y (the report prints the V-statistic)",
            "kid": "all-rows unbiased MMD^2 (cubic kernel), bootstrap without self-pairs",
            "fid": "delete-a-group jackknife (20 groups per set): bias-corrected FID +- "
                   "t_19 se, the same for every method column"},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "quick": args.quick, "populations": {},
    }
    for population in args.populations.split(","):
        truth = population_values(population, args.mc)
        entry = {"population_values": truth, "mc_pairs": args.mc, "by_n": {}}
        for n, t in zip(sizes, trials, strict=True):
            t1 = time.perf_counter()
            entry["by_n"][str(n)] = {"trials": t, **run(population, n, t, args.resamples,
                                                         truth, args.seed)}
            entry["by_n"][str(n)]["seconds"] = time.perf_counter() - t1
            print(population, n, {k: round(v["coverage"], 3) for k, v in
                                  entry["by_n"][str(n)]["basic"].items()}, flush=True)
        result["populations"][population] = entry
    worst = {}
    for m in INTERVAL_METHODS:
        worst[m] = min((v[m][k]["coverage"], f"{pop} n={n} {k}")
                       for pop, e in result["populations"].items()
                       for n, v in e["by_n"].items() if int(n) >= 200 for k in STATISTICS) \
            if any(int(n) >= 200 for n in sizes) else None
    result["worst_at_n_ge_200"] = worst
    result["target_met"] = {m: (w is not None and w[0] >= 0.90) for m, w in worst.items()}
    result["seconds"] = time.perf_counter() - t0
    if not args.quick or args.out != parser.get_default("out"):
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"worst_at_n_ge_200": worst, "target_met": result["target_met"],
                      "seconds": result["seconds"]}, indent=2))
    return result


if __name__ == "__main__":
    main()
