"""Do `featsim compare`'s paired intervals of a change cover the population change?

Claim measured (issue 12): the paired bootstrap interval of ``after - before``
(:func:`featsim.metrics.paired.paired_resampling`, basic, nominal 95 %) contains the population
change of D, both within-domain distances and the ratio in at least 90 % of trials at n >= 200;
and excluding pairs of copies of one image from the within-set terms (the current engine)
covers at least as well as counting them as pairs at distance 0 (the engine before issue 15),
both measured here on the same draws.

Population (d = 16, n = m images per domain): before, x ~ N(0, I) and y ~ N(0.4, I); after,
a fixed map of each image, x -> 1.5 tanh(x), y -> 0.8 tanh(y) + 0.1 (a representation that
changes scale and shape, as fine-tuning does). Population changes of the U-statistics by
Monte Carlo on ``--mc`` x ``--mc`` images (``--mc-reps`` repetitions, their standard error in
the JSON). The energy distance is left out: the interval is of the printed V-statistic, whose
bias W/n changes with the representation, so it targets a slightly different quantity.

Usage:
  python benchmarks/paired_coverage.py           # writes benchmarks/results/paired_coverage.json
  python benchmarks/paired_coverage.py --quick   # seconds: checks the harness only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # small matrices: one BLAS thread is faster here

import numpy as np  # noqa: E402
from scipy.spatial.distance import cdist  # noqa: E402

from featsim.metrics import paired  # noqa: E402

STATISTICS = ("distance", "distance_source", "distance_target", "ratio")
DIM = 16


def _draw(rng, n):
    return rng.normal(size=(n, DIM)), rng.normal(0.4, 1.0, size=(n, DIM))


def _after(x, y):
    return 1.5 * np.tanh(x), 0.8 * np.tanh(y) + 0.1


def _u_statistics(x, y) -> dict[str, float]:
    n, m = len(x), len(y)
    between = cdist(x, y).mean()
    wx, wy = cdist(x, x).sum() / (n * (n - 1)), cdist(y, y).sum() / (m * (m - 1))
    return {"distance": between, "distance_source": wx, "distance_target": wy,
            "ratio": between / (0.5 * (wx + wy))}


def population_change(rng, mc: int, reps: int) -> dict[str, dict[str, float]]:
    draws = []
    for _ in range(reps):
        x, y = _draw(rng, mc)
        before, after = _u_statistics(x, y), _u_statistics(*_after(x, y))
        draws.append({k: after[k] - before[k] for k in STATISTICS})
    return {k: {"value": float(np.mean([d[k] for d in draws])),
                "mc_standard_error": float(np.std([d[k] for d in draws], ddof=1)
                                           / np.sqrt(reps))} for k in STATISTICS}


def _count_copies_as_pairs(weights):
    """The engine before issue 15: sum_i w_i^2 replaced by sum_i w_i, so copies of one image
    count as pairs at distance 0."""
    return sum(w.sum(1) for w in weights.values())


def coverage(rng, truth, n: int, trials: int, n_bootstrap: int) -> dict:
    hits = {rule: {k: 0 for k in STATISTICS} for rule in ("distinct_pairs", "copies_as_pairs")}
    widths = {rule: {k: [] for k in STATISTICS} for rule in hits}
    exclude = paired._sum_sq_per_image
    for trial in range(trials):
        x, y = _draw(rng, n)
        xa, ya = _after(x, y)
        sets = {("before", "source"): x, ("before", "target"): y,
                ("after", "source"): xa, ("after", "target"): ya}
        for rule in hits:
            paired._sum_sq_per_image = (exclude if rule == "distinct_pairs"
                                        else _count_copies_as_pairs)
            try:
                est = paired.paired_resampling(
                    sets, views={"before": ("before", "before"), "after": ("after", "after")},
                    changes=[("before", "after")], n_bootstrap=n_bootstrap, n_permutations=0,
                    seed=trial)  # the same resamples for both rules
            finally:
                paired._sum_sq_per_image = exclude
            for k in STATISTICS:
                low, high = est.changes["before", "after"][k]
                hits[rule][k] += low <= truth[k]["value"] <= high
                widths[rule][k].append(high - low)
    out = {}
    for rule in hits:
        out[rule] = {}
        for k in STATISTICS:
            p = hits[rule][k] / trials
            out[rule][k] = {"coverage": p, "standard_error": float(np.sqrt(p * (1 - p) / trials)),
                            "mean_width": float(np.mean(widths[rule][k]))}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).parent / "results" / "paired_coverage.json")
    parser.add_argument("--mc", type=int, default=3000)
    parser.add_argument("--mc-reps", type=int, default=4)
    parser.add_argument("--bootstrap", type=int, default=200)
    args = parser.parse_args(argv)
    plan = ((20, 4), (40, 3)) if args.quick else ((30, 1000), (200, 400))
    mc, reps = (400, 2) if args.quick else (args.mc, args.mc_reps)
    start = time.perf_counter()
    rng = np.random.default_rng(20261206)
    truth = population_change(rng, mc, reps)
    result = {
        "claim": "paired change intervals cover the population change >= 0.90 at n >= 200; "
                 "excluding copies from within-set pairs covers at least as well",
        "quick": args.quick, "dim": DIM, "confidence": 0.95, "method": "basic",
        "n_bootstrap": args.bootstrap, "population_change": truth, "by_n": {},
    }
    for n, trials in plan:
        result["by_n"][str(n)] = dict(trials=trials, **coverage(rng, truth, n, trials,
                                                                 args.bootstrap))
        print(n, {rule: {k: v["coverage"] for k, v in r.items()}
                  for rule, r in result["by_n"][str(n)].items() if rule != "trials"},
              flush=True)
    big = [v for n, v in result["by_n"].items() if int(n) >= 200]
    result["worst_coverage_n_ge_200"] = min(
        (v["distinct_pairs"][k]["coverage"] for v in big for k in STATISTICS), default=None)
    result["seconds"] = round(time.perf_counter() - start, 1)
    result["platform"] = {"python": platform.python_version(), "numpy": np.__version__}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out} ({result['seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
