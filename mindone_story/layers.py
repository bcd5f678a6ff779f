"""The device shim: every kernel choice that depends on the device lives here and nowhere else.

The device is chosen once (:func:`set_device`), and each cell binds its implementation when it is built:

- ``ascend``: the ``mint`` kernels and FlashAttentionScore (:data:`ASCEND_CALLS`). Under the *emulated* Ascend
  backend ("Ascend-emulated", for tests on CPU) the same branch runs with each of those calls replaced by
  :mod:`.emulated_ascend`, which first asserts the kernel's documented contract and then computes a CPU reference.
- ``fused``: CPU with the fp32 kernels of ``cpu_kernels`` (many ``mint`` ops have no CPU kernel and
  ``mint.nn.Linear`` runs at half the speed of MatMul + BiasAdd there). Cells given other dtypes take ``composed``.
- ``composed``: CPU with legacy ``ops`` only (no C++ compiler, or fp16 on CPU).

A cell's ``impl`` is one bound method, so graph mode inlines it; the remaining tests in ``construct`` are plain dtype
and shape comparisons, which fold at compile time. The attention kernel is a visible switch, ``"math"`` or
``"flash"`` (default: flash on Ascend, math on CPU). Parameter names are ``weight``/``bias`` so that model attribute
paths equal the diffusers / transformers checkpoint keys.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, mint, nn, ops
from mindspore.common.initializer import initializer

from . import cpu_kernels

DEVICES = ("CPU", "Ascend", "Ascend-emulated")
ATTENTION = ("math", "flash")

# The Ascend-only calls of the ``ascend`` branch, by the name the emulation uses. Cells call them with keywords
# only; tests/test_ascend.py checks that each exists in the installed MindSpore and takes every keyword passed.
ASCEND_CALLS = {
    "linear": mint.nn.functional.linear,
    "conv2d": mint.nn.functional.conv2d,
    "pad": mint.nn.functional.pad,
    "group_norm": mint.nn.functional.group_norm,
    "layer_norm": mint.nn.functional.layer_norm,
    "flash_attention_score": ops.flash_attention_score,
}


class DeviceDtypeError(ValueError):
    """A dtype the chosen device (or attention kernel) cannot run."""


@dataclass(frozen=True)
class Backend:
    device: str  # one of DEVICES
    attention: str  # one of ATTENTION

    @property
    def ascend(self) -> bool:
        """Whether cells take the Ascend branch (on an NPU, or emulated on CPU)."""
        return self.device != "CPU"

    def call(self, name: str):
        """The Ascend-only function ``name``: MindSpore's on an NPU, the contract-checking reference if emulated."""
        if self.device == "Ascend-emulated":
            from . import emulated_ascend

            return getattr(emulated_ascend, name)
        return ASCEND_CALLS[name]


_backend: Backend | None = None


def set_device(device: str, attention: str | None = None) -> Backend:
    """Choose the device (one of :data:`DEVICES`) and the attention kernel ("math" or "flash"; default flash on
    Ascend, math on CPU) before building models: cells bind their kernels when they are built."""
    global _backend
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    attention = attention or ("flash" if device != "CPU" else "math")
    if attention not in ATTENTION:
        raise ValueError(f"unknown attention kernel {attention!r}; choose one of {', '.join(ATTENTION)}")
    if attention == "flash" and device == "CPU":
        raise ValueError("FlashAttentionScore runs only on Ascend: on CPU use the math attention")
    target = "CPU" if device == "Ascend-emulated" else device
    if ms.get_context("device_target") != target:  # set_context warns (deprecated) even when nothing changes
        ms.set_context(device_target=target)
    _backend = Backend(device, attention)
    return _backend


def backend() -> Backend:
    """The chosen backend; until :func:`set_device` is called, MindSpore's device target, or the emulated Ascend
    backend if the environment sets ``MINDONE_STORY_BACKEND=ascend-emulated``."""
    if _backend is None:
        if os.environ.get("MINDONE_STORY_BACKEND", "").lower() == "ascend-emulated":
            return set_device("Ascend-emulated")
        return set_device("Ascend" if ms.get_context("device_target") == "Ascend" else "CPU")
    return _backend


def fused_cpu() -> bool:
    """Whether CPU cells built now use the fused kernels of ``cpu_kernels`` (decided per cell, at construction).
    The kernels are fp32-only: cells given other dtypes (fp16 on CPU, if asked for) take the composed path. The
    dtype tests in ``construct`` are plain comparisons, which graph mode folds; a helper taking ``*tensors`` there
    made every call site a closure and the SDXL UNet's common-subexpression pass ran for minutes."""
    return not backend().ascend and cpu_kernels.library() is not None


def holds_scores(dtype: ms.Type) -> bool:
    """Whether an attention call built now in ``dtype``, unmasked or key-masked (the UNet's), holds its [B, H, Sq, Sk]
    scores: the composed math ops do; the fused CPU kernel (fp32) and FlashAttentionScore do not. For the memory
    checks."""
    return backend().attention == "math" and not (fused_cpu() and dtype == ms.float32)


def _kind() -> str:
    return "ascend" if backend().ascend else "fused" if fused_cpu() else "composed"


def default_dtype() -> ms.Type:
    """fp16 on Ascend (FlashAttentionScore takes fp16 and bf16 only); fp32 on CPU (bf16 has no CPU kernels, fp16 is
    no faster there)."""
    return ms.float16 if backend().ascend else ms.float32


def compute_dtype(dtype: ms.Type | None = None) -> ms.Type:
    """The dtype the UNet and the encoders run in: ``dtype`` if the device runs it, else the device's default.
    Every loader resolves its dtype here, so a bad pair fails before any weight is read."""
    b = backend()
    if dtype is None:
        return default_dtype()
    if dtype == ms.bfloat16 and b.device == "CPU":
        raise DeviceDtypeError("bf16 has no MindSpore CPU kernels: on CPU use fp32 (the default) or fp16")
    if dtype == ms.float32 and b.attention == "flash":
        raise DeviceDtypeError(
            f"FlashAttentionScore takes fp16 or bf16, not fp32: on {b.device} use fp16 (the default) or bf16, "
            "or choose the math attention for fp32"
        )
    if dtype not in (ms.float32, ms.float16, ms.bfloat16):
        raise DeviceDtypeError(f"unsupported compute dtype {dtype} on {b.device}: use fp16, bf16 or fp32")
    return dtype


def _zeros(*shape: int) -> Parameter:
    # Lazily initialised: building a full-size model allocates nothing until weights are loaded or it first runs.
    # Every real use loads a checkpoint, and loading is strict, so no weight stays at its placeholder unnoticed.
    return Parameter(initializer("zeros", shape, ms.float32))


def _ones(*shape: int) -> Parameter:
    return Parameter(initializer("ones", shape, ms.float32))


class Linear(nn.Cell):
    """y = x W^T + b on inputs of any rank. Ascend: ``mint`` linear. CPU: the fused ``linear`` kernel (oneDNN SGEMM
    split across threads, 1.5-2.5x MatMul + BiasAdd at the UNet's sizes), or MatMul + BiasAdd on 2-D views (twice
    mint.nn.Linear's speed there)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = _zeros(out_features, in_features)
        self.bias = _zeros(out_features) if bias else None
        self.has_bias = bias
        self.matmul = ops.MatMul(transpose_b=True)
        self.fused = None
        kind = _kind()
        if kind == "ascend":
            self.linear = backend().call("linear")
        elif kind == "fused":
            self.fused = cpu_kernels.op("linear", lambda x, w, *b: x[:-1] + [w[0]])
        self.impl = {"ascend": self._ascend, "fused": self._fused, "composed": self._composed}[kind]

    def construct(self, x: Tensor) -> Tensor:
        return self.impl(x)

    def _ascend(self, x: Tensor) -> Tensor:
        return self.linear(input=x, weight=self.weight, bias=self.bias)

    def _fused(self, x: Tensor) -> Tensor:
        if x.dtype == self.weight.dtype == ms.float32:
            return self.fused(x, self.weight, self.bias) if self.has_bias else self.fused(x, self.weight)
        return self._composed(x)

    def _composed(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        y = self.matmul(x.reshape(-1, self.in_features), self.weight)
        if self.has_bias:
            y = ops.bias_add(y, self.bias)
        return y.reshape(lead + (self.out_features,))


class Conv2d(nn.Cell):
    """NCHW convolution. ``padding`` is an int or (top, bottom, left, right), which also covers the VAE's
    asymmetric pad-then-stride-2 downsampling (on Ascend a ``mint`` pad before the convolution; on CPU inside the
    convolution, as ConstantPadND has no CPU kernel).

    On CPU the convolution is one MatMul over an im2col: on AVX-512 CPUs oneDNN runs MindSpore's plain-layout Conv2D
    on a reference kernel, 100x slower than PyTorch. That is the fused ``conv2d`` kernel (im2col + oneDNN SGEMM) or,
    without the kernels, a MatMul over an im2col built from contiguous slices (``_conv_as_matmul``).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding=0, bias=True):
        super().__init__()
        self.weight = _zeros(out_channels, in_channels, kernel_size, kernel_size)
        self.bias = _zeros(out_channels) if bias else None
        self.has_bias = bias
        self.pad = (padding,) * 4 if isinstance(padding, int) else tuple(padding)
        self.kernel_size, self.stride = kernel_size, stride
        self.fused = None
        kind = _kind()
        if kind == "ascend":
            self.conv2d, self.pad_call = backend().call("conv2d"), backend().call("pad")
        elif kind == "fused":
            top, bottom, left, right = self.pad
            # the spec tensor carries stride and padding to the kernel; the tag keeps PyNative's shape cache apart
            self.spec = Tensor(np.array([stride, top, bottom, left, right], np.int64))
            self.fused = cpu_kernels.op(
                "conv2d",
                lambda x, w, b, spec: [
                    x[0],
                    w[0],
                    (x[2] + top + bottom - w[2]) // stride + 1,
                    (x[3] + left + right - w[3]) // stride + 1,
                ],
                tag=f"conv2d{(stride,) + self.pad}",
            )
        self.impl = {"ascend": self._ascend, "fused": self._fused, "composed": self._composed}[kind]

    def construct(self, x: Tensor) -> Tensor:
        return self.impl(x)

    def _ascend(self, x: Tensor) -> Tensor:
        top, bottom, left, right = self.pad
        padding = top
        if not top == bottom == left == right:  # mint's conv2d pads symmetrically; the pad takes (left, right, ...)
            x = self.pad_call(input=x, pad=(left, right, top, bottom), mode="constant", value=0.0)
            padding = 0
        return self.conv2d(input=x, weight=self.weight, bias=self.bias, stride=self.stride, padding=padding)

    def _fused(self, x: Tensor) -> Tensor:
        if x.dtype == self.weight.dtype == ms.float32:
            bias = self.bias if self.has_bias else ops.zeros((self.weight.shape[0],), x.dtype)
            return self.fused(x, self.weight, bias, self.spec)
        return self._composed(x)

    def _composed(self, x: Tensor) -> Tensor:
        y = _conv_as_matmul(x, self.weight, self.stride, self.pad)
        if self.has_bias:
            y = ops.bias_add(y, self.bias)
        return y


# Largest im2col buffer (bytes) built at once; bigger convolutions (the VAE at 1024 px) run in bands of rows.
_IM2COL_BYTES = 1 << 29


def _zero_pad(x: Tensor, top: int, bottom: int, left: int, right: int) -> Tensor:
    """Zero padding of the last two axes by concatenation (fast on CPU, where the Pad kernels are slow or absent)."""
    b, c, h, w = x.shape
    if left or right:
        parts = (ops.zeros((b, c, h, left), x.dtype),) if left else ()
        parts += (x,)
        parts += (ops.zeros((b, c, h, right), x.dtype),) if right else ()
        x = ops.concat(parts, 3)
        w = w + left + right
    if top or bottom:
        parts = (ops.zeros((b, c, top, w), x.dtype),) if top else ()
        parts += (x,)
        parts += (ops.zeros((b, c, bottom, w), x.dtype),) if bottom else ()
        x = ops.concat(parts, 2)
    return x


def _conv_as_matmul(x: Tensor, weight: Tensor, stride: int, pad: tuple) -> Tensor:
    """Convolution as W[O, C*k*k] @ cols[B, C*k*k, rows*Wq].

    The padded input is split into its stride x stride phases, each flattened to [Hq*Wq]. Tap (i, j) of the kernel
    then reads phase (i % s, j % s) at the flat offset (i // s) * Wq + j // s, so every im2col block is a contiguous
    slice; outputs are computed on the phase width Wq and the surplus columns are cropped at the end.
    """
    b, c, h, w = x.shape
    o, k, s = weight.shape[0], weight.shape[2], stride
    w2d = weight.reshape(o, c * k * k)
    top, bottom, left, right = pad
    if k == 1 and s == 1 and top + bottom + left + right == 0:
        return ops.matmul(w2d, x.reshape(b, c, h * w)).reshape(b, o, h, w)
    ho, wo = (h + top + bottom - k) // s + 1, (w + left + right - k) // s + 1
    reach = (k - 1) // s
    hq, wq = ho + reach + 1, -(-(w + left + right) // s)  # one spare phase row keeps the last flat slice in range
    x = _zero_pad(x, top, hq * s - h - top, left, wq * s - w - left)
    if s == 1:
        phases = x.reshape(b, c, hq * wq)
    else:  # [B, C, s*s phases of hq*wq]; kept 3-D because indexing a phase axis is a slow gather on CPU
        phases = x.reshape(b, c, hq, s, wq, s).transpose(0, 1, 3, 5, 2, 4).reshape(b, c, s * s * hq * wq)
    rows_per_band = max(1, min(ho, _IM2COL_BYTES // (b * c * k * k * wq * 4)))
    bands = ()
    for r0 in range(0, ho, rows_per_band):
        n = min(rows_per_band, ho - r0) * wq
        taps = ()
        for i in range(k):
            for j in range(k):
                start = ((i % s) * s + j % s) * hq * wq + (i // s) * wq + j // s + r0 * wq
                taps += (phases[:, :, start : start + n],)
        bands += (ops.matmul(w2d, ops.stack(taps, 2).reshape(b, c * k * k, n)),)
    y = bands[0] if len(bands) == 1 else ops.concat(bands, 2)
    return y.reshape(b, o, ho, wq)[:, :, :, :wo]


class GroupNorm(nn.Cell):
    """GroupNorm over NCHW (or NC...) inputs; ``silu=True`` applies SiLU to the result. Ascend: ``mint`` group_norm.
    CPU: computed in fp32, fused with the SiLU where the kernels are available (as composed ops the pair costs
    ~40x PyTorch's time)."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, silu: bool = False):
        super().__init__()
        self.num_groups, self.eps, self.silu = num_groups, eps, silu
        self.weight = _ones(num_channels)
        self.bias = _zeros(num_channels)
        self.fused = None
        kind = _kind()
        if kind == "ascend":
            self.group_norm = backend().call("group_norm")
        elif kind == "fused":
            self.fused = cpu_kernels.op("group_norm_silu" if silu else "group_norm", lambda x, *_: x)
            self.eps_tensor = Tensor([eps], ms.float32)
        self.impl = {"ascend": self._ascend, "fused": self._fused, "composed": self._composed}[kind]

    def construct(self, x: Tensor) -> Tensor:
        return self.impl(x)

    def _ascend(self, x: Tensor) -> Tensor:
        h = self.group_norm(input=x, num_groups=self.num_groups, weight=self.weight, bias=self.bias, eps=self.eps)
        return ops.silu(h) if self.silu else h

    def _fused(self, x: Tensor) -> Tensor:
        if self.weight.dtype == self.bias.dtype == ms.float32:
            shape, dtype, g = x.shape, x.dtype, self.num_groups
            # the kernel reads the group count from the shape [B, G, C/G, spatial]
            h = x.astype(ms.float32).reshape(shape[0], g, shape[1] // g, -1)
            w, b = self.weight.reshape(g, -1), self.bias.reshape(g, -1)
            return self.fused(h, w, b, self.eps_tensor).reshape(shape).astype(dtype)
        return self._composed(x)

    def _composed(self, x: Tensor) -> Tensor:
        shape, dtype = x.shape, x.dtype
        h = x.astype(ms.float32).reshape(shape[0], self.num_groups, -1)
        mean = h.mean(-1, keep_dims=True)
        var = ops.square(h - mean).mean(-1, keep_dims=True)
        h = ((h - mean) * ops.rsqrt(var + self.eps)).reshape(shape[0], shape[1], -1)
        # bias_add broadcasts over axis 1 ten times faster than `x + b[:, None]` on CPU
        w, b = self.weight.astype(ms.float32), self.bias.astype(ms.float32)  # fp16 weights: normalise in fp32
        h = ops.bias_add(h * w.reshape(1, -1, 1), b)
        if self.silu:
            h = ops.silu(h)
        return h.reshape(shape).astype(dtype)


class LayerNorm(nn.Cell):
    """LayerNorm over the last axis. Ascend: ``mint`` layer_norm. CPU: computed in fp32 (LayerNormExt has no CPU
    kernel; the legacy primitive does, at 15-25x PyTorch's time, so the fused kernel is used where available)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = _ones(dim)
        self.bias = _zeros(dim)
        self.norm = ops.LayerNorm(-1, -1, eps)
        self.fused = None
        kind = _kind()
        if kind == "ascend":
            self.layer_norm = backend().call("layer_norm")
        elif kind == "fused":
            self.fused = cpu_kernels.op("layer_norm", lambda x, *_: x)
            self.eps_tensor = Tensor([eps], ms.float32)
        self.impl = {"ascend": self._ascend, "fused": self._fused, "composed": self._composed}[kind]

    def construct(self, x: Tensor) -> Tensor:
        return self.impl(x)

    def _ascend(self, x: Tensor) -> Tensor:
        return self.layer_norm(input=x, normalized_shape=(self.dim,), weight=self.weight, bias=self.bias, eps=self.eps)

    def _fused(self, x: Tensor) -> Tensor:
        if self.weight.dtype == self.bias.dtype == ms.float32:
            return self.fused(x.astype(ms.float32), self.weight, self.bias, self.eps_tensor).astype(x.dtype)
        return self._composed(x)

    def _composed(self, x: Tensor) -> Tensor:
        return self.norm(x.astype(ms.float32), self.weight, self.bias)[0].astype(x.dtype)


class Embedding(nn.Cell):
    def __init__(self, num: int, dim: int):
        super().__init__()
        self.weight = _zeros(num, dim)

    def construct(self, ids: Tensor) -> Tensor:
        return ops.gather(self.weight, ids, 0)


class GELU(nn.Cell):
    """Exact (erf) GELU, as torch.nn.functional.gelu; a fused kernel on CPU (ops.gelu there: 16-40x PyTorch)."""

    def __init__(self):
        super().__init__()
        self.fused = cpu_kernels.op("gelu", lambda x: x) if _kind() == "fused" else None

    def construct(self, x: Tensor) -> Tensor:
        if self.fused is not None and x.dtype == ms.float32:
            return self.fused(x)
        return ops.gelu(x, approximate="none")


class GatedGELU(nn.Cell):
    """x[..., :d] * gelu(x[..., d:]) for x [..., 2d]: the gate of diffusers' GEGLU, fused on CPU."""

    def __init__(self):
        super().__init__()
        self.gelu = GELU()
        self.fused = cpu_kernels.op("geglu", lambda x: x[:-1] + [x[-1] // 2]) if _kind() == "fused" else None

    def construct(self, x: Tensor) -> Tensor:
        if self.fused is not None and x.dtype == ms.float32:
            return self.fused(x)
        hidden, gate = ops.split(x, x.shape[-1] // 2, axis=-1)
        return hidden * self.gelu(gate)


def quick_gelu(x: Tensor) -> Tensor:
    return x * ops.sigmoid(1.702 * x)


def silu(x: Tensor) -> Tensor:
    return ops.silu(x)


def upsample_nearest2x(x: Tensor) -> Tensor:
    b, c, h, w = x.shape
    return ops.broadcast_to(x.reshape(b, c, h, 1, w, 1), (b, c, h, 2, w, 2)).reshape(b, c, 2 * h, 2 * w)


def sinusoidal_frequencies(dim: int, max_period: float = 10000.0, shift: float = 0.0) -> Tensor:
    """exp(-log(max_period) * i / (half - shift)) for i < dim/2, as a constant (Arange has no CPU kernel)."""
    half = dim // 2
    return Tensor(np.exp(-math.log(max_period) * np.arange(half, dtype=np.float32) / (half - shift)))


# -- attention ----------------------------------------------------------------------------------------------------
# Both kernels compute softmax(q k^T / sqrt(d) + mask) v on [batch, heads, seq, head_dim] tensors. ``mask`` is
# additive (0 to keep, a large negative number to drop) and broadcasts to [B, H, Sq, Sk]; in practice it is
# [B, 1, 1, Sk] (consistent attention) or [Sq, Sk] (CLIP's causal mask).
def _math_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    scores = ops.BatchMatMul(transpose_b=True)(q * (1.0 / math.sqrt(q.shape[-1])), k)
    if mask is not None:
        scores = scores + mask
    probs = ops.softmax(scores.astype(ms.float32), -1).astype(v.dtype)  # the softmax runs in fp32
    return ops.BatchMatMul()(probs, v)


class MathAttention(nn.Cell):
    """softmax(q k^T / sqrt(d) + mask) v. In fp32 on CPU, without a mask or with a key mask [B|1, H|1, 1, Sk]
    (consistent attention's), one fused kernel that never holds the [B, H, Sq, Sk] scores: the composed ops keep
    two such tensors, 1.3 GB each in an SDXL attn1 layer at 1024 px. Other masks (CLIP's causal one) compose."""

    def __init__(self):
        super().__init__()
        self.fused = cpu_kernels.op("attention", lambda q, k, v, *_: q[:-1] + [v[-1]]) if _kind() == "fused" else None

    def construct(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
        if self.fused is not None and q.dtype == ms.float32:
            if mask is None:
                return self.fused(q, k, v)
            if mask.ndim == 4 and mask.shape[2] == 1 and mask.dtype == ms.float32:
                return self.fused(q, k, v, mask)
        return _math_attention(q, k, v, mask)


class FlashAttention(nn.Cell):
    """One FlashAttentionScore call where its contract admits the inputs (fp16/bf16, head size a multiple of 16 up
    to 512), the math path elsewhere: the fp32 VAE, and head sizes such as CLIP ViT-bigG's 104."""

    def __init__(self):
        super().__init__()
        self.flash = backend().call("flash_attention_score")

    def construct(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
        d = q.shape[-1]
        if q.dtype == ms.float32 or d % 16 != 0 or d > 512:
            return _math_attention(q, k, v, mask)
        drop = None
        if mask is not None:
            # the kernel's mask is boolean, 1 = drop; the smallest shape it takes: [Sq, Sk], else [B, 1, Sq, Sk]
            shape = (q.shape[2], k.shape[2]) if mask.ndim == 2 else (q.shape[0], 1, q.shape[2], k.shape[2])
            drop = ops.broadcast_to((mask < -1.0).astype(ms.uint8), shape)  # compared before broadcasting
        return self.flash(
            query=q,
            key=k,
            value=v,
            head_num=q.shape[1],
            attn_mask=drop,
            scalar_value=1.0 / math.sqrt(d),
            input_layout="BNSD",
        )


def attention_kernel() -> nn.Cell:
    """The attention cell of the chosen backend's attention switch (bound when the calling cell is built)."""
    return FlashAttention() if backend().attention == "flash" else MathAttention()


class SwapAxes(nn.Cell):
    """x [A, M, N(, K)] -> [A, N, M(, K)]: heads split and merged, tokens to channels and back. On CPU one fused kernel,
    because MindSpore 2.10's CPU graph keeps every Transpose output alive until the graph ends, while a kernel's output
    is freed after its last use: the SDXL UNet step at 512 px went from 3.9 to 1.2 GB above its weights."""

    def __init__(self):
        super().__init__()
        self.fused = cpu_kernels.op("swap_axes12", lambda x: [x[0], x[2], x[1], x[3]]) if _kind() == "fused" else None

    def construct(self, x: Tensor) -> Tensor:
        if self.fused is not None and x.dtype == ms.float32:
            if x.ndim == 3:
                a, m, n = x.shape
                return self.fused(x.reshape(a, m, n, 1)).reshape(a, n, m)
            return self.fused(x)
        return ops.swapaxes(x, 1, 2)


class Heads(nn.Cell):
    """Attention heads split from channels and merged back, for every attention of the library (UNet, VAE, CLIP,
    IP-Adapter's resampler and reference K/V), through ``SwapAxes``."""

    def __init__(self):
        super().__init__()
        self.swap = SwapAxes()

    def split(self, x: Tensor, heads: int) -> Tensor:
        """[B, S, H*D] -> [B, H, S, D]."""
        b, s, c = x.shape
        return self.swap(x.reshape(b, s, heads, c // heads))

    def merge(self, x: Tensor) -> Tensor:
        """[B, H, S, D] -> [B, S, H*D]."""
        b, h, s, d = x.shape
        return self.swap(x).reshape(b, s, h * d)
