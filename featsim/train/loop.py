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
import jax.numpy as jnp
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
from featsim.train.classification import epoch_metrics
from featsim.train.config import TrainConfig
from featsim.train.datasets import Dataset, load_dataset, split_validation
from featsim.train.epoch import (
    DeviceData,
    EpochOutputs,
    evaluate_data,
    run_epoch,
    seed_state,
    stack_states,
)
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


def device_data(dataset: Dataset) -> DeviceData:
    """A dataset's images, labels (and regression targets) on the devices, once per run."""
    return DeviceData.put({"images": dataset.images, "labels": dataset.labels,
                           "targets": dataset.targets})


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
    run = RunDir(workdir, writes=parallel.process_share().is_main).create()
    if config.uses_cached_features and fast_linear:
        return train_linear_probe(config, run.path, train=train, test=test, weights=weights,
                                  progress=progress, data_dir=data_dir)
    data = _SharedData.load(config, train, test, data_dir)
    seed_run = _SeedRun(config, run, data, weights=weights, resume=resume)
    _train([seed_run], data, progress=progress)
    return seed_run.finish()


@dataclasses.dataclass(frozen=True)
class _SharedData:
    """What the seeds of one configuration share: the datasets, on the host and on the
    devices, the global batch and the class weights."""

    train: Dataset
    val: Dataset | None
    test: Dataset
    train_data: DeviceData
    val_data: DeviceData | None
    test_data: DeviceData
    batch_size: int
    class_weights: np.ndarray

    @classmethod
    def load(cls, config: TrainConfig, train, test, data_dir) -> _SharedData:
        ndev = jax.device_count()  # all hosts' devices; each process feeds its local ones
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
        weights_c = (balanced_class_weights(train.labels, num_classes)
                     if config.class_weighting == "balanced"
                     else np.ones(num_classes, np.float32))
        return cls(train=train, val=val, test=test, train_data=device_data(train),
                   val_data=None if val is None else device_data(val),
                   test_data=device_data(test),
                   batch_size=-(-config.batch_size // ndev) * ndev, class_weights=weights_c)


class _SeedRun:
    """One seed's run: its keys and state, evaluation, history, stopping and files."""

    def __init__(self, config: TrainConfig, run: RunDir, data: _SharedData, *, weights,
                 resume: bool):
        self.config, self.run, self.data = config, run, data
        self.started = time.perf_counter()
        train = data.train
        self.num_classes = train.num_classes
        self.head = 1 if self.num_classes == 2 else self.num_classes
        self.stop_rule = StopWhen(config.stop_when) if config.stop_when else None
        if self.stop_rule is not None:  # fail before training, not after the first epoch
            keys = BINARY_METRIC_KEYS if self.num_classes == 2 else MULTICLASS_METRIC_KEYS
            self.stop_rule.check_available(f"val_{k}" for k in (*keys, "loss"))
        steps_per_epoch = math.ceil(len(train) / data.batch_size)
        rng = jax.random.key(config.seed)
        init_key, self.data_key, self.step_key = jax.random.split(rng, 3)
        state, self.step_config, model, _ = create_train_state(config, self.head,
                                                               steps_per_epoch,
                                                           init_key, weights=weights)
        self.bn_mode = bn_stats_mode(config, state.batch_stats, self.step_config.frozen_stats)
        bn_rows = (bn_subset(len(train), config.bn_stats_images, config.seed)
                   if config.bn_stats_images is not None else np.arange(len(train)))
        self.n_bn = len(bn_rows) if self.bn_mode == "recomputed" else 0
        self.bn_key = jax.random.fold_in(rng, 1)  # independent of init/data/step keys
        # The step's module without the pmap axis name (one device: results independent of
        # the device count), in the same compute dtype (heads.model_for).
        self.bn_module = model.module
        self.bn_text = bn_description(self.bn_mode, self.n_bn, len(train))
        self.metadata = model_metadata(config, self.head, bn_stats=self.bn_text)
        # The images on the device already, not a second copy from the host.
        self.bn_images = data.train_data.first_copy("images")[bn_rows] if self.n_bn else None
        run.write_config(config)
        self.train_step = make_train_step(self.step_config, data.class_weights)
        self.eval_step = make_eval_step(self.step_config, data.class_weights)
        self.state = parallel.replicate(state)
        self.history: list[dict] = []
        self.best = {"epoch": None, "val_loss": None}
        self.best_variables = None
        self.start_epoch = 0
        if resume and run.checkpoint_file.exists():
            host_state, self.start_epoch, self.history, self.best = run.load_checkpoint(state)
            self.state = parallel.replicate(host_state)
            if self.history and self.history[-1].get("stop_reason"):
                self.start_epoch = config.epochs  # the run had stopped: do not train on
        self.stopped = self.start_epoch >= config.epochs
        self.last_eval = None

    def epoch_keys(self, epoch: int) -> tuple:
        """``(order_key, step_key)`` of ``epoch``: the same whether the seed runs alone or
        stacked with others."""
        return jax.random.fold_in(self.data_key, epoch), jax.random.fold_in(self.step_key,
                                                                             epoch)

    def for_evaluation(self, state, epoch: int):
        """``(state to evaluate and save, history fields)``: with recomputed statistics a
        copy whose BatchNorm statistics are the population ones of this epoch's weights
        (deterministic in ``epoch``); the training state itself is left as it is."""
        if self.bn_mode != "recomputed":
            return state, {}
        t0 = time.perf_counter()
        host = parallel.fetch({"params": state.params, "batch_stats": state.batch_stats},
                              replicated=True)
        stats = population_batch_stats(self.bn_module, self.step_config, host, self.bn_images,
                                       self.data.batch_size,
                                       jax.random.fold_in(self.bn_key, epoch))
        return (state.replace(batch_stats=parallel.replicate(stats)),
                {"bn_stats_images": self.n_bn, "bn_seconds": time.perf_counter() - t0})

    def evaluate(self, state, name: str) -> dict:
        dataset = getattr(self.data, name)
        return evaluate(self.eval_step, state, getattr(self.data, f"{name}_data"),
                        self.data.batch_size, dataset.num_classes)

    def end_epoch(self, state, outputs: EpochOutputs, epoch: int, started: float) -> bool:
        """Records an epoch's training outputs, evaluates, checkpoints; True to stop."""
        config, run = self.config, self.run
        self.state = state
        row = {"epoch": epoch + 1}
        row.update({f"train_{k}": v for k, v in epoch_metrics(
            outputs, self.data.train.labels, self.num_classes).items()})
        eval_state, bn_row = self.for_evaluation(state, epoch)
        self.last_eval = (epoch + 1, eval_state)
        row.update(bn_row)
        if self.data.val is not None:
            row.update({f"val_{k}": v for k, v in self.evaluate(eval_state, "val").items()})
        row.update({f"test_{k}": v for k, v in self.evaluate(eval_state, "test").items()})
        row["seconds"] = time.perf_counter() - started
        self.history.append(row)
        stop, best = None, self.best
        if self.data.val is not None:
            if best["val_loss"] is None or row["val_loss"] < best["val_loss"]:
                self.best = {"epoch": epoch + 1, "val_loss": row["val_loss"]}
                # Kept in memory too: in a multi-process run only process 0 writes the file.
                self.best_variables = _host_variables(eval_state)
                run.save_model(self.best_variables, self.metadata, best=True)
            elif (config.early_stopping_patience is not None
                  and epoch + 1 - best["epoch"] >= config.early_stopping_patience):
                stop = (f"early_stopping_patience={config.early_stopping_patience}: no "
                        f"val_loss below epoch {best['epoch']}'s {best['val_loss']:.6g}")
            if self.stop_rule is not None and self.stop_rule.holds(row):
                stop = f"stop_when {self.stop_rule.describe(row)}"
        if stop:
            row["stop_reason"] = stop  # in history.json/csv and metrics.json
        run.save_checkpoint(parallel.fetch(state, replicated=True), epoch + 1, self.history,
                            self.best)
        run.write_history(self.history)
        self.stopped = bool(stop) or epoch + 1 >= config.epochs
        return bool(stop)

    def finish(self) -> dict:
        """The final model's test metrics, ``model.msgpack`` and ``metrics.json``."""
        config, run, state, history = self.config, self.run, self.state, self.history
        chosen_epoch = history[-1]["epoch"]
        if config.early_stopping_patience is not None and self.best["epoch"] is not None:
            chosen_epoch = self.best["epoch"]  # saved with the statistics it was evaluated with
            host = parallel.fetch(state, replicated=True)
            best_variables = self.best_variables or run.load_variables(best=True)  # resumed
            final = parallel.replicate(host.replace(
                params=best_variables["params"],
                batch_stats=best_variables.get("batch_stats", host.batch_stats)))
        elif self.last_eval is not None and self.last_eval[0] == chosen_epoch:
            final = self.last_eval[1]
        else:  # resumed after the last epoch: the same statistics again (same key)
            final, _ = self.for_evaluation(state, chosen_epoch - 1)
        test_metrics = self.evaluate(final, "test")
        run.save_model(_host_variables(final), self.metadata)
        data = self.data
        result = {f"test_{k}": v for k, v in test_metrics.items()}
        result.update(epoch=chosen_epoch, epochs_run=len(history), n_train=len(data.train),
                      n_val=0 if data.val is None else len(data.val), n_test=len(data.test),
                      seconds=time.perf_counter() - self.started, devices=jax.device_count(),
                      stop_reason=history[-1].get("stop_reason"),
                      bn_stats=self.bn_text, bn_stats_images=self.n_bn,
                      config=config.to_dict(), featsim_version=featsim.__version__)
        run.write_metrics(result)
        return result


def _train(runs: list[_SeedRun], data: _SharedData, *, progress: bool) -> None:
    """The epochs of one or several seeds of one configuration. Several seeds that start at
    the same epoch run stacked: one program per epoch for all of them (``jax.vmap`` over
    seeds in :func:`~featsim.train.epoch.run_epoch`); a seed that stops early is carried
    along, its files left as they were when it stopped."""
    first = runs[0]
    start = min(r.start_epoch for r in runs)
    bar = tqdm(total=first.config.epochs, initial=start,
               desc=f"{first.config.backbone} {first.config.strategy}"
               + (f" x {len(runs)} seeds" if len(runs) > 1 else ""), unit="epoch",
               disable=not progress)
    if len(runs) == 1:
        for epoch in range(first.start_epoch, first.config.epochs):
            t0 = time.perf_counter()
            order_key, step_key = first.epoch_keys(epoch)
            state, outputs = run_epoch(first.train_step, first.state, data.train_data,
                                       data.batch_size, order_key=order_key, step_key=step_key)
            stop = first.end_epoch(state, outputs, epoch, t0)
            bar.update(1)
            if stop:
                break
        bar.close()
        return
    if len({r.start_epoch for r in runs}) != 1:
        raise ValueError("stacked seeds must resume from the same epoch; got "
                         f"{[r.start_epoch for r in runs]} (run them separately)")
    stacked = stack_states([r.state for r in runs])
    for epoch in range(start, first.config.epochs):
        t0 = time.perf_counter()
        keys = [r.epoch_keys(epoch) for r in runs]
        stacked, outputs = run_epoch(first.train_step, stacked, data.train_data,
                                     data.batch_size, order_key=jnp.stack([k[0] for k in keys]),
                                     step_key=jnp.stack([k[1] for k in keys]), stacked=True)
        for i, r in enumerate(runs):
            if not r.stopped:
                r.end_epoch(seed_state(stacked, i), outputs.seed(i), epoch, t0)
        bar.update(1)
        if all(r.stopped for r in runs):
            break
    bar.close()


def _host_variables(state) -> dict:
    """The (unreplicated) variables of a train state, as saved in ``model.msgpack``."""
    variables = {"params": state.params}
    if state.batch_stats is not None:
        variables["batch_stats"] = state.batch_stats
    return parallel.fetch(variables, replicated=True)


def run_seeds(config: TrainConfig, seeds, workdir, *, together: bool = False,
              **kwargs) -> dict:
    """Runs ``config`` once per seed in ``workdir/seed_<s>/`` and writes ``summary.json``
    with the mean and std (ddof=1) of every test metric.

    Args:
        together: train the seeds in one compiled program (``jax.vmap`` over seeds: one
            dispatch per epoch for all, the data on the devices once), with the results of
            separate runs (to float32 rounding: a test checks). Needs the memory of all the
            seeds' states and activations at once, and ``val_fraction=0`` (each seed's
            validation split would leave it another training set). The cached-feature linear
            path is already fast and runs the seeds one after another.
        **kwargs: for :func:`train_and_evaluate` (``train``, ``test``, ``weights``,
            ``resume``, ``progress``, ``data_dir``, ``fast_linear``).
    """
    root = RunDir(workdir, writes=parallel.process_share().is_main)
    seeds = [int(s) for s in seeds]
    configs = [dataclasses.replace(config, seed=s) for s in seeds]
    cached = config.uses_cached_features and kwargs.get("fast_linear", True)
    if together and config.val_fraction:
        raise ValueError("together=True needs val_fraction=0: each seed's validation split "
                         "leaves it a different training set (run the seeds separately)")
    if together and not cached and len(seeds) > 1:
        data = _SharedData.load(config, kwargs["train"], kwargs["test"],
                                kwargs.get("data_dir"))
        seed_runs = [_SeedRun(c, RunDir(root.path / f"seed_{c.seed}",
                                            writes=root.writes).create(), data,
                              weights=kwargs.get("weights"), resume=kwargs.get("resume", False))
                     for c in configs]
        _train(seed_runs, data, progress=kwargs.get("progress", True))
        runs = [r.finish() for r in seed_runs]
    else:
        runs = [train_and_evaluate(c, root.path / f"seed_{c.seed}", **kwargs) for c in configs]
    numeric = [{k: v for k, v in r.items() if k.startswith("test_")} for r in runs]
    summary = {"seeds": seeds, "together": bool(together and not cached and len(seeds) > 1),
               "summary": summarize_runs(numeric), "runs": runs}
    root.create().write_summary(summary)
    return summary
