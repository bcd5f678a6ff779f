"""The device shim's CPU kernels against numpy references, in both execution modes."""

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor

from mindone_story import layers


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


@pytest.mark.parametrize("mode", ["pynative", "graph"])
@pytest.mark.parametrize("shape,out_ch,k,stride,pad", CASES)
def test_conv2d_matches_reference(mode, shape, out_ch, k, stride, pad):
    rng = np.random.default_rng(0)
    conv = layers.Conv2d(shape[1], out_ch, k, stride=stride, padding=pad)
    w = rng.standard_normal((out_ch, shape[1], k, k)).astype(np.float32)
    b = rng.standard_normal(out_ch).astype(np.float32)
    conv.weight.set_data(Tensor(w))
    conv.bias.set_data(Tensor(b))
    x = rng.standard_normal(shape).astype(np.float32)
    run = ms.jit(conv.construct) if mode == "graph" else conv
    out = run(Tensor(x)).asnumpy()
    ref = conv_reference(x, w, b, stride, (pad,) * 4 if isinstance(pad, int) else pad)
    assert out.shape == ref.shape
    assert np.abs(out - ref).max() / np.abs(ref).max() < 1e-5


def test_conv2d_in_bands_equals_one_piece(monkeypatch):
    """Large convolutions build their im2col in bands of rows; the bands must join exactly."""
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
