"""One depthwise convolution, forward and forward + backward: featsim's DepthwiseConv vs PyTorch.

The training benchmark (benchmarks/training.py) finds featsim's EfficientNet-Lite0 step slower
than PyTorch's while its forward pass is as fast; this script locates the difference. For
three of EfficientNet-Lite0's depthwise layers at batch 16 (224 px input), it times
``DepthwiseConv`` (shifted multiply-adds, jit) and PyTorch's grouped ``conv2d``
(channels_last): the forward pass, and the forward pass plus the gradients with respect to
the input and the kernel of ``sum(y ** 2)``. Best of 4 calls after one warm-up.

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
LAYERS = [(16, 112, 32, 3, 1), (16, 56, 144, 5, 1), (16, 112, 96, 3, 2)]  # n, size, c, k, s


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
    for layer in LAYERS:
        rows.append(_layer(*layer))
        print(json.dumps(rows[-1]), flush=True)
    result = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
              "layers": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
