"""Our parameter names and shapes, computed from a diffusers / transformers config.json (no weights allocated).

Our MindSpore models use exactly the diffusers / transformers key names, so these tables are also the keys of a
diffusers folder. They let a loader be strict (every target key present, each with the right shape) without
building a model; tests check them against the manifests made from the original classes.

``ip_adapter_modules(unet_config)`` lists the cross-attention modules in the order of diffusers'
``unet.attn_processors`` (down_blocks -> up_blocks -> mid_block; attn1, attn2 per transformer block), which is the
order of IP-Adapter's ``ip_adapter.<i>`` indices: module ``k`` of that list has index ``2k + 1``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

Shapes = dict[str, tuple[int, ...]]


def as_dict(config: Any) -> dict[str, Any]:
    """A config as a plain dict: a dict, a dataclass, or any object with attributes (the models' config classes)."""
    if isinstance(config, Mapping):
        return dict(config)
    if dataclasses.is_dataclass(config):
        return dataclasses.asdict(config)
    return dict(vars(config))


def _per_block(value: Any, n: int) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def _linear(out: Shapes, name: str, n_out: int, n_in: int, bias: bool = True) -> None:
    out[f"{name}.weight"] = (n_out, n_in)
    if bias:
        out[f"{name}.bias"] = (n_out,)


def _conv(out: Shapes, name: str, n_out: int, n_in: int, k: int) -> None:
    out[f"{name}.weight"] = (n_out, n_in, k, k)
    out[f"{name}.bias"] = (n_out,)


def _norm(out: Shapes, name: str, n: int) -> None:
    out[f"{name}.weight"] = (n,)
    out[f"{name}.bias"] = (n,)


def _resnet(out: Shapes, name: str, c_in: int, c_out: int, temb: int | None) -> None:
    _norm(out, f"{name}.norm1", c_in)
    _conv(out, f"{name}.conv1", c_out, c_in, 3)
    if temb:
        _linear(out, f"{name}.time_emb_proj", c_out, temb)
    _norm(out, f"{name}.norm2", c_out)
    _conv(out, f"{name}.conv2", c_out, c_out, 3)
    if c_in != c_out:
        _conv(out, f"{name}.conv_shortcut", c_out, c_in, 1)


def _transformer(out: Shapes, name: str, c: int, depth: int, context: int, linear_proj: bool) -> None:
    _norm(out, f"{name}.norm", c)
    for proj in ("proj_in", "proj_out"):
        (_linear(out, f"{name}.{proj}", c, c) if linear_proj else _conv(out, f"{name}.{proj}", c, c, 1))
    for d in range(depth):
        b = f"{name}.transformer_blocks.{d}"
        for i in (1, 2, 3):
            _norm(out, f"{b}.norm{i}", c)
        for attn, kv in (("attn1", c), ("attn2", context)):
            _linear(out, f"{b}.{attn}.to_q", c, c, bias=False)
            _linear(out, f"{b}.{attn}.to_k", c, kv, bias=False)
            _linear(out, f"{b}.{attn}.to_v", c, kv, bias=False)
            _linear(out, f"{b}.{attn}.to_out.0", c, c)
        _linear(out, f"{b}.ff.net.0.proj", 8 * c, c)  # GEGLU: value and gate of width 4c
        _linear(out, f"{b}.ff.net.2", c, 4 * c)


def _unet_blocks(cfg: Mapping[str, Any]) -> tuple[list[int], list[int], list[bool], list[bool]]:
    chans = list(cfg["block_out_channels"])
    n = len(chans)
    depth = _per_block(cfg.get("transformer_layers_per_block", 1), n)
    down_attn = [t.startswith("CrossAttn") for t in cfg["down_block_types"]]
    up_attn = [t.startswith("CrossAttn") for t in cfg["up_block_types"]]
    return chans, depth, down_attn, up_attn


def unet_shapes(config: Any) -> Shapes:
    """diffusers UNet2DConditionModel (SDXL-style: text_time add-embedding, CrossAttn blocks, UNetMidBlock2DCrossAttn)."""
    cfg = as_dict(config)
    chans, depth, down_attn, up_attn = _unet_blocks(cfg)
    layers, ctx, lin = cfg["layers_per_block"], cfg["cross_attention_dim"], cfg.get("use_linear_projection", False)
    temb = chans[0] * 4
    out: Shapes = {}
    _conv(out, "conv_in", chans[0], cfg["in_channels"], cfg.get("conv_in_kernel", 3))
    _linear(out, "time_embedding.linear_1", temb, chans[0])
    _linear(out, "time_embedding.linear_2", temb, temb)
    if cfg.get("addition_embed_type") == "text_time":
        _linear(out, "add_embedding.linear_1", temb, cfg["projection_class_embeddings_input_dim"])
        _linear(out, "add_embedding.linear_2", temb, temb)
    c_out = chans[0]
    for b, has_attn in enumerate(down_attn):
        c_in, c_out = c_out, chans[b]
        for j in range(layers):
            _resnet(out, f"down_blocks.{b}.resnets.{j}", c_in if j == 0 else c_out, c_out, temb)
            if has_attn:
                _transformer(out, f"down_blocks.{b}.attentions.{j}", c_out, depth[b], ctx, lin)
        if b < len(chans) - 1:
            _conv(out, f"down_blocks.{b}.downsamplers.0.conv", c_out, c_out, 3)
    c = chans[-1]
    _resnet(out, "mid_block.resnets.0", c, c, temb)
    _transformer(out, "mid_block.attentions.0", c, depth[-1], ctx, lin)
    _resnet(out, "mid_block.resnets.1", c, c, temb)
    rev, rev_depth = chans[::-1], depth[::-1]
    c_out = rev[0]
    for b, has_attn in enumerate(up_attn):
        prev, c_out, c_skip_last = c_out, rev[b], rev[min(b + 1, len(rev) - 1)]
        for j in range(layers + 1):
            skip = c_skip_last if j == layers else c_out
            _resnet(out, f"up_blocks.{b}.resnets.{j}", (prev if j == 0 else c_out) + skip, c_out, temb)
            if has_attn:
                _transformer(out, f"up_blocks.{b}.attentions.{j}", c_out, rev_depth[b], ctx, lin)
        if b < len(chans) - 1:
            _conv(out, f"up_blocks.{b}.upsamplers.0.conv", c_out, c_out, 3)
    _norm(out, "conv_norm_out", chans[0])
    _conv(out, "conv_out", cfg["out_channels"], chans[0], cfg.get("conv_out_kernel", 3))
    return out


def _vae_mid(out: Shapes, name: str, c: int) -> None:
    _resnet(out, f"{name}.resnets.0", c, c, None)
    _norm(out, f"{name}.attentions.0.group_norm", c)
    for p in ("to_q", "to_k", "to_v", "to_out.0"):
        _linear(out, f"{name}.attentions.0.{p}", c, c)
    _resnet(out, f"{name}.resnets.1", c, c, None)


def vae_shapes(config: Any) -> Shapes:
    """diffusers AutoencoderKL."""
    cfg = as_dict(config)
    chans, layers, lat = list(cfg["block_out_channels"]), cfg["layers_per_block"], cfg["latent_channels"]
    out: Shapes = {}
    _conv(out, "encoder.conv_in", chans[0], cfg["in_channels"], 3)
    c_out = chans[0]
    for b in range(len(chans)):
        c_in, c_out = c_out, chans[b]
        for j in range(layers):
            _resnet(out, f"encoder.down_blocks.{b}.resnets.{j}", c_in if j == 0 else c_out, c_out, None)
        if b < len(chans) - 1:
            _conv(out, f"encoder.down_blocks.{b}.downsamplers.0.conv", c_out, c_out, 3)
    _vae_mid(out, "encoder.mid_block", chans[-1])
    _norm(out, "encoder.conv_norm_out", chans[-1])
    _conv(out, "encoder.conv_out", 2 * lat, chans[-1], 3)
    _conv(out, "quant_conv", 2 * lat, 2 * lat, 1)
    _conv(out, "post_quant_conv", lat, lat, 1)
    _conv(out, "decoder.conv_in", chans[-1], lat, 3)
    _vae_mid(out, "decoder.mid_block", chans[-1])
    rev = chans[::-1]
    c_out = rev[0]
    for b in range(len(rev)):
        prev, c_out = c_out, rev[b]
        for j in range(layers + 1):
            _resnet(out, f"decoder.up_blocks.{b}.resnets.{j}", prev if j == 0 else c_out, c_out, None)
        if b < len(rev) - 1:
            _conv(out, f"decoder.up_blocks.{b}.upsamplers.0.conv", c_out, c_out, 3)
    _norm(out, "decoder.conv_norm_out", chans[0])
    _conv(out, "decoder.conv_out", cfg["out_channels"], chans[0], 3)
    return out


def _clip_encoder(out: Shapes, name: str, cfg: Mapping[str, Any]) -> None:
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    for i in range(cfg["num_hidden_layers"]):
        b = f"{name}.encoder.layers.{i}"
        for p in ("q_proj", "k_proj", "v_proj", "out_proj"):
            _linear(out, f"{b}.self_attn.{p}", h, h)
        _norm(out, f"{b}.layer_norm1", h)
        _linear(out, f"{b}.mlp.fc1", inter, h)
        _linear(out, f"{b}.mlp.fc2", h, inter)
        _norm(out, f"{b}.layer_norm2", h)


def clip_text_shapes(config: Any, with_projection: bool | None = None) -> Shapes:
    """transformers CLIPTextModel (keys with the ``text_model.`` prefix) or CLIPTextModelWithProjection."""
    cfg = as_dict(config)
    if with_projection is None:
        with_projection = "CLIPTextModelWithProjection" in cfg.get("architectures", [])
    h = cfg["hidden_size"]
    out: Shapes = {
        "text_model.embeddings.token_embedding.weight": (cfg["vocab_size"], h),
        "text_model.embeddings.position_embedding.weight": (cfg["max_position_embeddings"], h),
    }
    _clip_encoder(out, "text_model", cfg)
    _norm(out, "text_model.final_layer_norm", h)
    if with_projection:
        _linear(out, "text_projection", cfg["projection_dim"], h, bias=False)
    return out


def clip_vision_shapes(config: Any) -> Shapes:
    """transformers CLIPVisionModelWithProjection."""
    cfg = as_dict(config)
    h, p = cfg["hidden_size"], cfg["patch_size"]
    out: Shapes = {
        "vision_model.embeddings.class_embedding": (h,),
        "vision_model.embeddings.patch_embedding.weight": (h, cfg.get("num_channels", 3), p, p),
        "vision_model.embeddings.position_embedding.weight": ((cfg["image_size"] // p) ** 2 + 1, h),
    }
    _norm(out, "vision_model.pre_layrnorm", h)  # sic: transformers' spelling
    _clip_encoder(out, "vision_model", cfg)
    _norm(out, "vision_model.post_layernorm", h)
    _linear(out, "visual_projection", cfg["projection_dim"], h, bias=False)
    return out


def ip_adapter_modules(unet_config: Any) -> list[tuple[str, int]]:
    """(attn2 module path, hidden size) in ip_adapter index order: entry k is ``ip_adapter.{2k + 1}``."""
    cfg = as_dict(unet_config)
    chans, depth, down_attn, up_attn = _unet_blocks(cfg)
    layers = cfg["layers_per_block"]
    mods = []
    for b, has_attn in enumerate(down_attn):
        for j in range(layers if has_attn else 0):
            mods += [
                (f"down_blocks.{b}.attentions.{j}.transformer_blocks.{d}.attn2", chans[b]) for d in range(depth[b])
            ]
    rev, rev_depth = chans[::-1], depth[::-1]
    for b, has_attn in enumerate(up_attn):
        for j in range(layers + 1 if has_attn else 0):
            mods += [
                (f"up_blocks.{b}.attentions.{j}.transformer_blocks.{d}.attn2", rev[b]) for d in range(rev_depth[b])
            ]
    mods += [(f"mid_block.attentions.0.transformer_blocks.{d}.attn2", chans[-1]) for d in range(depth[-1])]
    return mods


def ip_adapter_shapes(unet_config: Any, image_proj: Mapping[str, Any]) -> Shapes:
    """Our IP-Adapter names: ``image_proj.*`` (ImageProjModel or Resampler) and the UNet's ``to_k_ip``/``to_v_ip``.

    ``image_proj`` describes the projection: ``{"kind": "image_proj_model", "num_tokens", "clip_dim"}`` or
    ``{"kind": "resampler", "dim", "depth", "inner_dim", "num_queries", "embedding_dim", "ff_mult"}``.
    """
    ctx = as_dict(unet_config)["cross_attention_dim"]
    p = dict(image_proj)
    out: Shapes = {}
    if p["kind"] == "image_proj_model":
        _linear(out, "image_proj.proj", p["num_tokens"] * ctx, p["clip_dim"])
        _norm(out, "image_proj.norm", ctx)
    else:
        dim, inner = p["dim"], p["inner_dim"]
        out["image_proj.latents"] = (1, p["num_queries"], dim)
        _linear(out, "image_proj.proj_in", dim, p["embedding_dim"])
        _linear(out, "image_proj.proj_out", ctx, dim)
        _norm(out, "image_proj.norm_out", ctx)
        for i in range(p["depth"]):
            b = f"image_proj.layers.{i}"
            _norm(out, f"{b}.0.norm1", dim)
            _norm(out, f"{b}.0.norm2", dim)
            _linear(out, f"{b}.0.to_q", inner, dim, bias=False)
            _linear(out, f"{b}.0.to_kv", 2 * inner, dim, bias=False)
            _linear(out, f"{b}.0.to_out", dim, inner, bias=False)
            _norm(out, f"{b}.1.0", dim)
            _linear(out, f"{b}.1.1", p["ff_mult"] * dim, dim, bias=False)
            _linear(out, f"{b}.1.3", dim, p["ff_mult"] * dim, bias=False)
    for module, hidden in ip_adapter_modules(unet_config):
        _linear(out, f"{module}.to_k_ip", hidden, ctx, bias=False)
        _linear(out, f"{module}.to_v_ip", hidden, ctx, bias=False)
    return out
