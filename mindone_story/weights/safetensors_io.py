"""Safetensors reading and writing with numpy only (no torch, no mindspore).

Reading: ``SafetensorsFile(path)`` parses the 8-byte header length and the JSON header itself, checks every entry
(dtype, shape, data offsets) against the file size, and then reads one tensor per access. ``file[key]`` returns an
owned array read with ``pread``, so converting a 7 GB file holds one tensor at a time; ``file.view(key)`` returns a
zero-copy read-only view of a memory map for callers that want no copy. BF16 is upcast to float32 (the bits shifted
left by 16), which is exact. ``ShardedSafetensors(index_json)`` reads a diffusers/transformers sharded folder.

Writing: ``save_safetensors`` writes a tmp file next to the target and ``os.replace``-s it, so a crash never leaves a
half-written file under the final name. Values may be arrays or ``LazyTensor`` (shape and dtype known up front, data
produced on demand), so a shard is written tensor by tensor. ``save_sharded`` plans shards from the sizes alone and
writes the ``*.safetensors.index.json`` that diffusers and transformers read.
"""

from __future__ import annotations

import functools
import json
import math
import mmap
import os
import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# safetensors dtype name -> numpy dtype of the stored bytes (little-endian). BF16 is stored as uint16 bits.
_STORED = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_ITEMSIZE = {**{k: v.itemsize for k, v in _STORED.items()}, "F8_E4M3": 1, "F8_E5M2": 1}
_FROM_NUMPY = {v.newbyteorder("="): k for k, v in _STORED.items() if k not in ("BF16",)}
_MAX_HEADER = 100 * 2**20  # the safetensors spec caps the header at 100 MB


class WeightFileError(ValueError):
    """A weight file is missing, truncated, corrupt or not in the expected format. The message names the file."""


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors dtype name, e.g. "F16", "BF16"
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def _parse_header(path: Path, size: int, head: bytes) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    def bad(msg: str) -> WeightFileError:
        return WeightFileError(f"{path}: not a valid safetensors file: {msg}")

    if size < 8:
        raise bad(f"the file has {size} bytes, less than the 8-byte header length (truncated?)")
    (n,) = struct.unpack("<Q", head[:8])
    if n > _MAX_HEADER or 8 + n > size:
        raise bad(f"header length {n} does not fit in the file of {size} bytes (truncated or not safetensors)")
    try:
        header = json.loads(head[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"the JSON header does not parse ({e})") from None
    if not isinstance(header, dict):
        raise bad("the JSON header is not an object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise bad("__metadata__ is not an object")
    data_start, data_len = 8 + n, size - 8 - n
    infos: dict[str, TensorInfo] = {}
    for key, e in header.items():
        try:
            dtype, shape, (b, end) = e["dtype"], tuple(int(s) for s in e["shape"]), e["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise bad(f"entry {key!r} lacks dtype/shape/data_offsets") from None
        if dtype not in _ITEMSIZE:
            raise bad(f"entry {key!r} has unknown dtype {dtype!r}")
        if not (isinstance(b, int) and isinstance(end, int) and 0 <= b <= end) or any(s < 0 for s in shape):
            raise bad(f"entry {key!r} has invalid offsets {[b, end]} or shape {list(shape)}")
        if end - b != math.prod(shape) * _ITEMSIZE[dtype]:
            raise bad(f"entry {key!r}: {end - b} bytes for shape {list(shape)} of {dtype}")
        if end > data_len:
            raise WeightFileError(
                f"{path}: truncated: tensor {key!r} ends at byte {data_start + end} but the file has {size} bytes"
            )
        infos[key] = TensorInfo(dtype, shape, data_start + b, data_start + end)
    spans = sorted((i.start, i.end, k) for k, i in infos.items() if i.end > i.start)
    for (_, e0, k0), (s1, _, k1) in zip(spans, spans[1:]):
        if s1 < e0:
            raise bad(f"tensors {k0!r} and {k1!r} overlap")
    return infos, {str(k): str(v) for k, v in metadata.items()}


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """Exact BF16 -> float32: the BF16 bits are the top half of the float32 bits."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16_bits(x: np.ndarray, chunk: int = 1 << 22) -> np.ndarray:
    """float32 -> BF16 bits with round-to-nearest-even (as torch does); NaN stays NaN. Works in chunks so the
    uint32 temporaries stay small even for the 63M-element token embedding."""
    x = np.asarray(x, dtype=np.float32)
    x = x if x.flags.c_contiguous else x.copy(order="C")  # (ascontiguousarray would make 0-d arrays 1-d)
    out = np.empty(x.shape, np.uint16)
    src, dst = x.reshape(-1), out.reshape(-1)
    for i in range(0, src.size, chunk):
        part = src[i : i + chunk]
        u = part.view(np.uint32)
        r = (u >> 16) & 1
        r += 0x7FFF
        r += u  # wraps only for NaNs with the sign bit set, which are replaced below
        r >>= 16
        dst[i : i + chunk] = r
        dst[i : i + chunk][np.isnan(part)] = 0x7FC0
    return out


def _decode(raw: np.ndarray, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    if dtype == "BF16":
        raw = bf16_bits_to_f32(raw)
    return raw.reshape(shape)


@dataclass(frozen=True)
class LazyTensor:
    """A tensor whose shape and stored dtype are known before its data is read (or, for writing, produced)."""

    shape: tuple[int, ...]
    dtype: str  # safetensors dtype name; "BF16" loads as float32 (exact), and the writer also takes its uint16 bits
    load: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _ITEMSIZE[self.dtype]


class LazyWeights(Mapping[str, np.ndarray]):
    """The one lazy source: name -> ``LazyTensor`` in ``self.tensors``, read as name -> np.ndarray on access.

    Every reader (a safetensors file, a shard index, a torch zip, a key-mapped view, a LoRA-fused view, random
    weights in the benchmarks) only fills ``tensors``; shape, dtype and iteration come from here."""

    tensors: dict[str, LazyTensor]

    def __getitem__(self, key: str) -> np.ndarray:
        return self.tensors[key].load()

    def shape(self, key: str) -> tuple[int, ...]:
        return self.tensors[key].shape

    def dtype(self, key: str) -> str:
        """The stored safetensors dtype name ("F16", "BF16", ...); reads return float32 for BF16."""
        return self.tensors[key].dtype

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def __contains__(self, key: object) -> bool:
        return key in self.tensors

    @property
    def files(self) -> list[Path]:
        """The files read (for fingerprints)."""
        return [self.path]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(getattr(self, 'path', ''))!r}, {len(self)} tensors)"


class SafetensorsFile(LazyWeights):
    """A lazy, read-only mapping key -> np.ndarray over one .safetensors file (see the module docstring)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise WeightFileError(f"{self.path}: file not found")
        self._fd = os.open(self.path, os.O_RDONLY)
        size = os.fstat(self._fd).st_size
        head = os.pread(self._fd, 8, 0)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        if 8 + n <= size and n <= _MAX_HEADER:
            head += os.pread(self._fd, n, 8)
        self._infos, self.metadata = _parse_header(self.path, size, head)
        self.tensors = {
            k: LazyTensor(i.shape, i.dtype, functools.partial(self._read, k)) for k, i in self._infos.items()
        }
        self._mmap: mmap.mmap | None = None

    def _read(self, key: str) -> np.ndarray:
        info = self._infos[key]
        if info.dtype not in _STORED:
            raise WeightFileError(f"{self.path}: tensor {key!r} has dtype {info.dtype}, which is not supported")
        raw = np.empty(info.nbytes // _STORED[info.dtype].itemsize, _STORED[info.dtype])
        buf = memoryview(raw).cast("B")
        got = 0
        while got < info.nbytes:  # pread may return short reads on some filesystems
            n = os.preadv(self._fd, [buf[got:]], info.start + got)
            if n <= 0:
                raise WeightFileError(f"{self.path}: truncated while reading {key!r}")
            got += n
        return _decode(raw, info.dtype, info.shape)

    def view(self, key: str) -> np.ndarray:
        """A zero-copy read-only view into a memory map (BF16 is still converted, hence copied)."""
        info = self.info(key)
        if self._mmap is None:
            self._mmap = mmap.mmap(self._fd, 0, access=mmap.ACCESS_READ)
        stored = _STORED[info.dtype]
        raw = np.frombuffer(self._mmap, stored, info.nbytes // stored.itemsize, info.start)
        return _decode(raw, info.dtype, info.shape)

    def info(self, key: str) -> TensorInfo:
        try:
            return self._infos[key]
        except KeyError:
            raise KeyError(f"{key!r} is not in {self.path}") from None

    def close(self) -> None:
        if self._mmap is not None:
            self._mmap = None  # numpy views may still hold it; the mmap closes when they go
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class ShardedSafetensors(LazyWeights):
    """A lazy mapping over the shards named by a ``*.safetensors.index.json`` (diffusers / transformers)."""

    def __init__(self, index_path: str | os.PathLike):
        self.path = Path(index_path)
        try:
            weight_map = json.loads(self.path.read_text())["weight_map"]
        except FileNotFoundError:
            raise WeightFileError(f"{self.path}: file not found") from None
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise WeightFileError(f"{self.path}: not a safetensors index ({e!r})") from None
        self._files = {name: SafetensorsFile(self.path.parent / name) for name in sorted(set(weight_map.values()))}
        self._where = {k: self._files[v] for k, v in weight_map.items()}
        for k, f in self._where.items():
            if k not in f:
                raise WeightFileError(f"{self.path}: {k!r} is listed for {f.path.name} but that shard lacks it")
        self.tensors = {k: f.tensors[k] for k, f in self._where.items()}

    @property
    def files(self) -> list[Path]:
        return [f.path for f in self._files.values()]


def _as_lazy(v: np.ndarray | LazyTensor) -> LazyTensor:
    if isinstance(v, LazyTensor):
        return v
    a = np.asarray(v)
    dt = _FROM_NUMPY.get(a.dtype.newbyteorder("="))
    if dt is None:
        raise TypeError(f"cannot store numpy dtype {a.dtype} in safetensors (use LazyTensor with 'BF16' bits)")
    return LazyTensor(tuple(a.shape), dt, lambda: a)


def save_safetensors(
    tensors: Mapping[str, np.ndarray | LazyTensor], path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> int:
    """Write ``tensors`` (in key order) to ``path`` atomically; returns the bytes of tensor data written."""
    path = Path(path)
    items = [(k, _as_lazy(v)) for k, v in tensors.items()]
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for k, t in items:
        header[k] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # align the data to 8 bytes, as the reference writer does
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)) + blob)
            for k, t in items:
                a = np.asarray(t.load())
                if t.dtype == "BF16" and a.dtype == np.float32:  # values as a reader gives them: round to BF16 bits
                    a = f32_to_bf16_bits(a)
                a = a if a.flags.c_contiguous else a.copy(order="C")  # (ascontiguousarray makes 0-d arrays 1-d)
                if tuple(a.shape) != t.shape or a.nbytes != t.nbytes:
                    raise ValueError(f"{k!r}: produced {a.dtype}{list(a.shape)}, planned {t.dtype}{list(t.shape)}")
                if a.dtype.byteorder == ">":
                    a = a.astype(a.dtype.newbyteorder("<"))
                f.write(a.reshape(-1).view(np.uint8))  # no copy; also fine for 0-d and empty tensors
                del a
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return offset


def save_sharded(
    tensors: Mapping[str, np.ndarray | LazyTensor],
    directory: str | os.PathLike,
    weights_name: str = "diffusion_pytorch_model.safetensors",
    max_shard_bytes: int = 5 * 10**9,
    metadata: Mapping[str, str] | None = None,
) -> list[Path]:
    """Write one file ``weights_name`` if everything fits in ``max_shard_bytes``; otherwise shards named like
    diffusers' (``diffusion_pytorch_model[.fp16]-00001-of-00002.safetensors``) plus the index under the name both
    libraries read (``diffusion_pytorch_model.safetensors.index[.fp16].json``).
    A tensor larger than the limit gets a shard of its own. Returns the written paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lazy = {k: _as_lazy(v) for k, v in tensors.items()}
    shards: list[dict[str, LazyTensor]] = [{}]
    size = 0
    for k, t in lazy.items():
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += t.nbytes
    stem, ext = weights_name.rsplit(".safetensors", 1)[0], ".safetensors"
    base, _, variant = stem.rpartition(".") if "." in stem else (stem, "", "")
    index = directory / f"{base}.safetensors.index{'.' + variant if variant else ''}.json"
    if len(shards) == 1:
        save_safetensors(shards[0], directory / weights_name, metadata)
        index.unlink(missing_ok=True)  # a stale index from an earlier sharded run would shadow the single file
        return [directory / weights_name]
    names = [f"{stem}-{i + 1:05d}-of-{len(shards):05d}{ext}" for i in range(len(shards))]
    written = []
    for name, shard in zip(names, shards):
        save_safetensors(shard, directory / name, metadata)
        written.append(directory / name)
    weight_map = {k: name for name, shard in zip(names, shards) for k in shard}
    doc = {"metadata": {"total_size": sum(t.nbytes for t in lazy.values())}, "weight_map": weight_map}
    tmp = index.with_name(f".{index.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, index)
    (directory / weights_name).unlink(missing_ok=True)
    return [*written, index]
