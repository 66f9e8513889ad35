"""State-dict conversion: layouts, strict bookkeeping, head handling (no torch needed)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from featsim.backbones import (
    KeyMapping,
    abstract_variables,
    check_variables,
    convert_state_dict,
    get_backbone,
    torch_module_path,
)
from featsim.backbones.resnet import TORCHVISION_KEYS

from ._helpers import fake_torch_state_dict


@pytest.fixture(scope="module")
def resnet18_template():
    return get_backbone("resnet18").abstract_variables()


@pytest.mark.parametrize(
    ("prefix", "path"),
    [
        ("conv1", ("conv1",)),
        ("layer1.0.conv1", ("layer1_0", "conv1")),
        ("layer3.1.downsample.0", ("layer3_1", "downsample_0")),
        (
            "features.denseblock1.denselayer2.norm1",
            ("features", "denseblock1", "denselayer2", "norm1"),
        ),
        ("features.1.conv.0.0", ("features_1", "conv_0_0")),
        ("", ()),
    ],
)
def test_torch_module_path(prefix, path):
    assert torch_module_path(prefix) == path


def test_converts_every_leaf_with_the_right_layout(resnet18_template):
    state_dict, expected = fake_torch_state_dict(resnet18_template)
    assert state_dict["conv1.weight"].shape == (64, 3, 7, 7)  # OIHW in the fake checkpoint
    assert state_dict["fc.weight"].shape == (1000, 512)
    variables = convert_state_dict(state_dict, resnet18_template, mapping=TORCHVISION_KEYS)
    got = traverse_util.flatten_dict(variables)
    want = traverse_util.flatten_dict(expected)
    assert got.keys() == want.keys()
    for key, value in want.items():
        np.testing.assert_array_equal(got[key], value, err_msg="/".join(key))
        assert got[key].dtype == np.float32
    # Spot-check the layouts against the PyTorch arrays directly.
    np.testing.assert_array_equal(
        variables["params"]["conv1"]["kernel"][2, 5, 1, 7], state_dict["conv1.weight"][7, 1, 2, 5]
    )
    np.testing.assert_array_equal(
        variables["params"]["fc"]["kernel"][10, 3], state_dict["fc.weight"][3, 10]
    )
    np.testing.assert_array_equal(
        variables["batch_stats"]["layer2_0"]["downsample_1"]["var"],
        state_dict["layer2.0.downsample.1.running_var"],
    )


def test_template_dtype_is_used(resnet18_template):
    state_dict, _ = fake_torch_state_dict(resnet18_template)
    state_dict = {
        k: v.astype(np.float64) if v.dtype == np.float32 else v for k, v in state_dict.items()
    }
    variables = convert_state_dict(state_dict, resnet18_template, mapping=TORCHVISION_KEYS)
    assert {v.dtype for v in jax.tree.leaves(variables)} == {np.dtype(np.float32)}


def test_unmatched_keys_are_listed(resnet18_template):
    state_dict, _ = fake_torch_state_dict(resnet18_template)
    state_dict["layer5.0.conv1.weight"] = np.zeros((1, 1, 1, 1), np.float32)
    state_dict["bn1.weird"] = np.zeros(64, np.float32)
    with pytest.raises(ValueError, match="no Flax leaf") as err:
        convert_state_dict(state_dict, resnet18_template, mapping=TORCHVISION_KEYS)
    assert "layer5.0.conv1.weight" in str(err.value) and "bn1.weird" in str(err.value)


def test_missing_keys_are_listed(resnet18_template):
    state_dict, _ = fake_torch_state_dict(resnet18_template)
    del state_dict["layer4.1.bn2.running_var"]
    del state_dict["conv1.weight"]
    with pytest.raises(ValueError, match="does not fill") as err:
        convert_state_dict(state_dict, resnet18_template, mapping=TORCHVISION_KEYS)
    assert "batch_stats/layer4_1/bn2/var" in str(err.value)
    assert "params/conv1/kernel" in str(err.value)


def test_shape_mismatch_names_key_and_shapes(resnet18_template):
    state_dict, _ = fake_torch_state_dict(resnet18_template)
    state_dict["layer1.0.conv2.weight"] = np.zeros((64, 64, 1, 1), np.float32)
    with pytest.raises(ValueError, match=r"layer1\.0\.conv2\.weight") as err:
        convert_state_dict(state_dict, resnet18_template, mapping=TORCHVISION_KEYS)
    assert "(64, 64, 1, 1)" in str(err.value) and "(3, 3, 64, 64)" in str(err.value)
    assert "skip_head" not in str(err.value)  # not a head problem


def test_num_batches_tracked_is_ignored(resnet18_template):
    state_dict, _ = fake_torch_state_dict(resnet18_template)
    assert any(k.endswith("num_batches_tracked") for k in state_dict)
    convert_state_dict(state_dict, resnet18_template, mapping=TORCHVISION_KEYS)
    no_counters = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    convert_state_dict(no_counters, resnet18_template, mapping=TORCHVISION_KEYS)


def test_other_head_size_raises_with_hint(resnet18_template):
    state_dict, _ = fake_torch_state_dict(resnet18_template)  # 1000 classes
    template = get_backbone("resnet18", num_classes=2).abstract_variables()
    with pytest.raises(ValueError, match="skip_head=True") as err:
        convert_state_dict(state_dict, template, mapping=TORCHVISION_KEYS)
    assert "fc.weight" in str(err.value) and "(1000, 512)" in str(err.value)


def test_skip_head_keeps_the_new_head_from_init(resnet18_template):
    state_dict, expected = fake_torch_state_dict(resnet18_template)
    template = get_backbone("resnet18", num_classes=2).abstract_variables()
    # The new head's initial values (any concrete arrays; normally from module.init).
    head = {"kernel": np.full((512, 2), 0.5, np.float32), "bias": np.zeros(2, np.float32)}
    template["params"]["fc"] = head
    variables = convert_state_dict(state_dict, template, mapping=TORCHVISION_KEYS, skip_head=True)
    np.testing.assert_array_equal(variables["params"]["fc"]["kernel"], head["kernel"])
    assert variables["params"]["fc"]["kernel"].shape == (512, 2)
    np.testing.assert_array_equal(
        variables["params"]["layer3_1"]["conv2"]["kernel"],
        expected["params"]["layer3_1"]["conv2"]["kernel"],
    )


def test_skip_head_needs_initialised_head(resnet18_template):
    state_dict, _ = fake_torch_state_dict(resnet18_template)
    with pytest.raises(ValueError, match="initialised arrays"):
        convert_state_dict(state_dict, resnet18_template, mapping=TORCHVISION_KEYS, skip_head=True)


def test_skip_head_for_a_headless_model(resnet18_template):
    state_dict, _ = fake_torch_state_dict(resnet18_template)
    template = get_backbone("resnet18", num_classes=None).abstract_variables()
    with pytest.raises(ValueError, match=r"fc\.weight"):  # not silently dropped...
        convert_state_dict(state_dict, template, mapping=TORCHVISION_KEYS)
    variables = convert_state_dict(state_dict, template, mapping=TORCHVISION_KEYS, skip_head=True)
    assert "fc" not in variables["params"]  # ...unless asked


def test_duplicate_targets_are_reported():
    class Tiny:
        def init(self, rng, x, train=False):
            return {"params": {"a": {"kernel": jnp.zeros((2, 2))}}}

    template = abstract_variables(Tiny(), (1, 2))
    mapping = KeyMapping(module_path=lambda prefix: ("a",))
    state_dict = {"x.weight": np.ones((2, 2)), "y.weight": np.ones((2, 2))}
    with pytest.raises(ValueError, match="same Flax leaf"):
        convert_state_dict(state_dict, template, mapping=mapping)


def test_check_variables(resnet18_template):
    _, variables = fake_torch_state_dict(resnet18_template)
    check_variables(variables, resnet18_template)
    variables["params"]["fc"]["kernel"] = np.zeros((512, 3), np.float32)
    del variables["batch_stats"]["bn1"]["mean"]
    with pytest.raises(ValueError, match="missing leaves: batch_stats/bn1/mean") as err:
        check_variables(variables, resnet18_template)
    assert "params/fc/kernel: (512, 3)" in str(err.value)
