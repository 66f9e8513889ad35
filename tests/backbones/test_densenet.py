"""DenseNet: equality with a torch reference of torchvision's modules, legacy keys, heads."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import featsim.backbones.densenet
from featsim.backbones import convert_state_dict, get_backbone, load_pretrained
from featsim.backbones.densenet import TORCHVISION_KEYS, DenseNet

from ._helpers import fake_torch_state_dict, rel_err

FEATURES = ("stem", "stage1", "stage2", "stage3", "stage4", "pre_logits")
# float32 end to end; errors measured so far are ~1e-6 (see the report printed with -s).
TOL = 1e-4
# A small DenseNet-BC (same code paths as the registered ones) for the cheap tests.
TINY = dict(growth_rate=8, block_config=(2, 3), num_init_features=16, bn_size=2)


def _apply(module, *, train=False, **kwargs):
    if train:
        return jax.jit(
            functools.partial(module.apply, train=True, mutable=["batch_stats"], **kwargs)
        )
    return jax.jit(functools.partial(module.apply, train=False, **kwargs))


def _flat(tree):
    return traverse_util.flatten_dict(dict(tree))


def _shapes(module, variables, input_shape):
    return jax.eval_shape(
        functools.partial(module.apply, train=False),
        variables,
        jax.ShapeDtypeStruct(input_shape, jnp.float32),
    )


def _fake_variables(model, input_shape, seed=0):
    template = jax.eval_shape(
        functools.partial(model.init, train=False),
        jax.random.key(0),
        jax.ShapeDtypeStruct(input_shape, jnp.float32),
    )
    # Tame the fake weights (N(0, 1) everywhere) so activations stay in a sane range.
    variables = jax.tree.map(lambda v: v * 0.1, fake_torch_state_dict(template, seed)[1])
    variables["batch_stats"] = jax.tree.map(lambda v: jnp.abs(v) + 1.0, variables["batch_stats"])
    return variables


# ------------------------------------------------------------------ no torch needed


def test_registered():
    bb = get_backbone("densenet161")
    assert isinstance(bb.module, featsim.backbones.densenet.DenseNet)
    assert bb.weights.filename == "densenet161-8d451a50.pth"
    assert bb.weights.url == "https://download.pytorch.org/models/densenet161-8d451a50.pth"
    assert get_backbone("densenet121").weights.filename == "densenet121-a639ec97.pth"
    assert bb.preprocessing.input_size == 224 and bb.preprocessing.resize_size == 256


def test_feature_names_shapes_and_parameter_count():
    bb = get_backbone("densenet121")
    # One trace for both the outputs and the variables.
    (logits, feats), variables = jax.eval_shape(
        functools.partial(bb.module.init_with_output, train=False),
        jax.random.key(0),
        jax.ShapeDtypeStruct((2, 97, 97, 3), jnp.float32),
    )
    assert sorted(feats) == sorted(FEATURES)
    assert logits.shape == (2, 1000) and logits.dtype == jnp.float32
    # 97 -> conv 49 -> pool 25 -> 12 -> 6 -> 3; stages are taken before each transition.
    assert feats["stem"].shape == (2, 25, 25, 64)
    assert feats["stage1"].shape == (2, 25, 25, 64 + 6 * 32)
    assert feats["stage2"].shape == (2, 12, 12, 128 + 12 * 32)
    assert feats["stage3"].shape == (2, 6, 6, 256 + 24 * 32)
    assert feats["stage4"].shape == (2, 3, 3, 512 + 16 * 32)
    assert feats["pre_logits"].shape == (2, 1024)
    # torchvision's documented num_params for the IMAGENET1K_V1 weights.
    assert sum(np.prod(p.shape) for p in jax.tree.leaves(variables["params"])) == 7_978_856


def test_densenet161_parameter_count():
    # torchvision's documented num_params for the IMAGENET1K_V1 weights.
    params = get_backbone("densenet161").abstract_variables()["params"]
    assert sum(np.prod(p.shape) for p in jax.tree.leaves(params)) == 28_681_000


@pytest.mark.parametrize(("num_classes", "shape"), [(1, (3, 1)), (5, (3, 5))])
def test_head_sizes(num_classes, shape):
    # TINY: 16 -> 16 + 2 * 8 = 32 -> transition 16 -> 16 + 3 * 8 = 40 features.
    model = DenseNet(**TINY, num_classes=num_classes)
    variables = _fake_variables(model, (1, 32, 32, 3))
    assert variables["params"]["classifier"]["kernel"].shape == (40, num_classes)
    logits, _ = _shapes(model, variables, (3, 32, 32, 3))
    assert logits.shape == shape


@pytest.mark.parametrize("num_classes", [None, 0])
def test_no_head(num_classes):
    model = DenseNet(**TINY, num_classes=num_classes)
    variables = _fake_variables(model, (1, 32, 32, 3))
    assert "classifier" not in variables["params"]
    logits, feats = _shapes(model, variables, (2, 32, 32, 3))
    assert logits is None
    assert feats["pre_logits"].shape == (2, 40)


def test_key_mapping_accepts_both_layouts():
    path = TORCHVISION_KEYS.module_path
    want = ("denseblock3", "denselayer12", "norm2")
    assert path("features.denseblock3.denselayer12.norm2") == want
    assert path("features.denseblock3.denselayer12.norm.2") == want
    assert path("features.denseblock1.denselayer1.conv.1") == (
        "denseblock1",
        "denselayer1",
        "conv1",
    )
    assert path("features.transition2.norm") == ("transition2", "norm")
    assert path("features.norm5") == ("norm5",)
    assert path("classifier") == ("classifier",)
    assert TORCHVISION_KEYS.head_paths() == (("classifier",),)


def test_foreign_keys_are_reported():
    template = _fake_variables(DenseNet(**TINY), (1, 32, 32, 3))
    # A key without torchvision's `features.` prefix must not silently fill `conv0`.
    state_dict = {"conv0.weight": np.zeros((16, 3, 7, 7), np.float32)}
    with pytest.raises(ValueError, match=r"checkpoint keys with no Flax leaf: conv0\.weight"):
        convert_state_dict(state_dict, template, mapping=TORCHVISION_KEYS)


def test_rejects_nchw_input():
    bb = get_backbone("densenet121")
    with pytest.raises(ValueError, match=r"NHWC input \[N, H, W, 3\]"):
        jax.eval_shape(bb.module.init, jax.random.key(0), jnp.zeros((1, 3, 32, 32)))


def test_dropout_only_in_training():
    model = DenseNet(growth_rate=8, block_config=(1,), num_init_features=8, drop_rate=0.5)
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    variables = _fake_variables(model, x.shape)
    eval_logits, _ = _apply(model)(variables, x)
    np.testing.assert_array_equal(eval_logits, _apply(model)(variables, x)[0])
    train = _apply(model, train=True)
    # An "rbg" key: compiling threefry's bit generator costs seconds of CPU per jit here, and
    # what is tested is how the module uses its rng, not the generator.
    rngs = {"dropout": jax.random.key(1, impl="rbg")}
    (train_logits, _), _ = train(variables, x, rngs=rngs)
    (train_again, _), _ = train(variables, x, rngs=rngs)
    np.testing.assert_array_equal(train_logits, train_again)  # explicit rng: reproducible
    assert not np.allclose(train_logits, eval_logits)


def test_bfloat16_compute():
    model32 = DenseNet(**TINY, num_classes=4)
    model16 = DenseNet(**TINY, num_classes=4, dtype=jnp.bfloat16)
    x = np.random.default_rng(0).normal(size=(2, 48, 48, 3)).astype(np.float32)
    variables = _fake_variables(model32, x.shape, seed=3)
    logits32, _ = _apply(model32)(variables, x)
    logits16, feats16 = _apply(model16)(variables, x)
    assert logits16.dtype == jnp.bfloat16 and feats16["stage2"].dtype == jnp.bfloat16
    # bf16 keeps 8 mantissa bits; through ~15 layers a few percent is expected.
    assert rel_err(logits16, logits32) < 0.1


# ----------------------------------------------------------------------------- torch


@pytest.fixture(scope="module")
def torch():
    torch = pytest.importorskip("torch", reason="torch is the reference for DenseNet equivalence")
    # One intra-op thread: on a shared, loaded CPU, OpenMP workers spin-wait for each other
    # and a two-thread forward can cost ten times the CPU time of a one-thread one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield torch
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ref(torch):
    from . import torch_reference_densenet

    return torch_reference_densenet


def _reference(torch, ref, model):
    torch.manual_seed(0)
    return ref.randomize_batchnorm(model, torch.Generator().manual_seed(1)).eval()


def _nchw(torch, x):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


@pytest.fixture(scope="module")
def converted(torch, ref):
    """name -> (torch reference, backbone, abstract variables, converted variables), cached."""
    cache = {}

    def get(name):
        if name not in cache:
            model = _reference(torch, ref, ref.ARCHS[name]())
            bb = get_backbone(name)
            template = bb.abstract_variables()
            state_dict = ref.state_dict_numpy(model)
            variables = convert_state_dict(state_dict, template, mapping=TORCHVISION_KEYS)
            cache[name] = model, bb, template, variables
        return cache[name]

    return get


# densenet161 compiles slowly on CPU (~15 s a shape): one image a size for it.
@pytest.mark.parametrize(
    ("name", "size", "batch"),
    [
        ("densenet121", 224, 2),
        ("densenet121", 97, 2),
        ("densenet161", 224, 1),
        ("densenet161", 97, 1),
    ],
)
def test_matches_torchvision_reference(converted, name, size, batch, torch, ref, record_property):
    model, bb, _, variables = converted(name)
    x = np.random.default_rng(size).normal(size=(batch, size, size, 3)).astype(np.float32)
    with torch.no_grad():
        want_logits, want = model.tapped(_nchw(torch, x))
    logits, feats = _apply(bb.module)(variables, x)
    assert sorted(feats) == sorted(FEATURES)
    errors = {k: rel_err(feats[k], ref.to_nhwc(want[k])) for k in FEATURES}
    errors["logits"] = rel_err(logits, want_logits.numpy())
    record_property("rel_errors", errors)
    print(f"\n{name} @ {size}: max rel err {max(errors.values()):.2e}  {errors}")
    assert max(errors.values()) < TOL, errors


@pytest.mark.parametrize("name", ["densenet121", "densenet161"])
def test_legacy_checkpoint_keys_load(converted, name, ref):
    # torchvision's published .pth files spell dense-layer modules `norm.1`, `conv.2`, ...
    model, _, template, variables = converted(name)
    legacy = ref.to_legacy_keys(ref.state_dict_numpy(model))
    assert "features.denseblock1.denselayer1.norm.1.weight" in legacy
    assert "features.denseblock1.denselayer1.norm1.weight" not in legacy
    got = _flat(convert_state_dict(legacy, template, mapping=TORCHVISION_KEYS))
    want = _flat(variables)
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg="/".join(k))

    # Both spellings of one module in one file: reported, not silently resolved.
    key = "features.denseblock1.denselayer1.norm1.weight"
    both = {**legacy, key: legacy["features.denseblock1.denselayer1.norm.1.weight"]}
    with pytest.raises(ValueError, match="keys mapping to the same Flax leaf"):
        convert_state_dict(both, template, mapping=TORCHVISION_KEYS)


def test_pretrained_file_and_new_head(converted, torch, ref, tmp_path):
    # The registry path end to end, from a .pth with torchvision's legacy key names.
    model, _, _, variables = converted("densenet121")
    path = tmp_path / "densenet121-a639ec97.pth"
    torch.save(ref.to_legacy_keys(model.state_dict()), path)
    want = _flat(variables)

    loaded = get_backbone("densenet121", pretrained=True, weights_path=path)
    got = _flat(loaded.variables)
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg="/".join(k))

    # Fine-tuning with a sigmoid head: everything but the classifier from the checkpoint.
    bb = load_pretrained(
        get_backbone("densenet121", num_classes=1),
        path=path,
        skip_head=True,
        rng=jax.random.key(0),
    )
    got = _flat(bb.variables)
    assert got.keys() == want.keys()
    assert got[("params", "classifier", "kernel")].shape == (1024, 1)
    assert got[("params", "classifier", "bias")].shape == (1,)
    for k in want:
        if k[1] != "classifier":
            np.testing.assert_array_equal(got[k], want[k], err_msg="/".join(k))


def test_train_mode_step_matches_torch(torch, ref):
    # One training-mode forward: outputs use batch statistics, and every BatchNorm's running
    # stats move by torch's momentum 0.1 with the unbiased variance.
    model = _reference(torch, ref, ref.DenseNet(**TINY, num_classes=5)).train()
    flax_model = DenseNet(**TINY, num_classes=5)
    x = np.random.default_rng(0).normal(size=(2, 40, 40, 3)).astype(np.float32)
    template = jax.eval_shape(functools.partial(flax_model.init, train=False), jax.random.key(0), x)
    variables = convert_state_dict(ref.state_dict_numpy(model), template, mapping=TORCHVISION_KEYS)

    (logits, feats), state = _apply(flax_model, train=True)(variables, x)
    want_logits, want = model.tapped(_nchw(torch, x))
    assert rel_err(logits, want_logits.detach().numpy()) < TOL
    assert rel_err(feats["stage2"], ref.to_nhwc(want["stage2"])) < TOL

    updated = convert_state_dict(ref.state_dict_numpy(model), template, mapping=TORCHVISION_KEYS)
    got_stats = _flat(state["batch_stats"])
    want_stats = _flat(updated["batch_stats"])
    before = _flat(variables["batch_stats"])
    # norm0, 2 per dense layer, 1 per transition, norm5.
    assert len(got_stats) == len(want_stats) == 2 * (1 + 2 * 5 + 1 + 1)
    for path, got in got_stats.items():
        assert not np.allclose(got, before[path]), path  # the statistics did move
        np.testing.assert_allclose(got, want_stats[path], rtol=1e-4, atol=1e-6, err_msg=str(path))
