"""What the image pipeline costs: ``featsim distance`` end to end vs the bare forward pass.

Claim measured (issue 4): on the Kermany chest X-ray test split (624 JPEGs) with the real
EfficientNet-Lite0 weights, the whole main job (list files, hash contents, decode, resize,
normalise, forward, pool, write the cache, metrics) runs at a throughput close to the
backbone's bare jitted forward pass on ready-made batches, and a rerun served from the
content-keyed cache is many times faster.

Reported, all in this process and run after one warm-up compile:
* ``bare_forward``: images/s of the jitted forward on a ready [batch, 224, 224, 3] array;
* ``decode_transform``: images/s of host decoding + resize/crop/normalise alone (thread pool);
* ``extract_cold``: ``extract_features`` without cache; ``distance_cold``: the full
  ``feature_distance`` job (source = imagenette_val_500, target = Kermany test) with an
  empty cache; ``distance_cached``: the same job again (cache hits);
* ratios: pipeline images/s over bare forward images/s; cold over cached wall time;
* ``default_*`` (issue 12): the same job with the CLI's default intervals
  (``n_bootstrap=200``: weighted bootstrap on one float64 distance matrix, FID 20-group
  jackknife, FID_infinity) against ``n_bootstrap=0``, cold (fresh cache) and cached; target
  ``default_over_no_bootstrap_cold <= 3``. ``interval_phase_s`` times the interval phase
  alone (``similarity_report`` with and without intervals on the extracted features).

Usage:
  python benchmarks/pipeline.py [--data ../shared/data] [--batch 32] [--out OUT.json]
  python benchmarks/pipeline.py --quick   # 64 generated images, for CI: no shared data needed
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _make_images(folder: Path, n: int) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        cls = folder / ("NORMAL" if i % 2 else "PNEUMONIA")
        cls.mkdir(parents=True, exist_ok=True)
        gray = rng.integers(0, 256, (300, 260), dtype=np.uint8)
        Image.fromarray(gray, "L").save(cls / f"img{i:04d}.jpeg", quality=90)
    return folder


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" /
                        "pipeline.json")
    args = parser.parse_args(argv)

    from featsim.data import Transform, load_rgb, open_source
    from featsim.features import extract_features
    from featsim.metrics import StatOptions
    from featsim.pipeline import feature_distance, pretrained_backbone

    tmp = Path(tempfile.mkdtemp(prefix="featsim-bench-"))
    if args.quick:
        target = str(_make_images(tmp / "xray", 64))
        source = str(_make_images(tmp / "photos", 64))
    else:
        target = str(args.data / "chest_xray_kermany_224" / "chest_xray") + ":test"
        source = str(args.data / "imagenette_val_500")
    backbone = pretrained_backbone("efficientnet_lite0")
    transform = Transform.for_backbone(backbone.preprocessing)
    items = open_source(target).items
    result = {"quick": args.quick, "backbone": backbone.name, "batch": args.batch,
              "source": source, "target": target, "n_target": len(items),
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "devices": [str(d) for d in jax.devices()]}}

    forward = jax.jit(lambda v, x: backbone.module.apply(v, x)[1]["pre_logits"])
    x = np.random.default_rng(0).normal(size=(args.batch, 224, 224, 3)).astype(np.float32)
    forward(backbone.variables, x).block_until_ready()
    times = []
    for _ in range(3 if args.quick else 8):
        t0 = time.perf_counter()
        forward(backbone.variables, x).block_until_ready()
        times.append(time.perf_counter() - t0)
    result["bare_forward_img_s"] = args.batch / statistics.median(times)

    workers = min(8, os.cpu_count() or 1)
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda it: transform(load_rgb(it)), items))
    result["decode_transform_img_s"] = len(items) / (time.perf_counter() - t0)

    # Warm up extraction's own compiled function (same shapes) before timing it.
    extract_features(backbone, target, batch_size=args.batch, cache=False, progress=False)
    t0 = time.perf_counter()
    extract_features(backbone, target, batch_size=args.batch, cache=False, progress=False)
    result["extract_cold_img_s"] = len(items) / (time.perf_counter() - t0)

    cache = tmp / "cache"
    timings = {}
    for name in ("distance_cold", "distance_cached"):
        t0 = time.perf_counter()
        job = feature_distance(backbone, source, target, batch_size=args.batch,
                               cache_dir=cache, progress=False)
        timings[name] = time.perf_counter() - t0
    n_images = len(job.source) + len(job.target)
    for name, cache_dir in (("default_cold", tmp / "cache_default"),
                            ("default_cached", tmp / "cache_default")):
        t0 = time.perf_counter()
        default_job = feature_distance(backbone, source, target, batch_size=args.batch,
                                       cache_dir=cache_dir, progress=False,
                                       stats=StatOptions(n_bootstrap=200))
        timings[name] = time.perf_counter() - t0
    from featsim.report import similarity_report

    a, b = job.source[job.layer], job.target[job.layer]
    t0 = time.perf_counter()
    similarity_report(a, b, progress=False)
    t_plain = time.perf_counter() - t0
    t0 = time.perf_counter()
    similarity_report(a, b, stats=StatOptions(n_bootstrap=200), progress=False)
    result.update(
        dim=int(a.shape[1]),
        report_no_intervals_s=t_plain,
        report_default_intervals_s=time.perf_counter() - t0,
        default_cold_s=timings["default_cold"],
        default_cached_s=timings["default_cached"],
        default_over_no_bootstrap_cold=timings["default_cold"] / timings["distance_cold"],
        default_over_no_bootstrap_cached=timings["default_cached"]
        / timings["distance_cached"],
        default_fid=default_job.report.fid,
        default_fid_infinity=default_job.report.fid_infinity,
        default_fid_ci=[default_job.report.ci["fid"].low, default_job.report.ci["fid"].high],
    )
    result["interval_phase_s"] = (result["report_default_intervals_s"]
                                  - result["report_no_intervals_s"])
    result.update(
        n_images_distance=n_images,
        distance_cold_s=timings["distance_cold"],
        distance_cold_img_s=n_images / timings["distance_cold"],
        distance_cached_s=timings["distance_cached"],
        cached_speedup=timings["distance_cold"] / timings["distance_cached"],
        pipeline_over_bare_forward=result["extract_cold_img_s"] / result["bare_forward_img_s"],
        distance_over_bare_forward=(n_images / timings["distance_cold"])
        / result["bare_forward_img_s"],
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
