"""One depthwise convolution, forward and forward + backward: featsim's DepthwiseConv vs PyTorch.

The training benchmark (benchmarks/training.py) finds featsim's EfficientNet-Lite0 step slower
than PyTorch's while its forward pass is as fast; this script locates the difference. For
every depthwise layer of EfficientNet-Lite0 at batch 16 (224 px input; the 16 layers have
12 distinct shapes, each timed once and counted as often as it occurs), it times
``DepthwiseConv`` (shifted multiply-adds, jit, hand-written gradient) and PyTorch's grouped
``conv2d`` (channels_last): the forward pass, and the forward pass plus the gradients with
respect to the input and the kernel of ``sum(y ** 2)``. Best of 4 calls after one warm-up.
``network`` sums the layers (count x time): the share of the training step's difference
that the depthwise layers explain.

Usage:
  python benchmarks/depthwise.py [--out benchmarks/results/depthwise.json]   # needs [torch]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# (input size, channels, kernel, stride, how many such layers): EfficientNet-Lite0's
# depthwise layers in network order (featsim.backbones.efficientnet; 224 px input).
LAYERS = [(112, 32, 3, 1, 1), (112, 96, 3, 2, 1), (56, 144, 3, 1, 1), (56, 144, 5, 2, 1),
          (28, 240, 5, 1, 1), (28, 240, 3, 2, 1), (14, 480, 3, 1, 2), (14, 480, 5, 1, 1),
          (14, 672, 5, 1, 2), (14, 672, 5, 2, 1), (7, 1152, 5, 1, 3), (7, 1152, 3, 1, 1)]
BATCH = 16
TIMES = ("featsim_forward_ms", "featsim_forward_backward_ms", "torch_forward_ms",
         "torch_forward_backward_ms")


def _best(fn, rounds: int = 4) -> float:
    fn()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _layer(n: int, size: int, c: int, k: int, s: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from featsim.backbones.layers import DepthwiseConv

    pad = k // 2
    module = DepthwiseConv((k, k), (s, s), ((pad, pad), (pad, pad)))
    x = jnp.asarray(np.random.default_rng(0).random((n, size, size, c), np.float32))
    variables = module.init(jax.random.key(0), x)
    forward = jax.jit(module.apply)
    grads = jax.jit(jax.grad(lambda v, x: jnp.sum(module.apply(v, x) ** 2), argnums=(0, 1)))
    tx = torch.rand(n, c, size, size).contiguous(
        memory_format=torch.channels_last).requires_grad_()
    weight = torch.rand(c, 1, k, k, requires_grad=True)

    def torch_forward():
        with torch.no_grad():
            torch.nn.functional.conv2d(tx, weight, stride=s, padding=pad, groups=c)

    def torch_backward():
        y = torch.nn.functional.conv2d(tx, weight, stride=s, padding=pad, groups=c)
        (y ** 2).sum().backward()

    return {
        "shape": [n, size, size, c], "kernel": k, "stride": s,
        "featsim_forward_ms": 1e3 * _best(lambda: forward(variables, x).block_until_ready()),
        "featsim_forward_backward_ms": 1e3 * _best(
            lambda: jax.block_until_ready(grads(variables, x))),
        "torch_forward_ms": 1e3 * _best(torch_forward),
        "torch_forward_backward_ms": 1e3 * _best(torch_backward),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path,
                        default=ROOT / "benchmarks" / "results" / "depthwise.json")
    args = parser.parse_args(argv)
    rows = []
    for size, c, k, s, count in LAYERS:
        rows.append({**_layer(BATCH, size, c, k, s), "count": count})
        print(json.dumps(rows[-1]), flush=True)
    network = {key: sum(row["count"] * row[key] for row in rows) for key in TIMES}
    network["layers"] = sum(row["count"] for row in rows)
    result = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
              "layers": rows, "network": network}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
