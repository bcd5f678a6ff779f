"""IP-Adapter for SDXL: the image projections (ImageProjModel, Resampler) under IP-Adapter's own names, the
per-layer reference K/V projections (``to_k_ip`` / ``to_v_ip``), and the decoupled cross-attention processor.

Decoupled cross-attention (IP-Adapter, and Story-Adapter's GRCA on top of it) replaces every cross-attention layer
(attn2; 70 in SDXL) by ``to_out(attn(q, k_text, v_text) + scale * attn(q, k_ip, v_ip))``, each branch with its own
softmax. The image tokens' K/V do not depend on the latents, the step or the panel, only on the reference images, so
here they are computed once (``IPAdapter.reference_kv``) and enter the compiled UNet as tensors through its
``story`` tuple: ``(scale [], keys, values)``, where ``keys[l]`` / ``values[l]`` are ``[2, heads, T, head_dim]`` for
attn2 layer ``l`` (row 0 the unconditional CFG half, row 1 the conditional one), already split into heads so no step
transposes them again. ``story=None`` is plain text cross-attention.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import initializer

from ..layers import GELU, Heads, LayerNorm, Linear, attention_kernel


class ImageProjModel(nn.Cell):
    """ip-adapter_sdxl: the projected CLIP image embedding [M, clip_dim] -> ``num_tokens`` tokens [M, T, ctx]."""

    def __init__(self, clip_dim: int, cross_attention_dim: int, num_tokens: int = 4):
        super().__init__()
        self.num_tokens, self.cross_attention_dim = num_tokens, cross_attention_dim
        self.proj = Linear(clip_dim, num_tokens * cross_attention_dim)
        self.norm = LayerNorm(cross_attention_dim)

    def construct(self, embeds: Tensor) -> Tensor:
        tokens = self.proj(embeds).reshape(-1, self.num_tokens, self.cross_attention_dim)
        return self.norm(tokens)


class PerceiverAttention(nn.Cell):
    """The latents attend to the image features and to themselves (IP-Adapter's resampler.py)."""

    def __init__(self, dim: int, inner_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = LayerNorm(dim)
        self.norm2 = LayerNorm(dim)
        self.to_q = Linear(dim, inner_dim, bias=False)
        self.to_kv = Linear(dim, 2 * inner_dim, bias=False)
        self.to_out = Linear(inner_dim, dim, bias=False)
        self.attention = attention_kernel()
        self.head_axes = Heads()

    def construct(self, x: Tensor, latents: Tensor) -> Tensor:
        x, latents = self.norm1(x), self.norm2(latents)
        q = self.to_q(latents)
        k, v = ops.split(self.to_kv(ops.concat((x, latents), 1)), self.to_q.out_features, axis=-1)
        # its q·d^-1/4 @ (k·d^-1/4)^T is softmax(q k^T / sqrt(d)): the one attention function
        q, k, v = (
            self.head_axes.split(q, self.heads),
            self.head_axes.split(k, self.heads),
            self.head_axes.split(v, self.heads),
        )
        return self.to_out(self.head_axes.merge(self.attention(q, k, v)))


class Resampler(nn.Cell):
    """ip-adapter-plus: ``num_queries`` learned latents read the encoder's penultimate hidden states [M, L, E]."""

    def __init__(
        self,
        dim: int,
        depth: int,
        inner_dim: int,
        num_queries: int,
        embedding_dim: int,
        output_dim: int,
        ff_mult: int = 4,
    ):
        super().__init__()
        # IP-Adapter and diffusers use 64-wide heads (ip-adapter-plus_sdxl_vit-h: 20 heads of 64)
        heads = inner_dim // 64 if inner_dim % 64 == 0 else 1
        self.latents = Parameter(initializer("zeros", (1, num_queries, dim)), name="latents")
        self.proj_in = Linear(embedding_dim, dim)
        self.proj_out = Linear(dim, output_dim)
        self.norm_out = LayerNorm(output_dim)
        # layers.<i>.1 is IP-Adapter's nn.Sequential(LayerNorm, Linear, GELU, Linear): indices 0, 1, 3 hold weights
        self.layers = nn.CellList(
            [
                nn.CellList(
                    [
                        PerceiverAttention(dim, inner_dim, heads),
                        nn.CellList(
                            [
                                LayerNorm(dim),
                                Linear(dim, dim * ff_mult, bias=False),
                                GELU(),
                                Linear(dim * ff_mult, dim, bias=False),
                            ]
                        ),
                    ]
                )
                for _ in range(depth)
            ]
        )

    def construct(self, features: Tensor) -> Tensor:
        x = self.proj_in(features)
        latents = ops.broadcast_to(self.latents.astype(x.dtype), (x.shape[0],) + self.latents.shape[1:])
        for layer in self.layers:
            latents = layer[0](x, latents) + latents
            ff = layer[1]
            latents = ff[3](ff[2](ff[1](ff[0](latents)))) + latents
        return self.norm_out(self.proj_out(latents))


class IPKV(nn.Cell):
    """One attn2 layer's reference key and value projections."""

    def __init__(self, hidden: int, context_dim: int):
        super().__init__()
        self.to_k_ip = Linear(context_dim, hidden, bias=False)
        self.to_v_ip = Linear(context_dim, hidden, bias=False)


class _NoProcessor(nn.Cell):
    """An attn1 layer's place in IP-Adapter's list of processors: it holds no weights."""


def attn2_layers(unet) -> list[tuple[str, int]]:
    """The UNet's cross-attention (attn2) modules as (path, hidden size), in the order of diffusers'
    ``unet.attn_processors``: down blocks, up blocks, then the mid block (diffusers registers ``up_blocks`` before
    ``mid_block``), attn1 and attn2 of each transformer block in turn. IP-Adapter numbers its weights in that order."""
    rank = {"down_blocks": 0, "up_blocks": 1, "mid_block": 2}
    found = [(name, cell.to_q.out_features) for name, cell in unet.cells_and_names() if name.endswith(".attn2")]
    return sorted(found, key=lambda item: rank[item[0].split(".", 1)[0]])  # stable: keeps the order inside a group


class IPAdapter(nn.Cell):
    """``image_proj.*`` and ``ip_adapter.<2k+1>.to_{k,v}_ip`` for the k-th attn2 module of ``modules`` (from
    ``attn2_layers``): IP-Adapter's own names. Its ``adapter_modules`` is one module per attention processor of the
    UNet, attn1 and attn2 alternating, and only the attn2 ones hold weights, so the checkpoint's indices are odd; the
    same list here gives the same names, and a checkpoint loads under its own keys.

    ``info`` describes the projection as ``weights.layouts.describe_image_proj`` reads it from a file.
    """

    def __init__(self, info: Mapping[str, Any], modules: Sequence[tuple[str, int]]):
        super().__init__()
        self.info = dict(info)
        self.modules = [m for m, _ in modules]
        ctx = info["cross_attention_dim"]
        if info["kind"] == "image_proj_model":
            self.image_proj = ImageProjModel(info["clip_dim"], ctx, info["num_tokens"])
        elif info["kind"] == "resampler":
            self.image_proj = Resampler(
                info["dim"],
                info["depth"],
                info["inner_dim"],
                info["num_queries"],
                info["embedding_dim"],
                ctx,
                info["ff_mult"],
            )
        else:
            raise ValueError(f"unknown image projection {info['kind']!r}")
        self.ip_adapter = nn.CellList([cell for _, h in modules for cell in (_NoProcessor(), IPKV(h, ctx))])
        self.heads: tuple[int, ...] | None = None  # each attn2 layer's heads, set by install()
        self.head_axes = Heads()

    @property
    def uses_hidden_states(self) -> bool:
        """The Resampler reads the encoder's penultimate hidden states; ImageProjModel its projected embedding."""
        return self.info["kind"] == "resampler"

    @property
    def tokens_per_image(self) -> int:
        return self.info["num_queries"] if self.uses_hidden_states else self.info["num_tokens"]

    def project(self, features: Tensor) -> Tensor:
        """Image features of M images -> their tokens concatenated along the sequence [1, M*T, ctx], image by image
        (as IP-Adapter's ``view(1, M*T, C)`` and diffusers' multi-image ``view(B, -1, heads, d)``)."""
        tokens = self.image_proj(features)
        return tokens.reshape(1, -1, tokens.shape[-1])

    def reference_kv(self, tokens: Tensor) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        """Reference tokens [2, T, ctx] (uncond, cond) -> per-layer keys and values, each [2, heads_l, T, d_l]."""
        if self.heads is None:
            raise RuntimeError("install(unet, ip_adapter) first: the K/V are split into the UNet's heads")
        keys, values = (), ()
        for k, h in enumerate(self.heads):
            layer = self.ip_adapter[2 * k + 1]
            keys += (self.head_axes.split(layer.to_k_ip(tokens), h),)
            values += (self.head_axes.split(layer.to_v_ip(tokens), h),)
        return keys, values


class DecoupledCrossAttention(nn.Cell):
    """The processor of the k-th attn2 layer: text cross-attention plus ``scale`` times reference attention."""

    def __init__(self, layer: int):
        super().__init__()
        self.layer = layer

    def construct(self, attn, x: Tensor, context: Tensor, story) -> Tensor:
        q, k, v = attn.heads_qkv(x, context)
        out = attn.attention(q, k, v)
        if story is None:
            return attn.out(out)
        scale, keys, values = story
        batch = x.shape[0]
        k_ip, v_ip = keys[self.layer].astype(x.dtype), values[self.layer].astype(x.dtype)
        if batch != 2:  # n panels per CFG half share the half's reference tokens
            shape = k_ip.shape[1:]
            k_ip = ops.broadcast_to(k_ip.reshape((2, 1) + shape), (2, batch // 2) + shape).reshape((batch,) + shape)
            v_ip = ops.broadcast_to(v_ip.reshape((2, 1) + shape), (2, batch // 2) + shape).reshape((batch,) + shape)
        return attn.out(out + scale.astype(x.dtype) * attn.attention(q, k_ip, v_ip))


def attn2_modules(unet, modules: Sequence[str]) -> list:
    """The UNet's Attention cells at IP-Adapter's module paths (``down_blocks.1.attentions.0...attn2``)."""
    cells = []
    for path in modules:
        cell = unet
        for part in path.split("."):
            cell = cell[int(part)] if part.isdigit() else getattr(cell, part, None)
            if cell is None:
                raise ValueError(f"the UNet has no module {path!r}: the IP-Adapter was made for another UNet")
        cells.append(cell)
    return cells


def install(unet, ip_adapter: IPAdapter) -> list[DecoupledCrossAttention]:
    """Put a decoupled cross-attention processor on each attn2 module, numbered in IP-Adapter's order, and give
    the adapter each layer's head count (its K/V come out split into heads)."""
    cells = attn2_modules(unet, ip_adapter.modules)
    ip_adapter.heads = tuple(attn.heads for attn in cells)
    processors = []
    for k, attn in enumerate(cells):
        attn.processor = DecoupledCrossAttention(k)
        processors.append(attn.processor)
    return processors


def uninstall(unet, ip_adapter: IPAdapter) -> None:
    for attn in attn2_modules(unet, ip_adapter.modules):
        attn.processor = None
