"""Training throughput: the pmap step at 1 and 2 (forced CPU) devices, and the cached-feature
linear path.

Claims measured (issue 5):
* the pmap training step (EfficientNet-Lite0, ``finetune``: every layer, BatchNorm in
  training mode, synchronised across devices; augmentation on device) runs at 1 and 2
  devices; on a CPU host the 2 "devices" share the same cores, so the ratio shows the cost of
  the data-parallel machinery rather than a speed-up;
* the ``linear`` fast path trains 20 epochs over 5,216 cached 1280-d feature vectors (the
  Kermany training split's size) in seconds.

Each device count runs in a fresh process (``XLA_FLAGS`` must be set before JAX starts).
Reported: steps/s and images/s (median over timed steps after one warm-up step), and for the
linear path the wall time of 20 epochs and its steps/s.

Usage:
  python benchmarks/training.py [--batch 16] [--size 224] [--steps 5] [--out OUT.json]
  python benchmarks/training.py --quick     # small images, for CI
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _step_benchmark(batch: int, size: int, steps: int) -> dict:
    import jax
    import numpy as np

    from featsim import parallel
    from featsim.train import TrainConfig
    from featsim.train.loop import create_train_state
    from featsim.train.steps import make_train_step

    config = TrainConfig("efficientnet_lite0", strategy="finetune", batch_size=batch)
    state, step_config, _, _ = create_train_state(config, 1, 100, jax.random.key(0))
    step = parallel.pmap(make_train_step(step_config, np.ones(2, np.float32)),
                         in_axes=(0, 0, None))
    state = parallel.replicate(state)
    rng = np.random.default_rng(0)
    data = {"images": rng.integers(0, 256, (batch, size, size, 3)).astype(np.uint8),
            "labels": (np.arange(batch) % 2).astype(np.int32),
            "mask": np.ones(batch, np.float32)}
    sharded = parallel.shard(data)
    t0 = time.perf_counter()
    state, out = step(state, sharded, jax.random.key(0))
    jax.block_until_ready(out)
    compile_s = time.perf_counter() - t0
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        state, out = step(state, sharded, jax.random.key(i + 1))
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    return {"devices": parallel.device_count(), "batch": batch, "size": size,
            "first_step_s": compile_s, "steps_per_s": 1 / median, "images_per_s": batch / median}


def _linear_benchmark(n: int, d: int, epochs: int) -> dict:
    import jax
    import numpy as np

    from featsim.train import TrainConfig
    from featsim.train.linear_probe import fit_head

    rng = np.random.default_rng(0)
    labels = {"train": (rng.random(n) < 0.74).astype(np.int32)}
    x = {"train": (rng.normal(size=(n, d)) + labels["train"][:, None] * 0.1).astype(np.float32)}
    head = {"kernel": np.zeros((d, 1), np.float32), "bias": np.zeros(1, np.float32)}
    config = TrainConfig("efficientnet_lite0", strategy="linear", epochs=epochs)
    t0 = time.perf_counter()
    _, history, _ = fit_head(config, head, x, labels, 2, jax.random.key(0))
    seconds = time.perf_counter() - t0
    steps = epochs * -(-n // config.batch_size)
    return {"n": n, "d": d, "epochs": epochs, "batch": config.batch_size, "seconds": seconds,
            "steps_per_s": steps / seconds,
            "final_train_loss": history[-1]["train_loss"]}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path,
                        default=ROOT / "benchmarks" / "results" / "training.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.size, args.steps = 4, 64, 2
    if args.child is not None:
        print(json.dumps(_step_benchmark(args.batch, args.size, args.steps)))
        return {}
    result = {"quick": args.quick, "machine": {"cpus": os.cpu_count(),
                                              "platform": platform.platform()}}
    pmap = {}
    for devices in (1, 2):
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
        run = subprocess.run(
            [sys.executable, __file__, "--child", str(devices), "--batch", str(args.batch),
             "--size", str(args.size), "--steps", str(args.steps)],
            env=env, capture_output=True, text=True, check=True)
        pmap[str(devices)] = json.loads(run.stdout.strip().splitlines()[-1])
    result["pmap_finetune_step"] = pmap
    result["two_over_one_device"] = pmap["2"]["steps_per_s"] / pmap["1"]["steps_per_s"]
    result["linear_cached_features"] = _linear_benchmark(
        512 if args.quick else 5216, 1280, 2 if args.quick else 20)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
