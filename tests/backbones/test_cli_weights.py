"""`featsim convert-weights` and `featsim backbones`: thin shims over the registry."""

import numpy as np
import pytest
from flax import traverse_util

from featsim.backbones import get_backbone, list_backbones, load_pretrained, load_variables
from featsim.cli import main

from ._helpers import fake_torch_state_dict


@pytest.fixture
def resnet18_state_dict():
    template = get_backbone("resnet18").abstract_variables()
    return fake_torch_state_dict(template, seed=3)


def _same(a, b):
    a, b = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg="/".join(k))


def test_convert_pth_to_safetensors_and_msgpack(tmp_path, resnet18_state_dict):
    torch = pytest.importorskip("torch", reason="writing a .pth checkpoint needs torch")
    pytest.importorskip("safetensors", reason="the .safetensors writer")
    state_dict, expected = resnet18_state_dict
    pth = tmp_path / "r18.pth"
    torch.save({k: torch.from_numpy(v) for k, v in state_dict.items()}, pth)

    assert main(["convert-weights", str(pth), str(tmp_path / "r18.safetensors"),
                 "--backbone", "resnet18"]) == 0
    assert main(["convert-weights", str(pth), str(tmp_path / "r18.msgpack"),
                 "--backbone", "resnet18"]) == 0
    from_st = get_backbone("resnet18", pretrained=True,
                           weights_path=tmp_path / "r18.safetensors").variables
    from_mp, meta = load_variables(tmp_path / "r18.msgpack", with_metadata=True)
    by_name = load_pretrained("resnet18", path=tmp_path / "r18.safetensors").variables
    _same(by_name, expected)
    _same(from_st, expected)
    _same(from_mp, expected)
    assert meta["backbone"] == "resnet18" and meta["converted_from"] == "r18.pth"
    assert len(meta["source_sha256"]) == 64


def test_convert_rejects_wrong_architecture(tmp_path, resnet18_state_dict, capsys):
    pytest.importorskip("safetensors", reason="the .safetensors reader")
    from featsim.backbones.weights import save_state_dict_safetensors

    state_dict, _ = resnet18_state_dict
    src = save_state_dict_safetensors(tmp_path / "r18.safetensors", state_dict)
    rc = main(["convert-weights", str(src), str(tmp_path / "out.msgpack"),
               "--backbone", "resnet50"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "r18.safetensors" in err and "convert-weights: error" in err
    assert not (tmp_path / "out.msgpack").exists()
    rc = main(["convert-weights", str(src), str(tmp_path / "out.npz"), "--backbone", "resnet18"])
    assert rc == 2 and ".safetensors or .msgpack" in capsys.readouterr().err


def test_backbones_lists_registry(capsys):
    assert main(["backbones"]) == 0
    out = capsys.readouterr().out
    for name in list_backbones():
        assert f"{name}\n" in out
    assert "download.pytorch.org" in out
