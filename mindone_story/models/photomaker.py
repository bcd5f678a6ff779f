"""PhotoMaker v1's id encoder (TencentARC/PhotoMaker ``photomaker/model.py``), under the checkpoint's names.

A CLIP ViT-L/14 vision tower with its ``visual_projection`` (1024 -> 768) and a second projection
``visual_projection_2`` (1024 -> 1280, no bias) embed each id photo as one 2048-wide token, the width of SDXL's
concatenated text context. ``fuse_module`` mixes that token into the prompt's class-word token:
``mlp1(concat(prompt, id)) + prompt``, then ``mlp2`` (with its residual) and a final LayerNorm.

The original fuses with ``masked_scatter`` over a boolean class-token mask, whose shape depends on the data. Here the
fuse runs on every position of the context and a float mask [B, 77, 1] selects the fused rows (the fuse is per
token, so the selected rows are exactly the original's), and the photo embeddings arrive already placed at their
class-token positions: fixed shapes, one compiled graph.
"""

from __future__ import annotations

from dataclasses import dataclass

from mindspore import Tensor, nn, ops

from ..config import CLIPVisionConfig
from ..layers import GELU, LayerNorm, Linear
from .clip import CLIPVisionTransformer

# PhotoMaker's VISION_CONFIG_DICT: transformers' CLIPVisionConfig defaults (224 px, quick_gelu) at ViT-L/14 size
VIT_L_14 = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_attention_heads": 16,
    "num_hidden_layers": 24,
    "patch_size": 14,
    "image_size": 224,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "num_channels": 3,
}


@dataclass(frozen=True)
class PhotoMakerConfig:
    vision: CLIPVisionConfig  # the tower; projection_dim is the first text encoder's width
    context_dim: int  # SDXL's text context (2048): projection_dim + the width of visual_projection_2

    @classmethod
    def sdxl(cls) -> PhotoMakerConfig:
        return cls(CLIPVisionConfig.from_dict(VIT_L_14), 2048)

    def to_dict(self) -> dict:
        return {"vision": self.vision.to_dict(), "context_dim": self.context_dim}

    @classmethod
    def from_dict(cls, raw: dict) -> PhotoMakerConfig:
        return cls(CLIPVisionConfig.from_dict(raw["vision"]), int(raw["context_dim"]))


class MLP(nn.Cell):
    def __init__(self, dim_in: int, dim_out: int, hidden: int, residual: bool):
        super().__init__()
        self.residual = residual
        self.layernorm = LayerNorm(dim_in)
        self.fc1 = Linear(dim_in, hidden)
        self.fc2 = Linear(hidden, dim_out)
        self.act_fn = GELU()

    def construct(self, x: Tensor) -> Tensor:
        y = self.fc2(self.act_fn(self.fc1(self.layernorm(x))))
        return y + x if self.residual else y


class FuseModule(nn.Cell):
    def __init__(self, dim: int):
        super().__init__()
        self.mlp1 = MLP(2 * dim, dim, dim, residual=False)
        self.mlp2 = MLP(dim, dim, dim, residual=True)
        self.layer_norm = LayerNorm(dim)

    def construct(self, prompt: Tensor, ids: Tensor) -> Tensor:
        x = self.mlp1(ops.concat((prompt, ids), -1)) + prompt
        return self.layer_norm(self.mlp2(x))


class PhotoMakerIDEncoder(nn.Cell):
    """``id_embeds(pixels [N, 3, S, S]) -> [N, context]``, once per character; ``fuse(prompt [B, T, C], placed
    [B, T, C], mask [B, T, 1]) -> [B, T, C]``: rows where mask is 1 are fused with the photo embedding placed there."""

    def __init__(self, cfg: PhotoMakerConfig):
        super().__init__()
        self.config = cfg
        v = cfg.vision
        self.vision_model = CLIPVisionTransformer(v)
        self.visual_projection = Linear(v.hidden_size, v.projection_dim, bias=False)
        self.visual_projection_2 = Linear(v.hidden_size, cfg.context_dim - v.projection_dim, bias=False)
        self.fuse_module = FuseModule(cfg.context_dim)

    def id_embeds(self, pixels: Tensor) -> Tensor:
        pooled = self.vision_model(pixels)[2]
        return ops.concat((self.visual_projection(pooled), self.visual_projection_2(pooled)), -1)

    def fuse(self, prompt: Tensor, placed: Tensor, mask: Tensor) -> Tensor:
        fused = self.fuse_module(prompt, placed.astype(prompt.dtype))
        mask = mask.astype(prompt.dtype)
        return fused * mask + prompt * (1 - mask)
