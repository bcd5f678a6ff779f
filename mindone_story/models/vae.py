"""AutoencoderKL (the SDXL VAE): encoder and decoder under diffusers' parameter names."""

from __future__ import annotations

from mindspore import Tensor, nn, ops

from ..config import VAEConfig
from ..layers import Conv2d, GroupNorm
from .attention import Attention
from .unet import ResnetBlock2D, Upsample2D


class _Down(nn.Cell):
    """Stride-2 conv after a (0, 1, 0, 1) pad, expressed as the conv's own asymmetric padding."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=(0, 1, 0, 1))

    def construct(self, x: Tensor) -> Tensor:
        return self.conv(x)


class _Block(nn.Cell):
    """DownEncoderBlock2D / UpDecoderBlock2D: resnets without time embedding, then an optional resampler."""

    def __init__(self, in_ch: int, out_ch: int, layers: int, groups: int, resample: str | None):
        super().__init__()
        self.resnets = nn.CellList(
            [ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, None, groups, 1e-6) for i in range(layers)]
        )
        self.downsamplers = nn.CellList([_Down(out_ch)]) if resample == "down" else None
        self.upsamplers = nn.CellList([Upsample2D(out_ch)]) if resample == "up" else None

    def construct(self, x: Tensor) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class _Mid(nn.Cell):
    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.resnets = nn.CellList([ResnetBlock2D(ch, ch, None, groups, 1e-6) for _ in range(2)])
        self.attentions = nn.CellList([Attention(ch, 1, qkv_bias=True, group_norm=(groups, 1e-6))])

    def construct(self, x: Tensor) -> Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Encoder(nn.Cell):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        last = len(ch) - 1
        self.down_blocks = nn.CellList(
            [
                _Block(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, None if i == last else "down")
                for i in range(len(ch))
            ]
        )
        self.mid_block = _Mid(ch[-1], g)
        self.conv_norm_out = GroupNorm(g, ch[-1], 1e-6, silu=True)
        self.conv_out = Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def construct(self, x: Tensor) -> Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(self.conv_norm_out(x))


class Decoder(nn.Cell):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g = list(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        self.conv_in = Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = _Mid(ch[0], g)
        last = len(ch) - 1
        self.up_blocks = nn.CellList(
            [
                _Block(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, g, None if i == last else "up")
                for i in range(len(ch))
            ]
        )
        self.conv_norm_out = GroupNorm(g, ch[-1], 1e-6, silu=True)
        self.conv_out = Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def construct(self, z: Tensor) -> Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(self.conv_norm_out(x))


class AutoencoderKL(nn.Cell):
    """``encode(image) -> (mean, logvar)`` and ``decode(latent) -> image``; latents are unscaled
    (multiply by ``config.scaling_factor`` after encoding and divide before decoding, as diffusers' pipelines do)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.post_quant_conv = Conv2d(cfg.latent_channels, cfg.latent_channels, 1)

    def encode(self, image: Tensor) -> tuple[Tensor, Tensor]:
        moments = self.quant_conv(self.encoder(image))
        mean, logvar = ops.split(moments, self.config.latent_channels, axis=1)
        return mean, ops.clamp(logvar, -30.0, 20.0)

    def decode(self, latent: Tensor) -> Tensor:
        return self.decoder(self.post_quant_conv(latent))

    def construct(self, latent: Tensor) -> Tensor:
        return self.decode(latent)
