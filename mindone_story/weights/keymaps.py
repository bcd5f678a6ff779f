"""One key map per checkpoint layout, onto our parameter names (= diffusers / transformers names), and a strict plan.

Each ``*_key`` function takes a source key (its component prefix removed) and returns ``[(our_key, op), ...]``, or
``[]`` for a key it does not know. ``op`` names every change of values explicitly:

- ``copy``: the values as they are;
- ``squeeze_1x1``: a 1x1 Conv2d weight [o, i, 1, 1] becomes a Linear weight [o, i] (sgm VAE attention);
- ``transpose``: OpenCLIP's ``text_projection`` is used as ``x @ P``; the HF Linear weight is ``P.T``;
- ``q`` / ``k`` / ``v``: one third (rows) of OpenCLIP's fused ``in_proj_weight`` [3h, h] / ``in_proj_bias`` [3h].

``map_keys(source, key_fn, name)`` applies a map to every key of a lazy source and gives ``MappedWeights`` (our key ->
lazy tensor, with the source keys it could not place and the targets produced twice). ``check(expected, weights,
name)`` is the one strict check, against the model's own parameter shapes: it raises one ``LayoutError`` listing
missing, unexpected and mis-shaped keys and keys produced twice (the first ten of each and how many in all). Known
extras (position_ids, logit_scale, denoiser.sigmas) are skipped by name and reported in ``MappedWeights.ignored``.
Nothing is read until a tensor is accessed.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import numpy as np

from ..errors import LayoutError
from .safetensors_io import LazyTensor, LazyWeights

Op = str
KeyFn = Callable[[str], list[tuple[str, Op]]]
Shapes = dict[str, tuple[int, ...]]
LazySource = LazyWeights  # (the name the readers' signatures use)


def as_dict(config: Any) -> dict[str, Any]:
    """A config as a plain dict: a dict, a dataclass, or any object with attributes (the models' config classes)."""
    if isinstance(config, Mapping):
        return dict(config)
    if dataclasses.is_dataclass(config):
        return dataclasses.asdict(config)
    return dict(vars(config))


# Keys that real files carry but our models do not need: skipped by name, never silently.
KNOWN_EXTRAS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"(^|\.)position_ids$"), "non-persistent buffer (saved by transformers < 4.31); recomputed"),
    (re.compile(r"(^|\.)logit_scale$"), "CLIP contrastive temperature; unused for encoding"),
    (re.compile(r"^denoiser\.sigmas$"), "sgm sampler sigma table; the scheduler computes it"),
]


def known_extra(key: str) -> str | None:
    return next((why for pat, why in KNOWN_EXTRAS if pat.search(key)), None)


# ---- shape and value transforms -------------------------------------------------------------------------------


def op_shape(op: Op, shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """The shape ``op`` produces from ``shape``, or None if ``op`` does not apply to it."""
    if op == "copy":
        return shape
    if op == "squeeze_1x1":
        return shape[:2] if len(shape) == 4 and shape[2:] == (1, 1) else shape if len(shape) == 2 else None
    if op == "transpose":
        return shape[::-1] if len(shape) == 2 else None
    if op in ("q", "k", "v"):
        return (shape[0] // 3, *shape[1:]) if shape and shape[0] % 3 == 0 else None
    raise ValueError(f"unknown op {op!r}")


def apply_op(op: Op, a: np.ndarray) -> np.ndarray:
    if op == "copy":
        return a
    if op == "squeeze_1x1":
        return a.reshape(a.shape[:2])
    if op == "transpose":
        return np.ascontiguousarray(a.T)
    n = a.shape[0] // 3
    i = "qkv".index(op)
    return np.ascontiguousarray(a[i * n : (i + 1) * n])


# ---- sgm single file: model.diffusion_model.* -----------------------------------------------------------------

_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj"}
_RESNET |= {"out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_UNET_TOP = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2"}
_UNET_TOP |= {"label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2"}
_UNET_TOP |= {"input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}


def _resnet_key(prefix: str, rest: str) -> str | None:
    module, _, param = rest.rpartition(".")
    return f"{prefix}.{_RESNET[module]}.{param}" if module in _RESNET else None


def sgm_unet_key_fn(unet_config: Any) -> KeyFn:
    """sgm/ldm UNet (input_blocks / middle_block / output_blocks) -> diffusers UNet2DConditionModel, from its config.

    input_blocks[1 + b*(L+1) + l] is down block b's layer l (resnet .0, attention .1) or, for l == L, its
    downsampler (.0.op); output_blocks[b*(L+1) + l] is up block b's layer l (resnet .0, attention .1) and its last
    layer ends with the upsampler (.1.conv without attention, .2.conv with it). Transformer internals share names."""
    cfg = as_dict(unet_config)
    per = cfg["layers_per_block"] + 1
    up_attn = [t.startswith("CrossAttn") for t in cfg["up_block_types"]]

    def key_fn(key: str) -> list[tuple[str, Op]]:
        module, _, param = key.rpartition(".")
        if module in _UNET_TOP:
            return [(f"{_UNET_TOP[module]}.{param}", "copy")]
        m = re.fullmatch(r"(input_blocks|output_blocks|middle_block)\.(\d+)\.(?:(\d+)\.)?(.+)", key)
        if not m:
            return []
        kind, i, j, rest = m.group(1), int(m.group(2)), m.group(3), m.group(4)
        out = None
        if kind == "middle_block" and j is None:
            out = _resnet_key(f"mid_block.resnets.{i // 2}", rest) if i in (0, 2) else f"mid_block.attentions.0.{rest}"
        elif kind == "input_blocks" and i >= 1 and j is not None:
            b, layer = divmod(i - 1, per)
            if layer < per - 1:
                out = _resnet_key(f"down_blocks.{b}.resnets.{layer}", rest) if j == "0" else None
                out = f"down_blocks.{b}.attentions.{layer}.{rest}" if j == "1" else out
            elif j == "0" and rest.startswith("op."):
                out = f"down_blocks.{b}.downsamplers.0.conv.{rest[3:]}"
        elif kind == "output_blocks" and j is not None:
            b, layer = divmod(i, per)
            if b >= len(up_attn):
                return []
            up_j = "2" if up_attn[b] else "1"
            if j == "0":
                out = _resnet_key(f"up_blocks.{b}.resnets.{layer}", rest)
            elif j == "1" and up_attn[b]:
                out = f"up_blocks.{b}.attentions.{layer}.{rest}"
            elif j == up_j and layer == per - 1 and rest.startswith("conv."):
                out = f"up_blocks.{b}.upsamplers.0.conv.{rest[5:]}"
        return [(out, "copy")] if out else []

    return key_fn


# ---- sgm single file: first_stage_model.* (ldm VAE) ----------------------------------------------------------

_VAE_ATTN = {"norm": ("group_norm", "copy"), "q": ("to_q", "squeeze_1x1"), "k": ("to_k", "squeeze_1x1")}
_VAE_ATTN |= {"v": ("to_v", "squeeze_1x1"), "proj_out": ("to_out.0", "squeeze_1x1")}
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}


def sgm_vae_key_fn(vae_config: Any) -> KeyFn:
    """ldm AutoencoderKL -> diffusers AutoencoderKL. ldm numbers decoder.up.i from the lowest resolution's
    opposite end (up.0 is the last to run), so up.i becomes up_blocks.(n - 1 - i)."""
    n = len(as_dict(vae_config)["block_out_channels"])

    def key_fn(key: str) -> list[tuple[str, Op]]:
        m = re.fullmatch(r"(encoder|decoder)\.(.+)\.(weight|bias)", key)
        if not m:
            return [(key, "copy")] if re.fullmatch(r"(post_)?quant_conv\.(weight|bias)", key) else []
        part, module, param = m.groups()
        simple = {"conv_in": "conv_in", "conv_out": "conv_out", "norm_out": "conv_norm_out"}
        if module in simple:
            return [(f"{part}.{simple[module]}.{param}", "copy")]
        if mm := re.fullmatch(r"mid\.block_([12])\.(\w+)", module):
            if mm.group(2) in _VAE_RESNET:
                return [(f"{part}.mid_block.resnets.{int(mm.group(1)) - 1}.{_VAE_RESNET[mm.group(2)]}.{param}", "copy")]
        if (mm := re.fullmatch(r"mid\.attn_1\.(\w+)", module)) and mm.group(1) in _VAE_ATTN:
            name, op = _VAE_ATTN[mm.group(1)]
            return [(f"{part}.mid_block.attentions.0.{name}.{param}", op if param == "weight" else "copy")]
        if mm := re.fullmatch(r"(down|up)\.(\d+)\.(block\.(\d+)\.(\w+)|downsample\.conv|upsample\.conv)", module):
            kind, i = mm.group(1), int(mm.group(2))
            if (kind == "down") != (part == "encoder") or i >= n:
                return []
            blocks = f"{part}.down_blocks.{i}" if kind == "down" else f"{part}.up_blocks.{n - 1 - i}"
            if mm.group(4) is not None and mm.group(5) in _VAE_RESNET:
                return [(f"{blocks}.resnets.{mm.group(4)}.{_VAE_RESNET[mm.group(5)]}.{param}", "copy")]
            if mm.group(3).endswith("sample.conv"):
                return [(f"{blocks}.{kind}samplers.0.conv.{param}", "copy")]
        return []

    return key_fn


# ---- sgm single file: conditioner.embedders.1.model.* (OpenCLIP ViT-bigG text) --------------------------------

_OPENCLIP_TOP = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
_OPENCLIP_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj"}
_OPENCLIP_BLOCK |= {"mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}


def openclip_text_key(key: str) -> list[tuple[str, Op]]:
    """OpenCLIP text tower (as in sgm's FrozenOpenCLIPEmbedder2) -> transformers CLIPTextModelWithProjection."""
    if key in _OPENCLIP_TOP:
        return [(_OPENCLIP_TOP[key], "copy")]
    if key == "text_projection":
        return [("text_projection.weight", "transpose")]
    m = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)", key)
    if m:
        layer, module, param = f"text_model.encoder.layers.{m.group(1)}", m.group(2), m.group(3)
        if module in _OPENCLIP_BLOCK:
            return [(f"{layer}.{_OPENCLIP_BLOCK[module]}.{param}", "copy")]
    m = re.fullmatch(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)", key)
    if m:
        return [(f"text_model.encoder.layers.{m.group(1)}.self_attn.{p}_proj.{m.group(2)}", p) for p in "qkv"]
    return []


# ---- diffusers folders and HF CLIP files ----------------------------------------------------------------------

_LEGACY_VAE_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def diffusers_key(key: str) -> list[tuple[str, Op]]:
    """diffusers names are ours; VAE folders saved before diffusers 0.14 spell attention query/key/value/proj_attn."""
    m = re.fullmatch(r"(.*\.attentions\.0)\.(query|key|value|proj_attn)\.(weight|bias)", key)
    if m:
        return [(f"{m.group(1)}.{_LEGACY_VAE_ATTN[m.group(2)]}.{m.group(3)}", "copy")]
    return [(key, "copy")]


def hf_clip_key(key: str) -> list[tuple[str, Op]]:
    """transformers CLIP text / vision: transformers 5 saves CLIPTextModel without the ``text_model.`` prefix."""
    if key.startswith(("embeddings.", "encoder.", "final_layer_norm.")):
        return [(f"text_model.{key}", "copy")]
    return [(key, "copy")]


def ip_adapter_key(key: str) -> list[tuple[str, Op]]:
    """IP-Adapter's own keys are the IPAdapter cell's: ``image_proj.*`` and ``ip_adapter.<i>.to_{k,v}_ip.weight``."""
    return [(key, "copy")] if key.startswith(("image_proj.", "ip_adapter.")) else []


# ---- mapping, and the one strict check --------------------------------------------------------------------------


def listing(title: str, items: list[str]) -> str:
    return f"{title} ({len(items)}): " + ", ".join(items[:10]) + (", ..." if len(items) > 10 else "")


class MappedWeights(LazyWeights):
    """Our key -> np.ndarray, read lazily from ``source`` through a key map. ``rules``: our key -> (source key, op);
    ``ignored``: (source key, why) of known extras; ``unmapped``: source keys the map could not place; ``twice``:
    our keys that two source keys produce. ``check`` reports the last two with the model's own mismatches."""

    def __init__(self, source: LazyWeights, name: str):
        self.source, self.name = source, name
        self.tensors: dict[str, LazyTensor] = {}
        self.rules: dict[str, tuple[str, Op]] = {}
        self.ignored: list[tuple[str, str]] = []
        self.unmapped: list[str] = []
        self.twice: list[str] = []
        self.config: dict[str, Any] = {}

    def rule(self, key: str) -> tuple[str, Op]:
        """(source key, op) that produces ``key``."""
        return self.rules[key]

    @property
    def files(self) -> list:
        return self.source.files

    def __repr__(self) -> str:
        return f"MappedWeights({self.name!r}, {len(self)} tensors, {len(self.ignored)} ignored)"


def _load(source: LazyWeights, key: str, op: Op) -> np.ndarray:
    return apply_op(op, source[key])


def map_keys(
    source: LazyWeights, key_fn: KeyFn, name: str, keys: Sequence[str] | None = None, strip: str = ""
) -> MappedWeights:
    """Map ``keys`` (default: all of ``source``; ``strip`` is removed from their front before ``key_fn``) onto our
    names, from the headers alone. Nothing is checked against a model here: that is ``check``'s one job."""
    out = MappedWeights(source, name)
    for src in source if keys is None else keys:
        why = known_extra(src)
        if why:
            out.ignored.append((src, why))
            continue
        targets = key_fn(src[len(strip) :])
        if not targets:
            out.unmapped.append(src)
            continue
        shape = tuple(source.shape(src))
        for target, op in targets:
            if target in out.rules:
                out.twice.append(f"{target} (from {out.rules[target][0]} and {src})")
                continue
            out.rules[target] = (src, op)
            got = op_shape(op, shape) or shape  # an op that cannot apply leaves a shape the check refuses
            out.tensors[target] = LazyTensor(got, source.dtype(src), partial(_load, source, src, op))
    return out


def check(expected: Mapping[str, tuple[int, ...]], weights: Mapping[str, Any], name: str) -> list[str]:
    """The one strict check: ``weights`` (a lazy source, ``MappedWeights`` or a dict of arrays) against the model's
    parameter shapes ``expected``. Raises one LayoutError listing every problem; returns the ignored source keys."""
    shape_of = getattr(weights, "shape", None)
    shapes = {k: tuple(shape_of(k) if callable(shape_of) else np.shape(weights[k])) for k in weights}
    rules = getattr(weights, "rules", {})

    def named(k: str) -> str:
        src = rules.get(k, (k,))[0]
        return k if src == k else f"{k} (from {src})"

    ignored = [k for k, _ in getattr(weights, "ignored", [])]
    ignored += [k for k in shapes if k not in expected and known_extra(k)]
    missing = [k for k in expected if k not in shapes]
    unexpected = list(getattr(weights, "unmapped", []))
    unexpected += [named(k) for k in shapes if k not in expected and not known_extra(k)]
    wrong = [
        f"{named(k)}: file {list(shapes[k])}, model {list(expected[k])}"
        for k in expected
        if k in shapes and shapes[k] != tuple(expected[k])
    ]
    problems = [
        listing(title, items)
        for title, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", wrong),
            ("keys produced twice", list(getattr(weights, "twice", []))),
        )
        if items
    ]
    if problems:
        raise LayoutError(f"{name}: the weights do not fit the model:\n  " + "\n  ".join(problems))
    return ignored


def plan(
    source: LazyWeights, key_fn: KeyFn, expected: Shapes, name: str, keys: Sequence[str] | None = None, strip: str = ""
) -> MappedWeights:
    """``map_keys`` then ``check`` (for a caller that has the expected shapes at hand)."""
    mapped = map_keys(source, key_fn, name, keys, strip)
    check(expected, mapped, name)
    return mapped
