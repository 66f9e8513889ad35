"""ResNet family: equality with a torch reference of torchvision's modules, heads, dtypes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from featsim.backbones import convert_state_dict, get_backbone
from featsim.backbones.resnet import TORCHVISION_KEYS, BasicBlock, ResNet

from ._helpers import fake_torch_state_dict, rel_err

FEATURES = ("stem", "stage1", "stage2", "stage3", "stage4", "pre_logits")
ARCHS = ("resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2")
# float32 end to end; errors measured so far are ~1e-6 (see the report printed with -s).
TOL = 1e-4


def _apply(module, *, train=False):
    if train:
        return jax.jit(functools.partial(module.apply, train=True, mutable=["batch_stats"]))
    return jax.jit(functools.partial(module.apply, train=False))


# ------------------------------------------------------------------ no torch needed


def test_feature_names_and_shapes():
    bb = get_backbone("resnet18", num_classes=10)
    variables = fake_torch_state_dict(bb.abstract_variables())[1]
    logits, feats = _apply(bb.module)(variables, jnp.zeros((2, 97, 97, 3)))
    assert sorted(feats) == sorted(FEATURES)
    assert logits.shape == (2, 10) and logits.dtype == jnp.float32
    # 97 -> conv 49 -> pool 25 -> 13 -> 7 -> 4: odd sizes at every stride.
    assert feats["stem"].shape == (2, 25, 25, 64)
    assert feats["stage2"].shape == (2, 13, 13, 128)
    assert feats["stage4"].shape == (2, 4, 4, 512)
    assert feats["pre_logits"].shape == (2, 512)


@pytest.mark.parametrize(("num_classes", "shape"), [(1, (3, 1)), (5, (3, 5))])
def test_head_sizes(num_classes, shape):
    bb = get_backbone("resnet18", num_classes=num_classes)
    template = bb.abstract_variables()
    assert template["params"]["fc"]["kernel"].shape == (512, num_classes)
    variables = fake_torch_state_dict(template)[1]
    logits, _ = _apply(bb.module)(variables, jnp.zeros((3, 32, 32, 3)))
    assert logits.shape == shape


@pytest.mark.parametrize("num_classes", [None, 0])
def test_no_head(num_classes):
    bb = get_backbone("resnet50", num_classes=num_classes)
    template = bb.abstract_variables()
    assert "fc" not in template["params"]
    logits, feats = jax.eval_shape(
        functools.partial(bb.module.apply, train=False),
        template,
        jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32),
    )
    assert logits is None
    assert feats["pre_logits"].shape == (2, 2048)


def test_parameter_counts_match_torchvision():
    # torchvision's documented num_params for the IMAGENET1K_V1 weights.
    expected = {
        "resnet18": 11_689_512,
        "resnet50": 25_557_032,
        "resnext50_32x4d": 25_028_904,
        "wide_resnet50_2": 68_883_240,
    }
    for name, count in expected.items():
        params = get_backbone(name).abstract_variables()["params"]
        assert sum(np.prod(p.shape) for p in jax.tree.leaves(params)) == count, name


def test_basic_block_rejects_groups():
    model = ResNet(stage_sizes=(1, 1, 1, 1), block_cls=BasicBlock, groups=2)
    with pytest.raises(ValueError, match="groups=1"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


def test_rejects_nchw_input():
    bb = get_backbone("resnet18")
    with pytest.raises(ValueError, match=r"NHWC input \[N, H, W, 3\]"):
        jax.eval_shape(bb.module.init, jax.random.key(0), jnp.zeros((1, 3, 32, 32)))


def test_bfloat16_compute():
    bb32 = get_backbone("resnet18")
    bb16 = get_backbone("resnet18", dtype=jnp.bfloat16)
    variables = fake_torch_state_dict(bb32.abstract_variables(), seed=3)[1]
    # Tame the fake weights (N(0, 1) everywhere) so activations stay in a sane range.
    variables = jax.tree.map(lambda v: v * 0.1, variables)
    variables["batch_stats"] = jax.tree.map(lambda v: jnp.abs(v) + 1.0, variables["batch_stats"])
    x = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)
    logits32, _ = _apply(bb32.module)(variables, x)
    logits16, feats16 = _apply(bb16.module)(variables, x)
    assert logits16.dtype == jnp.bfloat16 and feats16["stage3"].dtype == jnp.bfloat16
    # bf16 keeps 8 mantissa bits; through 18 layers a few percent is expected.
    assert rel_err(logits16, logits32) < 0.1


# ----------------------------------------------------------------------------- torch


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch", reason="torch is the reference for ResNet equivalence")


@pytest.fixture(scope="module")
def ref(torch):
    from . import torch_reference

    return torch_reference


def _reference(torch, ref, name, **kwargs):
    torch.manual_seed(0)
    model = ref.ARCHS[name](**kwargs)
    return ref.randomize_batchnorm(model, torch.Generator().manual_seed(1)).eval()


@pytest.fixture(scope="module", params=ARCHS)
def converted(request, torch, ref):
    name = request.param
    model = _reference(torch, ref, name)
    bb = get_backbone(name)
    variables = convert_state_dict(
        ref.state_dict_numpy(model), bb.abstract_variables(), mapping=TORCHVISION_KEYS
    )
    return name, model, bb, variables


@pytest.mark.parametrize("size", [224, 97])
def test_matches_torchvision_reference(converted, size, torch, ref, record_property):
    name, model, bb, variables = converted
    x = np.random.default_rng(size).normal(size=(2, size, size, 3)).astype(np.float32)
    with torch.no_grad():
        want_logits, want = model.tapped(
            torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
        )
    logits, feats = _apply(bb.module)(variables, x)
    assert sorted(feats) == sorted(FEATURES)
    errors = {k: rel_err(feats[k], ref.to_nhwc(want[k])) for k in FEATURES}
    errors["logits"] = rel_err(logits, want_logits.numpy())
    record_property("rel_errors", errors)
    print(f"\n{name} @ {size}: max rel err {max(errors.values()):.2e}  {errors}")
    assert max(errors.values()) < TOL, errors


def test_train_mode_step_matches_torch(torch, ref):
    # One training-mode forward: outputs use batch statistics, and every BatchNorm's running
    # stats move by torch's momentum 0.1 with the unbiased variance. A momentum of 0.1 in
    # Flax convention (the classic porting bug) would move them 90% instead.
    model = _reference(torch, ref, "resnet18").train()
    bb = get_backbone("resnet18")
    template = bb.abstract_variables()
    variables = convert_state_dict(ref.state_dict_numpy(model), template, mapping=TORCHVISION_KEYS)
    x = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)

    (logits, feats), state = _apply(bb.module, train=True)(variables, x)
    want_logits, want = model.tapped(
        torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    )
    assert rel_err(logits, want_logits.detach().numpy()) < TOL
    assert rel_err(feats["stage4"], ref.to_nhwc(want["stage4"])) < TOL

    updated = convert_state_dict(ref.state_dict_numpy(model), template, mapping=TORCHVISION_KEYS)
    got_stats = jax.tree.leaves_with_path(state["batch_stats"])
    want_stats = dict(jax.tree.leaves_with_path(updated["batch_stats"]))
    assert len(got_stats) == len(want_stats) == 2 * 20  # mean and var of 20 BatchNorms
    for path, got in got_stats:
        before = dict(jax.tree.leaves_with_path(variables["batch_stats"]))[path]
        assert not np.allclose(got, before), path  # the statistics did move
        np.testing.assert_allclose(got, want_stats[path], rtol=1e-4, atol=1e-6, err_msg=str(path))
