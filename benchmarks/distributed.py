"""featsim on several processes of one machine (jax.distributed, gloo on 127.0.0.1).

Runs feature extraction and the statistics of `featsim distance` at 1, 2 and 4 processes and
times each phase from a common start (an exchange all processes pass) to the last process's
end. The processes share this machine's cores, so the numbers show the overhead of splitting
(each process compiles its own programs, decodes its own chunks, exchanges the results), not
a speed-up; on a cluster each process has its own host. Every multi-process result is
checked against the one-process result (``identical``).

Then D with its baselines (``distance_summary``) at n = m = 50,000, d = 2048 in 1 and 4
processes: wall time and each process's peak resident memory. Every process holds both
feature sets (after extraction they are exchanged, so each has them all) and computes its
share of the distance tiles.

With ``--real-data DIR`` (the shared data folder) it also runs ``featsim distance`` on the
Imagenette validation images vs the Kermany chest X-ray test split alone and as 2 processes
and records whether every JSON value is equal.

Usage:
  python benchmarks/distributed.py [--quick] [--real-data ../shared/data]
                                   [--out benchmarks/results/distributed.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _images(folder: Path, n: int, size: int) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
            folder / f"{i:05d}.png")


# ---- one process ------------------------------------------------------------------------


def _worker(args) -> None:
    from featsim import parallel

    share = (parallel.initialize(f"127.0.0.1:{args.port}", args.processes, args.index)
             if args.processes > 1 else parallel.LOCAL)
    import dataclasses

    import jax
    import numpy as np

    from featsim import metrics
    from featsim.backbones import get_backbone
    from featsim.features import extract_features
    from featsim.metrics.options import StatOptions
    from featsim.report import similarity_report

    out: dict = {}

    def phase(name, fn):
        share.exchange(None)  # a common start
        t0 = time.perf_counter()
        value = fn()
        share.exchange(None)  # the last process's end
        out[f"{name}_s"] = time.perf_counter() - t0
        return value

    if args.task == "pipeline":
        bb = get_backbone(args.backbone)
        bb = dataclasses.replace(bb, variables=bb.init(jax.random.key(0)))
        feats = phase("extract", lambda: extract_features(
            bb, str(args.folder), batch_size=16, chunk_batches=1, cache=False, progress=False,
            share=share)["pre_logits"])
        rng = np.random.default_rng(1)
        x = rng.normal(size=(args.n, args.d)).astype(np.float32)
        y = rng.normal(0.3, 1.1, size=(args.n, args.d)).astype(np.float32)
        stats = StatOptions(n_bootstrap=args.bootstrap, kid_subset_size=500, seed=0)
        report = phase("metrics", lambda: similarity_report(x, y, stats=stats, progress=False,
                                                            share=share))
        out["features_sha"] = _sha(feats)
        out["report"] = report.to_dict()
    else:  # memory of D
        rng = np.random.default_rng(2)
        x = rng.standard_normal((args.n, args.d), np.float32)
        y = rng.standard_normal((args.n, args.d), np.float32) + np.float32(0.1)
        summary = phase("distance_summary", lambda: metrics.distance_summary(x, y, share=share))
        out["summary"] = summary.to_dict()
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    (args.result / f"{args.index}.json").write_text(json.dumps(out, default=float))


def _sha(a) -> str:
    import hashlib

    import numpy as np

    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


# ---- the driver -------------------------------------------------------------------------


def _run(processes: int, task: str, extra: list[str], work: Path) -> list[dict]:
    result = work / f"{task}_{processes}"
    result.mkdir(parents=True)
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)  # one device per process
    procs = [subprocess.Popen(
        [sys.executable, __file__, "--worker", "--task", task, "--processes", str(processes),
         "--index", str(i), "--port", str(port), "--result", str(result), *extra],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(processes)]
    for i, p in enumerate(procs):
        output, _ = p.communicate(timeout=3600)
        if p.returncode:
            raise RuntimeError(f"{task} process {i} of {processes} failed:\n{output[-3000:]}")
    return [json.loads((result / f"{i}.json").read_text()) for i in range(processes)]


def _real_data(data: Path, work: Path) -> dict:
    """`featsim distance` on real images, one process vs two: wall times and equality."""
    source = data / "imagenette_val_500" / "val"
    target = data / "chest_xray_kermany_224" / "chest_xray" / "test"
    command = [sys.executable, "-m", "featsim.cli", "distance", "--source", str(source),
               "--target", str(target), "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    out = {}
    for processes in (1, 2):
        port = _free_port()
        t0 = time.perf_counter()
        procs = [subprocess.Popen(
            [*command, "--json", str(work / f"real{processes}.json"),
             *(["--distributed", "--coordinator", f"127.0.0.1:{port}", "--num-processes",
                str(processes), "--process-id", str(i)] if processes > 1 else [])],
            env={**env, "FEATSIM_CACHE_DIR": str(work / f"real_cache{processes}")},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for i in range(processes)]
        for p in procs:
            output, _ = p.communicate(timeout=3600)
            if p.returncode:
                raise RuntimeError(f"featsim distance ({processes} processes):\n{output[-3000:]}")
        out[f"seconds_{processes}_process"] = time.perf_counter() - t0
    one, two = (json.loads((work / f"real{p}.json").read_text()) for p in (1, 2))
    report = one  # the distance JSON: the report's fields, then provenance
    return {"source": str(source.relative_to(data)), "target": str(target.relative_to(data)),
            "n": [report["n_source"], report["n_target"]], **out,
            "json_equal": one == two,
            "values": {k: report[k] for k in ("distance", "ratio", "energy_distance", "fid",
                                              "kid")}}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke test)")
    parser.add_argument("--out", type=Path,
                        default=ROOT / "benchmarks" / "results" / "distributed.json")
    parser.add_argument("--real-data", type=Path, default=None, metavar="DIR",
                        help="the shared data folder: also compare featsim distance on "
                             "Imagenette vs Kermany test, 1 vs 2 processes")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--task", default="pipeline", help=argparse.SUPPRESS)
    parser.add_argument("--processes", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--backbone", default="efficientnet_lite0", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--d", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--bootstrap", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args)
        return {}

    images, size, backbone = (32, 64, "mobilenet_v1_025") if args.quick else (
        256, 224, "efficientnet_lite0")
    n, d, bootstrap = (300, 64, 20) if args.quick else (2000, 1280, 200)
    mem_n, mem_d = (3000, 256) if args.quick else (50_000, 2048)
    counts = (1, 2) if args.quick else (1, 2, 4)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        _images(work / "images", images, size)
        pipeline, reference = {}, None
        for p in counts:
            rows = _run(p, "pipeline", ["--folder", str(work / "images"), "--backbone",
                                        backbone, "--n", str(n), "--d", str(d),
                                        "--bootstrap", str(bootstrap)], work)
            reference = reference or (rows[0]["features_sha"], rows[0]["report"])
            pipeline[str(p)] = {
                "extract_s": max(r["extract_s"] for r in rows),
                "metrics_s": max(r["metrics_s"] for r in rows),
                "peak_rss_mib": [r["peak_rss_mib"] for r in rows],
                "identical": all((r["features_sha"], r["report"]) == reference for r in rows),
            }
        base = pipeline["1"]
        for p in counts:
            row = pipeline[str(p)]
            row["extract_over_1_process"] = row["extract_s"] / base["extract_s"]
            row["metrics_over_1_process"] = row["metrics_s"] / base["metrics_s"]
        memory, reference = {}, None
        for p in (1, 2) if args.quick else (1, 4):
            rows = _run(p, "memory", ["--n", str(mem_n), "--d", str(mem_d)], work)
            reference = reference or rows[0]["summary"]
            memory[str(p)] = {"seconds": max(r["distance_summary_s"] for r in rows),
                              "peak_rss_mib_per_process": [r["peak_rss_mib"] for r in rows],
                              "identical": all(r["summary"] == reference for r in rows)}
        memory["summary"] = reference
        features_mib = 2 * mem_n * mem_d * 4 / 2**20
        real = _real_data(args.real_data, work) if args.real_data else None
    result = {
        "quick": args.quick,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "note": "processes share this machine's cores: the ratios are the overhead of "
                "splitting (per-process compilation, decoding, exchanges), not a speed-up",
        "pipeline": {"images": images, "image_size": size, "backbone": backbone,
                     "features": [n, d], "bootstrap": bootstrap, "by_processes": pipeline},
        "distance_memory": {"n": mem_n, "m": mem_n, "d": mem_d,
                            "float32_features_mib": features_mib, "by_processes": memory},
    }
    if real is not None:
        result["real_data_distance"] = real
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=float) + "\n")
    print(json.dumps(result, indent=2, default=float))
    return result


if __name__ == "__main__":
    main()
