"""``pretrain(config, workdir, data)``: self-supervised autoencoder pretraining of a backbone.

Park et al.'s first stage: a registered backbone's body (random init, as in the paper, or
ImageNet) encodes unlabelled images, a :class:`~featsim.train.autoencoder.ConvDecoder`
reconstructs them, and both train on the L1 reconstruction loss. The encoder then serves as
a weight source for ``featsim train --weights DIR`` and ``featsim distance/compare --weights
DIR`` (:func:`featsim.backbones.load_pretrained` reads ``DIR/encoder.msgpack``).

Writes into ``workdir``: ``config.json``; ``checkpoint.msgpack`` after every epoch (atomic;
``resume=True`` continues from it to the same result as an uninterrupted run);
``history.json`` / ``history.csv`` (train L1 per epoch, and validation L1 in inference mode
when ``val_fraction > 0``); ``encoder.msgpack`` (the backbone's variables in the registered
module's layout, headless, with provenance metadata); ``autoencoder.msgpack`` (encoder and
decoder); ``metrics.json``.

BatchNorm statistics: with ``recompute_batch_stats=True`` (default) the saved encoder's
running means/variances are recomputed after training over the training images in training
mode (:func:`featsim.train.batchnorm.recompute_batch_stats`). Without it a short run from a
random init (momentum 0.99: ``0.99 ** 32 = 0.72`` of the initial mean 0 / variance 1 left
after 32 steps) saves statistics far from the activations', and the encoder's
inference-mode features can be constant across images (seen on chest X-rays at 128 px:
std across images of ``pre_logits`` 4.5e-8 in inference mode, 0.14 in training mode).
``checkpoint.msgpack`` keeps the training-time moving averages, so ``resume`` continues
training unchanged.

Data loading, batching (masked padding), the ``pmap`` wrapper and the learning-rate
schedules are :mod:`featsim.train`'s; labels, when the source has any, are ignored.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from tqdm.auto import tqdm

import featsim
from featsim import parallel
from featsim.backbones.registry import ENCODER_FILENAME, get_backbone, load_pretrained
from featsim.backbones.weights import save_variables
from featsim.data.items import Source
from featsim.data.sources import open_source
from featsim.data.transforms import Transform
from featsim.rundir import RunDir
from featsim.train import optim
from featsim.train.autoencoder import (
    AutoencoderStepConfig,
    ConvAutoencoder,
    ConvDecoder,
    default_feature_layer,
    feature_shapes,
    make_pretrain_step,
    make_reconstruction_eval_step,
)
from featsim.train.batchnorm import recompute_batch_stats
from featsim.train.config import SCHEDULES
from featsim.train.datasets import Dataset, load_dataset, split_validation
from featsim.train.epoch import DeviceData, evaluate_data, run_epoch
from featsim.train.steps import TrainState

__all__ = [
    "ENCODER_FILENAME",
    "INITS",
    "PretrainConfig",
    "build_autoencoder",
    "encoder_variables",
    "initial_autoencoder_variables",
    "load_unlabelled",
    "pretrain",
    "pretrain_transform",
]

INITS = ("random", "imagenet")


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """Everything an autoencoder pretraining run depends on (recorded as ``config.json``).

    Attributes:
        backbone: registry name of the encoder.
        layer: the encoder's output tap; None: the last spatial map before global pooling
            (:func:`~featsim.train.autoencoder.default_feature_layer`).
        init: ``"random"`` (Park et al.) or ``"imagenet"`` (the registered weights, or the
            ``weights=`` file of :func:`pretrain`).
        image_size: side of the square training images; None: the backbone's input size.
            The resize keeps the backbone's resize/crop ratio.
        epochs, batch_size: global batch over all devices.
        learning_rate, schedule, warmup_epochs, weight_decay: Adam(W) and its schedule
            (:data:`featsim.train.SCHEDULES`), as in :class:`~featsim.train.TrainConfig`.
        decoder_width: channels of the decoder's first step (halved each step).
        normalization: the encoder's pixel scaling, ``"backbone"`` (the weights' own, what
            ``featsim distance`` uses) or ``"paper"`` (mean 0.5 / std 0.5, ``featsim train``'s
            default). The reconstruction target is always the pixels on [0, 1].
        val_fraction: share of the images held out for a validation L1 each epoch.
        limit: use a seeded random subset of this many images (None: all).
        image_dtype: ``"uint8"`` or ``"float32"`` in memory.
        seed: PRNG seed (init, subset, data order, dropout, validation split).
        recompute_batch_stats: after training, replace the BatchNorm running statistics
            of the saved encoder/autoencoder by their population values over the training
            images (see the module docstring).
    """

    backbone: str
    layer: str | None = None
    init: str = "random"
    image_size: int | None = None
    epochs: int = 10
    batch_size: int = 32
    learning_rate: float = 1e-3
    schedule: str = "constant"
    warmup_epochs: float = 0.0
    weight_decay: float = 0.0
    decoder_width: int = 256
    normalization: str = "backbone"
    val_fraction: float = 0.0
    limit: int | None = None
    image_dtype: str = "uint8"
    seed: int = 0
    recompute_batch_stats: bool = True

    def __post_init__(self):
        checks = [
            (self.init in INITS, f"init must be one of {INITS}"),
            (self.schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}"),
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.learning_rate > 0, "learning_rate must be > 0"),
            (self.image_size is None or self.image_size >= 8, "image_size must be >= 8"),
            (self.decoder_width >= 1, "decoder_width must be >= 1"),
            (self.normalization in ("paper", "backbone"),
             'normalization must be "paper" or "backbone"'),
            (0.0 <= self.val_fraction < 1.0, "val_fraction must be in [0, 1)"),
            (self.limit is None or self.limit >= 1, "limit must be >= 1"),
            (self.image_dtype in ("uint8", "float32"), 'image_dtype must be "uint8" or "float32"'),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"{message}; got {self!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, value: dict) -> PretrainConfig:
        return cls(**value)

    def replace(self, **changes) -> PretrainConfig:
        return dataclasses.replace(self, **changes)


def pretrain_transform(config: PretrainConfig) -> Transform:
    """The decoding transform of a run: the backbone's recipe at ``config.image_size``
    (same resize/crop ratio) with ``config.normalization``."""
    pre = get_backbone(config.backbone, num_classes=None).preprocessing
    if config.image_size is not None and config.image_size != pre.input_size:
        size = config.image_size
        resize = size if pre.crop == "none" else max(
            size, round(size * pre.resize_size / pre.input_size))
        pre = dataclasses.replace(pre, input_size=size, resize_size=resize)
    return Transform.for_backbone(pre, config.normalization)


def load_unlabelled(source: Source | str | os.PathLike, transform: Transform, *,
                    limit: int | None = None, seed: int = 0, dtype: str = "uint8",
                    data_dir=None) -> Dataset:
    """Decodes a source's images for reconstruction, labels or not.

    Labels are dropped (every example gets label 0 of one class ``"image"``), so unlabelled
    folders work; decoding is :func:`~featsim.train.datasets.load_dataset`'s.

    Args:
        limit: keep a random subset of this many items (``numpy`` generator seeded with
            ``seed``; kept in source order). More than the source holds is an error.

    Raises:
        ValueError: ``limit`` above the number of images (both named), or an image that
            cannot be decoded (named).
    """
    if not isinstance(source, Source):
        source = open_source(source, data_dir=data_dir)
    items = source.items
    if limit is not None:
        if limit > len(items):
            raise ValueError(f"limit={limit} but {source.spec!r} holds {len(items)} images")
        keep = np.sort(np.random.default_rng(seed).choice(len(items), limit, replace=False))
        items = tuple(items[i] for i in keep)
    items = tuple(dataclasses.replace(it, label=0) for it in items)
    source = dataclasses.replace(source, items=items, class_names=("image",))
    return load_dataset(source, transform, dtype=dtype, data_dir=data_dir)


@functools.lru_cache(maxsize=8)  # the same module object for the same configuration
def build_autoencoder(config: PretrainConfig, *, bn_axis_name: str | None = None):
    """``(module, layer, image_size)``: the :class:`ConvAutoencoder` for ``config``.

    Raises:
        KeyError: unknown backbone. ValueError: ``config.layer`` is not a spatial tap of it.
    """
    encoder = get_backbone(config.backbone, num_classes=None, bn_axis_name=bn_axis_name)
    size = config.image_size or encoder.preprocessing.input_size
    shape = (1, size, size, 3)
    layer = config.layer or default_feature_layer(encoder.module, shape)
    shapes = feature_shapes(encoder.module, shape)
    if layer not in shapes or len(shapes[layer]) != 4:
        spatial = [k for k, s in shapes.items() if len(s) == 4]
        raise ValueError(f"layer {layer!r} is not a spatial feature map of {config.backbone} "
                         f"at {size} px; spatial taps: {spatial}")
    module = ConvAutoencoder(encoder=encoder.module,
                             decoder=ConvDecoder(output_size=size,
                                                 base_width=config.decoder_width),
                             layer=layer)
    return module, layer, size


def initial_autoencoder_variables(config: PretrainConfig, module, size: int, rng, weights):
    """Random autoencoder variables, the encoder's replaced by ImageNet ones if asked."""
    init = jax.jit(lambda key, x: module.init(key, x, train=False))
    variables = jax.tree.map(np.asarray, init(rng, jnp.zeros((1, size, size, 3), jnp.float32)))
    variables = {col: dict(tree) for col, tree in variables.items()}
    if config.init == "imagenet":
        headless = get_backbone(config.backbone, num_classes=None)
        loaded = load_pretrained(headless, path=weights, skip_head=True).variables
        for collection, tree in loaded.items():
            variables[collection] = dict(variables[collection], encoder=tree)
    elif weights is not None:
        raise ValueError(f"weights={weights!r} is only used with init='imagenet'")
    return variables


def _mean_loss(outputs) -> float:
    sums, _, _ = outputs.fetch()
    return sums["loss_sum"] / sums["count"]


def _recomputed_stats(config: PretrainConfig, variables: dict, data: Dataset, batch_size: int,
                      step_config: AutoencoderStepConfig, key) -> tuple[dict, dict]:
    """``(variables, info)``: the autoencoder's BatchNorm statistics recomputed over
    ``data``'s images in consecutive batches of ``batch_size`` (the training batch, on one
    device: synchronised BatchNorm saw the same global batch). A final short batch is left
    out unless it is the only one (smaller batches have other statistics)."""
    t0 = time.perf_counter()
    module, _, _ = build_autoencoder(config)  # no pmap axis name: plain jit
    n = len(data)
    stops = list(range(batch_size, n + 1, batch_size)) or [n]
    scale = np.asarray(step_config.scale, np.float32)
    offset = np.asarray(step_config.offset, np.float32)
    chunks = (data.images[stop - min(batch_size, n):stop].astype(np.float32) * scale + offset
              for stop in stops)
    variables = recompute_batch_stats(module.apply, variables, chunks, rng=key)
    used = stops[-1] if n >= batch_size else n
    return variables, {"images": used, "batches": len(stops), "batch_size": min(batch_size, n),
                       "seconds": time.perf_counter() - t0}


def _variables_of(state) -> dict:
    host = parallel.fetch(state, replicated=True)
    variables = {"params": host.params}
    if host.batch_stats is not None:
        variables["batch_stats"] = host.batch_stats
    return variables


def pretrain(
    config: PretrainConfig,
    workdir: str | os.PathLike,
    data: Dataset | Source | str | os.PathLike,
    *,
    weights: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    data_dir=None,
) -> dict:
    """Trains the autoencoder of ``config.backbone`` on ``data``'s images (labels ignored).

    Args:
        config: the run's hyperparameters.
        workdir: output folder (created); see the module docstring for its files.
        data: a :class:`~featsim.train.datasets.Dataset` (used as is: ``config.limit`` and
            ``image_size`` do not apply) or a source spec (e.g.
            ``"../shared/data/chest_xray_kermany_224/chest_xray:train"``).
        weights: with ``init="imagenet"``, a checkpoint instead of the registered weights.
        resume: continue from ``workdir/checkpoint.msgpack`` if present.

    Returns:
        ``metrics.json``'s content: ``train_loss`` (last epoch), ``val_loss`` when
        validating, ``layer``, ``code_shape``, sizes, timing, ``encoder`` (its path).

    Raises:
        KeyError: unknown backbone. ValueError: a bad layer, ``limit`` or image.
        FileNotFoundError: ``init="imagenet"`` without available weights.
    """
    run = RunDir(workdir, writes=parallel.process_share().is_main).create()
    started = time.perf_counter()
    ndev = jax.device_count()
    batch_size = -(-config.batch_size // ndev) * ndev
    transform = pretrain_transform(config)
    if not isinstance(data, Dataset):
        data = load_unlabelled(data, transform, limit=config.limit, seed=config.seed,
                               dtype=config.image_dtype, data_dir=data_dir)
    size = data.images.shape[1]
    if config.image_size not in (None, size):
        raise ValueError(f"config.image_size={config.image_size} but the dataset's images "
                         f"are {size} px")
    config = config.replace(image_size=size) if config.image_size is None else config
    val = None
    if config.val_fraction:
        data, val = split_validation(data, config.val_fraction, config.seed)
    module, layer, _ = build_autoencoder(config, bn_axis_name=parallel.DATA_AXIS)
    rng = jax.random.key(config.seed)
    init_key, data_key, step_key = jax.random.split(rng, 3)
    variables = initial_autoencoder_variables(config, module, size, init_key, weights)
    steps_per_epoch = math.ceil(len(data) / batch_size)
    tx = _optimizer(config, steps_per_epoch)
    state = TrainState.create(apply_fn=module.apply, params=variables["params"], tx=tx,
                              batch_stats=variables.get("batch_stats"))
    scale, offset = transform.affine()
    step_config = AutoencoderStepConfig(module=module, scale=tuple(float(v) for v in scale),
                                        offset=tuple(float(v) for v in offset),
                                        axis_name=parallel.DATA_AXIS)
    run.write_config(config)
    train_step = make_pretrain_step(step_config)
    eval_step = make_reconstruction_eval_step(step_config)
    train_data = DeviceData.put({"images": data.images})
    val_data = None if val is None else DeviceData.put({"images": val.images})
    state = parallel.replicate(state)
    history: list[dict] = []
    start_epoch = 0
    if resume and run.checkpoint_file.exists():
        host_state, start_epoch, history, _ = run.load_checkpoint(
            parallel.fetch(state, replicated=True))
        state = parallel.replicate(host_state)
    bar = tqdm(total=config.epochs, initial=start_epoch, desc=f"{config.backbone} autoencoder",
               unit="epoch", disable=not progress)
    for epoch in range(start_epoch, config.epochs):
        t0 = time.perf_counter()
        state, outputs = run_epoch(train_step, state, train_data, batch_size,
                                   order_key=jax.random.fold_in(data_key, epoch),
                                   step_key=jax.random.fold_in(step_key, epoch))
        train_loss = _mean_loss(outputs)
        row = {"epoch": epoch + 1, "train_loss": train_loss}
        if val is not None:
            row["val_loss"] = _mean_loss(evaluate_data(eval_step, state, val_data, batch_size))
        row["seconds"] = time.perf_counter() - t0
        history.append(row)
        run.save_checkpoint(parallel.fetch(state, replicated=True), epoch + 1, history)
        run.write_history(history)
        bar.update(1)
        bar.set_postfix(loss=f"{train_loss:.4f}")
    bar.close()
    variables = _variables_of(state)
    bn_info = None
    if config.recompute_batch_stats and "batch_stats" in variables:
        variables, bn_info = _recomputed_stats(config, variables, data, batch_size,
                                               step_config, jax.random.fold_in(rng, 1))
        history[-1]["bn_recomputed_images"] = bn_info["images"]
        if val is not None:  # the saved model's inference-mode L1, next to the running one's
            recomputed = state.replace(batch_stats=parallel.replicate(variables["batch_stats"]))
            bn_info["val_loss"] = history[-1]["val_loss_bn_recomputed"] = _mean_loss(
                evaluate_data(eval_step, recomputed, val_data, batch_size))
            bn_info["val_loss_running_stats"] = history[-1]["val_loss"]
        run.write_history(history)
    metadata = {"backbone": config.backbone, "num_classes": "0", "kind": "autoencoder_encoder",
                "layer": layer, "init": config.init, "config": config.to_json(),
                "batch_stats": ("running averages of training" if bn_info is None else
                                f"recomputed over {bn_info['images']} training images")}
    if run.writes:  # process 0 of a multi-process run
        save_variables(run.encoder_file, encoder_variables(variables), metadata=metadata)
        save_variables(run.autoencoder_file, variables,
                       metadata=dict(metadata, kind="autoencoder"))
    code_shape = feature_shapes(module.encoder, (1, size, size, 3))[layer][1:]
    result = {"train_loss": history[-1]["train_loss"], "epochs_run": len(history),
              "layer": layer, "code_shape": list(code_shape), "image_size": size,
              "n_train": len(data), "n_val": 0 if val is None else len(val),
              "batch_stats_recomputed": bn_info or False,
              "seconds": time.perf_counter() - started, "devices": ndev,
              "encoder": str(run.encoder_file), "config": config.to_dict(),
              "featsim_version": featsim.__version__}
    if val is not None:  # of the saved variables
        result["val_loss"] = bn_info["val_loss"] if bn_info else history[-1]["val_loss"]
    run.write_metrics(result)
    return result


@functools.lru_cache(maxsize=8)
def _optimizer(config: PretrainConfig, steps_per_epoch: int):
    """Adam(W) on the configured schedule. One object per (configuration, steps): with the
    module (``build_autoencoder``) and the step functions also cached, a second run of the
    same configuration in one process (a resumed run, another seed's data) finds its
    programs compiled (the train state's static fields, ``apply_fn`` and ``tx``, compare
    equal)."""
    schedule = optim.schedule_for(config, steps_per_epoch)
    return (optax.adamw(schedule, weight_decay=config.weight_decay) if config.weight_decay
            else optax.adam(schedule))


def encoder_variables(variables) -> dict:
    """The ``encoder`` subtree of each collection of autoencoder variables."""
    return {col: traverse_util.unflatten_dict(
        {k[1:]: v for k, v in traverse_util.flatten_dict(tree).items() if k[0] == "encoder"})
        for col, tree in variables.items()}
