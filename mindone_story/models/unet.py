"""The SDXL UNet (diffusers' UNet2DConditionModel with text_time conditioning), under diffusers' parameter names."""

from __future__ import annotations

import mindspore as ms
from mindspore import Tensor, nn, ops

from ..config import UNetConfig
from ..layers import Conv2d, GroupNorm, Linear, silu, sinusoidal_frequencies, upsample_nearest2x
from .attention import Transformer2D
from .freeu import FREEU_BLOCKS, freeu_concat


class Timesteps(nn.Cell):
    """Sinusoidal embedding of a [N] float tensor; flip_sin_to_cos puts cos first, as SDXL does."""

    def __init__(self, dim: int, flip_sin_to_cos: bool, shift: float):
        super().__init__()
        self.freqs = sinusoidal_frequencies(dim, shift=shift)
        self.flip = flip_sin_to_cos

    def construct(self, t: Tensor) -> Tensor:
        args = t.astype(ms.float32).reshape(-1, 1) * self.freqs.reshape(1, -1)
        sin, cos = ops.sin(args), ops.cos(args)
        return ops.concat((cos, sin) if self.flip else (sin, cos), -1)


class TimestepEmbedding(nn.Cell):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = Linear(in_dim, dim)
        self.linear_2 = Linear(dim, dim)

    def construct(self, x: Tensor) -> Tensor:
        return self.linear_2(silu(self.linear_1(x)))


class ResnetBlock2D(nn.Cell):
    def __init__(self, in_ch: int, out_ch: int, temb_ch: int | None, groups: int = 32, eps: float = 1e-5):
        super().__init__()
        self.norm1 = GroupNorm(groups, in_ch, eps, silu=True)
        self.conv1 = Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_emb_proj = Linear(temb_ch, out_ch) if temb_ch else None
        self.norm2 = GroupNorm(groups, out_ch, eps, silu=True)
        self.conv2 = Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def construct(self, x: Tensor, temb: Tensor | None = None) -> Tensor:
        h = self.conv1(self.norm1(x))
        if self.time_emb_proj is not None:
            h = ops.bias_add(h.reshape(1, -1, h.shape[2] * h.shape[3]), self.time_emb_proj(silu(temb)).reshape(-1))
            h = h.reshape(x.shape[0], -1, x.shape[2], x.shape[3])
        h = self.conv2(self.norm2(h))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class Downsample2D(nn.Cell):
    def __init__(self, channels: int, padding):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=padding)

    def construct(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample2D(nn.Cell):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def construct(self, x: Tensor) -> Tensor:
        return self.conv(upsample_nearest2x(x))


class DownBlock(nn.Cell):
    """DownBlock2D, or CrossAttnDownBlock2D when ``heads`` is given."""

    def __init__(self, cfg: UNetConfig, in_ch: int, out_ch: int, index: int, last: bool):
        super().__init__()
        temb, g = cfg.block_out_channels[0] * 4, cfg.norm_num_groups
        n = cfg.layers_per_block
        self.resnets = nn.CellList(
            [ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, temb, g, cfg.norm_eps) for i in range(n)]
        )
        cross = cfg.down_block_types[index].startswith("CrossAttn")
        depth, heads = cfg.transformer_layers_per_block[index], cfg.heads[index]
        self.attentions = (
            nn.CellList([Transformer2D(out_ch, heads, depth, cfg.cross_attention_dim, g) for _ in range(n)])
            if cross
            else None
        )
        self.downsamplers = None if last else nn.CellList([Downsample2D(out_ch, cfg.downsample_padding)])

    def construct(self, x: Tensor, temb: Tensor, context: Tensor, story: tuple | None = None):
        skips = ()
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context, story)
            skips += (x,)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips += (x,)
        return x, skips


class UpBlock(nn.Cell):
    """UpBlock2D, or CrossAttnUpBlock2D; consumes one skip connection per resnet. ``freeu``: None, or this block's
    (backbone factor, skip factor) as 0-d tensors, applied before every resnet as diffusers does."""

    def __init__(self, cfg: UNetConfig, prev_ch: int, out_ch: int, skip_in_ch: int, index: int, last: bool):
        super().__init__()
        temb, g = cfg.block_out_channels[0] * 4, cfg.norm_num_groups
        n = cfg.layers_per_block + 1
        resnets = []
        for i in range(n):
            skip = skip_in_ch if i == n - 1 else out_ch
            resnets.append(ResnetBlock2D((prev_ch if i == 0 else out_ch) + skip, out_ch, temb, g, cfg.norm_eps))
        self.resnets = nn.CellList(resnets)
        rev = len(cfg.block_out_channels) - 1 - index
        cross = cfg.up_block_types[index].startswith("CrossAttn")
        depth, heads = cfg.transformer_layers_per_block[rev], cfg.heads[rev]
        self.attentions = (
            nn.CellList([Transformer2D(out_ch, heads, depth, cfg.cross_attention_dim, g) for _ in range(n)])
            if cross
            else None
        )
        self.upsamplers = None if last else nn.CellList([Upsample2D(out_ch)])

    def construct(self, x: Tensor, skips: tuple, temb: Tensor, context: Tensor, story: tuple | None = None, freeu=None):
        for i, resnet in enumerate(self.resnets):
            skip = skips[-1 - i]
            h = ops.concat((x, skip), 1) if freeu is None else freeu_concat(x, skip, freeu[0], freeu[1])
            x = resnet(h, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context, story)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class MidBlock(nn.Cell):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        ch, g = cfg.block_out_channels[-1], cfg.norm_num_groups
        temb = cfg.block_out_channels[0] * 4
        self.resnets = nn.CellList([ResnetBlock2D(ch, ch, temb, g, cfg.norm_eps) for _ in range(2)])
        heads, depth = cfg.heads[-1], cfg.transformer_layers_per_block[-1]
        self.attentions = nn.CellList([Transformer2D(ch, heads, depth, cfg.cross_attention_dim, g)])

    def construct(self, x: Tensor, temb: Tensor, context: Tensor, story: tuple | None = None) -> Tensor:
        x = self.resnets[0](x, temb)
        x = self.attentions[0](x, context, story)
        return self.resnets[1](x, temb)


class UNet(nn.Cell):
    """``construct(sample, timestep, encoder_hidden_states, text_embeds, time_ids, story=None, freeu=None)`` -> noise
    prediction.

    timestep is a float tensor of shape [B] (or [1], broadcast over the batch). freeu is None (off) or a [4] fp32
    tensor (s1, s2, b1, b2): a tensor input, so a compiled graph follows its values (see models/freeu.py).
    """

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.config = cfg
        ch = cfg.block_out_channels
        temb = ch[0] * 4
        self.time_proj = Timesteps(ch[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        self.time_embedding = TimestepEmbedding(ch[0], temb)
        self.add_time_proj = Timesteps(cfg.addition_time_embed_dim, cfg.flip_sin_to_cos, cfg.freq_shift)
        self.add_embedding = TimestepEmbedding(cfg.projection_class_embeddings_input_dim, temb)
        self.conv_in = Conv2d(cfg.in_channels, ch[0], 3, padding=1)

        last = len(ch) - 1
        self.down_blocks = nn.CellList([DownBlock(cfg, ch[max(i - 1, 0)], ch[i], i, i == last) for i in range(len(ch))])
        self.mid_block = MidBlock(cfg)
        rev = list(reversed(ch))
        self.up_blocks = nn.CellList(
            [UpBlock(cfg, rev[max(i - 1, 0)], rev[i], rev[min(i + 1, last)], i, i == last) for i in range(len(ch))]
        )
        self.conv_norm_out = GroupNorm(cfg.norm_num_groups, ch[0], cfg.norm_eps, silu=True)
        self.conv_out = Conv2d(ch[0], cfg.out_channels, 3, padding=1)
        self.skips_per_up_block = cfg.layers_per_block + 1

    def construct(
        self,
        sample: Tensor,
        timestep: Tensor,
        encoder_hidden_states: Tensor,
        text_embeds: Tensor,
        time_ids: Tensor,
        story: tuple | None = None,
        freeu: Tensor | None = None,
    ) -> Tensor:
        batch = sample.shape[0]
        t = ops.broadcast_to(timestep.reshape(-1), (batch,))
        emb = self.time_embedding(self.time_proj(t).astype(sample.dtype))
        time_embeds = self.add_time_proj(time_ids.reshape(-1)).reshape(batch, -1).astype(sample.dtype)
        emb = emb + self.add_embedding(ops.concat((text_embeds.astype(sample.dtype), time_embeds), -1))

        x = self.conv_in(sample)
        skips = (x,)
        for block in self.down_blocks:
            x, block_skips = block(x, emb, encoder_hidden_states, story)
            skips += block_skips
        x = self.mid_block(x, emb, encoder_hidden_states, story)
        n = self.skips_per_up_block
        for i, block in enumerate(self.up_blocks):
            factors = None if freeu is None or i >= FREEU_BLOCKS else (freeu[FREEU_BLOCKS + i], freeu[i])
            x = block(x, skips[len(skips) - n :], emb, encoder_hidden_states, story, factors)
            skips = skips[: len(skips) - n]
        return self.conv_out(self.conv_norm_out(x))


def up_attention(unet: UNet) -> list[tuple[int, int, nn.Cell]]:
    """Every transformer block of the up blocks that have attention, in call order, as (level, downscale, block):
    ``level`` counts those up blocks (0 the coarsest; SDXL has two), ``downscale`` is the block's size against the
    latent (4 and 2 for SDXL). The one walk that consistent attention, its token counts and the benchmarks use."""
    levels = len(unet.config.block_out_channels)
    found, level = [], 0
    for b, block in enumerate(unet.up_blocks):
        if block.attentions is None:
            continue
        for transformer in block.attentions:
            found += [(level, 2 ** (levels - 1 - b), tb) for tb in transformer.transformer_blocks]
        level += 1
    return found


def up_level_tokens(unet: UNet, latent_h: int, latent_w: int) -> list[int]:
    """Tokens per image at each up-block attention level, coarsest first."""
    scales = sorted({(level, scale) for level, scale, _ in up_attention(unet)})
    return [(latent_h // scale) * (latent_w // scale) for _, scale in scales]
