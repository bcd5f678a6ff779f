"""Attention, FeedForward, BasicTransformerBlock and Transformer2D with diffusers' parameter names.

Story methods attach a processor to an Attention (``attn.processor``). It is chosen when the network is built, so a
compiled graph sees a fixed structure; everything that changes per call reaches the processor through the
``story`` tuple of tensors that the UNet threads down to every attention layer.
"""

from __future__ import annotations

from mindspore import Tensor, nn

from ..layers import GatedGELU, GroupNorm, Heads, LayerNorm, Linear, SwapAxes, attention_kernel


class Attention(nn.Cell):
    """Multi-head attention with diffusers' names (to_q, to_k, to_v, to_out.0).

    ``residual`` and ``group_norm`` serve the VAE's single-head spatial attention, which works on NCHW input.
    """

    def __init__(
        self,
        query_dim: int,
        heads: int,
        context_dim: int | None = None,
        qkv_bias: bool = False,
        group_norm: tuple[int, float] | None = None,
    ):
        super().__init__()
        context_dim = context_dim or query_dim
        self.heads = heads
        self.group_norm = GroupNorm(group_norm[0], query_dim, group_norm[1]) if group_norm else None
        self.to_q = Linear(query_dim, query_dim, bias=qkv_bias)
        self.to_k = Linear(context_dim, query_dim, bias=qkv_bias)
        self.to_v = Linear(context_dim, query_dim, bias=qkv_bias)
        self.to_out = nn.CellList([Linear(query_dim, query_dim)])
        self.attention = attention_kernel()  # processors use it too
        self.head_axes = Heads()
        self.swap = SwapAxes()  # tokens to channels and back, in the VAE's spatial attention
        self.processor = None

    def split(self, x: Tensor) -> Tensor:
        """[B, S, H*D] -> [B, H, S, D]."""
        return self.head_axes.split(x, self.heads)

    def heads_qkv(self, x: Tensor, context: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Project to per-head q, k, v: [B, H, S, D]."""
        return self.split(self.to_q(x)), self.split(self.to_k(context)), self.split(self.to_v(context))

    def out(self, heads_out: Tensor) -> Tensor:
        return self.to_out[0](self.head_axes.merge(heads_out))

    def construct(self, x: Tensor, context: Tensor | None = None, story: tuple | None = None) -> Tensor:
        if self.processor is not None:
            return self.processor(self, x, context, story)
        if self.group_norm is not None:
            return self._spatial(x)
        context = x if context is None else context
        return self.out(self.attention(*self.heads_qkv(x, context)))

    def _spatial(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        tokens = self.swap(self.group_norm(x).reshape(b, c, h * w))
        out = self.out(self.attention(*self.heads_qkv(tokens, tokens)))
        return self.swap(out).reshape(b, c, h, w) + x


class GEGLU(nn.Cell):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = Linear(dim_in, dim_out * 2)
        self.gate = GatedGELU()

    def construct(self, x: Tensor) -> Tensor:
        return self.gate(self.proj(x))


class FeedForward(nn.Cell):
    """GEGLU feed-forward; ``net.1`` is diffusers' weightless dropout, kept so indices match the keys."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        inner = dim * mult
        self.net = nn.CellList([GEGLU(dim, inner), nn.Identity(), Linear(inner, dim)])

    def construct(self, x: Tensor) -> Tensor:
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nn.Cell):
    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.attn1 = Attention(dim, heads)
        self.norm2 = LayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim=context_dim)
        self.norm3 = LayerNorm(dim)
        self.ff = FeedForward(dim)

    def construct(self, x: Tensor, context: Tensor, story: tuple | None = None) -> Tensor:
        x = self.attn1(self.norm1(x), None, story) + x
        x = self.attn2(self.norm2(x), context, story) + x
        return self.ff(self.norm3(x)) + x


class Transformer2D(nn.Cell):
    """diffusers' Transformer2DModel with linear projections (SDXL): GroupNorm, proj_in, blocks, proj_out, residual."""

    def __init__(self, channels: int, heads: int, depth: int, context_dim: int, groups: int = 32):
        super().__init__()
        self.norm = GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = Linear(channels, channels)
        self.transformer_blocks = nn.CellList(
            [BasicTransformerBlock(channels, heads, context_dim) for _ in range(depth)]
        )
        self.proj_out = Linear(channels, channels)
        self.swap = SwapAxes()

    def construct(self, x: Tensor, context: Tensor, story: tuple | None = None) -> Tensor:
        b, c, h, w = x.shape
        tokens = self.swap(self.norm(x).reshape(b, c, h * w))
        tokens = self.proj_in(tokens)
        for block in self.transformer_blocks:
            tokens = block(tokens, context, story)
        tokens = self.proj_out(tokens)
        return self.swap(tokens).reshape(b, c, h, w) + x
