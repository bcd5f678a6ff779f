"""Weight file readers and writers: safetensors (against the reference library), torch zip pickles (against torch
when it is installed, and against the committed fixture files without it), atomic writes, shards, bad files, and
pickles that try to run code."""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest

from mindone_story.weights.safetensors_io import (
    LazyTensor,
    SafetensorsFile,
    ShardedSafetensors,
    WeightFileError,
    bf16_bits_to_f32,
    f32_to_bf16_bits,
    save_safetensors,
    save_sharded,
)
from mindone_story.weights.torch_bin import TorchBinFile, UnsafePickleError

LAYOUTS = Path(__file__).parent / "fixtures" / "layouts"


def sample_tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "f16": rng.standard_normal((3, 5)).astype(np.float16),
        "f32": rng.standard_normal((2, 3, 4)).astype(np.float32),
        "f64": rng.standard_normal(7),
        "i64": np.arange(77, dtype=np.int64)[None],
        "u8": np.arange(10, dtype=np.uint8),
        "bool": np.array([True, False, True]),
        "scalar": np.array(2.5, dtype=np.float32),
        "empty": np.zeros((0, 4), dtype=np.float32),
    }


# ---- safetensors --------------------------------------------------------------------------------------------------
def test_reads_what_the_reference_library_writes(tmp_path):
    from safetensors.numpy import save_file

    tensors = sample_tensors()
    save_file(tensors, tmp_path / "a.safetensors", metadata={"format": "pt"})
    f = SafetensorsFile(tmp_path / "a.safetensors")
    assert set(f) == set(tensors) and f.metadata == {"format": "pt"}
    for k, v in tensors.items():
        got = f[k]
        assert got.dtype == v.dtype and got.shape == v.shape and np.array_equal(got, v)
        assert f.shape(k) == v.shape and np.array_equal(f.view(k), v)
    assert f.dtype("f16") == "F16" and f.dtype("i64") == "I64"


def test_reference_library_reads_what_we_write(tmp_path):
    from safetensors.numpy import load_file

    tensors = sample_tensors()
    save_safetensors(tensors, tmp_path / "b.safetensors", {"format": "pt"})
    back = load_file(tmp_path / "b.safetensors")
    assert all(np.array_equal(back[k], v) and back[k].dtype == v.dtype for k, v in tensors.items())


def test_bf16_read_and_round():
    bits = np.array([0x3F80, 0xC000, 0x7F80, 0x0001, 0x4049], dtype=np.uint16)
    assert bf16_bits_to_f32(bits).tolist()[:3] == [1.0, -2.0, float("inf")]
    # round to nearest even: 1 + 2^-8 is a tie between 1 and 1 + 2^-7 -> 1; just above the tie rounds up.
    x = np.array([1.0 + 2**-8, 1.0 + 2**-8 + 2**-20, 1.0 + 3 * 2**-8, np.nan, -0.0], dtype=np.float32)
    r = bf16_bits_to_f32(f32_to_bf16_bits(x))
    assert r[0] == 1.0 and r[1] == 1.0 + 2**-7 and r[2] == 1.0 + 4 * 2**-8 and np.isnan(r[3])
    assert np.signbit(r[4])
    assert f32_to_bf16_bits(np.float32(1.5)).shape == () and f32_to_bf16_bits(np.ones((2, 0))).shape == (2, 0)


def test_bf16_rounding_matches_torch():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(1).standard_normal(100_000).astype(np.float32) * 100
    ours = f32_to_bf16_bits(x)
    theirs = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(ours, theirs)


def test_bf16_file_round_trip(tmp_path):
    x = np.random.default_rng(2).standard_normal((4, 6)).astype(np.float32)
    bits = f32_to_bf16_bits(x)
    save_safetensors({"w": LazyTensor((4, 6), "BF16", lambda: bits)}, tmp_path / "bf.safetensors")
    f = SafetensorsFile(tmp_path / "bf.safetensors")
    assert f.dtype("w") == "BF16" and f["w"].dtype == np.float32
    assert np.array_equal(f["w"], bf16_bits_to_f32(bits)) and np.abs(f["w"] - x).max() <= np.abs(x).max() * 2**-8


def test_write_is_atomic(tmp_path):
    target = tmp_path / "w.safetensors"
    save_safetensors({"a": np.ones(3, np.float32)}, target)
    before = target.read_bytes()

    def boom():
        raise RuntimeError("producer failed")

    with pytest.raises(RuntimeError):
        save_safetensors({"a": np.zeros(3, np.float32), "b": LazyTensor((2,), "F32", boom)}, target)
    assert target.read_bytes() == before  # the old file is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]  # and no tmp file is left


def test_lazy_tensor_must_match_its_plan(tmp_path):
    with pytest.raises(ValueError, match="planned"):
        save_safetensors({"a": LazyTensor((2, 2), "F32", lambda: np.zeros(3, np.float32))}, tmp_path / "x.safetensors")


def test_sharded_write_and_read(tmp_path):
    tensors = {f"layer.{i}.weight": np.full((10, 10), i, np.float32) for i in range(5)}  # 400 bytes each
    written = save_sharded(tensors, tmp_path, max_shard_bytes=1000)
    names = sorted(p.name for p in written)
    assert names == [
        "diffusion_pytorch_model-00001-of-00003.safetensors",
        "diffusion_pytorch_model-00002-of-00003.safetensors",
        "diffusion_pytorch_model-00003-of-00003.safetensors",
        "diffusion_pytorch_model.safetensors.index.json",
    ]
    index = json.loads((tmp_path / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 2000 and set(index["weight_map"]) == set(tensors)
    sharded = ShardedSafetensors(tmp_path / "diffusion_pytorch_model.safetensors.index.json")
    assert all(np.array_equal(sharded[k], v) for k, v in tensors.items())
    assert sharded.shape("layer.0.weight") == (10, 10)
    # Re-writing as one file removes the stale index, so readers cannot pick the old shards.
    save_sharded(tensors, tmp_path)
    assert not (tmp_path / "diffusion_pytorch_model.safetensors.index.json").exists()
    single = SafetensorsFile(tmp_path / "diffusion_pytorch_model.safetensors")
    assert np.array_equal(single["layer.4.weight"], tensors["layer.4.weight"])


def test_sharded_index_readable_by_transformers_convention(tmp_path):
    save_sharded({"a": np.ones(300, np.float32), "b": np.ones(300, np.float32)}, tmp_path, "model.safetensors", 1000)
    assert (tmp_path / "model-00001-of-00002.safetensors").is_file()
    assert (tmp_path / "model.safetensors.index.json").is_file()


# ---- bad safetensors files -----------------------------------------------------------------------------------------
def _good_file(tmp_path: Path) -> Path:
    path = tmp_path / "good.safetensors"
    save_safetensors({"a": np.arange(100, dtype=np.float32), "b": np.ones((4, 4), np.float16)}, path)
    return path


def _with_header(tmp_path: Path, header: dict, data: bytes = b"\0" * 64) -> Path:
    blob = json.dumps(header).encode()
    path = tmp_path / "crafted.safetensors"
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


def test_truncated_file_is_refused_with_its_name(tmp_path):
    path = _good_file(tmp_path)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(WeightFileError, match=r"good\.safetensors: truncated: tensor 'b'"):
        SafetensorsFile(path)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "less than the 8-byte header"),
        (b"\x05\0\0\0", "less than the 8-byte header"),
        (struct.pack("<Q", 10**12) + b"{}", "does not fit in the file"),
        (struct.pack("<Q", 4) + b"{{{{", "does not parse"),
        (struct.pack("<Q", 2) + b"[]", "not an object"),
    ],
)
def test_corrupt_headers(tmp_path, content, message):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(WeightFileError, match=message) as e:
        SafetensorsFile(path)
    assert "bad.safetensors" in str(e.value)


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}, "12 bytes for shape"),
        ({"dtype": "Q7", "shape": [4], "data_offsets": [0, 16]}, "unknown dtype"),
        ({"dtype": "F32", "shape": [4]}, "lacks dtype/shape/data_offsets"),
        ({"dtype": "F32", "shape": [4], "data_offsets": [16, 0]}, "invalid offsets"),
    ],
)
def test_corrupt_entries(tmp_path, entry, message):
    with pytest.raises(WeightFileError, match=message):
        SafetensorsFile(_with_header(tmp_path, {"x": entry}))


def test_overlapping_tensors_are_refused(tmp_path):
    header = {
        "x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        "y": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]},
    }
    with pytest.raises(WeightFileError, match="overlap"):
        SafetensorsFile(_with_header(tmp_path, header))


def test_missing_file(tmp_path):
    with pytest.raises(WeightFileError, match="file not found"):
        SafetensorsFile(tmp_path / "nope.safetensors")


# ---- torch zip checkpoints -----------------------------------------------------------------------------------------
def test_torch_bin_matches_torch_load(tmp_path):
    torch = pytest.importorskip("torch")
    from collections import OrderedDict

    base = torch.randn(6, 8)
    state = {
        "image_proj": OrderedDict(
            w16=torch.randn(3, 4).half(), w32=torch.randn(5), bf=torch.randn(4, 4).to(torch.bfloat16)
        ),
        "ip_adapter": {"1.to_k_ip.weight": torch.nn.Parameter(torch.randn(2, 3)), "ids": torch.arange(77)[None]},
        "transposed": base.t(),  # a strided view of a shared storage
        "slice": base[2:4],  # an offset into the same storage
        "scalar": torch.tensor(3.0),
        "step": 7,
    }
    path = tmp_path / "x.bin"
    torch.save(state, path)
    f = TorchBinFile(path)
    ref = torch.load(path, weights_only=True)
    flat = {
        "image_proj.w16": ref["image_proj"]["w16"],
        "image_proj.w32": ref["image_proj"]["w32"],
        "image_proj.bf": ref["image_proj"]["bf"].float(),
        "ip_adapter.1.to_k_ip.weight": ref["ip_adapter"]["1.to_k_ip.weight"].detach(),
        "ip_adapter.ids": ref["ip_adapter"]["ids"],
        "transposed": ref["transposed"],
        "slice": ref["slice"],
        "scalar": ref["scalar"],
    }
    assert set(f) == set(flat) and f.extras == {"step": 7}
    for k, v in flat.items():
        got = f[k]
        assert got.shape == tuple(v.shape) and np.array_equal(got, v.numpy()), k
        assert got.flags.c_contiguous and got.flags.writeable
    assert f.dtype("image_proj.w16") == "F16" and f.dtype("image_proj.bf") == "BF16"
    assert f["image_proj.bf"].dtype == np.float32


def test_committed_bin_reads_without_torch_like_its_safetensors_twin():
    # The fixture .bin was written by torch.save; its twin .safetensors holds the same tensors, flattened.
    a, b = TorchBinFile(LAYOUTS / "ip_adapter_micro.bin"), SafetensorsFile(LAYOUTS / "ip_adapter_micro.safetensors")
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in b)


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _torch_like_zip(path: Path, payload: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", payload)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")
    return path


def test_malicious_bin_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"image_proj": {"proj.weight": _Evil(marker)}}, protocol=2)
    with pytest.raises(UnsafePickleError, match=r"global '(posix|os|nt)\.system'") as e:
        TorchBinFile(_torch_like_zip(tmp_path / "evil.bin", payload))
    assert "evil.bin" in str(e.value)
    assert not marker.exists()
    # Control: the same payload does run under plain pickle, so the refusal above is what kept it from running.
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Evil(control), protocol=2))
    assert control.exists()


@pytest.mark.parametrize("module, name", [("builtins", "eval"), ("torch", "load"), ("posix", "system")])
def test_any_other_global_is_refused(tmp_path, module, name):
    payload = b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"X\x03\x00\x00\x001+1\x85R."  # GLOBAL; call it
    with pytest.raises(UnsafePickleError, match=f"global '{module}.{name}'"):
        TorchBinFile(_torch_like_zip(tmp_path / "g.bin", payload))


def test_legacy_pickle_is_refused_unread(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "legacy.bin"
    path.write_bytes(pickle.dumps(_Evil(marker), protocol=2))
    with pytest.raises(WeightFileError, match="legacy"):
        TorchBinFile(path)
    assert not marker.exists()


def test_truncated_and_corrupt_bin(tmp_path):
    raw = (LAYOUTS / "ip_adapter_micro.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(WeightFileError, match=r"cut\.bin: cannot read: truncated"):
        TorchBinFile(tmp_path / "cut.bin")
    # Flip one byte inside a data record: the zip CRC check catches it when that tensor is read.
    with zipfile.ZipFile(io.BytesIO(raw)) as z:
        info = z.getinfo("ip_adapter_micro/data/0")
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26 : info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len  # the local header's own extra field (alignment padding)
    bad = bytearray(raw)
    bad[start + 5] ^= 0xFF
    (tmp_path / "flip.bin").write_bytes(bytes(bad))
    f = TorchBinFile(tmp_path / "flip.bin")
    key = next(k for k, r in f.refs.items() if r.storage.key == "0")
    with pytest.raises(WeightFileError, match=r"flip\.bin: corrupt data record"):
        f[key]
