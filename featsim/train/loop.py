"""``train_and_evaluate(config, workdir, ...)``: one training run, resumable, with history.

Writes into ``workdir``: ``config.json``; ``checkpoint.msgpack`` after every epoch (atomic;
``resume=True`` continues from it to the same final result as an uninterrupted run);
``history.json`` and ``history.csv`` (loss, accuracy, precision, recall, F1, G-mean,
specificity, ROC AUC, ECE on train, validation and test per epoch); ``model.msgpack`` (the
final variables, loadable by ``featsim compare`` and ``featsim distance --weights``); and
``metrics.json`` (the final model's test metrics as ``test_<name>``).

Multi-host: call ``jax.distributed.initialize()`` first; every process then builds the same
global batches and feeds its share (:func:`featsim.parallel.process_slice`) to its local
devices, and ``pmap``'s collectives span all hosts. Only process 0 needs to write files
(not enforced yet: give each process its own ``workdir``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path

import jax
import numpy as np
from flax import traverse_util
from tqdm.auto import tqdm

import featsim
from featsim import parallel
from featsim.backbones.registry import get_backbone
from featsim.backbones.weights import save_variables
from featsim.data.transforms import Transform
from featsim.train import heads, strategies
from featsim.train.callbacks import StopWhen
from featsim.train.config import TrainConfig
from featsim.train.data import Dataset, batches, load_dataset, split_validation
from featsim.train.evaluation import (
    BINARY_METRIC_KEYS,
    MULTICLASS_METRIC_KEYS,
    classification_metrics,
    summarize_runs,
)
from featsim.train.losses import class_weights as balanced_class_weights
from featsim.train.runfiles import load_checkpoint as _load_checkpoint
from featsim.train.runfiles import save_checkpoint as _save_checkpoint
from featsim.train.runfiles import save_json as _save_json
from featsim.train.runfiles import write_history as _write_history
from featsim.train.steps import StepConfig, TrainState, make_eval_step, make_train_step

__all__ = ["create_train_state", "evaluate", "run_seeds", "train_and_evaluate"]


def _initial_variables(config: TrainConfig, num_classes: int, rng, weights):
    """Pretrained (new head), random (scratch) or Mean Var variables, as numpy."""
    backbone = heads.model_for(config, num_classes)
    head_key, init_key = jax.random.split(rng)
    if config.strategy == "scratch" or config.init == "random":
        return backbone, jax.tree.map(np.asarray, backbone.init(init_key))
    pretrained = heads.load_pretrained_model(backbone, path=weights, rng=head_key)
    variables = pretrained.variables
    if config.strategy == "meanvar":
        variables = dict(variables, params=strategies.meanvar_init(variables["params"],
                                                                   init_key))
        if "batch_stats" in variables:  # they described the pretrained activations
            fresh = jax.tree.map(np.asarray, backbone.init(init_key))["batch_stats"]
            variables["batch_stats"] = fresh
    return pretrained, variables


def create_train_state(config: TrainConfig, num_classes: int, steps_per_epoch: int, rng, *,
                       weights=None):
    """The initial :class:`TrainState` and the static :class:`StepConfig` of a run."""
    backbone, variables = _initial_variables(config, num_classes, rng, weights)
    module = heads.model_for(config, num_classes, bn_axis_name=parallel.DATA_AXIS).module
    stages = strategies.leaf_stages(backbone.module, variables, backbone.input_shape)
    labels = strategies.strategy_labels(stages, config.strategy,
                                        partial_stages=config.partial_stages)
    param_labels = traverse_util.unflatten_dict(
        {k[1:]: v for k, v in labels.items() if k[0] == "params"})
    tx = strategies.make_optimizer(param_labels, strategies.schedule_for(config, steps_per_epoch),
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
    )
    return state, step_config, backbone, transform


def _batch(dataset: Dataset, index, mask):
    batch = {"images": dataset.images[index], "labels": dataset.labels[index], "mask": mask}
    if dataset.targets is not None:
        batch["targets"] = dataset.targets[index]
    return batch


_AUX_SUMS = {"ce_sum": "class_loss", "aux_err_sum": "aux_mse"}  # step output -> metric


def _add_aux_sums(sums: dict, out) -> None:
    for key in _AUX_SUMS:
        if key in out:
            sums[key] = sums.get(key, 0.0) + float(np.asarray(out[key])[0])


def _aux_metrics(sums: dict, count: float) -> dict:
    """With an auxiliary head: the class-weighted cross-entropy alone and the regression
    MSE (mean over examples and targets), beside the total ``loss``."""
    return {name: sums[key] / count for key, name in _AUX_SUMS.items() if key in sums}


def _check_targets(dataset: Dataset, aux_targets: int, name: str) -> None:
    if not aux_targets:
        return
    shape = None if dataset.targets is None else dataset.targets.shape
    if shape != (len(dataset), aux_targets):
        raise ValueError(
            f"aux_targets={aux_targets} needs {name} regression targets of shape "
            f"({len(dataset)}, {aux_targets}), got {shape} from {dataset.source!r} (give "
            "target_columns naming labels.csv columns)")


def evaluate(p_eval_step, state, dataset: Dataset, batch_size: int) -> dict:
    """Loss and every classification metric of ``state`` on ``dataset`` (inference mode)."""
    loss_sum, count, probs, labels, aux = 0.0, 0.0, [], [], {}
    for index, mask in batches(len(dataset), batch_size, n_devices=jax.device_count()):
        index, mask = parallel.process_slice(index, mask)
        out = p_eval_step(state, parallel.shard(_batch(dataset, index, mask)))
        _add_aux_sums(aux, out)
        loss_sum += float(np.asarray(out["loss_sum"])[0])
        count += float(np.asarray(out["count"])[0])
        probs.append(parallel.unshard(out["probs"])[mask > 0])
        labels.append(dataset.labels[index][mask > 0])
    # The loss is global (psum); with several processes the other metrics cover this
    # process's share of the examples.
    metrics = classification_metrics(np.concatenate(labels), np.concatenate(probs),
                                     num_classes=dataset.num_classes, loss=loss_sum / count)
    return {**metrics, **_aux_metrics(aux, count)}


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
        train, test: labelled :class:`~featsim.train.data.Dataset` or source specs (e.g.
            ``"chest_xray:train"``, ``"chest_xray:test"``).
        weights: pretrained checkpoint instead of the registered one.
        resume: continue from ``workdir/checkpoint.msgpack`` if present.
        fast_linear: ``linear`` without augmentation trains the head on cached features
            (:mod:`featsim.train.linear_probe`); False runs the end-to-end loop instead.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if config.uses_cached_features and fast_linear:
        from featsim.train.linear_probe import train_linear_probe

        return train_linear_probe(config, workdir, train=train, test=test, weights=weights,
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
    (workdir / "config.json").write_text(config.to_json() + "\n")
    p_train = parallel.pmap(make_train_step(step_config, weights_c), in_axes=(0, 0, None))
    p_eval = parallel.pmap(make_eval_step(step_config, weights_c))
    state = parallel.replicate(state)
    history: list[dict] = []
    best = {"epoch": None, "val_loss": None}
    start_epoch = 0
    checkpoint = workdir / "checkpoint.msgpack"
    if resume and checkpoint.exists():
        host_state, start_epoch, history, best = _load_checkpoint(
            checkpoint, parallel.unreplicate(state))
        state = parallel.replicate(host_state)
        if history and history[-1].get("stop_reason"):
            start_epoch = config.epochs  # the run had stopped: do not train on
    bar = tqdm(total=config.epochs, initial=start_epoch, desc=f"{config.backbone} "
               f"{config.strategy}", unit="epoch", disable=not progress)
    for epoch in range(start_epoch, config.epochs):
        t0 = time.perf_counter()
        loss_sum, count, probs, seen, aux = 0.0, 0.0, [], [], {}
        epoch_key = jax.random.fold_in(data_key, epoch)
        for i, (index, mask) in enumerate(batches(len(train), batch_size, n_devices=ndev,
                                                  shuffle_key=epoch_key)):
            index, mask = parallel.process_slice(index, mask)
            key = jax.random.fold_in(jax.random.fold_in(step_key, epoch), i)
            state, out = p_train(state, parallel.shard(_batch(train, index, mask)), key)
            _add_aux_sums(aux, out)
            loss_sum += float(np.asarray(out["loss_sum"])[0])
            count += float(np.asarray(out["count"])[0])
            probs.append(parallel.unshard(out["probs"])[mask > 0])
            seen.append(index[mask > 0])
        row = {"epoch": epoch + 1}
        train_metrics = classification_metrics(
            train.labels[np.concatenate(seen)], np.concatenate(probs),
            num_classes=num_classes, loss=loss_sum / count)
        train_metrics.update(_aux_metrics(aux, count))
        row.update({f"train_{k}": v for k, v in train_metrics.items()})
        if val is not None:
            row.update({f"val_{k}": v for k, v in evaluate(p_eval, state, val,
                                                           batch_size).items()})
        row.update({f"test_{k}": v for k, v in evaluate(p_eval, state, test,
                                                        batch_size).items()})
        row["seconds"] = time.perf_counter() - t0
        history.append(row)
        stop = None
        if val is not None:
            if best["val_loss"] is None or row["val_loss"] < best["val_loss"]:
                best = {"epoch": epoch + 1, "val_loss": row["val_loss"]}
                _save_model(workdir / "best_model.msgpack", state, config, head)
            elif (config.early_stopping_patience is not None
                  and epoch + 1 - best["epoch"] >= config.early_stopping_patience):
                stop = (f"early_stopping_patience={config.early_stopping_patience}: no "
                        f"val_loss below epoch {best['epoch']}'s {best['val_loss']:.6g}")
            if stop_rule is not None and stop_rule.holds(row):
                stop = f"stop_when {stop_rule.describe(row)}"
        if stop:
            row["stop_reason"] = stop  # in history.json/csv and metrics.json
        _save_checkpoint(checkpoint, state, epoch + 1, history, best)
        _write_history(workdir, history)
        bar.update(1)
        if stop:
            break
    bar.close()
    final = state
    chosen_epoch = history[-1]["epoch"]
    if config.early_stopping_patience is not None and best["epoch"] is not None:
        chosen_epoch = best["epoch"]
        host = _load_model_into(workdir / "best_model.msgpack", parallel.unreplicate(state))
        final = parallel.replicate(host)
    test_metrics = evaluate(p_eval, final, test, batch_size)
    _save_model(workdir / "model.msgpack", final, config, head)
    result = {f"test_{k}": v for k, v in test_metrics.items()}
    result.update(epoch=chosen_epoch, epochs_run=len(history), n_train=len(train),
                  n_val=0 if val is None else len(val), n_test=len(test),
                  seconds=time.perf_counter() - started, devices=ndev,
                  stop_reason=history[-1].get("stop_reason"),
                  config=config.to_dict(), featsim_version=featsim.__version__)
    _save_json(workdir / "metrics.json", result)
    return result


def _save_model(path: Path, state, config: TrainConfig, num_classes: int) -> None:
    host = parallel.unreplicate(state)
    variables = {"params": host.params}
    if host.batch_stats is not None:
        variables["batch_stats"] = host.batch_stats
    save_variables(path, variables, metadata={
        "backbone": config.backbone, "num_classes": str(num_classes),
        "strategy": config.strategy, "config": config.to_json()})


def _load_model_into(path: Path, state):
    from featsim.backbones.weights import load_variables

    variables = load_variables(path)
    return state.replace(params=variables["params"],
                         batch_stats=variables.get("batch_stats", state.batch_stats))


def run_seeds(config: TrainConfig, seeds, workdir, **kwargs) -> dict:
    """Runs ``config`` once per seed in ``workdir/seed_<s>/`` and writes ``summary.json``
    with the mean and std (ddof=1) of every test metric."""
    workdir = Path(workdir)
    runs = [train_and_evaluate(dataclasses.replace(config, seed=int(s)),
                               workdir / f"seed_{s}", **kwargs) for s in seeds]
    numeric = [{k: v for k, v in r.items() if k.startswith("test_")} for r in runs]
    summary = {"seeds": list(seeds), "summary": summarize_runs(numeric), "runs": runs}
    workdir.mkdir(parents=True, exist_ok=True)
    _save_json(workdir / "summary.json", summary)
    return summary
