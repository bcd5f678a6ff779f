"""Consistent self-attention (StoryDiffusion), as one fused attention call per layer inside the compiled UNet.

The released processor (its low-VRAM Gradio app) runs on every self-attention layer of the UNet's up blocks: 36 in
SDXL, at 1/32 and 1/16 of the image size. At each sampling step it draws, per image, a Bernoulli(sa32 or sa64) subset
of token positions. Write mode: the id images of a character run as one batch; each attends to its own tokens plus
the sampled tokens of the other id images (per CFG half), and the sampled hidden states are kept in an id bank per
step and layer. Read mode: a later panel attends to its own tokens plus the banked tokens of the characters it names.
Step 0, and every layer whose random gate draw fails (threshold 0.3 before step 20, 0.1 after), use plain
self-attention.

Here both modes are one computation, so a compiled graph never branches on Python state. For each image, the keys
are its own tokens plus ``G`` tokens gathered from a pool (this batch's tokens of the same CFG half, then bank
tokens), with an additive validity mask: write mode gathers the other images' sampled tokens, read mode gathers bank
tokens, and a closed gate masks every gathered token, which is exactly plain self-attention. All of it (gates,
indices, masks, bank tokens) enters the UNet as tensors in the ``story`` tuple; the sampled hidden states of the
batch leave through a capture Parameter per layer.

``story`` tuple layout (see :meth:`StoryTensors.as_tuple`):
  0 gates    float [layers]           1 = consistent attention at that layer, 0 = plain
  1 banks    tuple of [2, P, C_layer] bank tokens appended to the pool, per layer
  2 index    tuple per level, int32 [n, G]   positions in the pool [n*N + P] (per CFG half)
  3 valid    tuple per level, float [n, G]   0 to keep, NEG to drop
  4 capture  tuple per level, int32 [n*L]    positions in [n*N] of the tokens to capture for the bank
"""

from __future__ import annotations

from dataclasses import dataclass

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops

NEG = -1e9
LEVEL_NAMES = ("sa32", "sa64")


class ConsistentSelfAttention(nn.Cell):
    """The processor of one up-block attn1 layer (``Attention.processor``)."""

    def __init__(self, layer: int, level: int, channels: int):
        super().__init__()
        self.layer, self.level = layer, level
        self._captures: dict[tuple[int, ...], Parameter] = {}
        self.new_capture((2, 1, channels))

    def new_capture(self, shape: tuple[int, ...]) -> None:
        """Attach the Parameter that holds the sampled hidden states of the last call, for the host to bank.

        One Parameter per shape, created once and handed back whenever that shape returns: a graph compiled for a
        shape keeps writing to the Parameter it was compiled with, so a reused pipeline must see the same one.
        A new Parameter rather than set_data, because PyNative keeps the old shape for a resized Parameter's Assign.
        The unique name is set after attaching, because attaching renames a Parameter after its attribute."""
        shape = tuple(shape)
        if shape not in self._captures:
            self._captures[shape] = Parameter(Tensor(np.zeros(shape, np.float32)), requires_grad=False)
        self.capture = self._captures[shape]
        self.capture.name = f"story_capture_{self.layer}"

    def construct(self, attn, x: Tensor, context, story) -> Tensor:
        if story is None:
            return attn.out(attn.attention(*attn.heads_qkv(x, x)))
        gates, banks, index, valid, capture = story
        index, valid, bank = index[self.level], valid[self.level], banks[self.layer]
        batch, tokens, channels = x.shape
        n = batch // 2
        q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)

        # pool per CFG half: this batch's keys/values, then the bank's
        pool_k = ops.concat((k.reshape(2, n * tokens, channels), attn.to_k(bank.astype(x.dtype))), 1)
        pool_v = ops.concat((v.reshape(2, n * tokens, channels), attn.to_v(bank.astype(x.dtype))), 1)
        g = index.shape[1]
        flat = index.reshape(-1)
        keys = ops.concat((ops.gather(pool_k, flat, 1).reshape(batch, g, channels), k), 1)
        values = ops.concat((ops.gather(pool_v, flat, 1).reshape(batch, g, channels), v), 1)

        gate = gates[self.layer]  # 1 keeps the validity mask, 0 drops every gathered token
        gathered = ops.tile((valid * gate + NEG * (1.0 - gate)).astype(x.dtype), (2, 1))
        mask = ops.concat((gathered, ops.zeros((batch, tokens), x.dtype)), 1).reshape(batch, 1, 1, g + tokens)
        out = attn.attention(attn.split(q), attn.split(keys), attn.split(values), mask)

        sampled = ops.gather(x.reshape(2, n * tokens, channels), capture[self.level], 1)
        ops.assign(self.capture, sampled.astype(self.capture.dtype))
        return attn.out(out)


def install(unet) -> list[ConsistentSelfAttention]:
    """Put a processor on every self-attention layer of the up blocks, in call order; returns them."""
    from ..models.unet import up_attention

    layers = up_attention(unet)
    if any(level >= len(LEVEL_NAMES) for level, _, _ in layers):
        raise ValueError("consistent self-attention expects attention in at most two up blocks (as SDXL)")
    processors = []
    for level, _, tb in layers:
        tb.attn1.processor = ConsistentSelfAttention(len(processors), level, tb.attn1.to_q.in_features)
        processors.append(tb.attn1.processor)
    return processors


def uninstall(unet) -> None:
    from ..models.unet import up_attention

    for _, _, tb in up_attention(unet):
        tb.attn1.processor = None


def gate_threshold(step: int) -> float:
    return 0.3 if step < 20 else 0.1


def gates_from_draws(step: int, draws: np.ndarray) -> np.ndarray:
    """The original's per-layer gating: plain attention at step 0; afterwards consistent where draw > threshold."""
    if step < 1:
        return np.zeros(len(draws), np.float32)
    return (np.asarray(draws) > gate_threshold(step)).astype(np.float32)


@dataclass
class StoryTensors:
    """Host-side (numpy) story inputs for one UNet call; ``as_tuple`` makes the tensors."""

    gates: np.ndarray
    banks: list[np.ndarray]
    index: list[np.ndarray]
    valid: list[np.ndarray]
    capture: list[np.ndarray]

    def as_tuple(self) -> tuple:
        # mutable: values are graph inputs, so a new step's values never trigger a recompile
        return ms.mutable(
            (
                Tensor(self.gates.astype(np.float32)),
                tuple(Tensor(b) for b in self.banks),
                tuple(Tensor(i.astype(np.int32)) for i in self.index),
                tuple(Tensor(v.astype(np.float32)) for v in self.valid),
                tuple(Tensor(c.astype(np.int32)) for c in self.capture),
            )
        )


def padded(rows: list[np.ndarray], width: int) -> tuple[np.ndarray, np.ndarray]:
    """Ragged index lists -> (indices [n, width] padded with 0, additive validity [n, width])."""
    index = np.zeros((len(rows), width), np.int64)
    valid = np.full((len(rows), width), NEG, np.float32)
    for r, row in enumerate(rows):
        index[r, : len(row)] = row
        valid[r, : len(row)] = 0.0
    return index, valid


def set_capture_shapes(processors: list[ConsistentSelfAttention], counts: list[int]) -> None:
    """Size each capture Parameter for this phase ([2, n*L, C]); graphs recompile once per phase, not per step."""
    for proc in processors:
        channels = proc.capture.shape[-1]
        shape = (2, counts[proc.level], channels)
        if tuple(proc.capture.shape) != shape:
            proc.new_capture(shape)
