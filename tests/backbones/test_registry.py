"""Registry: names, errors, and pretrained loading that never falls back to random weights."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from featsim.backbones import (
    TORCHVISION_IMAGENET,
    Backbone,
    ResNet,
    get_backbone,
    list_backbones,
    load_pretrained,
    register_backbone,
    save_variables,
)
from featsim.backbones import registry as registry_module
from featsim.backbones.resnet import BasicBlock

from ._helpers import fake_torch_state_dict, rel_err

RESNETS = {"resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2"}
TINY = dict(stage_sizes=(1, 1, 1, 1))  # a cheap-to-initialise ResNet-18 layout


@pytest.fixture
def isolated_registry(monkeypatch):
    monkeypatch.setattr(registry_module, "_REGISTRY", dict(registry_module._REGISTRY))


@pytest.fixture
def no_local_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("FEATSIM_WEIGHTS_DIR", str(tmp_path / "featsim"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "featsim"


def _assert_same_tree(got, want):
    got, want = traverse_util.flatten_dict(got), traverse_util.flatten_dict(want)
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg="/".join(k))


def test_list_backbones():
    names = list_backbones()
    assert RESNETS <= set(names)
    assert names == sorted(names)


def test_get_backbone():
    bb = get_backbone("resnet50", num_classes=7, dtype=jnp.bfloat16)
    assert isinstance(bb, Backbone) and isinstance(bb.module, ResNet)
    assert bb.module.num_classes == 7 and bb.module.dtype == jnp.bfloat16
    assert bb.preprocessing == TORCHVISION_IMAGENET
    assert bb.weights.filename == "resnet50-0676ba61.pth"
    assert bb.variables is None  # random weights only from an explicit init


def test_unknown_name_lists_valid_ones():
    with pytest.raises(KeyError, match="unknown backbone 'resnet51'") as err:
        get_backbone("resnet51")
    for name in RESNETS:
        assert name in str(err.value)


def test_register_backbone(isolated_registry):
    factory = functools.partial(ResNet, block_cls=BasicBlock, **TINY)
    assert register_backbone("tiny", preprocessing=TORCHVISION_IMAGENET)(factory) is factory
    assert "tiny" in list_backbones()
    assert get_backbone("tiny", num_classes=3).module.stage_sizes == (1, 1, 1, 1)
    with pytest.raises(ValueError, match="already registered"):
        register_backbone("tiny", preprocessing=TORCHVISION_IMAGENET)
    with pytest.raises(TypeError, match="must be a Preprocessing"):
        register_backbone("other", preprocessing={"input_size": 224})


@pytest.mark.parametrize("download", [False, True])
def test_pretrained_without_file_raises_never_random(no_local_weights, download):
    # download=True: the download fails (tests have no network, as offline users) and the
    # error still says which file to fetch, from where, and where to put it.
    with pytest.raises(FileNotFoundError) as err:
        get_backbone("resnet18", pretrained=True, download=download)
    message = str(err.value)
    assert "resnet18-f37072fd.pth" in message
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in message
    assert str(no_local_weights) in message
    if not download:
        assert "not fall back to random" in message
    assert not list(no_local_weights.glob("*.part"))  # no partial file left behind


def test_pretrained_without_registered_weights(isolated_registry):
    factory = functools.partial(ResNet, block_cls=BasicBlock, **TINY)
    register_backbone("tiny", preprocessing=TORCHVISION_IMAGENET)(factory)
    with pytest.raises(ValueError, match="no pretrained weights are registered for 'tiny'"):
        get_backbone("tiny", pretrained=True)


def test_pretrained_other_head_size_points_to_skip_head(no_local_weights):
    with pytest.raises(ValueError, match="skip_head=True"):
        get_backbone("resnet18", num_classes=2, pretrained=True)


def test_weights_path_needs_pretrained(tmp_path):
    with pytest.raises(ValueError, match="only used with pretrained=True"):
        get_backbone("resnet18", weights_path=tmp_path / "x.pth")


def test_pretrained_from_safetensors_and_featsim_format(tmp_path):
    st = pytest.importorskip("safetensors.numpy", reason="safetensors reads .safetensors")
    template = get_backbone("resnet18").abstract_variables()
    state_dict, expected = fake_torch_state_dict(template)
    st.save_file(state_dict, str(tmp_path / "r18.safetensors"))

    bb = get_backbone("resnet18", pretrained=True, weights_path=tmp_path / "r18.safetensors")
    _assert_same_tree(bb.variables, expected)

    headless = get_backbone(
        "resnet18", num_classes=None, pretrained=True, weights_path=tmp_path / "r18.safetensors"
    )
    assert "fc" not in headless.variables["params"]

    # featsim's own format, written once and read back as pretrained weights.
    save_variables(tmp_path / "r18.msgpack", bb.variables, metadata={"backbone": "resnet18"})
    again = get_backbone("resnet18", pretrained=True, weights_path=tmp_path / "r18.msgpack")
    _assert_same_tree(again.variables, expected)
    headless = get_backbone(
        "resnet18", num_classes=None, pretrained=True, weights_path=tmp_path / "r18.msgpack"
    )
    assert "fc" not in headless.variables["params"]
    with pytest.raises(ValueError, match=r"(?s)r18\.msgpack.*params/fc/kernel"):
        get_backbone("resnet50", pretrained=True, weights_path=tmp_path / "r18.msgpack")


def test_load_pretrained_with_a_new_head(tmp_path):
    st = pytest.importorskip("safetensors.numpy", reason="safetensors reads .safetensors")
    state_dict, expected = fake_torch_state_dict(get_backbone("resnet18").abstract_variables())
    path = tmp_path / "r18.safetensors"
    st.save_file(state_dict, str(path))
    bb = get_backbone("resnet18", num_classes=3)
    with pytest.raises(ValueError, match="needs rng="):
        load_pretrained(bb, path=path, skip_head=True)
    with pytest.raises(ValueError, match="skip_head=True"):
        load_pretrained(bb, path=path)
    loaded = load_pretrained(bb, path=path, skip_head=True, rng=jax.random.key(0))
    assert loaded.variables["params"]["fc"]["kernel"].shape == (512, 3)
    del expected["params"]["fc"], loaded.variables["params"]["fc"]
    _assert_same_tree(loaded.variables, expected)


def test_pretrained_found_in_weights_dir_matches_torch(no_local_weights):
    torch = pytest.importorskip("torch", reason="torch writes the .pth and is the reference")
    from . import torch_reference as ref

    torch.manual_seed(0)
    model = ref.randomize_batchnorm(
        ref.ARCHS["resnet18"](), torch.Generator().manual_seed(1)
    ).eval()
    no_local_weights.mkdir(parents=True)
    torch.save(model.state_dict(), no_local_weights / "resnet18-f37072fd.pth")

    bb = get_backbone("resnet18", pretrained=True)
    x = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)
    logits, _ = jax.jit(bb.module.apply)(bb.variables, x)
    with torch.no_grad():
        want = model(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))).numpy()
    assert rel_err(logits, want) < 1e-4
