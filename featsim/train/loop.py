"""``train_and_evaluate(config, workdir, ...)``: one training run, resumable, with history.

Writes into ``workdir``: ``config.json``; ``checkpoint.msgpack`` after every epoch (atomic;
``resume=True`` continues from it to the same final result as an uninterrupted run);
``history.json`` and ``history.csv`` (loss, accuracy, precision, recall, F1, G-mean,
specificity, ROC AUC, ECE on train, validation and test per epoch); ``model.msgpack`` (the
final variables, loadable by ``featsim compare`` and ``featsim distance --weights``); and
``metrics.json`` (the final model's test metrics as ``test_<name>``).

BatchNorm (``TrainConfig.recompute_bn_stats``, default on): every strategy that trains
BatchNorm (all but ``linear``) is evaluated, and saved, with population statistics
recomputed over the training split's images (un-augmented, inference preprocessing, every
row once, none padded; :func:`population_batch_stats`) from that epoch's weights, instead of
the running averages, which after a short run still hold mostly their initial values. The
state that trains on (and ``checkpoint.msgpack``) keeps the running averages, so resuming,
device count and padding leave results unchanged. ``metrics.json`` says which statistics
the reported model has (``bn_stats``, ``bn_stats_images``); ``history`` rows record
``bn_stats_images`` per epoch.

The epochs run in :mod:`featsim.train.epoch`: the data are copied to the devices once, each
epoch is one compiled program (batches built on the device, metrics accumulated there and
fetched once per epoch). Multi-host: call ``jax.distributed.initialize()`` first; every
process then builds the same global batches and its devices take their rows
(:func:`featsim.parallel.local_rows`), and ``pmap``'s collectives span all hosts. Only
process 0 needs to write files (not enforced yet: give each process its own ``workdir``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time

import jax
import numpy as np
from flax import traverse_util
from tqdm.auto import tqdm

import featsim
from featsim import parallel
from featsim.backbones.registry import get_backbone
from featsim.data.transforms import Transform
from featsim.rundir import RunDir, model_metadata
from featsim.train import heads, optim, strategies
from featsim.train.batchnorm import (
    bn_description,
    bn_stats_mode,
    bn_subset,
    even_batches,
    recompute_batch_stats,
)
from featsim.train.callbacks import StopWhen
from featsim.train.classification import classification_metrics
from featsim.train.config import TrainConfig
from featsim.train.datasets import Dataset, load_dataset, split_validation
from featsim.train.epoch import DeviceData, EpochOutputs, evaluate_data, run_epoch
from featsim.train.linear_probe import train_linear_probe
from featsim.train.losses import class_weights as balanced_class_weights
from featsim.train.metric_keys import BINARY_METRIC_KEYS, MULTICLASS_METRIC_KEYS
from featsim.train.steps import (
    StepConfig,
    TrainState,
    make_eval_step,
    make_train_step,
    normalize_images,
)
from featsim.train.summary import summarize_runs

__all__ = [
    "create_train_state",
    "evaluate",
    "population_batch_stats",
    "run_seeds",
    "train_and_evaluate",
]


def create_train_state(config: TrainConfig, num_classes: int, steps_per_epoch: int, rng, *,
                       weights=None):
    """The initial :class:`TrainState` and the static :class:`StepConfig` of a run."""
    backbone, variables = heads.initial_variables(config, num_classes, rng, weights)
    # bfloat16 compute: the layers cast their float32 parameters and inputs (Flax's dtype
    # field, set by model_for); BatchNorm statistics are reduced and kept in float32.
    module = heads.model_for(config, num_classes, bn_axis_name=parallel.DATA_AXIS).module
    stages = strategies.leaf_stages(backbone.module, variables, backbone.input_shape)
    labels = strategies.strategy_labels(stages, config.strategy,
                                        partial_stages=config.partial_stages)
    param_labels = traverse_util.unflatten_dict(
        {k[1:]: v for k, v in labels.items() if k[0] == "params"})
    tx = optim.make_optimizer(param_labels, optim.schedule_for(config, steps_per_epoch),
                                   body_lr_scale=config.body_lr_scale,
                                   weight_decay=config.weight_decay)
    state = TrainState.create(apply_fn=module.apply, params=variables["params"], tx=tx,
                              batch_stats=variables.get("batch_stats"))
    frozen = {k for k, v in labels.items() if v == "frozen"}
    transform = Transform.for_backbone(backbone.preprocessing, config.normalization)
    scale, offset = transform.affine()
    step_config = StepConfig(
        module=module,
        frozen_params=frozenset(k[1:] for k in frozen if k[0] == "params"),
        frozen_stats=frozenset(k[1:] for k in frozen if k[0] == "batch_stats"),
        body_train_mode=config.strategy != "linear",
        augment=config.augment,
        scale=tuple(float(v) for v in scale),
        offset=tuple(float(v) for v in offset),
        axis_name=parallel.DATA_AXIS,
        aux_targets=config.aux_targets,
        aux_weight=config.aux_weight,
        compute_dtype=config.compute_dtype,
    )
    return state, step_config, backbone, transform


def population_batch_stats(module, step_config: StepConfig, variables: dict, images,
                           batch_size: int, rng) -> dict:
    """``variables["batch_stats"]`` with every trained BatchNorm's running statistics
    replaced by their population values over ``images``
    (:func:`~featsim.train.batchnorm.recompute_batch_stats`).

    Args:
        module: the model without a pmap ``bn_axis_name`` (runs under ``jit`` on one device,
            so the result does not depend on the device count).
        step_config: the run's; its ``scale``/``offset`` preprocess the raw pixels exactly as
            the eval step does (no augmentation); its ``frozen_stats`` leaves are kept.
        variables: host ``{"params", "batch_stats"}``.
        images: ``[n, S, S, 3]`` on [0, 255], every row real.
        batch_size: the training (global) batch; the rows are cut by
            :func:`~featsim.train.batchnorm.even_batches` (all rows once, no padding, sizes
            within one of each other, none above ``batch_size``), so each BatchNorm sees
            batches like the synchronised ones of training.
        rng: key for stochastic layers (dropout) in training mode.
    """
    apply_fn = _normalized_apply(module, step_config)
    chunks = (images[index] for index in even_batches(len(images), batch_size))
    new = recompute_batch_stats(apply_fn, {"params": variables["params"],
                                           "batch_stats": variables["batch_stats"]},
                                chunks, rng=rng)["batch_stats"]
    if not step_config.frozen_stats:
        return new
    flat_new = traverse_util.flatten_dict(new)
    flat_old = traverse_util.flatten_dict(variables["batch_stats"])
    return traverse_util.unflatten_dict({
        k: (np.asarray(flat_old[k]) if k in step_config.frozen_stats else v)
        for k, v in flat_new.items()})


_APPLY_CACHE: dict = {}


def _normalized_apply(module, step_config: StepConfig):
    """``module.apply`` on raw pixels, one function object per (module, scaling) so that
    :func:`recompute_batch_stats` compiles once per run, not once per epoch."""
    key = (module, step_config.scale, step_config.offset)
    if key not in _APPLY_CACHE:
        def apply_fn(variables, images, **kwargs):
            return module.apply(variables, normalize_images(images, step_config), **kwargs)

        _APPLY_CACHE.clear()  # holds the latest run's only
        _APPLY_CACHE[key] = apply_fn
    return _APPLY_CACHE[key]


_AUX_SUMS = {"ce_sum": "class_loss", "aux_err_sum": "aux_mse"}  # step output -> metric


def device_data(dataset: Dataset) -> DeviceData:
    """A dataset's images, labels (and regression targets) on the devices, once per run."""
    return DeviceData.put({"images": dataset.images, "labels": dataset.labels,
                           "targets": dataset.targets})


def epoch_metrics(outputs: EpochOutputs, labels: np.ndarray, num_classes: int) -> dict:
    """Loss and every classification metric of an epoch's outputs (one fetch). With an
    auxiliary head also the class-weighted cross-entropy alone and the regression MSE (mean
    over examples and targets), beside the total ``loss``.

    The loss is global (psum); with several processes the other metrics cover this
    process's share of the examples.
    """
    sums, collected, rows = outputs.fetch()
    count = sums["count"]
    metrics = classification_metrics(labels[rows], collected["probs"],
                                     num_classes=num_classes, loss=sums["loss_sum"] / count)
    metrics.update({name: sums[key] / count for key, name in _AUX_SUMS.items() if key in sums})
    return metrics


def evaluate(eval_step, state, data: DeviceData, batch_size: int, num_classes: int) -> dict:
    """Loss and every classification metric of ``state`` on ``data`` (inference mode)."""
    return epoch_metrics(evaluate_data(eval_step, state, data, batch_size), data.host["labels"],
                         num_classes)


def _check_targets(dataset: Dataset, aux_targets: int, name: str) -> None:
    if not aux_targets:
        return
    shape = None if dataset.targets is None else dataset.targets.shape
    if shape != (len(dataset), aux_targets):
        raise ValueError(
            f"aux_targets={aux_targets} needs {name} regression targets of shape "
            f"({len(dataset)}, {aux_targets}), got {shape} from {dataset.source!r} (give "
            "target_columns naming labels.csv columns)")


def train_and_evaluate(
    config: TrainConfig,
    workdir: str | os.PathLike,
    *,
    train: Dataset | str,
    test: Dataset | str,
    weights: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    data_dir=None,
    fast_linear: bool = True,
) -> dict:
    """Trains ``config.backbone`` on ``train``, evaluating on validation and ``test`` each
    epoch; returns the final model's test metrics (also written to ``metrics.json``).

    Args:
        config: the run's hyperparameters.
        workdir: output folder (created).
        train, test: labelled :class:`~featsim.train.datasets.Dataset` or source specs (e.g.
            ``"chest_xray:train"``, ``"chest_xray:test"``).
        weights: pretrained checkpoint instead of the registered one.
        resume: continue from ``workdir/checkpoint.msgpack`` if present.
        fast_linear: ``linear`` without augmentation trains the head on cached features
            (:mod:`featsim.train.linear_probe`); False runs the end-to-end loop instead.
    """
    run = RunDir(workdir).create()
    if config.uses_cached_features and fast_linear:
        return train_linear_probe(config, run.path, train=train, test=test, weights=weights,
                                  progress=progress, data_dir=data_dir)
    started = time.perf_counter()
    ndev = jax.device_count()  # all hosts' devices; each process feeds its local ones
    batch_size = -(-config.batch_size // ndev) * ndev
    probe = get_backbone(config.backbone, num_classes=None)
    transform = Transform.for_backbone(probe.preprocessing, config.normalization)
    if not isinstance(train, Dataset):
        train = load_dataset(train, transform, dtype=config.image_dtype, data_dir=data_dir,
                             target_columns=config.target_columns)
    if not isinstance(test, Dataset):
        test = load_dataset(test, transform, dtype=config.image_dtype, data_dir=data_dir,
                            target_columns=config.target_columns)
    _check_targets(train, config.aux_targets, "train")
    _check_targets(test, config.aux_targets, "test")
    val = None
    if config.val_fraction:
        train, val = split_validation(train, config.val_fraction, config.seed)
    num_classes = train.num_classes
    head = 1 if num_classes == 2 else num_classes
    stop_rule = StopWhen(config.stop_when) if config.stop_when else None
    if stop_rule is not None:  # fail before training, not after the first epoch
        keys = BINARY_METRIC_KEYS if num_classes == 2 else MULTICLASS_METRIC_KEYS
        stop_rule.check_available(f"val_{k}" for k in (*keys, "loss"))
    weights_c = (balanced_class_weights(train.labels, num_classes)
                 if config.class_weighting == "balanced" else np.ones(num_classes, np.float32))
    steps_per_epoch = math.ceil(len(train) / batch_size)
    rng = jax.random.key(config.seed)
    init_key, data_key, step_key = jax.random.split(rng, 3)
    state, step_config, _, _ = create_train_state(config, head, steps_per_epoch, init_key,
                                                      weights=weights)
    bn_mode = bn_stats_mode(config, state.batch_stats, step_config.frozen_stats)
    bn_rows = (bn_subset(len(train), config.bn_stats_images, config.seed)
               if config.bn_stats_images is not None else np.arange(len(train)))
    n_bn = len(bn_rows) if bn_mode == "recomputed" else 0
    bn_key = jax.random.fold_in(rng, 1)  # independent of init/data/step keys
    # The step's module without the pmap axis name (one device: results independent of the
    # device count), in the same compute dtype.
    bn_module = heads.model_for(config, head).module
    bn_text = bn_description(bn_mode, n_bn, len(train))
    metadata = model_metadata(config, head, bn_stats=bn_text)

    def for_evaluation(state, epoch):
        """``(state to evaluate and save, history fields)``: with recomputed statistics a
        copy whose BatchNorm statistics are the population ones of this epoch's weights
        (deterministic in ``epoch``); the training state itself is left as it is."""
        if bn_mode != "recomputed":
            return state, {}
        t0 = time.perf_counter()
        host = parallel.fetch({"params": state.params, "batch_stats": state.batch_stats},
                              replicated=True)
        stats = population_batch_stats(bn_module, step_config, host, bn_images, batch_size,
                                       jax.random.fold_in(bn_key, epoch))
        return (state.replace(batch_stats=parallel.replicate(stats)),
                {"bn_stats_images": n_bn, "bn_seconds": time.perf_counter() - t0})
    run.write_config(config)
    train_step = make_train_step(step_config, weights_c)
    eval_step = make_eval_step(step_config, weights_c)
    train_data = device_data(train)
    val_data = None if val is None else device_data(val)
    test_data = device_data(test)
    # The images on the device already, not a second copy from the host.
    bn_images = train_data.first_copy("images")[bn_rows] if n_bn else None
    state = parallel.replicate(state)
    history: list[dict] = []
    best = {"epoch": None, "val_loss": None}
    start_epoch = 0
    if resume and run.checkpoint_file.exists():
        host_state, start_epoch, history, best = run.load_checkpoint(
            parallel.fetch(state, replicated=True))
        state = parallel.replicate(host_state)
        if history and history[-1].get("stop_reason"):
            start_epoch = config.epochs  # the run had stopped: do not train on
    last_eval = None
    bar = tqdm(total=config.epochs, initial=start_epoch, desc=f"{config.backbone} "
               f"{config.strategy}", unit="epoch", disable=not progress)
    for epoch in range(start_epoch, config.epochs):
        t0 = time.perf_counter()
        state, outputs = run_epoch(train_step, state, train_data, batch_size,
                                   order_key=jax.random.fold_in(data_key, epoch),
                                   step_key=jax.random.fold_in(step_key, epoch))
        row = {"epoch": epoch + 1}
        row.update({f"train_{k}": v for k, v in epoch_metrics(outputs, train.labels,
                                                               num_classes).items()})
        eval_state, bn_row = for_evaluation(state, epoch)
        last_eval = (epoch + 1, eval_state)
        row.update(bn_row)
        if val is not None:
            row.update({f"val_{k}": v for k, v in evaluate(
                eval_step, eval_state, val_data, batch_size, val.num_classes).items()})
        row.update({f"test_{k}": v for k, v in evaluate(
            eval_step, eval_state, test_data, batch_size, test.num_classes).items()})
        row["seconds"] = time.perf_counter() - t0
        history.append(row)
        stop = None
        if val is not None:
            if best["val_loss"] is None or row["val_loss"] < best["val_loss"]:
                best = {"epoch": epoch + 1, "val_loss": row["val_loss"]}
                run.save_model(_host_variables(eval_state), metadata, best=True)
            elif (config.early_stopping_patience is not None
                  and epoch + 1 - best["epoch"] >= config.early_stopping_patience):
                stop = (f"early_stopping_patience={config.early_stopping_patience}: no "
                        f"val_loss below epoch {best['epoch']}'s {best['val_loss']:.6g}")
            if stop_rule is not None and stop_rule.holds(row):
                stop = f"stop_when {stop_rule.describe(row)}"
        if stop:
            row["stop_reason"] = stop  # in history.json/csv and metrics.json
        run.save_checkpoint(parallel.fetch(state, replicated=True), epoch + 1, history, best)
        run.write_history(history)
        bar.update(1)
        if stop:
            break
    bar.close()
    chosen_epoch = history[-1]["epoch"]
    if config.early_stopping_patience is not None and best["epoch"] is not None:
        chosen_epoch = best["epoch"]  # saved with the statistics it was evaluated with
        host, best_variables = parallel.fetch(state, replicated=True), run.load_variables(
            best=True)
        final = parallel.replicate(host.replace(
            params=best_variables["params"],
            batch_stats=best_variables.get("batch_stats", host.batch_stats)))
    elif last_eval is not None and last_eval[0] == chosen_epoch:
        final = last_eval[1]
    else:  # resumed after the last epoch: the same statistics again (same key)
        final, _ = for_evaluation(state, chosen_epoch - 1)
    test_metrics = evaluate(eval_step, final, test_data, batch_size, test.num_classes)
    run.save_model(_host_variables(final), metadata)
    result = {f"test_{k}": v for k, v in test_metrics.items()}
    result.update(epoch=chosen_epoch, epochs_run=len(history), n_train=len(train),
                  n_val=0 if val is None else len(val), n_test=len(test),
                  seconds=time.perf_counter() - started, devices=ndev,
                  stop_reason=history[-1].get("stop_reason"),
                  bn_stats=bn_text, bn_stats_images=n_bn,
                  config=config.to_dict(), featsim_version=featsim.__version__)
    run.write_metrics(result)
    return result


def _host_variables(state) -> dict:
    """The (unreplicated) variables of a train state, as saved in ``model.msgpack``."""
    variables = {"params": state.params}
    if state.batch_stats is not None:
        variables["batch_stats"] = state.batch_stats
    return parallel.fetch(variables, replicated=True)


def run_seeds(config: TrainConfig, seeds, workdir, **kwargs) -> dict:
    """Runs ``config`` once per seed in ``workdir/seed_<s>/`` and writes ``summary.json``
    with the mean and std (ddof=1) of every test metric."""
    root = RunDir(workdir)
    runs = [train_and_evaluate(dataclasses.replace(config, seed=int(s)),
                               root.path / f"seed_{s}", **kwargs) for s in seeds]
    numeric = [{k: v for k, v in r.items() if k.startswith("test_")} for r in runs]
    summary = {"seeds": list(seeds), "summary": summarize_runs(numeric), "runs": runs}
    root.create().write_summary(summary)
    return summary
