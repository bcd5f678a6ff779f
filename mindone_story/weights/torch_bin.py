"""A safe reader for torch ``.bin`` / ``.pt`` checkpoints (the zip format of torch >= 1.6), without importing torch.

Why not ``pickle.load``: a pickle can name any global (``os.system``, ``builtins.eval``) and call it while loading.
``_SafeUnpickler.find_class`` allows only the few globals that tensors, storages and plain containers need and refuses
every other one with an error naming it, before anything is called. Tensors come back as lazy references: the
``data/<key>`` record of a storage is read from the zip (CRC-checked) only when that tensor is accessed, so memory
holds one tensor at a time.

``TorchBinFile(path)`` is a Mapping[str, np.ndarray]; nested dicts are flattened with ".", so IP-Adapter's
``{"image_proj": {...}, "ip_adapter": {...}}`` reads as ``image_proj.proj.weight``, ``ip_adapter.1.to_k_ip.weight``.
Non-tensor leaves (ints, strings) are kept in ``.extras``.
"""

from __future__ import annotations

import collections
import math
import os
import pickle
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from .safetensors_io import LazyTensor, LazyWeights, WeightFileError, bf16_bits_to_f32


class UnsafePickleError(WeightFileError):
    """The checkpoint's pickle asks for a global outside the allow-list; nothing from it was run."""


_STORAGE_DTYPES = {
    "DoubleStorage": "<f8",
    "FloatStorage": "<f4",
    "HalfStorage": "<f2",
    "BFloat16Storage": "bf16",
    "LongStorage": "<i8",
    "IntStorage": "<i4",
    "ShortStorage": "<i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "?",
    "UntypedStorage": "u1",
}
_TORCH_DTYPES = {
    "float64": "<f8",
    "float32": "<f4",
    "float16": "<f2",
    "bfloat16": "bf16",
    "int64": "<i8",
    "int32": "<i4",
    "int16": "<i2",
    "int8": "i1",
    "uint8": "u1",
    "bool": "?",
}


@dataclass(frozen=True)
class _StorageType:
    dtype: str


@dataclass(frozen=True)
class _TorchDtype:
    dtype: str


@dataclass(frozen=True)
class _Storage:
    key: str
    dtype: str
    numel: int


@dataclass(frozen=True)
class TensorRef:
    """A tensor in the checkpoint, not yet read: storage record, element offset, size and stride."""

    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    if not isinstance(storage, _Storage):
        raise UnsafePickleError(f"_rebuild_tensor_v2 got {type(storage).__name__}, not a storage")
    return TensorRef(storage, int(storage_offset), tuple(int(s) for s in size), tuple(int(s) for s in stride))


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
    if not isinstance(dtype, _TorchDtype):
        raise UnsafePickleError("_rebuild_tensor_v3 got a dtype that is not a torch dtype")
    ref = _rebuild_tensor_v2(storage, storage_offset, size, stride)
    nbytes = ref.storage.numel * _itemsize(ref.storage.dtype)  # the storage may be untyped bytes
    storage = _Storage(ref.storage.key, dtype.dtype, nbytes // _itemsize(dtype.dtype))
    return TensorRef(storage, ref.offset, ref.shape, ref.stride)


def _itemsize(dtype: str) -> int:
    return 2 if dtype == "bf16" else np.dtype(dtype).itemsize


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    if not isinstance(data, TensorRef):
        raise UnsafePickleError("_rebuild_parameter got something that is not a tensor")
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    # torch.Tensor.__reduce_ex__ wraps tensors that carry Python state; only plain tensor types are accepted.
    if func not in (_rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_parameter) or new_type not in ("Tensor", "Param"):
        raise UnsafePickleError("_rebuild_from_type_v2 with a function or type outside the allow-list")
    return func(*args)


def _codecs_encode(obj: str, encoding: str = "utf-8") -> bytes:
    # Protocol-2 pickles spell bytes as _codecs.encode(str, "latin1"); only plain text codecs are allowed.
    if not isinstance(obj, str) or encoding.lower().replace("-", "") not in ("latin1", "utf8", "ascii"):
        raise UnsafePickleError(f"_codecs.encode with encoding {encoding!r}")
    return obj.encode(encoding)


_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Tensor"): "Tensor",
    ("torch.nn.parameter", "Parameter"): "Param",
    ("torch", "Size"): tuple,
    ("_codecs", "encode"): _codecs_encode,
    **{("torch", name): _StorageType(dt) for name, dt in _STORAGE_DTYPES.items()},
    **{("torch", name): _TorchDtype(dt) for name, dt in _TORCH_DTYPES.items()},
}


class _SafeUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path, records: set[str]):
        super().__init__(file)
        self._path, self._records = path, records

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"{self._path}: refused to load: the pickle asks for the global '{module}.{name}', which is not a "
                "tensor, storage or plain container (the file may run code; nothing from it was run)"
            ) from None

    def persistent_load(self, pid: Any) -> _Storage:
        # torch's zip format: ('storage', storage_type, key, location, numel)
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise UnsafePickleError(f"{self._path}: unexpected persistent id {pid!r:.80}")
        _, stype, key, _location, numel = pid
        if not isinstance(stype, (_StorageType, _TorchDtype)) or str(key) not in self._records:
            raise WeightFileError(f"{self._path}: storage {key!r} has no data record or an unknown type")
        return _Storage(str(key), stype.dtype, int(numel))


def _flatten(obj: Any, prefix: str, tensors: dict[str, TensorRef], extras: dict[str, Any]) -> None:
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            _flatten(v, f"{prefix}{k}.", tensors, extras)
    elif isinstance(obj, TensorRef):
        tensors[prefix[:-1]] = obj
    else:
        extras[prefix[:-1]] = obj


class TorchBinFile(LazyWeights):
    """A lazy, read-only mapping key -> np.ndarray over a torch zip checkpoint (see the module docstring)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise WeightFileError(f"{self.path}: file not found")
        if not zipfile.is_zipfile(self.path):
            with open(self.path, "rb") as f:
                magic = f.read(2)
            kind = "a legacy (torch < 1.6) pickle" if magic[:1] == b"\x80" else "truncated or not a torch zip file"
            raise WeightFileError(f"{self.path}: cannot read: {kind}; re-save it with torch >= 1.6 or as safetensors")
        try:
            self._zip = zipfile.ZipFile(self.path)
            names = self._zip.namelist()
            pkl = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(pkl) != 1:
                raise WeightFileError(f"{self.path}: a zip file but not a torch checkpoint (no <name>/data.pkl)")
            self._root = pkl[0][: -len("data.pkl")]
            byteorder = f"{self._root}byteorder"
            self._big = byteorder in names and self._zip.read(byteorder).strip() == b"big"
            records = {n[len(self._root) + 5 :] for n in names if n.startswith(f"{self._root}data/")}
            with self._zip.open(pkl[0]) as f:
                obj = _SafeUnpickler(f, self.path, records).load()
        except (zipfile.BadZipFile, EOFError, pickle.UnpicklingError, zipfile.LargeZipFile, OSError) as e:
            raise WeightFileError(f"{self.path}: corrupt torch checkpoint ({e})") from None
        self.refs: dict[str, TensorRef] = {}
        self.extras: dict[str, Any] = {}
        if not isinstance(obj, Mapping):
            raise WeightFileError(f"{self.path}: the checkpoint holds a {type(obj).__name__}, not a dict of tensors")
        _flatten(obj, "", self.refs, self.extras)
        self.tensors = {
            k: LazyTensor(r.shape, _dtype_name(r.storage.dtype), partial(self._read, k)) for k, r in self.refs.items()
        }

    def _read(self, key: str) -> np.ndarray:
        ref = self.refs[key]
        st = ref.storage
        stored = np.dtype("<u2") if st.dtype == "bf16" else np.dtype(st.dtype)
        if self._big:
            stored = stored.newbyteorder(">")
        try:
            raw = self._zip.read(f"{self._root}data/{st.key}")
        except (zipfile.BadZipFile, OSError) as e:  # CRC mismatch or short read
            raise WeightFileError(f"{self.path}: corrupt data record for {key!r} ({e})") from None
        if len(raw) < st.numel * stored.itemsize:
            raise WeightFileError(f"{self.path}: data record for {key!r} is shorter than its storage")
        flat = np.frombuffer(raw, stored, st.numel)
        if ref.shape and math.prod(ref.shape) > 0:
            last = ref.offset + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride))
            if ref.offset < 0 or last >= st.numel or min(ref.stride) < 0:
                raise WeightFileError(f"{self.path}: tensor {key!r} reaches outside its storage")
            strides = tuple(s * stored.itemsize for s in ref.stride)
            arr = np.lib.stride_tricks.as_strided(flat[ref.offset :], ref.shape, strides, writeable=False)
        else:
            arr = flat[ref.offset : ref.offset + math.prod(ref.shape)].reshape(ref.shape)
        arr = np.array(arr, dtype=stored.newbyteorder("="), order="C")  # an owned, contiguous, native-order copy
        return bf16_bits_to_f32(arr) if st.dtype == "bf16" else arr

    def close(self) -> None:
        self._zip.close()


def _dtype_name(d: str) -> str:
    """A storage dtype in safetensors spelling ("F16", "BF16", ...)."""
    return "BF16" if d == "bf16" else _SAFETENSORS_NAME[np.dtype(d).newbyteorder("=")]


_SAFETENSORS_NAME = {
    np.dtype(np.float64): "F64",
    np.dtype(np.float32): "F32",
    np.dtype(np.float16): "F16",
    np.dtype(np.int64): "I64",
    np.dtype(np.int32): "I32",
    np.dtype(np.int16): "I16",
    np.dtype(np.int8): "I8",
    np.dtype(np.uint8): "U8",
    np.dtype(np.bool_): "BOOL",
}
