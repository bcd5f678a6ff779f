"""The emulated Ascend backend: each Ascend-only call of ``layers.ASCEND_CALLS``, checked and computed on CPU.

Every function here has the name of the MindSpore function it stands for and takes, keyword-only, exactly the
arguments the library passes (tests/test_ascend.py checks them against the installed MindSpore's signatures). It
first asserts the kernel's documented contract, quoted with the API page beside each check, and raises
a ValueError naming the op, the argument and the contract (graph mode can raise only built-in exceptions); then it computes a CPU reference from legacy
``ops`` (most ``mint`` ops have no CPU kernel). References compute in fp32 and round the result to the input dtype,
as the NPU kernels accumulate in fp32. The checks are plain comparisons on shapes, dtypes and Python constants, so
under ``ms.jit`` they fold at compile time and a violation fails the compile.
"""

from __future__ import annotations

import inspect

import mindspore as ms
from mindspore import ops

FLOATS = (ms.float16, ms.bfloat16, ms.float32)
HALVES = (ms.float16, ms.bfloat16)


def _check(ok: bool, op: str, arg: str, contract: str, got) -> None:
    if not ok:
        raise ValueError(f"{op}: {arg} violates the Ascend kernel's contract ({contract}); got {got}")


# https://www.mindspore.cn/docs/zh-CN/r2.11.0/api_python/mint/mindspore.mint.nn.functional.linear.html
# input (*, in_channels); weight (out_channels, in_channels); bias (out_channels) or None; and, per
# https://mindspore.cn/docs/zh-CN/r2.3.1/api_python/mint/mindspore.mint.nn.Linear.html, the weight (and bias) have the
# input's dtype.
def linear(*, input, weight, bias):
    op = "mint.nn.functional.linear"
    _check(input.dtype in FLOATS, op, "input", "float16, bfloat16 or float32", input.dtype)
    _check(weight.dtype == input.dtype, op, "weight", "the dtype of input", weight.dtype)
    _check(len(weight.shape) == 2, op, "weight", "shape (out_channels, in_channels)", weight.shape)
    _check(input.shape[-1] == weight.shape[1], op, "input", "shape (*, in_channels) of the weight", input.shape)
    if bias is not None:
        _check(bias.dtype == input.dtype, op, "bias", "the dtype of input", bias.dtype)
        _check(bias.shape == (weight.shape[0],), op, "bias", "shape (out_channels,)", bias.shape)
    lead = input.shape[:-1]
    y = ops.matmul(input.reshape(-1, input.shape[-1]).astype(ms.float32), weight.astype(ms.float32).T)
    if bias is not None:
        y = ops.bias_add(y, bias.astype(ms.float32))
    return y.reshape(lead + (weight.shape[0],)).astype(input.dtype)


# https://www.mindspore.cn/docs/zh-CN/r2.9.0/api_python/mint/mindspore.mint.nn.functional.conv2d.html
# input (N, C_in, H, W); weight (C_out, C_in / groups, kH, kW); bias (C_out); stride and padding ints (the padding
# symmetric on all sides; the library pads asymmetric cases with ``pad`` first); one dtype for all.
def conv2d(*, input, weight, bias, stride, padding):
    op = "mint.nn.functional.conv2d"
    _check(input.dtype in FLOATS, op, "input", "float16, bfloat16 or float32", input.dtype)
    _check(weight.dtype == input.dtype, op, "weight", "the dtype of input", weight.dtype)
    _check(len(input.shape) == 4, op, "input", "shape (N, C_in, H, W)", input.shape)
    _check(len(weight.shape) == 4, op, "weight", "shape (C_out, C_in, kH, kW)", weight.shape)
    _check(
        input.shape[1] == weight.shape[1], op, "weight", "C_in equal to the input's channels (groups=1)", weight.shape
    )
    if bias is not None:
        _check(bias.dtype == input.dtype, op, "bias", "the dtype of input", bias.dtype)
        _check(bias.shape == (weight.shape[0],), op, "bias", "shape (C_out,)", bias.shape)
    _check(isinstance(stride, int) and stride >= 1, op, "stride", "an int >= 1", stride)
    _check(isinstance(padding, int) and padding >= 0, op, "padding", "an int >= 0", padding)
    _check(input.shape[2] + 2 * padding >= weight.shape[2], op, "input", "padded height >= kernel height", input.shape)
    _check(input.shape[3] + 2 * padding >= weight.shape[3], op, "input", "padded width >= kernel width", input.shape)
    y = ops.conv2d(input.astype(ms.float32), weight.astype(ms.float32), stride=stride, pad_mode="pad", padding=padding)
    if bias is not None:
        y = ops.bias_add(y, bias.astype(ms.float32))
    return y.astype(input.dtype)


# https://www.mindspore.cn/docs/zh-CN/r2.11.0/api_python/mint/mindspore.mint.nn.functional.pad.html
# pad (left, right[, top, bottom[, front, back]]) from the last axis backwards: an even length of at most 6;
# mode "constant" fills with value (None means 0). Negative pads crop on CPU but are not supported on Ascend
# (https://mindspore.cn/docs/zh-CN/r2.5.0/api_python/ops/mindspore.ops.pad.html).
def pad(*, input, pad, mode, value):
    op = "mint.nn.functional.pad"
    _check(isinstance(pad, tuple), op, "pad", "a tuple of ints", pad)
    _check(
        len(pad) % 2 == 0 and len(pad) <= 6 and len(pad) // 2 <= len(input.shape), op, "pad", "even length <= 6", pad
    )
    _check(min(pad) >= 0, op, "pad", "no negative pads on Ascend", pad)
    _check(mode == "constant", op, "mode", "'constant' (the only mode the library uses)", mode)
    _check(value is None or value == 0.0, op, "value", "0 (the library pads with zeros)", value)
    x = input
    for i in range(len(pad) // 2):  # a constant range: unrolled at compile time
        axis, before, after = len(x.shape) - 1 - i, pad[2 * i], pad[2 * i + 1]
        parts = ()
        if before:
            parts += (ops.zeros(x.shape[:axis] + (before,) + x.shape[axis + 1 :], x.dtype),)
        parts += (x,)
        if after:
            parts += (ops.zeros(x.shape[:axis] + (after,) + x.shape[axis + 1 :], x.dtype),)
        x = ops.concat(parts, axis) if len(parts) > 1 else x
    return x


# https://www.mindspore.cn/docs/en/br_base/api_python/mint/mindspore.mint.nn.functional.group_norm.html (and
# https://mindspore.cn/docs/zh-CN/r2.4.1/api_python/ops/mindspore.ops.group_norm.html): input (N, C, *); num_groups
# an int >= 1 dividing C; weight and bias (C,) with the input's dtype; eps a float.
def group_norm(*, input, num_groups, weight, bias, eps):
    op = "mint.nn.functional.group_norm"
    _check(input.dtype in FLOATS, op, "input", "float16, bfloat16 or float32", input.dtype)
    _check(len(input.shape) >= 2, op, "input", "shape (N, C, *)", input.shape)
    _check(isinstance(num_groups, int) and num_groups >= 1, op, "num_groups", "an int >= 1", num_groups)
    _check(input.shape[1] % num_groups == 0, op, "num_groups", "a divisor of C", num_groups)
    _check(weight.dtype == input.dtype, op, "weight", "the dtype of input", weight.dtype)
    _check(bias.dtype == input.dtype, op, "bias", "the dtype of input", bias.dtype)
    _check(weight.shape == (input.shape[1],), op, "weight", "shape (C,)", weight.shape)
    _check(bias.shape == (input.shape[1],), op, "bias", "shape (C,)", bias.shape)
    _check(isinstance(eps, float), op, "eps", "a float", eps)
    shape = input.shape
    h = input.astype(ms.float32).reshape(shape[0], num_groups, -1)
    mean = h.mean(-1, keep_dims=True)
    var = ops.square(h - mean).mean(-1, keep_dims=True)
    h = ((h - mean) * ops.rsqrt(var + eps)).reshape(shape[0], shape[1], -1)
    h = ops.bias_add(h * weight.astype(ms.float32).reshape(1, -1, 1), bias.astype(ms.float32))
    return h.reshape(shape).astype(input.dtype)


# https://mindspore.cn/docs/en/master/api_python/mint/mindspore.mint.nn.functional.layer_norm.html
# normalized_shape equals input.shape[begin_norm_axis:]; weight and bias have shape normalized_shape and the
# input's dtype; eps a float.
def layer_norm(*, input, normalized_shape, weight, bias, eps):
    op = "mint.nn.functional.layer_norm"
    n = len(normalized_shape)
    _check(input.dtype in FLOATS, op, "input", "float16, bfloat16 or float32", input.dtype)
    _check(
        tuple(input.shape[-n:]) == tuple(normalized_shape), op, "normalized_shape", "input.shape[-k:]", normalized_shape
    )
    _check(weight.dtype == input.dtype, op, "weight", "the dtype of input", weight.dtype)
    _check(bias.dtype == input.dtype, op, "bias", "the dtype of input", bias.dtype)
    _check(weight.shape == tuple(normalized_shape), op, "weight", "shape normalized_shape", weight.shape)
    _check(bias.shape == tuple(normalized_shape), op, "bias", "shape normalized_shape", bias.shape)
    _check(isinstance(eps, float), op, "eps", "a float", eps)
    h = input.astype(ms.float32)
    mean = h.mean(-1, keep_dims=True)
    var = ops.square(h - mean).mean(-1, keep_dims=True)
    h = (h - mean) * ops.rsqrt(var + eps) * weight.astype(ms.float32) + bias.astype(ms.float32)
    return h.astype(input.dtype)


# https://www.mindspore.cn/docs/en/stable/api_python/ops/mindspore.ops.flash_attention_score.html
# query (B, N1, S1, D) and key/value (B, N2, S2, D) for input_layout "BNSD", float16 or bfloat16, one dtype; B in
# [1, 2048], N1 in [1, 256], N2 a factor of N1, D a multiple of 16 up to 512, S1 and S2 in [1, 512k]; head_num = N1.
# attn_mask bool or uint8, 0 = keep and 1 = drop, shaped (B, N1, S1, S2), (B, 1, S1, S2) or (S1, S2) with
# sparse_mode 0 or 1 (modes 2-4 take a compressed (2048, 2048) mask; the library never uses them). keep_prob in
# (0, 1]; scalar_value the scale, usually 1/sqrt(D). pre_tokens and next_tokens bound the band of the mask that is
# computed; with sparse_mode 0 the band must cover every (S1, S2) position the mask keeps.
# The library leaves keep_prob, sparse_mode, pre_tokens and next_tokens at the installed MindSpore's defaults, which
# are read here, so the contract checks them too.
_FA_DEFAULTS = {k: p.default for k, p in inspect.signature(ops.flash_attention_score).parameters.items()}


def flash_attention_score(
    *,
    query,
    key,
    value,
    head_num,
    attn_mask,
    scalar_value,
    input_layout,
    keep_prob=_FA_DEFAULTS["keep_prob"],
    sparse_mode=_FA_DEFAULTS["sparse_mode"],
    pre_tokens=_FA_DEFAULTS["pre_tokens"],
    next_tokens=_FA_DEFAULTS["next_tokens"],
):
    op = "ops.flash_attention_score"
    _check(input_layout == "BNSD", op, "input_layout", "'BNSD' (the layout the library passes)", input_layout)
    _check(query.dtype in HALVES, op, "query", "float16 or bfloat16", query.dtype)
    _check(key.dtype == query.dtype, op, "key", "the dtype of query", key.dtype)
    _check(value.dtype == query.dtype, op, "value", "the dtype of query", value.dtype)
    _check(len(query.shape) == 4, op, "query", "shape (B, N1, S1, D)", query.shape)
    b, n1, s1, d = query.shape
    _check(
        len(key.shape) == 4 and key.shape[0] == b and key.shape[3] == d, op, "key", "shape (B, N2, S2, D)", key.shape
    )
    _check(value.shape == key.shape, op, "value", "the shape of key", value.shape)
    _check(1 <= b <= 2048, op, "query", "batch B in [1, 2048]", b)
    _check(1 <= n1 <= 256, op, "query", "heads N1 in [1, 256]", n1)
    _check(n1 % key.shape[1] == 0, op, "key", "heads N2 a factor of N1", key.shape[1])
    _check(d % 16 == 0 and d <= 512, op, "query", "head size D a multiple of 16, at most 512", d)
    s2 = key.shape[2]
    _check(s1 <= 512 * 1024 and s2 <= 512 * 1024, op, "query", "sequence lengths in [1, 512k]", (s1, s2))
    _check(head_num == n1, op, "head_num", "the number of query heads N1", head_num)
    _check(isinstance(scalar_value, float) and scalar_value > 0, op, "scalar_value", "a positive float", scalar_value)
    _check(0.0 < keep_prob <= 1.0, op, "keep_prob", "in (0, 1]", keep_prob)
    _check(sparse_mode in (0, 1), op, "sparse_mode", "0 or 1 with a full mask", sparse_mode)
    _check(pre_tokens >= s1 and next_tokens >= s2, op, "pre_tokens/next_tokens", "a band covering S1 x S2", pre_tokens)
    scores = ops.BatchMatMul(transpose_b=True)(query.astype(ms.float32) * scalar_value, key.astype(ms.float32))
    if attn_mask is not None:
        _check(attn_mask.dtype in (ms.bool_, ms.uint8), op, "attn_mask", "bool or uint8", attn_mask.dtype)
        shape = attn_mask.shape
        ok = shape in ((b, n1, s1, s2), (b, 1, s1, s2), (s1, s2))
        _check(ok, op, "attn_mask", "shape (B, N1, S1, S2), (B, 1, S1, S2) or (S1, S2)", shape)
        drop = attn_mask.astype(ms.float32)  # 1 = drop
        scores = scores - 1e30 * (drop.reshape((1, 1) + shape) if len(shape) == 2 else drop)
    probs = ops.softmax(scores, -1)
    return ops.BatchMatMul()(probs, value.astype(ms.float32)).astype(query.dtype)
