"""The fast path of ``linear`` without augmentation: train the head on cached features.

With a frozen body in inference mode and no augmentation, the body maps each image to the
same ``pre_logits`` vector in every epoch, so the end-to-end loop recomputes one fixed
function. Here the features come once from the pipeline's content-keyed cache
(:func:`featsim.features.extract_features`) and the head (one linear layer: logits =
features @ W + b) trains on them with the same initial head, batches, loss, optimiser and
metrics as the end-to-end path: 20 epochs over 5,216 feature vectors take seconds.
A self-check at start-up compares the head's logits with the full model's on real images.
"""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax import lax

import featsim
from featsim import parallel
from featsim.backbones.registry import Backbone, get_backbone, load_pretrained
from featsim.data.transforms import Transform
from featsim.features.extract import extract_features
from featsim.rundir import RunDir, model_metadata
from featsim.train import optim, strategies
from featsim.train.batchnorm import bn_description, bn_stats_mode
from featsim.train.classification import epoch_metrics
from featsim.train.config import TrainConfig
from featsim.train.epoch import DeviceData, evaluate_data, run_epoch
from featsim.train.heads import initial_variables
from featsim.train.losses import class_weights as balanced_class_weights
from featsim.train.losses import weighted_example_losses as example_losses
from featsim.train.steps import TrainState, probabilities

__all__ = ["fit_head", "head_layer", "train_linear_probe"]


def head_layer(backbone: Backbone, variables) -> tuple[tuple[str, ...], str, str]:
    """``(module path, kernel name, bias name)`` of the single linear classifier that maps
    ``pre_logits`` to the logits; ValueError if the head is anything else."""
    stages = strategies.leaf_stages(backbone.module, variables, backbone.input_shape)
    params = [k for k, s in stages.items() if s == strategies.HEAD and k[0] == "params"]
    kernels = [k for k in params if k[-1] == "kernel"]
    if len(kernels) != 1:
        raise ValueError(f"the fast linear path needs one linear classifier head; "
                         f"{backbone.name}'s head has kernels {kernels}")
    path = kernels[0][1:-1]
    return path, "kernel", "bias"


def _head_params(variables, path):
    node = variables["params"]
    for name in path:
        node = node[name]
    kernel = np.asarray(node["kernel"])
    kernel = kernel.reshape(-1, kernel.shape[-1])  # a 1x1 conv head is a linear layer too
    return {"kernel": kernel, "bias": np.asarray(node["bias"])}


def _set_head(variables, path, head):
    flat = traverse_util.flatten_dict(variables)
    for name in ("kernel", "bias"):
        key = ("params", *path, name)
        flat[key] = np.asarray(head[name]).reshape(np.shape(flat[key]))
    return traverse_util.unflatten_dict(flat)


def train_linear_probe(config: TrainConfig, workdir, *, train, test, weights=None,
                       progress: bool = True, data_dir=None, cache_dir=None) -> dict:
    """:func:`~featsim.train.train_and_evaluate` for ``linear`` without augmentation."""
    started = time.perf_counter()
    run = RunDir(workdir, writes=parallel.process_share().is_main).create()
    if config.val_fraction:
        raise ValueError("the cached-feature linear path has no validation split yet; use "
                         "val_fraction=0 or enable augmentation (end-to-end path)")
    probe = get_backbone(config.backbone, num_classes=None)
    transform = Transform.for_backbone(probe.preprocessing, config.normalization)
    rng = jax.random.key(config.seed)
    init_key, data_key, _ = jax.random.split(rng, 3)

    # Features of the pretrained body (the cache makes reruns free).
    body = load_pretrained(probe, path=weights, skip_head=True)
    feats = {name: extract_features(body, src, transform=transform, progress=progress,
                                    data_dir=data_dir, cache_dir=cache_dir,
                                    batch_size=config.batch_size)
             for name, src in (("train", train), ("test", test))}
    labels = {name: f.labels.astype(np.int32) for name, f in feats.items()}
    if any(lab is None or (lab < 0).any() for lab in labels.values()):
        raise ValueError("training needs labels on every item of train and test")
    num_classes = max(len(feats["train"].class_names), int(labels["train"].max()) + 1)
    head_size = 1 if num_classes == 2 else num_classes
    backbone, variables = initial_variables(config, head_size, init_key, weights)
    path, _, _ = head_layer(backbone, variables)
    head = _head_params(variables, path)
    x = {name: f["pre_logits"] for name, f in feats.items()}
    head, history, evaluate = fit_head(config, head, x, labels, num_classes, data_key)
    run.write_history(history)
    run.write_config(config)
    final = _set_head(variables, path, jax.tree.map(np.asarray, head))
    bn_text = bn_description(bn_stats_mode(config, variables.get("batch_stats")), 0)
    run.save_model(final, model_metadata(config, head_size, bn_stats=bn_text))
    result = {f"test_{k}": v for k, v in evaluate(head, "test").items()}
    result.update(epoch=config.epochs, epochs_run=config.epochs, n_train=len(x["train"]),
                  n_val=0, n_test=len(x["test"]), seconds=time.perf_counter() - started,
                  devices=jax.device_count(), path="cached_features",
                  bn_stats=bn_text, bn_stats_images=0, config=config.to_dict(),
                  featsim_version=featsim.__version__)
    run.write_metrics(result)
    return result


def fit_head(config: TrainConfig, head, x, labels, num_classes: int, data_key):
    """Trains ``head`` (``{"kernel": [d, K], "bias": [K]}``) on features ``x["train"]``,
    evaluating on ``x["test"]`` every epoch; returns ``(head, history, evaluate)``.

    The batches, loss, optimiser, schedule and epoch driver (:mod:`featsim.train.epoch`)
    are the end-to-end loop's; the features stay on the devices for the whole run.
    """
    weights_c = (balanced_class_weights(labels["train"], num_classes)
                 if config.class_weighting == "balanced" else np.ones(num_classes, np.float32))
    weights_c = jnp.asarray(weights_c)
    ndev = jax.device_count()
    batch_size = -(-config.batch_size // ndev) * ndev  # as the end-to-end loop rounds it
    steps_per_epoch = math.ceil(len(x["train"]) / batch_size)
    tx = optim.make_optimizer({"kernel": "head", "bias": "head"},
                              optim.schedule_for(config, steps_per_epoch),
                              body_lr_scale=config.body_lr_scale,
                              weight_decay=config.weight_decay)
    state = parallel.replicate(TrainState.create(apply_fn=None, params=head, tx=tx))

    def logits_of(h, f):
        return f @ h["kernel"] + h["bias"]

    def sum_over_devices(value):
        return lax.psum(value, parallel.DATA_AXIS)

    def step(state, batch, key):
        del key
        f, y, mask = batch["features"], batch["labels"], batch["mask"]
        count = sum_over_devices(mask.sum())

        def loss_fn(h):
            losses = example_losses(logits_of(h, f), y, weights_c)
            return jnp.sum(losses * mask) / jnp.maximum(count, 1.0)

        probs = probabilities(logits_of(state.params, f))
        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        state = state.apply_gradients(grads=sum_over_devices(grads))
        loss = sum_over_devices(loss)
        return state, {"loss_sum": loss * count, "count": count, "probs": probs}

    def eval_step(state, batch):
        f, y, mask = batch["features"], batch["labels"], batch["mask"]
        logits = logits_of(state.params, f)
        losses = example_losses(logits, y, weights_c) * mask
        return {"loss_sum": sum_over_devices(losses.sum()),
                "count": sum_over_devices(mask.sum()), "probs": probabilities(logits)}

    data = {name: DeviceData.put({"features": x[name], "labels": labels[name]}) for name in x}

    def metrics_of(outputs, name):
        return epoch_metrics(outputs, labels[name], num_classes)

    def evaluate_state(state, name):
        return metrics_of(evaluate_data(eval_step, state, data[name], batch_size), name)

    def evaluate(h, name):
        """Metrics of the (host) head ``h`` on ``x[name]``."""
        return evaluate_state(state.replace(params=parallel.replicate(h)), name)

    history = []
    for epoch in range(config.epochs):
        t0 = time.perf_counter()
        state, outputs = run_epoch(step, state, data["train"], batch_size,
                                   order_key=jax.random.fold_in(data_key, epoch))
        row = {"epoch": epoch + 1}
        row.update({f"train_{k}": v for k, v in metrics_of(outputs, "train").items()})
        if "test" in x:
            row.update({f"test_{k}": v for k, v in evaluate_state(state, "test").items()})
        row["seconds"] = time.perf_counter() - t0
        history.append(row)
    return parallel.fetch(state.params, replicated=True), history, evaluate

