"""ResNet50 ``pre_logits`` extraction: featsim (Flax, jit) vs a torch.nn ResNet50, same weights.

Claim measured (issue 3): on this machine's CPU, featsim's jit-compiled ResNet50 extracts
pooled features at least as fast as PyTorch's eager ResNet50 in channels_last, batch 32 at 224.

Each configuration runs in a fresh process (spawned), so peak memory (VmHWM) is its own and
thread pools do not interfere. The torch model is torchvision's ResNet50 layout (the plain
torch.nn reference of the test suite, with torchvision's state-dict keys), randomly initialised
with a fixed seed; featsim converts that very state dict, so both compute the same function.
Reported per configuration: images/s (median over timed batches, after warm-up), compile or
first-call time, and peak resident memory.

Usage:
  python benchmarks/extraction.py [--batch 32] [--iters 5] [--out OUT.json]

Needs the ``[torch]`` extra.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _peak_rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _torch_model():
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from backbones import torch_reference  # the test suite's torchvision-layout ResNet

    torch.manual_seed(0)
    return torch_reference.ARCHS["resnet50"]().eval()


def _time(fn, iters):
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def _featsim_worker(batch, size, iters, variant, queue):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from featsim.backbones import convert_state_dict, get_backbone

    model = _torch_model()
    state_dict = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    del model
    bb = get_backbone("resnet50", num_classes=None)
    variables = convert_state_dict(state_dict, bb.abstract_variables(),
                                   mapping=bb.weights.key_mapping, skip_head=True)
    dtype = jnp.bfloat16 if variant == "bf16" else jnp.float32
    if variant == "bf16":  # bf16 compute, float32 parameters: a different numeric contract
        bb = get_backbone("resnet50", num_classes=None, dtype=jnp.bfloat16)
    variables = jax.device_put(variables)

    if variant == "uint8_fused":
        scale, shift = bb.preprocessing.affine()
        scale, shift = jnp.asarray(scale, jnp.float32), jnp.asarray(shift, jnp.float32)

        @jax.jit
        def extract(v, pixels):
            x = pixels.astype(jnp.float32) * scale + shift  # normalisation fused into the graph
            return bb.module.apply(v, x)[1]["pre_logits"]

        x = np.random.default_rng(0).integers(0, 256, size=(batch, size, size, 3), dtype=np.uint8)
    else:

        @jax.jit
        def extract(v, x):
            return bb.module.apply(v, x.astype(dtype))[1]["pre_logits"]

        x = np.random.default_rng(0).normal(size=(batch, size, size, 3)).astype(np.float32)
    x = jax.device_put(x)
    t0 = time.perf_counter()
    extract(variables, x).block_until_ready()
    first = time.perf_counter() - t0
    extract(variables, x).block_until_ready()  # warm-up
    times = _time(lambda: extract(variables, x).block_until_ready(), iters)
    queue.put({"framework": "featsim", "variant": variant, "first_call_seconds": first,
               "batch_seconds": times, "peak_rss_mib": _peak_rss_mib(),
               "jax": jax.__version__, "devices": [str(d) for d in jax.devices()]})


def _torch_worker(batch, size, iters, variant, queue):
    import numpy as np
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    model = _torch_model()
    model.fc = torch.nn.Identity()  # pooled 2048-d features, as featsim's pre_logits
    x = torch.from_numpy(
        np.random.default_rng(0).normal(size=(batch, 3, size, size)).astype(np.float32))
    if variant == "channels_last":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        t0 = time.perf_counter()
        model(x)
        first = time.perf_counter() - t0
        model(x)
        times = _time(lambda: model(x), iters)
    queue.put({"framework": "torch", "variant": variant, "first_call_seconds": first,
               "batch_seconds": times, "peak_rss_mib": _peak_rss_mib(),
               "torch": torch.__version__, "threads": torch.get_num_threads()})


def _xla_flags() -> str:
    import featsim  # noqa: F401  (applies featsim's XLA:CPU default to this process's env)

    return os.environ.get("XLA_FLAGS", "")


def _run(target, *args):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/extraction.json")
    parser.add_argument("--variants", default="float32,uint8_fused,bf16",
                        help="featsim variants to measure (comma-separated)")
    args = parser.parse_args(argv)

    runs = []
    for variant in ("channels_last", "nchw"):
        print(f"torch {variant} ...", flush=True)
        runs.append(_run(_torch_worker, args.batch, args.size, args.iters, variant))
    for variant in args.variants.split(","):
        print(f"featsim {variant} ...", flush=True)
        runs.append(_run(_featsim_worker, args.batch, args.size, args.iters, variant))
    for r in runs:
        r["images_per_second"] = args.batch / statistics.median(r["batch_seconds"])
        print(f"{r['framework']:8s} {r['variant']:14s} {r['images_per_second']:7.2f} img/s  "
              f"first call {r['first_call_seconds']:.2f} s  peak {r['peak_rss_mib']:.0f} MiB")
    baseline = next(r for r in runs if r["framework"] == "torch"
                    and r["variant"] == "channels_last")["images_per_second"]
    for r in runs:
        r["ratio_to_torch_channels_last"] = r["images_per_second"] / baseline
    result = {
        "batch": args.batch, "size": args.size, "iters": args.iters,
        "machine": platform.machine(), "cpu_count": os.cpu_count(),
        "python": platform.python_version(), "runs": runs,
        # featsim sets a YNNPACK fusion default at import (featsim/_xla.py); recorded here.
        "xla_flags_in_featsim_workers": _xla_flags(),
        "target": "featsim float32 images/s >= 1.0x torch channels_last",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
