"""Public entry points: find a checkpoint's files, read their headers and map the keys onto our names, lazily.

This module detects the layout and the model family from the keys and applies the layout's key map (one per layout,
in ``keymaps.py``: sgm UNet, ldm VAE, OpenCLIP text, diffusers, HF CLIP). Our names and shapes are the models' own
(``models.load.parameter_shapes`` of a model built without parameter memory), so the check against them,
``keymaps.check``, runs once where the model is at hand (``pretrained.load_sdxl``, the converter), before any
tensor is read.

- ``read_sdxl(path, configs=None, variant=None) -> SDXLCheckpoint``, a Mapping component -> ``MappedWeights`` over
  ``unet``, ``vae``, ``text_encoder``, ``text_encoder_2``, with ``.configs`` (those four and ``scheduler``),
  ``.tokenizer_root`` and ``.fingerprint``. ``path`` is an sgm single file (``.safetensors`` or a torch zip
  ``.ckpt/.bin``) or a diffusers folder (``unet/diffusion_pytorch_model[.fp16].safetensors``, possibly sharded, or
  ``.bin``; ``text_encoder*/model[.fp16].safetensors``). ``configs`` maps a component to its config (dict,
  dataclass or path); the defaults are a folder's own ``config.json`` files, else ``presets/sdxl``.
- ``read_ip_adapter(path, unet_config=None, image_encoder_config=None) -> MappedWeights`` under the file's own keys
  (``image_proj.*``, ``ip_adapter.<i>.to_{k,v}_ip.weight``, which are the IPAdapter cell's names); ``.config``
  describes the projection. The UNet's context width and a given image encoder config are checked against it.
- ``read_image_encoder(path, config=None) -> MappedWeights`` (CLIPVisionModelWithProjection; file or folder).
- ``open_weights(path)`` opens one file lazily (safetensors, a shard index, or a torch zip via the safe unpickler).

Errors: ``LayoutError`` for a wrong family (SD1.x, SD2.x, SDXL refiner, Flux, SD3, LoRA), a missing component or
an IP-Adapter / image encoder mismatch (and, from ``check``, missing / unexpected / mis-shaped keys);
``WeightFileError`` for a missing, truncated or corrupt file; ``UnsafePickleError`` for a pickle that asks for a
forbidden global. Every read is lazy: shapes come from headers and a tensor is read when it is accessed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from ..config import PRESETS
from . import keymaps as L
from .keymaps import LayoutError, MappedWeights
from .safetensors_io import SafetensorsFile, ShardedSafetensors, WeightFileError
from .torch_bin import TorchBinFile, UnsafePickleError

__all__ = [
    "LayoutError",
    "MappedWeights",
    "SDXLCheckpoint",
    "SDXL_MODEL_INDEX",
    "UnsafePickleError",
    "WeightFileError",
    "open_weights",
    "preset_configs",
    "read_image_encoder",
    "read_ip_adapter",
    "read_sdxl",
]

SDXL_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
# model_index.json of an SDXL pipeline folder, for folders we write (diffusers reads it; we read the components)
SDXL_MODEL_INDEX = {
    "_class_name": "StableDiffusionXLPipeline",
    "force_zeros_for_empty_prompt": True,
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
_SGM_PREFIX = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text_encoder": "conditioner.embedders.0.transformer.",
    "text_encoder_2": "conditioner.embedders.1.model.",
}
_WEIGHT_NAMES = {
    "diffusers": ("diffusion_pytorch_model", "diffusion_pytorch_model.bin"),
    "transformers": ("model", "pytorch_model.bin"),
}


def open_weights(path: str | os.PathLike) -> SafetensorsFile | ShardedSafetensors | TorchBinFile:
    """One weight file, by its content: a zip is a torch checkpoint, ``*.index[.variant].json`` a shard index, else
    safetensors."""
    path = Path(path)
    if not path.is_file():
        raise WeightFileError(f"{path}: file not found")
    if re.search(r"\.index(\.\w+)?\.json$", path.name):  # model.safetensors.index.json, ….index.fp16.json
        return ShardedSafetensors(path)
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic == b"PK" or path.suffix in (".bin", ".pt", ".pth", ".ckpt"):
        return TorchBinFile(path)
    return SafetensorsFile(path)


def load_config(config: Any) -> dict[str, Any]:
    if isinstance(config, (str, os.PathLike)):
        return json.loads(Path(config).read_text())
    return L.as_dict(config)


def preset_configs(name: str = "sdxl") -> dict[str, dict[str, Any]]:
    return {c: load_config(PRESETS / name / c / "config.json") for c in SDXL_COMPONENTS}


# ---- family detection -------------------------------------------------------------------------------------------

# (regex searched in each key, what the file is): checked before anything else so the error names the family.
_NOT_SDXL = [
    (r"^(model\.diffusion_model\.)?(double_blocks|single_blocks)\.", "a Flux transformer"),
    (r"^(model\.diffusion_model\.)?joint_blocks\.", "a Stable Diffusion 3 MMDiT"),
    (r"^cond_stage_model\.transformer\.", "a Stable Diffusion 1.x checkpoint (CLIP ViT-L only, context 768)"),
    (r"^cond_stage_model\.model\.", "a Stable Diffusion 2.x checkpoint (OpenCLIP ViT-H, context 1024)"),
    (r"(^lora_(unet|te)|\.lora(_down|_up|_A|_B)?\.)", "a LoRA, not a full model"),
]
_CONTEXT_FAMILY = {768: "Stable Diffusion 1.x", 1024: "Stable Diffusion 2.x", 1280: "the SDXL refiner"}


def detect_single_file(keys: list[str], source: L.LazySource, path: Path) -> None:
    """Raise a clear LayoutError unless ``keys`` are an sgm SDXL base single file with all four components."""
    for pattern, what in _NOT_SDXL:
        if any(re.search(pattern, k) for k in keys):
            raise L.LayoutError(f"{path}: this is {what}; an SDXL base model is needed")
    probe = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    if probe in keys:  # SD1/2 have attention at the first level; SDXL does not
        ctx = source.shape(probe)[-1]
        raise L.LayoutError(f"{path}: this is {_CONTEXT_FAMILY.get(ctx, 'an unknown')} UNet (context {ctx}), not SDXL")
    if "conditioner.embedders.0.model.positional_embedding" in keys:
        raise L.LayoutError(f"{path}: this is the SDXL refiner (OpenCLIP only); an SDXL base model is needed")
    if not any(k.startswith("model.diffusion_model.") for k in keys):
        if "conv_in.weight" in keys and any(k.startswith("down_blocks.") for k in keys):
            raise L.LayoutError(f"{path}: a lone diffusers UNet file; pass the whole diffusers folder instead")
        raise L.LayoutError(f"{path}: unknown layout (first keys: {', '.join(sorted(keys)[:5])})")
    for comp, prefix in _SGM_PREFIX.items():
        if not any(k.startswith(prefix) for k in keys):
            raise L.LayoutError(f"{path}: missing component {comp}: no {prefix}* keys (a UNet-only or pruned file?)")


def _sgm_key_fn(component: str, cfg: dict[str, Any]) -> L.KeyFn:
    if component == "unet":
        return L.sgm_unet_key_fn(cfg)
    if component == "vae":
        return L.sgm_vae_key_fn(cfg)
    return L.hf_clip_key if component == "text_encoder" else L.openclip_text_key


def map_single_file(source: L.LazySource, configs: dict[str, dict[str, Any]], path: Path) -> dict[str, L.MappedWeights]:
    """Detect and map an sgm single file given as any lazy source (a file, or shapes alone in tests)."""
    keys = list(source)
    detect_single_file(keys, source, path)
    out, claimed = {}, set()
    for comp, prefix in _SGM_PREFIX.items():
        ks = [k for k in keys if k.startswith(prefix)]
        claimed.update(ks)
        out[comp] = L.map_keys(source, _sgm_key_fn(comp, configs[comp]), comp, ks, prefix)
        out[comp].config = configs[comp]
    rest = [k for k in keys if k not in claimed]
    extras = [(k, L.known_extra(k)) for k in rest if L.known_extra(k)]
    unknown = [k for k in rest if not L.known_extra(k)]
    if unknown:
        raise L.LayoutError(f"{path}: " + L.listing("unexpected keys outside the four components", unknown))
    out["unet"].ignored += extras  # file-level extras (denoiser.sigmas) are reported with the UNet
    return out


# ---- diffusers folders ------------------------------------------------------------------------------------------


def weight_names(kind: str, variants: tuple[str | None, ...] = (None, "fp16")) -> list[str]:
    """The weight file names of one diffusers / transformers component folder, in order of preference: per variant
    one safetensors file or a shard index, in the spelling both libraries write (``model.fp16.safetensors``,
    ``model.safetensors.index.fp16.json``), then torch ``.bin`` when full precision is among the variants."""
    stem, bin_name = _WEIGHT_NAMES[kind]
    names = []
    for v in variants:
        names += [f"{stem}.{v}.safetensors", f"{stem}.safetensors.index.{v}.json"] if v else [f"{stem}.safetensors"]
        names += [] if v else [f"{stem}.safetensors.index.json"]
    return names + ([bin_name, f"{bin_name}.index.json"] if None in variants else [])


def find_weights(folder: Path, kind: str, variant: str | None = None) -> Path:
    """The weight file of one diffusers / transformers component folder, preferring full precision safetensors."""
    names = weight_names(kind, (variant,) if variant else (None, "fp16"))
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise L.LayoutError(f"{folder}: missing weights: none of {', '.join(names)}")


def check_folder_family(path: Path) -> None:
    """Name the family of a diffusers folder that is not SDXL base (from model_index.json and the UNet config)."""
    index = path / "model_index.json"
    cls = load_config(index).get("_class_name", "") if index.is_file() else ""
    if (path / "transformer").is_dir() or re.search(r"Flux|StableDiffusion3|PixArt|Sana", cls):
        raise L.LayoutError(f"{path}: a transformer-based pipeline ({cls or 'transformer/'}), not SDXL base")
    if re.fullmatch(r"StableDiffusion(Img2Img|Inpaint)?Pipeline", cls):
        raise L.LayoutError(f"{path}: a Stable Diffusion 1.x/2.x folder ({cls}), not SDXL")
    unet_cfg = path / "unet" / "config.json"
    if unet_cfg.is_file():
        cfg = load_config(unet_cfg)
        ctx = cfg.get("cross_attention_dim")
        if cfg.get("addition_embed_type") != "text_time" or ctx in _CONTEXT_FAMILY:
            raise L.LayoutError(f"{path}: {_CONTEXT_FAMILY.get(ctx, 'a non-SDXL')} UNet (context {ctx}), not SDXL")


def _read_folder(path: Path, configs: dict[str, Any], variant: str | None) -> dict[str, L.MappedWeights]:
    check_folder_family(path)
    out = {}
    for comp in SDXL_COMPONENTS:
        folder = path / comp
        if not folder.is_dir():
            raise L.LayoutError(f"{path}: missing component {comp}: no {comp}/ folder")
        if comp in configs:
            cfg = configs[comp]
        elif (folder / "config.json").is_file():
            cfg = load_config(folder / "config.json")
        else:
            cfg = preset_configs()[comp]
        source = open_weights(find_weights(folder, "diffusers" if comp in ("unet", "vae") else "transformers", variant))
        key_fn = L.diffusers_key if comp in ("unet", "vae") else L.hf_clip_key
        out[comp] = L.map_keys(source, key_fn, comp)
        out[comp].config = cfg
    return out


class SDXLCheckpoint(Mapping[str, L.MappedWeights]):
    """component -> MappedWeights, plus the configs used, where tokenizers live and a cheap content fingerprint."""

    def __init__(
        self,
        weights: dict[str, L.MappedWeights],
        configs: dict[str, dict[str, Any]],
        files: list[Path],
        tokenizer_root: Path,
        layout: str = "",
        path: Path | None = None,
    ):
        self.weights, self.configs, self.files, self.tokenizer_root = weights, configs, files, tokenizer_root
        self.layout, self.path = layout, path  # "diffusers folder" or "sgm single file"; what was read
        self._fingerprint: str | None = None

    def __getitem__(self, component: str) -> L.MappedWeights:
        return self.weights[component]

    def __iter__(self) -> Iterator[str]:
        return iter(self.weights)

    def __len__(self) -> int:
        return len(self.weights)

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = files_fingerprint(self.files)
        return self._fingerprint


def files_fingerprint(files: list[Path]) -> str:
    """sha256 over each file's name, size, first 64 KB (the header) and 16 sampled 4 KB blocks: cheap (no full read
    of gigabytes), and it changes when the weights do."""
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(65536))
            for i in range(16):
                fh.seek(size * (2 * i + 1) // 32)
                h.update(fh.read(4096))
    return h.hexdigest()[:16]


def read_sdxl(
    path: str | os.PathLike, configs: Mapping[str, Any] | None = None, variant: str | None = None
) -> SDXLCheckpoint:
    """An SDXL base model (sgm single file or diffusers folder) as lazy, checked weights per component."""
    path = Path(path)
    if not path.exists():
        raise WeightFileError(f"{path}: file not found")
    given = {k: load_config(v) for k, v in (configs or {}).items()}
    if path.is_dir():
        weights = _read_folder(path, given, variant)
        sched = path / "scheduler" / "scheduler_config.json"
        root = path
    else:
        cfgs = {**preset_configs(), **given}
        weights = map_single_file(open_weights(path), cfgs, path)
        sched, root = PRESETS / "sdxl" / "scheduler" / "scheduler_config.json", PRESETS / "sdxl"
    all_configs = {c: w.config for c, w in weights.items()}
    all_configs["scheduler"] = given.get("scheduler") or load_config(
        sched if sched.is_file() else PRESETS / "sdxl" / "scheduler" / "scheduler_config.json"
    )
    files = sorted({f for w in weights.values() for f in w.files})
    layout = "diffusers folder" if path.is_dir() else "sgm single file"
    return SDXLCheckpoint(weights, all_configs, files, root, layout, path)


# ---- image encoder and IP-Adapter -------------------------------------------------------------------------------

_ENCODER_BY_WIDTH = {1664: "image_encoder_bigg", 1280: "image_encoder_vit_h"}


def read_image_encoder(path: str | os.PathLike, config: Any = None) -> L.MappedWeights:
    """A CLIPVisionModelWithProjection (IP-Adapter's image encoder). Without a config: the folder's config.json, or
    the preset chosen by the width of the patch embedding (1664 ViT-bigG/14, 1280 ViT-H/14)."""
    path = Path(path)
    if path.is_dir():
        if config is None and (path / "config.json").is_file():
            config = path / "config.json"
        path = find_weights(path, "transformers")
    source = open_weights(path)
    keys = list(source)
    patch = "vision_model.embeddings.patch_embedding.weight"
    if patch not in keys:
        raise L.LayoutError(f"{path}: not a CLIP vision model (no {patch})")
    if config is None:
        width = source.shape(patch)[0]
        if width not in _ENCODER_BY_WIDTH:
            raise L.LayoutError(f"{path}: image encoder of width {width}; pass its config.json")
        config = PRESETS / _ENCODER_BY_WIDTH[width] / "config.json"
    cfg = load_config(config)
    # A full CLIPModel file also holds the text tower; the image encoder does not use it.
    text = [k for k in keys if k.startswith(("text_model.", "text_projection."))]
    mapped = L.map_keys(source, L.hf_clip_key, "image_encoder", [k for k in keys if k not in text])
    mapped.ignored += [(k, "text tower of a full CLIPModel; unused") for k in text]
    mapped.config = cfg
    return mapped


def describe_image_proj(source: L.LazySource, keys: list[str], path: Path) -> dict[str, Any]:
    """Which projection an IP-Adapter file holds, read from its shapes (no weights read)."""
    if "image_proj.proj.weight" in keys and "image_proj.norm.weight" in keys:  # ImageProjModel
        (rows, clip_dim), (ctx,) = source.shape("image_proj.proj.weight"), source.shape("image_proj.norm.weight")
        return {"kind": "image_proj_model", "num_tokens": rows // ctx, "clip_dim": clip_dim, "cross_attention_dim": ctx}
    if "image_proj.latents" in keys:  # Resampler (IP-Adapter-Plus)
        _, nq, dim = source.shape("image_proj.latents")
        depth = len({k.split(".")[2] for k in keys if k.startswith("image_proj.layers.")})
        return {
            "kind": "resampler",
            "dim": dim,
            "depth": depth,
            "inner_dim": source.shape("image_proj.layers.0.0.to_q.weight")[0],
            "num_queries": nq,
            "embedding_dim": source.shape("image_proj.proj_in.weight")[1],
            "ff_mult": source.shape("image_proj.layers.0.1.1.weight")[0] // dim,
            "cross_attention_dim": source.shape("image_proj.proj_out.weight")[0],
        }
    raise L.LayoutError(f"{path}: unsupported IP-Adapter image projection (keys: {sorted(keys)[:5]})")


def check_image_encoder(info: Mapping[str, Any], encoder: Mapping[str, Any], path: Path) -> None:
    """ImageProjModel takes the encoder's projected embedding; the Resampler takes its hidden states."""
    if info["kind"] == "image_proj_model":
        need, got, what = info["clip_dim"], encoder["projection_dim"], "projection_dim"
    else:
        need, got, what = info["embedding_dim"], encoder["hidden_size"], "hidden_size"
    if need != got:
        names = {1280: "ViT-bigG/14 projection or ViT-H/14 hidden size", 1024: "ViT-H/14 projection"}
        raise L.LayoutError(
            f"{path}: this IP-Adapter needs image features of width {need} ({names.get(need, 'unknown encoder')}) "
            f"but the image encoder's {what} is {got}: use the image encoder the adapter was trained with"
        )


def read_ip_adapter(
    path: str | os.PathLike, unet_config: Any = None, image_encoder_config: Any = None
) -> MappedWeights:
    """An IP-Adapter (.bin nested dicts or flat .safetensors: the same keys) under its own keys, which are ours."""
    path = Path(path)
    if path.is_dir():
        path = next((p for p in (path / "model.safetensors", path / "ip_adapter.safetensors") if p.is_file()), path)
    return map_ip_adapter(open_weights(path), unet_config, image_encoder_config, path)


def map_ip_adapter(source: L.LazySource, unet_config: Any, image_encoder_config: Any, path: Path) -> MappedWeights:
    """Map an IP-Adapter given as any lazy source (see read_ip_adapter)."""
    keys = list(source)
    if not any(k.startswith("image_proj.") for k in keys):
        raise L.LayoutError(f"{path}: not an IP-Adapter (no image_proj.* keys)")
    ucfg = load_config(unet_config if unet_config is not None else PRESETS / "sdxl" / "unet" / "config.json")
    info = describe_image_proj(source, keys, path)
    if info["cross_attention_dim"] != ucfg["cross_attention_dim"]:
        ctx = info["cross_attention_dim"]
        raise L.LayoutError(
            f"{path}: an IP-Adapter for {_CONTEXT_FAMILY.get(ctx, 'another UNet')} (context {ctx}); "
            f"the UNet has cross_attention_dim {ucfg['cross_attention_dim']}"
        )
    if image_encoder_config is not None:
        check_image_encoder(info, load_config(image_encoder_config), path)
    out = L.map_keys(source, L.ip_adapter_key, "ip_adapter")
    out.config = info
    return out
