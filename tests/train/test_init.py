"""``TrainConfig.init``: ``"random"`` starts the body from its own random initialisation, so
``linear`` + ``init="random"`` is a random-features probe (El Azhari's "random weights,
frozen" cell): the body stays exactly at its random init, only the head trains."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from flax import traverse_util

from featsim.backbones import get_backbone, save_variables
from featsim.backbones.weights import load_variables
from featsim.train import INITS, AugmentConfig, TrainConfig, train_and_evaluate
from featsim.train.datasets import Dataset
from featsim.train.heads import initial_variables
from tests._tiny import TINY


def tiny_dataset(n, seed=0) -> Dataset:
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 2).astype(np.int32)
    images = (rng.integers(0, 80, (n, 32, 32, 3)) + 120 * labels[:, None, None, None])
    return Dataset(images=images.astype(np.uint8), labels=labels, groups=None,
                   ids=tuple(str(i) for i in range(n)), class_names=("a", "b"),
                   source="tiny")


@pytest.fixture
def body_weights(tmp_path):
    """A "pretrained" checkpoint: fixed values far from any random init."""
    bb = get_backbone(TINY, num_classes=None)
    flat = traverse_util.flatten_dict(jax.tree.map(np.asarray, bb.init(jax.random.key(42))))
    flat = {k: np.full_like(v, 0.05) for k, v in flat.items()}
    return save_variables(tmp_path / "body.msgpack", traverse_util.unflatten_dict(flat),
                          metadata={"backbone": TINY})


def body_leaves(variables) -> dict:
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(variables).items()
            if "fc" not in k}


def test_init_values_and_combinations():
    assert INITS == ("pretrained", "random")
    assert TrainConfig(backbone=TINY).init == "pretrained"
    for strategy in ("linear", "partial", "finetune"):
        TrainConfig(backbone=TINY, strategy=strategy, init="random")
    for strategy in ("scratch", "meanvar"):
        with pytest.raises(ValueError, match="init"):
            TrainConfig(backbone=TINY, strategy=strategy, init="random")
    with pytest.raises(ValueError, match="init must be one of"):
        TrainConfig(backbone=TINY, init="imagenet")
    off = AugmentConfig(enabled=False)
    assert TrainConfig(backbone=TINY, augment=off).uses_cached_features
    assert not TrainConfig(backbone=TINY, augment=off, init="random").uses_cached_features
    config = TrainConfig(backbone=TINY, init="random")
    assert TrainConfig.from_dict(json.loads(config.to_json())) == config


def test_random_init_is_scratch_init_not_the_weights(body_weights):
    key = jax.random.key(3)
    _, pretrained = initial_variables(TrainConfig(backbone=TINY), 1, key, body_weights)
    _, random = initial_variables(TrainConfig(backbone=TINY, init="random"), 1, key,
                                   body_weights)
    _, scratch = initial_variables(TrainConfig(backbone=TINY, strategy="scratch"), 1, key,
                                    body_weights)
    assert all(np.all(v == 0.05) for v in body_leaves(pretrained).values())
    jax.tree.map(np.testing.assert_array_equal, random, scratch)
    assert not all(np.all(v == 0.05) for v in body_leaves(random).values())


def test_linear_random_init_freezes_the_random_body(tmp_path, body_weights):
    config = TrainConfig(backbone=TINY, strategy="linear", init="random", epochs=2,
                         batch_size=8, augment=AugmentConfig(enabled=False), seed=1)
    train_and_evaluate(config, tmp_path / "run", train=tiny_dataset(32),
                       test=tiny_dataset(16, seed=1), weights=body_weights, progress=False)
    init_key = jax.random.split(jax.random.key(config.seed), 3)[0]
    _, start = initial_variables(config, 1, init_key, body_weights)
    final = load_variables(tmp_path / "run" / "model.msgpack")
    start_body, final_body = body_leaves(start), body_leaves(final)
    assert start_body.keys() == final_body.keys()
    for k in start_body:  # body frozen, BatchNorm statistics included
        np.testing.assert_array_equal(start_body[k], final_body[k], err_msg=str(k))
    head = [k for k in traverse_util.flatten_dict(final) if "fc" in k and k[0] == "params"]
    assert head and any(
        not np.array_equal(traverse_util.flatten_dict(final)[k],
                           traverse_util.flatten_dict(start)[k]) for k in head)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["init"] == "random" and saved["strategy"] == "linear"
