"""The device shim's CPU kernels against numpy references, in both execution modes, on both CPU paths: the fused
kernels of cpu_kernels.cc and the composed MindSpore ops used when no compiler is available."""

import math
import os
import warnings

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor

from mindone_story import cpu_kernels, layers

PATHS = ["fused", "composed"]


@pytest.fixture
def path(request, monkeypatch):
    """Cells built inside a test see the requested CPU path."""
    if request.param == "fused":
        assert cpu_kernels.library() is not None, "the fused CPU kernels did not build (is g++ installed?)"
    else:
        monkeypatch.setattr(layers, "fused_cpu", lambda: False)
    return request.param


def run(cell, mode, *arrays):
    fn = ms.jit(cell.construct) if mode == "graph" else cell
    return fn(*(Tensor(a) for a in arrays)).asnumpy()


def rel_err(out, ref):
    return np.abs(out - ref).max() / np.abs(ref).max()


def conv_reference(x, w, b, stride, pad):
    top, bottom, left, right = pad
    x = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    k = w.shape[2]
    ho, wo = (x.shape[2] - k) // stride + 1, (x.shape[3] - k) // stride + 1
    out = np.zeros((x.shape[0], w.shape[0], ho, wo), np.float64)
    for i in range(k):
        for j in range(k):
            patch = x[:, :, i : i + stride * ho : stride, j : j + stride * wo : stride]
            out += np.einsum("oc,bchw->bohw", w[:, :, i, j], patch)
    return out + b.reshape(1, -1, 1, 1)


CASES = [  # input shape, out channels, kernel, stride, padding: every convolution the models use, and odd sizes
    ((2, 8, 9, 11), 5, 3, 1, 1),  # UNet / VAE 3x3
    ((2, 8, 10, 12), 5, 3, 2, (0, 1, 0, 1)),  # VAE encoder downsampling
    ((1, 4, 7, 9), 4, 3, 2, 1),  # UNet downsampling, odd size
    ((1, 3, 28, 28), 7, 14, 14, 0),  # CLIP patch embedding
    ((2, 4, 8, 8), 6, 1, 1, 0),  # 1x1 shortcut
    ((1, 3, 5, 6), 2, 3, 1, (2, 0, 1, 3)),  # asymmetric padding
]


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("mode", ["pynative", "graph"])
@pytest.mark.parametrize("shape,out_ch,k,stride,pad", CASES)
def test_conv2d_matches_reference(path, mode, shape, out_ch, k, stride, pad):
    rng = np.random.default_rng(0)
    conv = layers.Conv2d(shape[1], out_ch, k, stride=stride, padding=pad)
    w = rng.standard_normal((out_ch, shape[1], k, k)).astype(np.float32)
    b = rng.standard_normal(out_ch).astype(np.float32)
    conv.weight.set_data(Tensor(w))
    conv.bias.set_data(Tensor(b))
    x = rng.standard_normal(shape).astype(np.float32)
    out = run(conv, mode, x)
    ref = conv_reference(x, w, b, stride, (pad,) * 4 if isinstance(pad, int) else pad)
    assert out.shape == ref.shape
    assert rel_err(out, ref) < 1e-5


def test_conv2d_in_bands_equals_one_piece(monkeypatch):
    """Large convolutions build their im2col in bands of rows; the bands must join exactly (composed path)."""
    monkeypatch.setattr(layers, "fused_cpu", lambda: False)
    rng = np.random.default_rng(1)
    conv = layers.Conv2d(8, 5, 3, padding=1)
    w = rng.standard_normal((5, 8, 3, 3)).astype(np.float32)
    conv.weight.set_data(Tensor(w))
    conv.bias.set_data(Tensor(np.zeros(5, np.float32)))
    x = rng.standard_normal((2, 8, 13, 10)).astype(np.float32)
    whole = conv(Tensor(x)).asnumpy()
    monkeypatch.setattr(layers, "_IM2COL_BYTES", 2 * 8 * 9 * 12 * 4 * 3)  # three rows per band: 5 bands
    banded = conv(Tensor(x)).asnumpy()
    ref = conv_reference(x, w, np.zeros(5, np.float32), 1, (1, 1, 1, 1))
    assert np.abs(banded - ref).max() / np.abs(ref).max() < 1e-5
    assert np.abs(banded - whole).max() / np.abs(ref).max() < 1e-6


def test_fused_conv2d_splits_images_into_pieces():
    """The fused kernel cuts each image into bands of ~4 MB of im2col (here 10 per image) shared among threads."""
    rng = np.random.default_rng(2)
    conv = layers.Conv2d(256, 4, 3, padding=1)
    assert conv.fused is not None
    w = (0.05 * rng.standard_normal((4, 256, 3, 3))).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    conv.weight.set_data(Tensor(w))
    conv.bias.set_data(Tensor(b))
    x = rng.standard_normal((2, 256, 64, 64)).astype(np.float32)
    assert rel_err(conv(Tensor(x)).asnumpy(), conv_reference(x, w, b, 1, (1, 1, 1, 1))) < 1e-5


def test_pynative_keeps_convolutions_of_one_input_shape_apart():
    """PyNative caches an op's inferred output shape per name and input shapes; strides must not share it."""
    x = Tensor(np.ones((1, 2, 8, 8), np.float32))
    shapes = [layers.Conv2d(2, 3, 3, stride=s, padding=1)(x).shape for s in (1, 2)]
    assert shapes == [(1, 3, 8, 8), (1, 3, 4, 4)]


def _gelu(x):
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def _group_norm(x, groups, w, b, eps):
    h = x.reshape(x.shape[0], groups, -1).astype(np.float64)
    h = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + eps)
    return h.reshape(x.shape) * w.reshape(1, -1, 1, 1) + b.reshape(1, -1, 1, 1)


def _layer_norm(x, w, b, eps):
    h = x.astype(np.float64)
    return (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + eps) * w + b


def _filled(cell, rng):
    values = {}
    for p in cell.get_parameters():
        values[p.name.split(".")[-1]] = v = rng.standard_normal(p.shape).astype(np.float32)
        p.set_data(Tensor(v))
    return values


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("mode", ["pynative", "graph"])
@pytest.mark.parametrize("silu", [False, True])
def test_group_norm_matches_reference(path, mode, silu):
    rng = np.random.default_rng(3)
    norm = layers.GroupNorm(4, 12, eps=1e-6, silu=silu)
    p = _filled(norm, rng)
    x = (rng.standard_normal((2, 12, 5, 7)) * 3 + 2).astype(np.float32)  # an offset tests the variance's accuracy
    ref = _group_norm(x, 4, p["weight"], p["bias"], 1e-6)
    if silu:
        ref = ref / (1 + np.exp(-ref))
    assert rel_err(run(norm, mode, x), ref) < 1e-5


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("mode", ["pynative", "graph"])
def test_layer_norm_matches_reference(path, mode):
    rng = np.random.default_rng(4)
    norm = layers.LayerNorm(20, eps=1e-5)
    p = _filled(norm, rng)
    x = (rng.standard_normal((2, 7, 20)) + 1).astype(np.float32)
    assert rel_err(run(norm, mode, x), _layer_norm(x, p["weight"], p["bias"], 1e-5)) < 1e-5


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("mode", ["pynative", "graph"])
def test_gelu_and_its_gate_match_reference(path, mode):
    x = np.linspace(-12, 12, 2 * 3 * 64, dtype=np.float32).reshape(2, 3, 64)  # both tails and the middle
    assert rel_err(run(layers.GELU(), mode, x), _gelu(x.astype(np.float64))) < 1e-6
    gated = run(layers.GatedGELU(), mode, x)
    assert gated.shape == (2, 3, 32)
    assert rel_err(gated, x[..., :32] * _gelu(x[..., 32:].astype(np.float64))) < 1e-6


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("mode", ["pynative", "graph"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", [3, 300])  # few rows: threads split the outputs; many: they split the rows
def test_linear_matches_reference(path, mode, bias, rows):
    rng = np.random.default_rng(5)
    lin = layers.Linear(24, 10, bias=bias)
    p = _filled(lin, rng)
    x = rng.standard_normal((2, rows, 24)).astype(np.float32)
    ref = x.astype(np.float64) @ p["weight"].T + (p["bias"] if bias else 0)
    assert rel_err(run(lin, mode, x), ref) < 1e-5


def _attention(q, k, v, mask=None):
    s = q @ k.swapaxes(-1, -2) / math.sqrt(q.shape[-1]) + (0 if mask is None else mask)
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("mode", ["pynative", "graph"])
@pytest.mark.parametrize(
    "shape",  # B, H, Sq, Sk, D, Dv: CLIP text, a query count that is no multiple of the kernel's row block, a key
    # count that shrinks the block to 16 rows, more values than keys' width, a single key
    [(2, 3, 77, 77, 8, 8), (1, 2, 300, 40, 16, 16), (1, 1, 40, 20000, 4, 4), (2, 1, 9, 5, 4, 12), (1, 2, 7, 1, 8, 8)],
)
def test_attention_matches_reference(path, mode, shape):
    b, h, sq, sk, d, dv = shape
    rng = np.random.default_rng(7)
    q, k, v = (3 * rng.standard_normal(s).astype(np.float32) for s in [(b, h, sq, d), (b, h, sk, d), (b, h, sk, dv)])
    cell = layers.MathAttention()
    assert (cell.fused is not None) == (path == "fused")
    ref = _attention(*(x.astype(np.float64) for x in (q, k, v)))
    assert rel_err(run(cell, mode, q, k, v), ref) < 1e-5


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("mode", ["pynative", "graph"])
@pytest.mark.parametrize("mask_shape", [(2, 1, 1, 9), (1, 3, 1, 9), (2, 3, 1, 9), (1, 1, 6, 9), (2, 1, 6, 9)])
def test_masked_attention_matches_reference(path, mode, mask_shape):
    """Key masks [B|1, H|1, 1, Sk] (consistent attention's, with its -1e9 drops) run fused; row masks (CLIP's
    causal one) on the composed ops. Either way the mask is applied."""
    rng = np.random.default_rng(8)
    q = rng.standard_normal((2, 3, 6, 8)).astype(np.float32)
    k, v = (rng.standard_normal((2, 3, 9, 8)).astype(np.float32) for _ in range(2))
    mask = np.where(rng.random(mask_shape) < 0.4, -1e9, rng.standard_normal(mask_shape)).astype(np.float32)
    mask[..., -1] = 0.0  # every row keeps a key
    cell = layers.MathAttention()
    out = run(cell, mode, q, k, v, mask)
    assert rel_err(out, _attention(*(x.astype(np.float64) for x in (q, k, v, mask)))) < 1e-5
    assert rel_err(out, run(cell, mode, q, k, v)) > 1e-2


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("mode", ["pynative", "graph"])
def test_masked_keys_weigh_exactly_nothing(path, mode):
    """A dropped key's probability is 0, not the ~1e-40 that exp's floor and the division leave (subnormals, which
    made the kernel's product with V 20x slower): values of 3e38 on the dropped keys do not reach the output."""
    rng = np.random.default_rng(10)
    q, k = rng.standard_normal((2, 3, 6, 8)).astype(np.float32), rng.standard_normal((2, 3, 40, 8)).astype(np.float32)
    v = rng.standard_normal((2, 3, 40, 8)).astype(np.float32)
    v[:, :, :30] = 3e38  # the dropped keys: the first 30 of each row, as the gathered pool of a closed gate
    mask = np.zeros((2, 1, 1, 40), np.float32)
    mask[..., :30] = -1e9
    out = run(layers.MathAttention(), mode, q, k, v, mask)
    ref = _attention(*(x.astype(np.float64) for x in (q, k[:, :, 30:], v[:, :, 30:])))
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("mode", ["pynative", "graph"])
@pytest.mark.parametrize("shape", [(2, 5, 7, 3), (1, 40, 33, 64), (3, 33, 65), (2, 1, 9)])  # odd sizes cross tiles
def test_swap_axes_matches_reference(path, mode, shape):
    x = np.random.default_rng(9).standard_normal(shape).astype(np.float32)
    cell = layers.SwapAxes()
    assert (cell.fused is not None) == (path == "fused")
    assert np.array_equal(run(cell, mode, x), np.swapaxes(x, 1, 2))


@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_memory_check_counts_scores_where_attention_holds_them(path):
    """The fused kernel holds no [B, H, Sq, Sk] scores, so at 1024 px and 8 id images the bound is the VAE's (a
    composed path would hold 10.7 GB of scores at the finest attention level and refuse on a small machine)."""
    import json

    from mindone_story import checks
    from mindone_story.config import UNetConfig, VAEConfig, preset_dir

    unet = UNetConfig.from_dict(json.loads((preset_dir("sdxl") / "unet" / "config.json").read_text()))
    vae = VAEConfig.from_dict(json.loads((preset_dir("sdxl") / "vae" / "config.json").read_text()))
    assert layers.holds_scores(ms.float16)  # no fused kernel in fp16
    assert layers.holds_scores(ms.float32) == (path == "composed")
    need, what = checks.least_memory(unet, vae, 1024, 1024, 8, layers.holds_scores(ms.float32))
    if path == "fused":
        assert what.startswith("the VAE") and need == 2 * 4 * 128 * 1024 * 1024
    else:
        assert what.startswith("the attention scores") and need == 2 * 8 * 10 * 4096**2 * 4


def test_kernels_fall_back_with_a_warning_without_a_compiler(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_built", cpu_kernels._UNBUILT)
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler found"):
        assert cpu_kernels.library() is None
    assert not layers.fused_cpu()
    assert layers.GroupNorm(2, 4).fused is None


def test_kernels_can_be_switched_off(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_built", cpu_kernels._UNBUILT)
    monkeypatch.setenv("MINDONE_STORY_CPU_KERNELS", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cpu_kernels.library() is None


def test_a_failed_build_is_reported_and_leaves_no_library(monkeypatch, tmp_path):
    broken = tmp_path / "cpu_kernels.cc"
    broken.write_text("this is not C++")
    monkeypatch.setattr(cpu_kernels, "_SOURCE", broken)
    monkeypatch.setattr(cpu_kernels, "_built", cpu_kernels._UNBUILT)
    monkeypatch.setenv("MINDONE_STORY_CACHE", str(tmp_path / "cache"))
    with pytest.warns(RuntimeWarning, match="building cpu_kernels.cc failed"):
        assert cpu_kernels.library() is None
    assert os.listdir(tmp_path / "cache" / "cpu_kernels") == []


def test_the_built_library_is_reused(monkeypatch):
    path = cpu_kernels.library()
    assert path is not None
    before = os.stat(path).st_mtime_ns
    monkeypatch.setattr(cpu_kernels.subprocess, "run", _refuse_compiling(cpu_kernels.subprocess.run))
    assert cpu_kernels._build("g++") == path
    assert os.stat(path).st_mtime_ns == before


def _refuse_compiling(real_run):
    def checked(cmd, *args, **kwargs):
        assert "--version" in cmd, f"recompiled although the library was cached: {cmd}"
        return real_run(cmd, *args, **kwargs)

    return checked


@pytest.mark.parametrize("mode", ["pynative", "graph"])
def test_fp16_takes_the_composed_path_on_cpu(mode):
    """The fused kernels are fp32-only; fp16 cells (--dtype fp16 on CPU) must still run, on the composed ops."""
    assert layers.fused_cpu()
    rng = np.random.default_rng(6)
    lin = layers.Linear(16, 8)
    p = _filled(lin, rng)
    for param in lin.get_parameters():
        param.set_dtype(ms.float16)
    x = rng.standard_normal((2, 5, 16)).astype(np.float16)
    out = run(lin, mode, x)
    assert out.dtype == np.float16
    ref = x.astype(np.float64) @ p["weight"].T + p["bias"]
    assert rel_err(out, ref) < 5e-3
    gelu = run(layers.GELU(), mode, x)
    assert gelu.dtype == np.float16 and rel_err(gelu, _gelu(x.astype(np.float64))) < 5e-3
