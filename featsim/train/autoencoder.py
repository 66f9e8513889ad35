"""A convolutional autoencoder around a registered backbone (Park et al.'s pretraining stage).

The encoder is a registered backbone's body up to one tapped feature map (default the last
convolutional map before global pooling, e.g. EfficientNet-Lite's ``"head"`` or ResNet's
``"stage4"``); :class:`ConvDecoder` upsamples it back to the input resolution and 3
channels. Training minimises the L1 reconstruction error of the input pixels on [0, 1]
(:func:`l1_per_example`), with no labels. The encoder's variables keep the registered
module's layout (``params/encoder/...`` is exactly ``get_backbone(name, num_classes=None)``'s
tree), so they load wherever ImageNet weights do.

``make_pretrain_step`` / ``make_reconstruction_eval_step`` follow
:mod:`featsim.train.steps`: pure functions, loss normalised by the *global* count of real
examples and gradients summed with ``lax.psum`` under :func:`featsim.parallel.pmap`; padded
rows (``mask`` 0) contribute nothing to the loss (they still enter training-mode BatchNorm
batch statistics, as in the classification loop).

Reference:
    Park et al., self-supervised autoencoder pretraining on unlabelled medical images, then
    transfer to classification (featsim issue 7).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct
from jax import lax

from featsim.backbones.convert import abstract_variables
from featsim.train.strategies import tap_order

__all__ = [
    "AutoencoderStepConfig",
    "ConvAutoencoder",
    "ConvDecoder",
    "decoder_sizes",
    "default_feature_layer",
    "feature_shapes",
    "l1_per_example",
    "make_pretrain_step",
    "make_reconstruction_eval_step",
]

# Taps that are not a spatial map of the body: pooled vectors and auxiliary classifiers.
_NOT_ENCODER_TAPS = ("pre_logits", "aux_logits")


def feature_shapes(module: nn.Module, input_shape) -> dict[str, tuple[int, ...]]:
    """Every tapped feature's shape for an NHWC ``input_shape`` (no compute)."""
    variables = abstract_variables(module, tuple(input_shape))
    x = jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32)
    _, feats = jax.eval_shape(lambda v, x: module.apply(v, x, train=False), variables, x)
    return {k: tuple(v.shape) for k, v in feats.items()}


def default_feature_layer(module: nn.Module, input_shape) -> str:
    """The last spatial (``[N, h, w, C]``) tap in network order before global pooling.

    Raises:
        ValueError: the module taps no spatial feature map.
    """
    shapes = feature_shapes(module, input_shape)
    spatial = [k for k in tap_order(shapes)
               if len(shapes[k]) == 4 and k not in _NOT_ENCODER_TAPS]
    if not spatial:
        raise ValueError(f"no spatial feature map among the taps {shapes}")
    return spatial[-1]


def decoder_sizes(feature_size: int, output_size: int) -> tuple[int, ...]:
    """Spatial side after each upsampling step: ``ceil(log2(output / feature))`` steps of
    about x2, the last one exactly ``output_size`` (so any input size works, e.g. 299)."""
    if feature_size < 1 or output_size < 1:
        raise ValueError(f"sizes must be >= 1, got feature {feature_size}, output {output_size}")
    steps = max(1, math.ceil(math.log2(output_size / feature_size)))
    return tuple(math.ceil(output_size / 2 ** (steps - k)) for k in range(1, steps + 1))


class ConvDecoder(nn.Module):
    """Bilinear upsampling + 3x3 conv + ReLU per step, then a 3x3 conv to RGB.

    Upsample-then-convolve rather than transposed convolutions: no checkerboard artefacts,
    and non-power-of-two ratios (Inception's 299 from 8) need no special case.

    Attributes:
        output_size: side of the reconstructed square image.
        base_width: channels after the first step; halved each step, never below
            ``min_width``.
        min_width: the narrowest step.
        out_channels: 3 (RGB).
    """

    output_size: int
    base_width: int = 256
    min_width: int = 16
    out_channels: int = 3
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z):
        """``z [N, h, w, C]`` -> ``[N, output_size, output_size, out_channels]`` float32."""
        if z.ndim != 4 or z.shape[1] != z.shape[2]:
            raise ValueError(f"ConvDecoder expects a square map [N, h, h, C], got {z.shape}")
        conv = dict(kernel_size=(3, 3), padding="SAME", dtype=self.dtype,
                    param_dtype=self.param_dtype)
        x = z
        for k, size in enumerate(decoder_sizes(z.shape[1], self.output_size)):
            x = jax.image.resize(x, (x.shape[0], size, size, x.shape[-1]), "bilinear")
            width = max(self.min_width, self.base_width // 2**k)
            x = nn.relu(nn.Conv(width, name=f"up{k}", **conv)(x))
        x = nn.Conv(self.out_channels, name="to_rgb", **conv)(x)
        return x.astype(jnp.float32)


class ConvAutoencoder(nn.Module):
    """``encoder`` (a registered backbone module) up to ``layer``, then ``decoder``.

    The encoder runs whole (taps after ``layer`` are dead code under ``jit`` except for the
    BatchNorm statistics of later layers in training mode); its variables sit under
    ``encoder`` in the backbone's own layout.

    ``__call__(x, *, train=False)`` returns ``(reconstruction [N, S, S, 3], code)`` with the
    reconstruction on the [0, 1] pixel scale and ``code`` the ``layer`` feature map.
    """

    encoder: nn.Module
    decoder: ConvDecoder
    layer: str

    def __call__(self, x, *, train: bool = False):
        _, feats = self.encoder(x, train=train)
        if self.layer not in feats:
            raise ValueError(f"the encoder has no feature {self.layer!r}; taps: "
                             f"{sorted(feats)}")
        code = feats[self.layer]
        return self.decoder(code), code


def l1_per_example(reconstruction, images):
    """Mean absolute error per example on the [0, 1] scale.

    Args:
        reconstruction: float ``[b, S, S, 3]`` on [0, 1].
        images: ``[b, S, S, 3]`` pixels on [0, 255] (uint8 or float).

    Returns:
        float32 ``[b]``.
    """
    target = images.astype(jnp.float32) / 255.0
    return jnp.mean(jnp.abs(reconstruction.astype(jnp.float32) - target), axis=(1, 2, 3))


class AutoencoderStepConfig(struct.PyTreeNode):
    """Static ingredients of the steps: the module, the encoder's pixel scaling, the axis."""

    module: Any = struct.field(pytree_node=False)
    scale: tuple = struct.field(pytree_node=False, default=(1.0, 1.0, 1.0))
    offset: tuple = struct.field(pytree_node=False, default=(0.0, 0.0, 0.0))
    axis_name: str | None = struct.field(pytree_node=False, default=None)


def _encoder_input(images, cfg: AutoencoderStepConfig):
    x = images.astype(jnp.float32)
    return x * jnp.asarray(cfg.scale, jnp.float32) + jnp.asarray(cfg.offset, jnp.float32)


def _global_sum(x, axis_name):
    return lax.psum(x, axis_name) if axis_name else x


@functools.lru_cache(maxsize=8)  # one function per configuration: its programs compile once
def make_pretrain_step(cfg: AutoencoderStepConfig):
    """``train_step(state, batch, key) -> (state, metrics)`` for a
    :class:`~featsim.train.TrainState` holding the autoencoder's variables.

    ``batch``: ``images [b, S, S, 3]`` on [0, 255], ``mask [b]``. The loss is
    ``sum_i mask_i * l1_i / sum_i mask_i`` over the global batch; ``metrics`` holds its
    ``loss_sum`` and ``count`` (global). ``key`` drives dropout / stochastic depth as
    ``fold_in(key, device index)`` (index 0 without ``pmap``).
    """

    def train_step(state, batch, key):
        # Device 0's key is fold_in(key, 0) with or without pmap, so 1 device == plain.
        key = jax.random.fold_in(key, lax.axis_index(cfg.axis_name) if cfg.axis_name else 0)
        x = _encoder_input(batch["images"], cfg)
        mask = batch["mask"]
        count = _global_sum(mask.sum(), cfg.axis_name)

        def loss_fn(params):
            variables = {"params": params}
            if state.batch_stats is not None:
                variables["batch_stats"] = state.batch_stats
            (recon, _), updates = state.apply_fn(variables, x, train=True,
                                                 mutable=["batch_stats"],
                                                 rngs={"dropout": key})
            losses = l1_per_example(recon, batch["images"])
            stats = updates.get("batch_stats", state.batch_stats)
            return jnp.sum(losses * mask) / jnp.maximum(count, 1.0), stats

        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        grads = _global_sum(grads, cfg.axis_name)
        loss = _global_sum(loss, cfg.axis_name)
        state = state.apply_gradients(grads=grads, batch_stats=stats)
        return state, {"loss_sum": loss * count, "count": count}

    return train_step


@functools.lru_cache(maxsize=8)
def make_reconstruction_eval_step(cfg: AutoencoderStepConfig):
    """``eval_step(state, batch) -> {"loss_sum", "count"}`` in inference mode."""

    def eval_step(state, batch):
        variables = {"params": state.params}
        if state.batch_stats is not None:
            variables["batch_stats"] = state.batch_stats
        recon, _ = state.apply_fn(variables, _encoder_input(batch["images"], cfg), train=False)
        losses = l1_per_example(recon, batch["images"]) * batch["mask"]
        return {"loss_sum": _global_sum(losses.sum(), cfg.axis_name),
                "count": _global_sum(batch["mask"].sum(), cfg.axis_name)}

    return eval_step
