"""LoRA files, fused into the SDXL weights as those load: ``W' = W + multiplier * scale * up @ down``.

One key table per published layout; each turns a file key into (component, our module, role), role being
``down``, ``up`` or ``alpha``. Our module names and weight shapes are the models' own (``models.load.parameter_shapes``
of each component, passed in as ``shapes``): the diffusers / transformers names.

- ``kohya`` (sd-scripts, also LyCORIS' plain LoRA/LoCon): ``lora_unet_<module>.lora_down.weight`` / ``.lora_up.weight``
  / ``.alpha``, the module path with ``.`` written ``_``, in sgm names (``input_blocks_4_1_transformer_blocks_0_
  attn1_to_q``, as sd-scripts trains SDXL) or diffusers names (``down_blocks_1_attentions_0_...``); text encoders
  ``lora_te1_`` / ``lora_te2_``. Conv LoRA (LoCon) on 3x3 and 1x1 convs: down [r, i, k, k], up [o, r, 1, 1].
  scale = alpha / rank; no alpha (or 0) means alpha = rank, as sd-scripts does.
- ``peft`` (diffusers >= 0.24 ``save_lora_weights``): ``{unet,text_encoder,text_encoder_2}.<module>.lora_A.weight``
  / ``.lora_B.weight``. scale = lora_alpha / r from the file's ``lora_adapter_metadata`` (peft's LoraConfig per
  component: ``alpha_pattern`` and ``use_rslora`` honoured; the rank is the tensors' own); without it, diffusers'
  rule: lora_alpha = the most common rank of that component, so 1.0 for the usual one-rank file.
- ``diffusers_legacy`` (diffusers < 0.24): ``<component>.<module>.lora.down.weight`` / ``.lora.up.weight``; text
  encoders also ``self_attn.to_{q,k,v,out}_lora.{down,up}.weight`` and ``<module>.lora_linear_layer.{down,up}.weight``.
- ``attn_processor``, the older diffusers attention-processor layout that PhotoMaker's ``lora_weights`` use:
  ``[unet.]<attention>.processor.to_{q,k,v,out}_lora.{down,up}.weight``.
  The last two store no alpha and take the peft rule without metadata.

``read_lora(path, configs, shapes)`` maps a file strictly before any weight is read: every key must land on a Linear or
Conv weight of ours with compatible shapes, or ``LoRAError`` lists the keys it could not place (the first ten and
how many), and names the family of an SD1.x / SD2.x LoRA. ``fuse(weights, loras)`` wraps each component's lazy
weights so that a tensor is fused when it is read: memory holds one base tensor and one delta at a time.
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from . import keymaps as L
from .layouts import files_fingerprint, open_weights
from .safetensors_io import LazyTensor, LazyWeights, WeightFileError

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
_CONTEXT_FAMILY = {768: "Stable Diffusion 1.x", 1024: "Stable Diffusion 2.x", 1280: "the SDXL refiner"}


class LoRAError(L.LayoutError):
    """A LoRA file does not fit the model; the message lists the keys and says why."""


def flat(name: str) -> str:
    return name.replace(".", "_")


# ---- our LoRA-able modules and their names in each layout -------------------------------------------------------


def lora_modules(expected: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Our modules a LoRA can change: Linear and Conv2d weights (the token and position tables are not layers)."""
    return {
        k[: -len(".weight")]: shape
        for k, shape in expected.items()
        if k.endswith(".weight") and len(shape) in (2, 4) and not re.search(r"_embedding\.weight$", k)
    }


def sgm_unet_modules(unet_config: Any, ours: Mapping[str, Any]) -> dict[str, str]:
    """sgm module name -> our UNet module, by running the sgm key map (keymaps.sgm_unet_key_fn) over every candidate
    sgm name: block indices times the inner names of resnets (sgm's), samplers and transformers (shared)."""
    key_fn = L.sgm_unet_key_fn(unet_config)
    inner = set(L._RESNET) | {"op", "conv"}
    inner |= {m.split(".", 4)[4] for m in ours if re.match(r"\w+\.\d+\.attentions\.\d+\.", m)}
    inner |= {m.split(".", 3)[3] for m in ours if m.startswith("mid_block.attentions.0.")}
    cfg = L.as_dict(unet_config)
    n = len(cfg["block_out_channels"]) * (cfg["layers_per_block"] + 1) + 1  # input_blocks.0 .. input_blocks.n-1
    candidates = list(L._UNET_TOP)
    blocks = [f"{kind}.{i}.{j}" for kind in ("input_blocks", "output_blocks") for i in range(n) for j in range(3)]
    candidates += [f"{b}.{x}" for b in blocks for x in inner]
    candidates += [f"middle_block.{i}.{x}" for i in range(3) for x in inner]
    out = {}
    for sgm in candidates:
        targets = key_fn(f"{sgm}.weight")
        if targets and targets[0][0][: -len(".weight")] in ours:
            out[sgm] = targets[0][0][: -len(".weight")]
    return out


@dataclass
class Names:
    """Per component: our LoRA-able modules (name -> weight shape) and the flattened names kohya writes."""

    modules: dict[str, dict[str, tuple[int, ...]]]
    kohya: dict[str, dict[str, str]]  # component -> {flattened name: our module}
    context: int  # the UNet's cross_attention_dim, for naming the family of a LoRA made for another

    @classmethod
    def of(cls, configs: Mapping[str, Any], shapes: Mapping[str, Mapping[str, tuple[int, ...]]]) -> Names:
        """From the components' configs and their models' parameter shapes."""
        modules = {c: lora_modules(shapes[c]) for c in COMPONENTS}
        kohya = {c: {flat(m): m for m in modules[c]} for c in COMPONENTS}
        sgm = {flat(s): m for s, m in sgm_unet_modules(configs["unet"], modules["unet"]).items()}
        clash = [k for k in sgm if k in kohya["unet"] and kohya["unet"][k] != sgm[k]]
        if clash:  # cannot happen for SDXL: sgm and diffusers block names differ
            raise AssertionError(f"ambiguous flattened UNet names: {clash[:5]}")
        kohya["unet"] |= sgm
        return cls(modules, kohya, L.as_dict(configs["unet"])["cross_attention_dim"])


# ---- the key tables ---------------------------------------------------------------------------------------------

Parsed = tuple[str, str, str]  # (component, our module, role); a table returns None for a key it cannot place
Table = Callable[[str, Names], "Parsed | None"]

_KOHYA_PREFIX = {"unet": "unet", "te1": "text_encoder", "te2": "text_encoder_2"}
_KOHYA_ROLE = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}


def kohya_key(key: str, names: Names) -> Parsed | None:
    m = re.fullmatch(r"lora_(unet|te1|te2)_([^.]+)\.(lora_down\.weight|lora_up\.weight|alpha)", key)
    if not m:
        return None
    comp = _KOHYA_PREFIX[m.group(1)]
    module = names.kohya[comp].get(m.group(2))
    return (comp, module, _KOHYA_ROLE[m.group(3)]) if module else None


def peft_key(key: str, names: Names) -> Parsed | None:
    m = re.fullmatch(r"(unet|text_encoder|text_encoder_2)\.(.+)\.lora_(A|B)\.weight", key)
    if not m or m.group(2) not in names.modules[m.group(1)]:
        return None
    return m.group(1), m.group(2), "down" if m.group(3) == "A" else "up"


_LEGACY_TE_ATTN = re.compile(
    r"(text_encoder|text_encoder_2)\.(.+\.self_attn)\.(to_[qkv]_lora|to_out_lora)\.(down|up)\.weight"
)
_LEGACY_TE_LINEAR = re.compile(r"(text_encoder|text_encoder_2)\.(.+)\.lora_linear_layer\.(down|up)\.weight")
_LEGACY_TE = {"to_q_lora": "q_proj", "to_k_lora": "k_proj", "to_v_lora": "v_proj", "to_out_lora": "out_proj"}


def diffusers_legacy_key(key: str, names: Names) -> Parsed | None:
    m = re.fullmatch(r"(unet|text_encoder|text_encoder_2)\.(.+)\.lora\.(down|up)\.weight", key)
    if m:
        comp, module, role = m.groups()
    elif m := _LEGACY_TE_ATTN.fullmatch(key):
        comp, module, role = m.group(1), f"{m.group(2)}.{_LEGACY_TE[m.group(3)]}", m.group(4)
    elif m := _LEGACY_TE_LINEAR.fullmatch(key):
        comp, module, role = m.groups()
    else:
        return None
    return (comp, module, role) if module in names.modules[comp] else None


def attn_processor_key(key: str, names: Names) -> Parsed | None:
    m = re.fullmatch(r"(?:unet\.)?(.+\.attn[12])\.processor\.to_(q|k|v|out)_lora\.(down|up)\.weight", key)
    if not m:
        return None
    module = f"{m.group(1)}.to_{m.group(2)}" + (".0" if m.group(2) == "out" else "")
    return ("unet", module, m.group(3)) if module in names.modules["unet"] else None


TABLES: dict[str, Table] = {
    "kohya": kohya_key,
    "peft": peft_key,
    "diffusers_legacy": diffusers_legacy_key,
    "attn_processor": attn_processor_key,
}
_STORES_ALPHA = {"kohya"}

# variants we do not fuse, named so the error says what the file is
_UNSUPPORTED = [
    (r"\.(hada_w[12]_[ab]|hada_t[12]|lokr_w[12](_[ab])?)$", "LyCORIS LoHa / LoKr (not LoRA) is not supported"),
    (r"(\.dora_scale|\.lora_magnitude_vector(\.weight)?)$", "DoRA (magnitude vectors) is not supported"),
    (r"\.lora_B\.bias$", "peft's lora_bias is not supported"),
    (r"^lora_te_", "a LoRA for Stable Diffusion 1.x / 2.x (one text encoder; SDXL's are lora_te1_ and lora_te2_)"),
]


# ---- reading a file ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Module:
    """One fused pair: ``weight`` (our key) += scale * up @ down, up and down read from the file by key."""

    component: str
    weight: str
    down: str
    up: str
    rank: int
    scale: float  # alpha / rank (or peft's rule); the user's multiplier is applied on top


class LoRA:
    """A checked LoRA file: ``modules[component][our weight key] -> Module``, read lazily from ``source``."""

    def __init__(self, path: Path, source: L.LazySource, modules: dict[str, dict[str, Module]], layouts: list[str]):
        self.path, self._source, self.modules, self.layouts = path, source, modules, layouts

    def delta(self, m: Module) -> np.ndarray:
        """scale * up @ down in float32, shaped as the weight (convs: [o, r] @ [r, i*k*k])."""
        up = np.asarray(self._source[m.up], np.float32).reshape(-1, m.rank)
        down = np.asarray(self._source[m.down], np.float32).reshape(m.rank, -1)
        return np.float32(m.scale) * (up @ down)

    @property
    def fingerprint(self) -> str:
        return files_fingerprint([self.path])

    def __len__(self) -> int:
        return sum(len(v) for v in self.modules.values())

    def __repr__(self) -> str:
        counts = ", ".join(f"{c} {len(v)}" for c, v in self.modules.items() if v)
        return f"LoRA({str(self.path)!r}, {'+'.join(self.layouts)}: {counts})"


def _metadata(source: L.LazySource, path: Path) -> dict[str, Any]:
    """diffusers' ``lora_adapter_metadata``: peft's LoraConfig per component, keys prefixed ``unet.`` etc."""
    raw = (getattr(source, "metadata", None) or {}).get("lora_adapter_metadata")
    try:
        meta = json.loads(raw) if raw else {}
    except json.JSONDecodeError as e:
        raise LoRAError(f"{path}: lora_adapter_metadata is not JSON ({e})") from None
    if not isinstance(meta, dict):
        raise LoRAError(f"{path}: lora_adapter_metadata is not a JSON object")
    return meta


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """peft's rank_pattern / alpha_pattern: a key matches a module whose name ends with it (as a regex)."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _peft_scales(comp: str, pairs: Mapping[str, tuple[int, float | None]], meta: Mapping[str, Any]) -> dict[str, float]:
    """scale per module of one component from a file without stored alphas (see the module docstring)."""
    cfg = {k.removeprefix(f"{comp}."): v for k, v in meta.items() if k.startswith(f"{comp}.")}
    if cfg:
        alpha = cfg.get("lora_alpha", 8)  # peft's default
        out = {}
        for m, (rank, _) in pairs.items():
            a = _pattern_value(cfg.get("alpha_pattern") or {}, m, alpha)
            out[m] = a / math.sqrt(rank) if cfg.get("use_rslora") else a / rank
        return out
    common = collections.Counter(rank for rank, _ in pairs.values()).most_common(1)[0][0] if pairs else 1
    return {m: common / rank for m, (rank, _) in pairs.items()}


def _check_pair(weight: tuple[int, ...], down: tuple[int, ...], up: tuple[int, ...]) -> str | None:
    """Why down / up cannot be fused into a weight of shape ``weight``, or None."""
    rank = down[0] if down else 0
    if len(up) not in (2, 4) or up[0] != weight[0] or up[1] != rank or tuple(up[2:]) not in ((), (1, 1)):
        return f"up {list(up)} does not give [{weight[0]}, {rank}] (out, rank)"
    linear_like = (weight[1],) if len(weight) == 2 or weight[2:] == (1, 1) else None
    if tuple(down[1:]) != tuple(weight[1:]) and not (
        linear_like and tuple(down[1:]) in (linear_like, (*linear_like, 1, 1))
    ):
        return f"down {list(down)} does not take the input {list(weight[1:])}"
    return None


def read_lora(
    path: str | os.PathLike, configs: Mapping[str, Any], shapes: Mapping[str, Mapping[str, tuple[int, ...]]]
) -> LoRA:
    """Map one LoRA file onto the models of ``configs`` with parameter ``shapes`` (``unet``, ``text_encoder``,
    ``text_encoder_2``; ``pretrained.model_shapes`` gives them without allocating weights)."""
    path = Path(path)
    if not path.is_file():
        raise WeightFileError(f"{path}: LoRA file not found")
    from .photomaker import lora_part  # a PhotoMaker file: its lora_weights

    return map_lora(lora_part(open_weights(path), path), Names.of(configs, shapes), path)


def map_lora(source: L.LazySource, names: Names, path: Path) -> LoRA:
    keys = list(source)
    if not keys:
        raise LoRAError(f"{path}: the file holds no tensors")
    for pattern, what in _UNSUPPORTED:
        hits = [k for k in keys if re.search(pattern, k)]
        if hits:
            raise LoRAError(f"{path}: {what}: " + L.listing("keys", hits))
    groups: dict[tuple[str, str, str], dict[str, str]] = collections.defaultdict(dict)
    unplaced = []
    for key in keys:
        hit = next(((name, p) for name, table in TABLES.items() if (p := table(key, names))), None)
        if hit is None:
            unplaced.append(key)
            continue
        layout, (comp, module, role) = hit
        groups[(layout, comp, module)][role] = key
    problems = []
    if unplaced:
        problems.append(L.listing("keys that fit no layer of the SDXL model", unplaced))
    by_comp: dict[tuple[str, str], dict[str, tuple[int, float | None, dict[str, str]]]] = collections.defaultdict(dict)
    incomplete, bad_shape, twice, family = [], [], [], None
    seen: dict[tuple[str, str], str] = {}
    for (layout, comp, module), roles in groups.items():
        if "down" not in roles or "up" not in roles:
            incomplete.extend(roles.values())
            continue
        weight = names.modules[comp][module]
        down, up = tuple(source.shape(roles["down"])), tuple(source.shape(roles["up"]))
        why = _check_pair(weight, down, up)
        if why:
            bad_shape.append(f"{roles['down']}: {why} of {comp}.{module}.weight {list(weight)}")
            if module.endswith("attn2.to_k") and len(down) == 2 and down[1] != names.context:
                family = family or _CONTEXT_FAMILY.get(down[1], f"a UNet of context {down[1]}")
            continue
        if (comp, module) in seen:
            twice.append(f"{comp}.{module} (from {seen[(comp, module)]} and {roles['down']})")
            continue
        seen[(comp, module)] = roles["down"]
        alpha = None
        if "alpha" in roles:
            a = np.asarray(source[roles["alpha"]], np.float64)
            alpha = float(a.reshape(-1)[0]) if a.size == 1 else None
            if alpha is None:
                bad_shape.append(f"{roles['alpha']}: alpha of shape {list(a.shape)}, not a scalar")
        by_comp[(layout, comp)][module] = (down[0], alpha, roles)
    for title, items in (
        ("LoRA pairs with a missing half", incomplete),
        ("shape mismatches", bad_shape),
        ("layers given twice", twice),
    ):
        if items:
            problems.append(L.listing(title, items))
    if problems:
        hint = f" (made for {family}; this UNet's cross-attention context is {names.context})" if family else ""
        raise LoRAError(f"{path}: the LoRA does not fit the SDXL model{hint}: " + "; ".join(problems))
    meta = _metadata(source, path)
    modules: dict[str, dict[str, Module]] = {c: {} for c in COMPONENTS}
    for (layout, comp), pairs in by_comp.items():
        if layout in _STORES_ALPHA:  # kohya: alpha / rank, a missing or zero alpha meaning rank
            scales = {m: (a or r) / r for m, (r, a, _) in pairs.items()}
        else:
            scales = _peft_scales(comp, {m: (r, a) for m, (r, a, _) in pairs.items()}, meta)
        for m, (rank, _, roles) in pairs.items():
            weight = f"{m}.weight"
            modules[comp][weight] = Module(comp, weight, roles["down"], roles["up"], rank, scales[m])
    return LoRA(path, source, modules, sorted({layout for layout, _ in by_comp}))


# ---- fusing -----------------------------------------------------------------------------------------------------


class FusedWeights(LazyWeights):
    """A component's lazy weights with LoRA deltas added as each tensor is read (float32, then the caller casts)."""

    def __init__(self, base: LazyWeights, deltas: dict[str, list[tuple[LoRA, Module, float]]]):
        self._base, self._deltas = base, deltas
        self.config = getattr(base, "config", {})
        self.ignored = getattr(base, "ignored", [])
        self.tensors = {
            k: LazyTensor(tuple(base.shape(k)), "F32", partial(self._fused, k))
            if k in deltas
            else LazyTensor(tuple(base.shape(k)), base.dtype(k), partial(base.__getitem__, k))
            for k in base
        }

    def _fused(self, key: str) -> np.ndarray:
        w = np.array(self._base[key], np.float32)
        for lora, module, multiplier in self._deltas[key]:
            w += np.float32(multiplier) * lora.delta(module).reshape(w.shape)
        return w


def fuse(weights: Mapping[str, Mapping[str, np.ndarray]], loras: Sequence[tuple[LoRA, float]]) -> dict[str, Mapping]:
    """Each component's weights with the LoRAs (each with its multiplier) fused in, lazily; others unchanged."""
    out: dict[str, Mapping] = dict(weights)
    for comp in COMPONENTS:
        deltas: dict[str, list[tuple[LoRA, Module, float]]] = collections.defaultdict(list)
        for lora, multiplier in loras:
            for key, module in lora.modules.get(comp, {}).items():
                deltas[key].append((lora, module, float(multiplier)))
        if deltas:
            out[comp] = FusedWeights(weights[comp], dict(deltas))
    return out
