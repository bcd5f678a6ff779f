"""CLIP text encoders (ViT-L; bigG with projection) and CLIP vision with projection, under transformers' names.

The text encoders return what SDXL uses: the last hidden state, hidden_states[-2] (the output of the penultimate
layer, before the final LayerNorm) and the pooled output (projected for CLIPTextModelWithProjection). The vision
encoder returns image_embeds, the last hidden state and hidden_states[-2] (IP-Adapter-Plus's input).
"""

from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops
from mindspore.common.initializer import initializer

from ..config import CLIPTextConfig, CLIPVisionConfig
from ..layers import GELU, Conv2d, Embedding, Heads, LayerNorm, Linear, attention_kernel, quick_gelu


class CLIPAttention(nn.Cell):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = Linear(dim, dim)
        self.k_proj = Linear(dim, dim)
        self.v_proj = Linear(dim, dim)
        self.out_proj = Linear(dim, dim)
        self.attention = attention_kernel()
        self.head_axes = Heads()

    def construct(self, x: Tensor, mask: Tensor | None) -> Tensor:
        # written out: a generator expression in construct makes graph mode's CSE pass slow (PLATFORM.md)
        q = self.head_axes.split(self.q_proj(x), self.heads)
        k = self.head_axes.split(self.k_proj(x), self.heads)
        v = self.head_axes.split(self.v_proj(x), self.heads)
        return self.out_proj(self.head_axes.merge(self.attention(q, k, v, mask)))


class CLIPMLP(nn.Cell):
    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        if act not in ("gelu", "quick_gelu"):
            raise ValueError(f"unsupported CLIP hidden_act {act!r}; expected 'gelu' or 'quick_gelu'")
        self.quick = act == "quick_gelu"
        self.gelu = None if self.quick else GELU()
        self.fc1 = Linear(dim, hidden)
        self.fc2 = Linear(hidden, dim)

    def construct(self, x: Tensor) -> Tensor:
        h = self.fc1(x)
        return self.fc2(quick_gelu(h) if self.quick else self.gelu(h))


class CLIPEncoderLayer(nn.Cell):
    def __init__(self, dim: int, heads: int, hidden: int, act: str, eps: float):
        super().__init__()
        self.self_attn = CLIPAttention(dim, heads)
        self.layer_norm1 = LayerNorm(dim, eps)
        self.mlp = CLIPMLP(dim, hidden, act)
        self.layer_norm2 = LayerNorm(dim, eps)

    def construct(self, x: Tensor, mask: Tensor | None) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Cell):
    def __init__(self, cfg):
        super().__init__()
        self.layers = nn.CellList(
            [
                CLIPEncoderLayer(
                    cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size, cfg.hidden_act, cfg.layer_norm_eps
                )
                for _ in range(cfg.num_hidden_layers)
            ]
        )

    def construct(self, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """Returns (last layer output, penultimate layer output)."""
        penultimate = x
        for layer in self.layers:
            penultimate = x
            x = layer(x, mask)
        return x, penultimate


class CLIPTextEmbeddings(nn.Cell):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.token_embedding = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def construct(self, ids: Tensor) -> Tensor:
        return self.token_embedding(ids) + self.position_embedding.weight[: ids.shape[1]].reshape(1, ids.shape[1], -1)


class CLIPTextTransformer(nn.Cell):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = CLIPTextEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)
        n = cfg.max_position_embeddings
        self.causal_mask = Tensor(np.triu(np.full((n, n), -1e9, np.float32), 1))

    def construct(self, ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        seq = ids.shape[1]
        x = self.embeddings(ids)
        mask = self.causal_mask[:seq, :seq].astype(x.dtype)
        last, penultimate = self.encoder(x, mask)
        last = self.final_layer_norm(last)
        pooled = ops.gather_d(
            last, 1, self._eos_index(ids).reshape(-1, 1, 1).broadcast_to((ids.shape[0], 1, last.shape[2]))
        )
        return last, penultimate, pooled.squeeze(1)

    def _eos_index(self, ids: Tensor) -> Tensor:
        # transformers' rule: configs with the legacy eos_token_id 2 pool at argmax(ids), since the end token has the
        # highest id in CLIP's vocabulary; other configs pool at the first occurrence of eos_token_id.
        if self.config.eos_token_id == 2:
            return ops.argmax(ids.astype(ms.int32), -1)
        return ops.argmax((ids == self.config.eos_token_id).astype(ms.int32), -1)


class CLIPTextModel(nn.Cell):
    """``construct(input_ids) -> (last_hidden_state, hidden_states[-2], pooled)``; pooled is text_embeds
    (projected) for CLIPTextModelWithProjection configs and pooler_output otherwise."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.config = cfg
        self.text_model = CLIPTextTransformer(cfg)
        self.text_projection = Linear(cfg.hidden_size, cfg.projection_dim, bias=False) if cfg.with_projection else None

    def construct(self, input_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        last, penultimate, pooled = self.text_model(input_ids)
        if self.text_projection is not None:
            pooled = self.text_projection(pooled)
        return last, penultimate, pooled


class CLIPVisionEmbeddings(nn.Cell):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.patch = cfg.patch_size
        self.class_embedding = ms.Parameter(initializer("zeros", (cfg.hidden_size,), ms.float32))
        self.patch_embedding = Conv2d(
            cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size, bias=False
        )
        self.position_embedding = Embedding((cfg.image_size // cfg.patch_size) ** 2 + 1, cfg.hidden_size)

    def construct(self, pixels: Tensor) -> Tensor:
        b = pixels.shape[0]
        patches = self.patch_embedding(pixels.astype(self.patch_embedding.weight.dtype))
        patches = patches.reshape(b, patches.shape[1], -1).transpose(0, 2, 1)
        cls = ops.broadcast_to(self.class_embedding.reshape(1, 1, -1), (b, 1, patches.shape[2]))
        return ops.concat((cls, patches), 1) + self.position_embedding.weight.reshape(1, -1, patches.shape[2])


class CLIPVisionTransformer(nn.Cell):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(cfg)
        self.pre_layrnorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)  # sic: transformers' spelling
        self.encoder = CLIPEncoder(cfg)
        self.post_layernorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)

    def construct(self, pixels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        last, penultimate = self.encoder(self.pre_layrnorm(self.embeddings(pixels)), None)
        return last, penultimate, self.post_layernorm(last[:, 0])


class CLIPVisionModelWithProjection(nn.Cell):
    """``construct(pixel_values) -> (image_embeds, last_hidden_state, hidden_states[-2])``."""

    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.config = cfg
        self.vision_model = CLIPVisionTransformer(cfg)
        self.visual_projection = Linear(cfg.hidden_size, cfg.projection_dim, bias=False)

    def construct(self, pixel_values: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        last, penultimate, pooled = self.vision_model(pixel_values)
        return self.visual_projection(pooled), last, penultimate
