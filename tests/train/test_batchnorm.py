"""``recompute_batch_stats``: population BatchNorm statistics over batches, against float64
numpy on a tiny network, and on a registered backbone.

Definition checked (see :mod:`featsim.train.batchnorm`): every batch runs in training mode
(BN1 normalises it with the batch's own statistics before the conv feeding BN2); each
BatchNorm's new running mean / variance is the row-weighted average over batches of the
batch's mean / variance of its input, the variance biased for ``flax.linen.BatchNorm`` and
unbiased for :class:`featsim.backbones.layers.BatchNorm` (each layer's own convention)."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import pytest
from flax import traverse_util

from featsim.backbones import get_backbone
from featsim.backbones.layers import BatchNorm as TorchStyleBatchNorm
from featsim.train import recompute_batch_stats
from featsim.train.batchnorm import batchnorm_momenta


class TwoBN(nn.Module):
    """BN1 (on the input) -> ReLU -> 3x3 VALID conv -> BN2 -> mean pool."""

    torch_style_second: bool = False

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                         name="bn1")(x)
        x = nn.Conv(4, (3, 3), padding="VALID", name="conv")(nn.relu(x))
        if self.torch_style_second:
            x = TorchStyleBatchNorm(use_running_average=not train, momentum=0.99, name="bn2")(x)
        else:
            x = nn.BatchNorm(use_running_average=not train, momentum=0.99, epsilon=1e-5,
                             name="bn2")(x)
        return x.mean(axis=(1, 2))


def _random_variables(module, x, seed=0):
    """Initialised variables with non-trivial BN scale/bias and running statistics."""
    variables = module.init(jax.random.key(seed), x[:2], train=False)
    rng = np.random.default_rng(seed)
    flat = traverse_util.flatten_dict(jax.device_get(variables))
    for k, v in flat.items():
        if k[-1] in ("scale", "var"):
            flat[k] = rng.uniform(0.5, 2.0, v.shape).astype(np.float32)
        elif k[-1] in ("bias", "mean"):
            flat[k] = rng.normal(0.0, 1.0, v.shape).astype(np.float32)
    return traverse_util.unflatten_dict(flat)


def _numpy_population_stats(variables, batches, eps=1e-5, unbiased_second=False):
    """float64 reference: per batch, BN1 in training mode, then the conv; row-weighted
    averages of each BN input's batch mean and variance."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
    sums = {name: [0.0, 0.0] for name in ("bn1", "bn2")}
    rows = 0
    for x in batches:
        x = np.asarray(x, np.float64)
        n = x.shape[0]
        m1, v1 = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
        h = (x - m1) / np.sqrt(v1 + eps) * p["bn1"]["scale"] + p["bn1"]["bias"]
        h = np.maximum(h, 0.0)
        kernel, bias = p["conv"]["kernel"], p["conv"]["bias"]
        out_h, out_w = h.shape[1] - 2, h.shape[2] - 2
        y = np.zeros((n, out_h, out_w, kernel.shape[-1])) + bias
        for di in range(3):
            for dj in range(3):
                y += np.einsum("nhwc,co->nhwo", h[:, di:di + out_h, dj:dj + out_w],
                               kernel[di, dj])
        m2 = y.mean(axis=(0, 1, 2))
        v2 = y.var(axis=(0, 1, 2), ddof=1 if unbiased_second else 0)
        for name, m, v in (("bn1", m1, v1), ("bn2", m2, v2)):
            sums[name][0] = sums[name][0] + n * m
            sums[name][1] = sums[name][1] + n * v
        rows += n
    return {name: (s[0] / rows, s[1] / rows) for name, s in sums.items()}


@pytest.mark.parametrize("torch_style_second", [False, True])
def test_tiny_network_matches_numpy_population_stats(torch_style_second):
    module = TwoBN(torch_style_second=torch_style_second)
    rng = np.random.default_rng(1)
    # Unequal batch sizes (5, 5, 3) check the row weighting; inputs off zero mean / unit var.
    batches = [rng.normal(2.0, 3.0, (n, 6, 6, 3)).astype(np.float32) for n in (5, 5, 3)]
    variables = _random_variables(module, batches[0])
    before = jax.tree.map(np.copy, variables)
    assert batchnorm_momenta(module.apply, variables, batches[0]) == {("bn1",): 0.9,
                                                                      ("bn2",): 0.99}

    new = recompute_batch_stats(module.apply, variables, iter(batches))

    expected = _numpy_population_stats(variables, batches, unbiased_second=torch_style_second)
    for name, (mean, var) in expected.items():
        np.testing.assert_allclose(new["batch_stats"][name]["mean"], mean, rtol=1e-4,
                                   atol=1e-5, err_msg=name)
        np.testing.assert_allclose(new["batch_stats"][name]["var"], var, rtol=1e-4,
                                   err_msg=name)
        assert new["batch_stats"][name]["mean"].dtype == np.float32
    # The input is untouched and params are passed through as they are.
    assert new["params"] is variables["params"]
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(before), strict=True):
        np.testing.assert_array_equal(a, b)


def test_one_batch_makes_inference_mode_equal_training_mode():
    """With biased-variance BatchNorms, statistics recomputed on one batch are that batch's,
    so inference mode then reproduces training mode on it (the running stats before did not)."""
    module = TwoBN()
    x = np.random.default_rng(2).normal(5.0, 4.0, (8, 6, 6, 3)).astype(np.float32)
    variables = _random_variables(module, x)
    train_out, _ = module.apply(variables, x, train=True, mutable=["batch_stats"])
    stale = module.apply(variables, x, train=False)
    assert np.abs(np.asarray(stale) - np.asarray(train_out)).max() > 0.1
    new = recompute_batch_stats(module.apply, variables, [x])
    np.testing.assert_allclose(module.apply(new, x, train=False), train_out, rtol=1e-4,
                               atol=1e-4)


def test_errors():
    module = TwoBN()
    x = np.zeros((2, 6, 6, 3), np.float32)
    variables = _random_variables(module, x)
    with pytest.raises(ValueError, match="at least one"):
        recompute_batch_stats(module.apply, variables, [])
    with pytest.raises(ValueError, match="no batch_stats"):
        recompute_batch_stats(module.apply, {"params": variables["params"]}, [x])

    class Frozen(nn.Module):
        @nn.compact
        def __call__(self, x, *, train=False):
            return nn.BatchNorm(use_running_average=not train, momentum=1.0)(x)

    frozen = Frozen()
    with pytest.raises(ValueError, match="never move"):
        recompute_batch_stats(frozen.apply, frozen.init(jax.random.key(0), x), [x])


def test_registered_backbone_keeps_params_and_gets_varied_features():
    bb = get_backbone("efficientnet_lite0", num_classes=None)
    rng = np.random.default_rng(0)
    batches = [rng.normal(0.0, 1.0, (4, 32, 32, 3)).astype(np.float32) for _ in range(2)]
    variables = jax.device_get(bb.module.init(jax.random.key(0), batches[0][:1], train=False))
    new = recompute_batch_stats(bb.module.apply, variables, batches, rng=jax.random.key(1))
    old_flat = traverse_util.flatten_dict(variables["batch_stats"])
    new_flat = traverse_util.flatten_dict(new["batch_stats"])
    assert new_flat.keys() == old_flat.keys() and len(new_flat) > 90
    for a, b in zip(jax.tree.leaves(new["params"]), jax.tree.leaves(variables["params"]),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    for k, v in new_flat.items():
        assert v.shape == old_flat[k].shape and v.dtype == np.float32, k
        assert np.isfinite(v).all(), k
        if k[-1] == "var":
            assert (v >= 0).all(), k
    # The stem BN saw the conv of the inputs: statistics far from the init (0, 1).
    assert not np.allclose(new_flat[("bn0", "mean")], 0.0)
    feats = jax.jit(lambda v, x: bb.module.apply(v, x, train=False)[1]["pre_logits"])
    f = np.concatenate([np.asarray(feats(new, b)) for b in batches])
    assert np.isfinite(f).all() and f.std(axis=0).mean() > 1e-3
