"""Weight files: featsim's msgpack format, .safetensors and .pth readers, local lookup."""

import dataclasses
import hashlib
import sys

import numpy as np
import pytest
from flax import traverse_util

from featsim.backbones import (
    KeyMapping,
    WeightsSource,
    find_local_weights,
    load_state_dict_file,
    load_variables,
    save_variables,
)
from featsim.backbones.weights import cache_dir, download_weights, search_dirs

VARIABLES = {
    "params": {"conv1": {"kernel": np.arange(24, dtype=np.float32).reshape(2, 2, 2, 3)}},
    "batch_stats": {"bn1": {"mean": np.zeros(3, np.float32), "var": np.ones(3, np.float32)}},
}
STATE_DICT = {
    "conv1.weight": np.arange(24, dtype=np.float32).reshape(3, 2, 2, 2),
    "bn1.running_var": np.ones(3, np.float32),
    "bn1.num_batches_tracked": np.array(5, np.int64),
}


def _assert_same(got, want):
    got, want = traverse_util.flatten_dict(got), traverse_util.flatten_dict(want)
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
        assert np.asarray(got[k]).dtype == want[k].dtype


def test_featsim_format_round_trip(tmp_path):
    path = save_variables(tmp_path / "sub" / "m.msgpack", VARIABLES, metadata={"name": "x"})
    _assert_same(load_variables(path), VARIABLES)
    variables, metadata = load_variables(path, with_metadata=True)
    _assert_same(variables, VARIABLES)
    assert metadata == {"name": "x"}
    assert not list(path.parent.glob("*.tmp"))  # the atomic write cleaned up


def test_featsim_format_rejects_other_files(tmp_path):
    bad = tmp_path / "bad.msgpack"
    bad.write_bytes(b"\x00not msgpack at all")
    with pytest.raises(ValueError, match=r"bad\.msgpack"):
        load_variables(bad)
    with pytest.raises(FileNotFoundError, match=r"missing\.msgpack"):
        load_variables(tmp_path / "missing.msgpack")
    with pytest.raises(ValueError, match="str -> str"):
        save_variables(tmp_path / "m.msgpack", VARIABLES, metadata={"n": 1})


def test_unknown_suffix_and_missing_file(tmp_path):
    (tmp_path / "w.h5").write_bytes(b"")
    with pytest.raises(ValueError, match=r"unknown checkpoint suffix '\.h5'"):
        load_state_dict_file(tmp_path / "w.h5")
    with pytest.raises(FileNotFoundError, match=r"nope\.pth"):
        load_state_dict_file(tmp_path / "nope.pth")


def test_empty_pth_is_named_without_needing_torch(tmp_path, monkeypatch):
    (tmp_path / "w.pth").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "torch", None)  # the reader never imports torch
    with pytest.raises(ValueError, match=r"w\.pth.*empty"):
        load_state_dict_file(tmp_path / "w.pth")


def test_safetensors_round_trip(tmp_path):
    st = pytest.importorskip("safetensors.numpy", reason="safetensors reads .safetensors")
    path = tmp_path / "w.safetensors"
    st.save_file(STATE_DICT, str(path))
    _assert_same(load_state_dict_file(path), STATE_DICT)


def test_pth_round_trip(tmp_path):
    torch = pytest.importorskip("torch", reason="torch reads .pth files")
    path = tmp_path / "w.pth"
    sd = {k: torch.from_numpy(v) for k, v in STATE_DICT.items()}
    sd["half"] = torch.ones(2, dtype=torch.bfloat16)
    torch.save(sd, path)
    loaded = load_state_dict_file(path)
    assert loaded["half"].dtype == np.float32
    del loaded["half"]
    _assert_same(loaded, STATE_DICT)


def test_pth_training_checkpoint_is_rejected(tmp_path):
    torch = pytest.importorskip("torch", reason="torch reads .pth files")
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": {"w": torch.ones(1)}, "epoch": 3}, path)
    with pytest.raises(ValueError, match="not a flat state dict"):
        load_state_dict_file(path)


def test_find_local_weights(tmp_path, monkeypatch):
    featsim_dir, torch_home = tmp_path / "featsim", tmp_path / "torch"
    monkeypatch.setenv("FEATSIM_WEIGHTS_DIR", str(featsim_dir))
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    assert search_dirs() == [featsim_dir, torch_home / "hub" / "checkpoints"]
    source = WeightsSource("r-123.pth", "https://example.invalid/r-123.pth", KeyMapping())
    assert find_local_weights(source) is None
    (torch_home / "hub" / "checkpoints").mkdir(parents=True)
    (torch_home / "hub" / "checkpoints" / "r-123.pth").write_bytes(b"")
    assert find_local_weights(source) == torch_home / "hub" / "checkpoints" / "r-123.pth"
    featsim_dir.mkdir()
    (featsim_dir / "r-123.pth").write_bytes(b"")
    assert find_local_weights(source) == featsim_dir / "r-123.pth"  # featsim's dir first


def _served(tmp_path, payload: bytes, name: str):
    """A WeightsSource whose 'official location' is a local file:// URL."""
    served = tmp_path / "server" / name
    served.parent.mkdir(parents=True, exist_ok=True)
    served.write_bytes(payload)
    digest = hashlib.sha256(payload).hexdigest()
    return WeightsSource(filename=name, url=served.as_uri(), key_mapping=KeyMapping()), digest


def test_download_verifies_sha256_prefix_and_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("FEATSIM_WEIGHTS_DIR", str(tmp_path / "cache"))
    payload = b"not really a checkpoint" * 1000
    digest = hashlib.sha256(payload).hexdigest()
    source, _ = _served(tmp_path, payload, f"tiny-{digest[:10]}.pth")
    path = download_weights(source)
    assert path == cache_dir() / source.filename and path.read_bytes() == payload
    assert find_local_weights(source) == path


def test_download_rejects_wrong_digest(tmp_path, monkeypatch):
    monkeypatch.setenv("FEATSIM_WEIGHTS_DIR", str(tmp_path / "cache"))
    source, digest = _served(tmp_path, b"payload", "tiny.pth")
    bad = dataclasses.replace(source, sha256="0" * 64)
    with pytest.raises(ValueError, match=r"SHA-256 .* expected 0000"):
        download_weights(bad)
    assert not any((tmp_path / "cache").iterdir())  # nothing cached, no partial file
    good = dataclasses.replace(source, sha256=digest)
    assert download_weights(good).read_bytes() == b"payload"


def test_download_offline_names_file_url_and_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("FEATSIM_WEIGHTS_DIR", str(tmp_path / "cache"))
    source = WeightsSource(filename="x-12345678.pth", url="https://example.invalid/x.pth",
                           key_mapping=KeyMapping())
    with pytest.raises(FileNotFoundError) as err:
        download_weights(source)
    message = str(err.value)
    assert "x-12345678.pth" in message and "https://example.invalid/x.pth" in message
    assert str(tmp_path / "cache") in message
