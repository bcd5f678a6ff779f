"""FreeU (Si et al. 2023) as diffusers applies it (``apply_freeu`` and ``fourier_filter`` in diffusers 0.39's
utils/torch_utils.py), without an FFT.

On the first two up blocks, before each resnet: the first half of the backbone's channels (counted at each call) is
multiplied by b1 / b2, and the skip connection goes through ``fourier_filter(threshold=1, scale=s1 / s2)``. That filter
takes the FFT over (H, W), fftshifts it, multiplies the bins [H//2 - 1 : H//2 + 1] x [W//2 - 1 : W//2 + 1] by s,
and returns the real part of the inverse FFT, in fp32 (diffusers 0.39 upcasts every dtype, not only the
non-power-of-two sizes, so fp16 and fp32 models filter alike).

Without an FFT: after fftshift, index N//2 holds frequency 0 and N//2 - 1 holds frequency -1, for even and odd N
alike, so the scaled set is S = {0, -1 mod H} x {0, -1 mod W} (one bin per axis when that axis has size 1). Scaling
S by s gives x + (s - 1) Re P_S x, with P_S the projection onto the Fourier modes in S. S is not closed under
conjugation (the conjugate of -1 is +1), so Re P_S x is half the projection onto each conjugate pair: with
a = 2 pi n / H, b = 2 pi m / W and the real functions
    g in {1, cos a, sin a, cos b, sin b, cos(a + b), sin(a + b)},
    Re P_S x = (1 / HW) sum_g <x, g> g.
(Pair (0, -1) gives cos b and sin b; pair (-1, 0) cos a and sin a; pair (-1, -1) cos(a + b) and sin(a + b). The
mixed pair (1, -1) is not in S, so cos a cos b and sin a sin b do not enter separately.) The weight is 1 / HW for
every g, also where an axis has size 2 (frequency -1 is then the self-conjugate Nyquist bin: sin vanishes and
<cos, cos> = N instead of N / 2), and an axis of size 1 has no frequency -1, so its terms are dropped.
That is two matmuls with a [7, HW] basis; tests/test_freeu.py checks it against diffusers' fourier_filter on every
size from 1 to 9 and at 24 x 24.

MindSpore 2.10 has fftn / ifftn / fftshift on CPU and Ascend (complex64, documented for mindscience use); this
formulation needs none of them and costs 4 * 7 * HW flops per channel.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import mindspore as ms
import numpy as np
from mindspore import Tensor, ops

from ..errors import StoryError

FREEU_BLOCKS = 2  # up blocks 0 and 1 (diffusers' resolution_idx 0 and 1)
APP_FREEU = (0.6, 0.4, 1.1, 1.2)  # StoryDiffusion's app: pipe.enable_freeu(s1=0.6, s2=0.4, b1=1.1, b2=1.2)


def freeu_factors(value) -> tuple[float, float, float, float] | None:
    """None (off) or (s1, s2, b1, b2), from None, 'off', 's1,s2,b1,b2' or four numbers; anything else is an error.

    A zero is refused: diffusers treats any zero factor as FreeU off, which would silently ignore the other three."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "off"):
        return None
    items = value.split(",") if isinstance(value, str) else value
    try:
        if isinstance(items, (str, bytes)) or not isinstance(items, Sequence) or len(items) != 4:
            raise ValueError
        if not all(isinstance(v, (str, numbers.Real)) and not isinstance(v, bool) for v in items):
            raise ValueError
        factors = tuple(float(v) for v in items)
    except ValueError:
        raise StoryError(f"FreeU takes 'off' or four numbers s1,s2,b1,b2, got {value!r}") from None
    if not all(math.isfinite(v) and v != 0 for v in factors):
        raise StoryError(f"FreeU factors must be finite and nonzero, got {factors}")
    return factors


def freeu_tensor(factors: tuple[float, float, float, float] | None) -> Tensor | None:
    """The UNet's ``freeu`` input: [4] fp32 (s1, s2, b1, b2), or None for no FreeU (no FreeU ops in the graph)."""
    return None if factors is None else Tensor(np.asarray(factors, np.float32))


def _basis(h: int, w: int) -> Tensor:
    """The [7 or fewer, h * w] functions g of the module docstring (numpy at trace time: the shape is static)."""
    a = np.arange(h, dtype=np.float64)[:, None] * (2 * math.pi / h) + np.zeros((1, w))
    b = np.arange(w, dtype=np.float64)[None, :] * (2 * math.pi / w) + np.zeros((h, 1))
    g = [np.ones((h, w))]
    for angle, size in ((a, h), (b, w)):
        g += [] if size == 1 else [np.cos(angle)] if size == 2 else [np.cos(angle), np.sin(angle)]
    if h > 1 and w > 1:
        g += [np.cos(a + b)] if h == 2 and w == 2 else [np.cos(a + b), np.sin(a + b)]
    return Tensor(np.stack(g).reshape(len(g), h * w).astype(np.float32))


def skip_filter(x: Tensor, scale: Tensor) -> Tensor:
    """diffusers' fourier_filter(x, threshold=1, scale) on [B, C, H, W], computed in fp32."""
    b, c, h, w = x.shape
    g = _basis(h, w)
    flat = x.astype(ms.float32).reshape(b * c, h * w)
    low = ops.matmul(ops.matmul(flat, g.T), g)
    return (flat + (scale.astype(ms.float32) - 1) / (h * w) * low).reshape(b, c, h, w).astype(x.dtype)


def freeu_concat(x: Tensor, skip: Tensor, backbone: Tensor, skip_scale: Tensor) -> Tensor:
    """The resnet input concat(x, skip) with FreeU: the first half of x's channels times ``backbone`` (b1 or b2),
    the skip through ``skip_filter``. One concat (not a scaled copy of x, then a second concat): on CPU that
    halves the cost."""
    half = x.shape[1] // 2
    return ops.concat((x[:, :half] * backbone.astype(x.dtype), x[:, half:], skip_filter(skip, skip_scale)), 1)
