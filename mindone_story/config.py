"""One frozen config type per model, read from the diffusers / transformers ``config.json`` files.

Field names follow the checkpoint configs so a folder's config.json maps onto them directly; unknown keys are
ignored. Presets ``tiny`` (the built-in test model) and ``sdxl`` (SDXL base / RealVisXL) live as config.json files
under ``mindone_story/presets/`` so that the PyTorch fixture scripts read exactly the same values.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

PRESETS = Path(__file__).parent / "presets"

T = TypeVar("T")


def default_cache_dir() -> Path:
    """The library's cache: built models, tokenizers, fused kernels, compiled graphs (``MINDONE_STORY_CACHE``)."""
    return Path(os.environ.get("MINDONE_STORY_CACHE") or Path.home() / ".cache" / "mindone_story")


def _from_dict(cls: type[T], raw: dict[str, Any]) -> T:
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items() if k in names}
    return cls(**values)


class _JsonConfig:
    @classmethod
    def from_dict(cls, raw: dict[str, Any]):
        return _from_dict(cls, raw)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


@dataclass(frozen=True)
class UNetConfig(_JsonConfig):
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280)
    down_block_types: tuple[str, ...] = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    up_block_types: tuple[str, ...] = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
    layers_per_block: int = 2
    transformer_layers_per_block: tuple[int, ...] = (1, 2, 10)
    # diffusers' SDXL configs store the number of heads under this name (a historic misnomer kept by the files).
    attention_head_dim: tuple[int, ...] = (5, 10, 20)
    num_attention_heads: tuple[int, ...] | None = None
    cross_attention_dim: int = 2048
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    addition_embed_type: str = "text_time"
    addition_time_embed_dim: int = 256
    projection_class_embeddings_input_dim: int = 2816
    use_linear_projection: bool = True
    downsample_padding: int = 1
    sample_size: int = 128

    def __post_init__(self):
        n = len(self.block_out_channels)
        for name in ("down_block_types", "up_block_types", "transformer_layers_per_block", "attention_head_dim"):
            value = getattr(self, name)
            if isinstance(value, int):
                object.__setattr__(self, name, (value,) * n)
            elif len(value) != n:
                raise ValueError(f"UNetConfig.{name} has {len(value)} entries, block_out_channels has {n}")
        if self.addition_embed_type != "text_time":
            raise ValueError(f"only SDXL's text_time conditioning is supported, got {self.addition_embed_type!r}")
        if not self.use_linear_projection:
            raise ValueError("only linear-projection transformers (SDXL) are supported")

    @property
    def heads(self) -> tuple[int, ...]:
        return tuple(self.num_attention_heads or self.attention_head_dim)

    @property
    def pooled_dim(self) -> int:
        """Width of the pooled text embedding fed to the text_time embedding."""
        return self.projection_class_embeddings_input_dim - 6 * self.addition_time_embed_dim


@dataclass(frozen=True)
class VAEConfig(_JsonConfig):
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.13025
    force_upcast: bool = True
    sample_size: int = 1024

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


@dataclass(frozen=True)
class CLIPTextConfig(_JsonConfig):
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 768
    eos_token_id: int = 2
    architectures: tuple[str, ...] = ("CLIPTextModel",)

    @property
    def with_projection(self) -> bool:
        return "CLIPTextModelWithProjection" in self.architectures


@dataclass(frozen=True)
class CLIPVisionConfig(_JsonConfig):
    hidden_size: int = 1280
    intermediate_size: int = 5120
    num_hidden_layers: int = 32
    num_attention_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    num_channels: int = 3
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 1024


def preset_dir(name: str) -> Path:
    path = PRESETS / name
    if not path.is_dir():
        known = sorted(p.name for p in PRESETS.iterdir() if p.is_dir())
        raise ValueError(f"unknown preset {name!r}; known presets: {known}")
    return path
