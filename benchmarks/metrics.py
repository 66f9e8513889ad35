"""Speed, accuracy and memory of featsim.metrics against baselines measured in the same run.

Claims measured (issue 2):
  * D (average euclidean distance) for 10,000 x 10,000 pairs at d = 2048, float32, against
    (a) one jit-compiled jnp matmul of the same shape (the floor: D needs that many FLOPs) and
    (b) row-chunked ``scipy.spatial.distance.cdist`` (float64). Targets: <= 1.3x the matmul,
    >= 25x faster than cdist. cdist takes minutes at full size, so it is timed on a subset of
    its chunks and scaled by the chunk count (reported as such); its value on that subset is
    compared with featsim's on the same rows.
  * Frechet distance at d = 2048 against the pytorch-fid recipe (``scipy.linalg.sqrtm``).
    Targets: >= 10x faster, relative difference <= 1e-9.
  * FID numerics (issue 12): ``fid`` on features with a common offset 1e6 x the spread, and at
    d = 512, n = 3000 with eigenvalues of S1 S2 spanning ~1e14, against an exact float64 QR /
    nuclear-norm reference computed from the data. Target: relative error <= 1e-8.
  * KID (100 subsets x 1000 rows, d = 2048, 2 x 10,000 float32 rows) with float32 block Gram
    products against the same code with float64 products and a clean-fid style float64 loop
    (``(X X^T / d + 1) ** 3`` per subset), all in this run; largest |MMD^2| difference.
  * D at n = m = 50,000, d = 2048 (float32) in a fresh process: time and peak memory (an
    n x m float32 matrix alone would take 9.3 GiB).
  * Streaming (minibatch) CKA over 50,000 x 2048 features fed in batches: peak resident memory
    of a fresh process doing only that. Target: < 2 GiB.

Usage:
  python benchmarks/metrics.py [--out benchmarks/results/metrics.json] [--quick]

``--quick`` shrinks every size (for smoke tests); the numbers then say nothing about targets.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import resource
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import scipy
import scipy.linalg
from scipy.spatial.distance import cdist

import featsim
from featsim.metrics import average_distance, fid, frechet_distance, kid
from featsim.metrics import mmd as mmd_module
from featsim.metrics.cka import MinibatchCKA


def _best_time(fn, repeats):
    best = float("inf")
    out = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def _reference_mean_distance(x, y, block=1000):
    """float64 NumPy reference of mean ||x_i - y_j|| (centred expansion, blockwise)."""
    x = x.astype(np.float64)
    y = y.astype(np.float64)
    c = np.concatenate([x, y]).mean(0)
    x, y = x - c, y - c
    xs, ys = (x * x).sum(1), (y * y).sum(1)
    total = 0.0
    for i in range(0, len(x), block):
        d2 = xs[i : i + block, None] + ys[None, :] - 2 * x[i : i + block] @ y.T
        total += np.sqrt(np.maximum(d2, 0)).sum()
    return total / (len(x) * len(y))


def bench_distance(n, d, repeats, cdist_chunk, cdist_chunks_timed):
    rng = np.random.default_rng(0)
    # Post-ReLU-like features: positive, with a mean larger than the spread.
    x = np.abs(rng.normal(1.0, 1.0, size=(n, d))).astype(np.float32)
    y = np.abs(rng.normal(1.2, 1.1, size=(n, d))).astype(np.float32)

    matmul = jax.jit(lambda a, b: jnp.matmul(a, b.T, precision=jax.lax.Precision.HIGHEST))
    xj, yj = jnp.asarray(x), jnp.asarray(y)
    matmul(xj, yj).block_until_ready()
    t_matmul, _ = _best_time(lambda: matmul(xj, yj).block_until_ready(), repeats)

    t0 = time.perf_counter()
    d_featsim = average_distance(x, y)  # includes compilation
    t_first = time.perf_counter() - t0
    t_featsim, d_featsim = _best_time(lambda: average_distance(x, y), repeats)

    t_cdist_part = 0.0
    cdist_sum = 0.0
    rows = cdist_chunk * cdist_chunks_timed
    for k in range(cdist_chunks_timed):
        chunk = x[k * cdist_chunk : (k + 1) * cdist_chunk].astype(np.float64)
        t0 = time.perf_counter()
        cdist_sum += cdist(chunk, y.astype(np.float64)).sum()
        t_cdist_part += time.perf_counter() - t0
    n_chunks = -(-n // cdist_chunk)
    t_cdist = t_cdist_part * n_chunks / cdist_chunks_timed
    d_cdist_subset = cdist_sum / (rows * n)
    d_featsim_subset = average_distance(x[:rows], y)

    t0 = time.perf_counter()
    d_ref = _reference_mean_distance(x, y)
    t_ref = time.perf_counter() - t0

    return {
        "shape": {"n": n, "m": n, "d": d, "dtype": "float32"},
        "featsim_seconds": t_featsim,
        "featsim_first_call_seconds_incl_compile": t_first,
        "matmul_seconds": t_matmul,
        "ratio_to_matmul": t_featsim / t_matmul,
        "cdist_seconds_extrapolated": t_cdist,
        "cdist_rows_timed": rows,
        "cdist_chunk_rows": cdist_chunk,
        "speedup_vs_cdist": t_cdist / t_featsim,
        "numpy_float64_blocked_reference_seconds": t_ref,
        "value": d_featsim,
        "reference_float64": d_ref,
        "relative_error_vs_float64_reference": abs(d_featsim - d_ref) / d_ref,
        "relative_error_vs_cdist_on_timed_rows": abs(d_featsim_subset - d_cdist_subset)
        / d_cdist_subset,
        "targets": {"ratio_to_matmul_max": 1.3, "speedup_vs_cdist_min": 25.0,
                    "relative_error_max": 1e-6},
    }


def bench_frechet(d, n, repeats):
    rng = np.random.default_rng(1)
    a = rng.normal(size=(d, d)) / np.sqrt(d)
    x = rng.normal(size=(n, d)) @ a
    y = rng.normal(size=(n, d)) @ (a + 0.2 * rng.normal(size=(d, d)) / np.sqrt(d)) + 0.1
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)

    def sqrtm_fid():
        covmean = scipy.linalg.sqrtm(s1 @ s2)
        if np.iscomplexobj(covmean):
            covmean = covmean.real
        diff = mu1 - mu2
        return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))

    t_ours, v_ours = _best_time(lambda: frechet_distance(mu1, s1, mu2, s2), repeats)
    t_sqrtm, v_sqrtm = _best_time(sqrtm_fid, 1)
    return {
        "d": d,
        "n_samples_per_set": n,
        "featsim_seconds": t_ours,
        "sqrtm_seconds": t_sqrtm,
        "speedup_vs_sqrtm": t_sqrtm / t_ours,
        "value": v_ours,
        "value_sqrtm": v_sqrtm,
        "relative_difference": abs(v_ours - v_sqrtm) / abs(v_sqrtm),
        "targets": {"speedup_vs_sqrtm_min": 10.0, "relative_difference_max": 1e-9},
    }


def _qr_fid(x, y):
    """Exact float64 FID from the data: tr((S1 S2)^(1/2)) = ||R1 R2^T||_* with A_k = Q_k R_k,
    means from correctly rounded sums (np.mean's rounding would show at offset 1e6)."""
    mx = np.array([math.fsum(col) for col in x.T]) / len(x)
    my = np.array([math.fsum(col) for col in y.T]) / len(y)
    a1 = (x - mx) / np.sqrt(len(x) - 1)
    a2 = (y - my) / np.sqrt(len(y) - 1)
    r1, r2 = np.linalg.qr(a1, mode="r"), np.linalg.qr(a2, mode="r")
    diff = mx - my
    tr_sqrt = scipy.linalg.svdvals(r1 @ r2.T).sum()
    return float(diff @ diff + (a1 * a1).sum() + (a2 * a2).sum() - 2 * tr_sqrt)


def bench_fid_numerics(offset_n, offset_d, small_ev_n, small_ev_d):
    rng = np.random.default_rng(4)
    out = {}
    mix = np.eye(offset_d) + 0.3 * rng.normal(size=(offset_d, offset_d)) / np.sqrt(offset_d)
    x = 1e6 + rng.normal(size=(offset_n, offset_d)) @ mix
    y = 1e6 + 0.1 + 1.1 * rng.normal(size=(offset_n, offset_d)) @ mix
    ref = _qr_fid(x, y)
    out["common_offset_1e6"] = {"n": offset_n, "d": offset_d, "value": fid(x, y),
                                "reference_qr": ref,
                                "relative_error": abs(fid(x, y) - ref) / ref}
    scale = np.logspace(0, -3.5, small_ev_d)
    x = rng.normal(size=(small_ev_n, small_ev_d)) * scale
    y = rng.normal(size=(small_ev_n, small_ev_d)) * scale * rng.uniform(0.8, 1.2, small_ev_d)
    y += 0.01
    ref = _qr_fid(x, y)
    out["small_eigenvalues"] = {"n": small_ev_n, "d": small_ev_d,
                                "eigenvalue_range_of_s1_s2": "~1e14", "value": fid(x, y),
                                "reference_qr": ref,
                                "relative_error": abs(fid(x, y) - ref) / ref}
    out["target_relative_error_max"] = 1e-8
    return out


def _cleanfid_style_kid(x, y, m, num_subsets, seed):
    """The clean-fid / torch-fidelity recipe: a float64 loop over subsets, same subset draws."""
    ix, iy = mmd_module._subset_indices(len(x), len(y), m, num_subsets, seed)
    d = x.shape[1]
    values = np.empty(num_subsets)
    for k in range(num_subsets):
        a = x[ix[k]].astype(np.float64)
        b = y[iy[k]].astype(np.float64)
        kxx = (a @ a.T / d + 1) ** 3
        kyy = (b @ b.T / d + 1) ** 3
        kxy = (a @ b.T / d + 1) ** 3
        values[k] = ((kxx.sum() - np.trace(kxx)) / (m * (m - 1))
                     + (kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean())
    return values


def bench_kid(n, d, subset_size, num_subsets):
    rng = np.random.default_rng(5)
    x = np.abs(rng.normal(0.4, 0.5, size=(n, d))).astype(np.float32)
    y = np.abs(rng.normal(0.45, 0.55, size=(n, d))).astype(np.float32)
    opts = dict(subset_size=subset_size, num_subsets=num_subsets, seed=0)
    load_before = os.getloadavg()[0]
    t_f32, res = _best_time(lambda: kid(x, y, **opts), 1)
    limit = mmd_module._MAX_GRAM_REL_ERROR
    mmd_module._MAX_GRAM_REL_ERROR = 0.0  # no error budget: float64 products
    try:
        t_f64, res64 = _best_time(lambda: kid(x, y, **opts), 1)
    finally:
        mmd_module._MAX_GRAM_REL_ERROR = limit
    t_loop, loop = _best_time(lambda: _cleanfid_style_kid(x, y, subset_size, num_subsets, 0), 1)
    return {
        "n_x": n, "n_y": n, "d": d, "subset_size": subset_size, "num_subsets": num_subsets,
        "strategy": mmd_module._host_strategy(n, n, subset_size, num_subsets, d),
        "featsim_float32_blocks_seconds": t_f32,
        "featsim_float64_products_seconds": t_f64,
        "cleanfid_style_float64_loop_seconds": t_loop,
        "speedup_vs_float64_products": t_f64 / t_f32,
        "speedup_vs_cleanfid_style_loop": t_loop / t_f32,
        "kid": res.mean, "kid_std": res.std,
        "max_abs_mmd2_difference_vs_float64_loop": float(np.abs(res.mmd2 - loop).max()),
        "max_abs_mmd2_difference_float64_products_vs_loop": float(np.abs(res64.mmd2 - loop).max()),
        "gram_block": mmd_module._GRAM_BLOCK,
        # Timings on a shared machine: the 1-minute load average before and after the runs.
        "load_average_1min_before_after": [load_before, os.getloadavg()[0]],
    }


def _cka_worker(n, d, batch, queue):
    rng = np.random.default_rng(2)
    w = rng.normal(size=(d, d)).astype(np.float32) / np.sqrt(d)
    state = MinibatchCKA.empty()
    t0 = time.perf_counter()
    for start in range(0, n, batch):
        k = min(batch, n - start)
        xb = rng.normal(size=(k, d)).astype(np.float32)
        yb = np.tanh(xb @ w) + 0.1 * rng.normal(size=(k, d)).astype(np.float32)
        state = state.update(xb, yb)
    value = state.compute()
    seconds = time.perf_counter() - t0
    queue.put({"value": value, "seconds": seconds, "peak_rss_mib": _peak_rss_mib()})


def _peak_rss_mib() -> float:
    """This process's peak resident memory since exec (VmHWM).

    Not ``ru_maxrss``: Linux keeps that across fork+exec, so a spawned child would report its
    parent's peak.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _scale_worker(n, d, queue):
    rng = np.random.default_rng(3)
    x = np.abs(rng.normal(1.0, 1.0, size=(n, d))).astype(np.float32)
    y = np.abs(rng.normal(1.2, 1.1, size=(n, d))).astype(np.float32)
    inputs = _peak_rss_mib()
    t0 = time.perf_counter()
    value = average_distance(x, y)
    seconds = time.perf_counter() - t0
    queue.put({"value": value, "seconds_incl_compile": seconds, "peak_rss_mib": _peak_rss_mib(),
               "peak_rss_mib_before_call": inputs,
               "n_by_m_float32_matrix_would_be_mib": n * n * 4 / 2**20})


def bench_distance_scale(n, d):
    """D at the issue's scale, n = m = 50,000, d = 2048, in a fresh process (peak memory)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_scale_worker, args=(n, d, queue))
    proc.start()
    result = queue.get()
    proc.join()
    result.update({"n": n, "m": n, "d": d, "dtype": "float32"})
    return result


def bench_minibatch_cka(n, d, batch):
    ctx = mp.get_context("spawn")  # a fresh interpreter: its peak RSS is CKA's alone
    queue = ctx.Queue()
    proc = ctx.Process(target=_cka_worker, args=(n, d, batch, queue))
    proc.start()
    result = queue.get()
    proc.join()
    result.update({"n": n, "d": d, "batch_size": batch, "target_peak_rss_mib_max": 2048,
                   "input_bytes_if_materialised_mib": 2 * n * d * 4 / 2**20})
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results/metrics.json")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for smoke tests")
    parser.add_argument("--skip-scale", action="store_true",
                        help="skip D at n = m = 50,000 (a few minutes on 2 cores)")
    sections = ("distance", "frechet", "fid_numerics", "kid", "scale", "cka")
    parser.add_argument("--only", nargs="+", choices=sections,
                        help="run these sections only and update them in an existing --out")
    args = parser.parse_args(argv)
    run = set(args.only or sections)
    if args.skip_scale:
        run.discard("scale")

    if args.quick:
        dist_cfg = dict(n=1000, d=128, repeats=1, cdist_chunk=250, cdist_chunks_timed=1)
        fr_cfg = dict(d=64, n=500, repeats=1)
        cka_cfg = dict(n=2000, d=64, batch=256)
        scale_cfg = dict(n=3000, d=64)
        fidnum_cfg = dict(offset_n=300, offset_d=16, small_ev_n=600, small_ev_d=64)
        kid_cfg = dict(n=400, d=128, subset_size=100, num_subsets=5)
    else:
        dist_cfg = dict(n=10_000, d=2048, repeats=3, cdist_chunk=250, cdist_chunks_timed=2)
        fr_cfg = dict(d=2048, n=8192, repeats=3)
        cka_cfg = dict(n=50_000, d=2048, batch=256)
        scale_cfg = dict(n=50_000, d=2048)
        fidnum_cfg = dict(offset_n=4000, offset_d=64, small_ev_n=3000, small_ev_d=512)
        kid_cfg = dict(n=10_000, d=2048, subset_size=1000, num_subsets=100)

    results = {
        "featsim_version": featsim.__version__,
        "jax": jax.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "devices": [str(dv) for dv in jax.devices()],
        "quick": args.quick,
    }
    out = Path(args.out)
    if args.only and out.exists():
        previous = json.loads(out.read_text())
        if previous.get("quick") != args.quick:
            parser.error(f"--only would mix quick={args.quick} rows into {out} "
                         f"(quick={previous.get('quick')}); use another --out")
        results = {**previous, **results}
    benches = {
        "distance": ("average_distance", lambda: bench_distance(**dist_cfg)),
        "frechet": ("frechet_distance", lambda: bench_frechet(**fr_cfg)),
        "fid_numerics": ("fid_numerics", lambda: bench_fid_numerics(**fidnum_cfg)),
        "kid": ("kid", lambda: bench_kid(**kid_cfg)),
        "scale": ("average_distance_scale", lambda: bench_distance_scale(**scale_cfg)),
        "cka": ("minibatch_cka", lambda: bench_minibatch_cka(**cka_cfg)),
    }
    for section in sections:
        if section not in run:
            continue
        key, bench = benches[section]
        print(f"{key} ...", flush=True)
        results[key] = bench()
        print(json.dumps(results[key], indent=1), flush=True)

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
