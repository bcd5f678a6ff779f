"""Building our models from checkpoints: a diffusers folder, a single file, or the built-in tiny model.

The built-in tiny model is a real diffusers-format folder (tiny configs, a small tokenizer, deterministic random
weights in the real key layouts) written on first use under the cache directory, so every run on it goes through
exactly the loading code that real checkpoints use, with no network.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mindspore as ms
import numpy as np
from mindspore.nn.utils import no_init_parameters

from .config import CLIPTextConfig, CLIPVisionConfig, UNetConfig, VAEConfig, default_cache_dir, preset_dir
from .layers import compute_dtype
from .models.clip import CLIPTextModel, CLIPVisionModelWithProjection
from .models.ip_adapter import IPAdapter, attn2_layers
from .models.load import check_state, load_state, parameter_shapes
from .models.photomaker import PhotoMakerConfig, PhotoMakerIDEncoder
from .models.unet import UNet
from .models.vae import AutoencoderKL
from .weights.layouts import SDXL_COMPONENTS, load_config

TINY_VERSION = 2  # bump when the tiny presets or the weight recipe change, so caches are rebuilt


@dataclass
class SDXLModels:
    unet: UNet
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    text_encoder_2: CLIPTextModel
    tokenizer: Any
    tokenizer_2: Any
    scheduler_config: dict[str, Any]
    fingerprint: str
    ignored: dict[str, list[str]] = field(default_factory=dict)
    loras: list[dict[str, Any]] = field(default_factory=list)  # path, scale, fingerprint, layouts of each LoRA


# -- building and loading -----------------------------------------------------------------------------------------
def build_component(name: str, config: dict[str, Any]):
    """A model for a component, from its config dict, with no parameter memory: its parameters get their data when
    a checkpoint is loaded (``load_state``, which is strict, so none is left without). Without
    ``no_init_parameters`` MindSpore fills every initializer at once; the zeros came from untouched pages when the
    process was young, but later, from a heap with freed pages, building the 2.6 B-parameter UNet made gigabytes
    resident."""
    with no_init_parameters():
        return _build(name, config)


def _build(name: str, config: dict[str, Any]):
    if name == "unet":
        return UNet(UNetConfig.from_dict(config))
    if name == "vae":
        return AutoencoderKL(VAEConfig.from_dict(config))
    if name in ("text_encoder", "text_encoder_2"):
        return CLIPTextModel(CLIPTextConfig.from_dict(config))
    if name == "image_encoder":
        return CLIPVisionModelWithProjection(CLIPVisionConfig.from_dict(config))
    if name == "photomaker":  # PhotoMaker's id encoder: {"vision": CLIP vision config, "context_dim": ...}
        return PhotoMakerIDEncoder(PhotoMakerConfig.from_dict(config))
    raise ValueError(f"unknown component {name!r}")


def model_shapes(configs: Mapping[str, Any], names: Sequence[str] | None = None) -> dict[str, dict]:
    """Each component's parameter names and shapes, from its model built without parameter memory: the one
    description a checkpoint, a LoRA or a conversion is checked against."""
    return {n: parameter_shapes(build_component(n, configs[n])) for n in names or configs}


def load_component(
    name: str, config: dict[str, Any], state: Mapping[str, np.ndarray], source: str, dtype: ms.Type | None = None
):
    model = build_component(name, config)
    ignored = load_state(model, state, source, dtype)
    model.set_train(False)
    return model, ignored


def check_sdxl(checkpoint, source: str = "") -> tuple[dict[str, Any], dict[str, list[str]]]:
    """Build the four models of a read checkpoint (no parameter memory) and run the one strict check on each,
    before any tensor is read. Returns the models and each one's ignored source keys."""
    models, ignored = {}, {}
    for name in SDXL_COMPONENTS:
        models[name] = build_component(name, checkpoint.configs[name])
        ignored[name] = check_state(models[name], checkpoint[name], f"{source or checkpoint.path} ({name})")
    return models, ignored


def _tokenizer(folder: Path):
    from transformers import CLIPTokenizer  # plain-Python tokenizer; imported here to keep start-up light

    if not (folder / "vocab.json").exists():
        raise FileNotFoundError(f"tokenizer files missing: expected vocab.json and merges.txt in {folder}")
    return CLIPTokenizer.from_pretrained(str(folder))


def load_sdxl(
    path: str | os.PathLike, dtype: ms.Type | None = None, loras: Sequence[tuple[str | os.PathLike, float]] = ()
) -> SDXLModels:
    """Load SDXL from a diffusers folder (unet/, vae/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/,
    scheduler/) or a single checkpoint file (tokenizers from ``tokenizer``/``tokenizer_2`` folders beside it).
    The UNet and text encoders take ``dtype`` (default: the device's, fp16 on Ascend and fp32 on CPU); the VAE stays
    fp32 (the SDXL VAE overflows in fp16).

    ``loras``: (file, multiplier) pairs, fused into the weights as they load (weights/lora.py). Every file is
    mapped and checked before any weight is read; the fingerprint covers the LoRA files and their multipliers."""
    from .weights import read_sdxl
    from .weights.lora import fuse, read_lora

    dtype = compute_dtype(dtype)
    # One pass: find the files and read their headers, map the keys (read_sdxl); build the models and check each
    # once (check_sdxl); map the LoRAs onto the same models; then read tensor by tensor into the parameters.
    checkpoint = read_sdxl(path)
    models, ignored = check_sdxl(checkpoint, str(path))
    shapes = {name: parameter_shapes(model) for name, model in models.items()}
    fused = [(read_lora(file, checkpoint.configs, shapes), float(scale)) for file, scale in loras]
    weights = fuse(checkpoint, fused)
    for name, model in models.items():
        load_state(model, weights[name], f"{path} ({name})", ms.float32 if name == "vae" else dtype, checked=True)
        model.set_train(False)
    records = [
        {"path": str(lora.path), "scale": scale, "fingerprint": lora.fingerprint, "layouts": lora.layouts}
        for lora, scale in fused
    ]
    fingerprint = checkpoint.fingerprint
    if records:  # a base model with LoRAs is another model
        identity = json.dumps([fingerprint] + [[r["fingerprint"], r["scale"]] for r in records])
        fingerprint = hashlib.sha256(identity.encode()).hexdigest()[:16]
    root = Path(checkpoint.tokenizer_root)
    if not (root / "tokenizer" / "vocab.json").exists() and not Path(path).is_dir():
        root = Path(path).parent
    if not (root / "tokenizer" / "vocab.json").exists():
        # single files carry no tokenizer: use CLIP's, built from the vocabulary the project ships
        from .tokenizers import sdxl_tokenizer_root

        root = sdxl_tokenizer_root(default_cache_dir())
    return SDXLModels(
        tokenizer=_tokenizer(root / "tokenizer"),
        tokenizer_2=_tokenizer(root / "tokenizer_2"),
        scheduler_config=checkpoint.configs["scheduler"],
        fingerprint=fingerprint,
        ignored=ignored,
        loras=records,
        **models,
    )


# -- IP-Adapter and its image encoder ----------------------------------------------------------------------------
@dataclass
class IPAdapterModels:
    image_encoder: CLIPVisionModelWithProjection
    ip_adapter: IPAdapter
    fingerprint: str  # of both files, as SDXLModels.fingerprint


def build_ip_adapter(info: Mapping[str, Any], unet: Any) -> IPAdapter:
    """An IPAdapter of projection ``info`` for ``unet`` (a UNet, or its config: then built without parameter memory
    to find its attn2 layers), itself without parameter memory."""
    if not isinstance(unet, UNet):
        unet = build_component("unet", load_config(unet))
    with no_init_parameters():
        return IPAdapter(info, attn2_layers(unet))


def load_ip_adapter(
    path: str | os.PathLike, unet: Any, image_encoder_config: Any = None, dtype: ms.Type | None = None
) -> IPAdapter:
    """An IP-Adapter file (.bin or .safetensors), checked against the UNet (a UNet, or its config: then built
    without parameter memory to find its attn2 layers) and, if given, the image encoder's config before any weight
    is read. ``dtype``: as :func:`load_sdxl`."""
    from .weights import read_ip_adapter

    dtype = compute_dtype(dtype)
    if not Path(path).exists():
        raise FileNotFoundError(f"IP-Adapter not found: {path}")
    weights = read_ip_adapter(path, unet.config if isinstance(unet, UNet) else unet, image_encoder_config)
    model = build_ip_adapter(weights.config, unet)
    load_state(model, weights, f"{path} (IP-Adapter)", dtype)
    model.set_train(False)
    model.files = weights.files  # for fingerprints
    return model


def load_ip_adapter_models(
    ip_ckpt: str | os.PathLike, image_encoder_path: str | os.PathLike, unet_config: Any, dtype: ms.Type | None = None
) -> IPAdapterModels:
    """An IP-Adapter and its CLIP image encoder (a transformers folder or file), checked against each other and
    against the UNet (``unet_config``: the UNet or its config): a ViT-H encoder with a bigG adapter, or an SD1.5
    adapter, is a LayoutError that says so. ``dtype``: as :func:`load_sdxl`, for both."""
    from .weights import read_image_encoder
    from .weights.layouts import files_fingerprint

    dtype = compute_dtype(dtype)
    if not Path(image_encoder_path).exists():
        raise FileNotFoundError(f"image encoder not found: {image_encoder_path}")
    encoder_weights = read_image_encoder(image_encoder_path)
    ip_adapter = load_ip_adapter(ip_ckpt, unet_config, encoder_weights.config, dtype)
    encoder, _ = load_component(
        "image_encoder", encoder_weights.config, encoder_weights, f"{image_encoder_path} (image encoder)", dtype
    )
    fingerprint = files_fingerprint(encoder_weights.files + ip_adapter.files)  # the same cheap hash as the base
    return IPAdapterModels(encoder, ip_adapter, fingerprint)


# -- the built-in tiny model --------------------------------------------------------------------------------------
def random_weights(shapes: Mapping[str, tuple[int, ...]], seed_text: str) -> dict[str, np.ndarray]:
    """Deterministic random weights: each tensor seeded by its own name, scaled like a trained network
    (fan-in for matrices and kernels, ones/zeros for norms, 0.02 for embeddings)."""
    out = {}
    for key, shape in shapes.items():
        seed = int.from_bytes(hashlib.sha256(f"{seed_text}:{key}".encode()).digest()[:8], "little")
        rng = np.random.default_rng(seed)
        if key.endswith("bias"):
            value = 0.02 * rng.standard_normal(shape)
        elif len(shape) == 1:  # norm scales and the CLIP class embedding
            value = 1.0 + 0.02 * rng.standard_normal(shape)
        elif "embedding" in key and len(shape) == 2:
            value = 0.02 * rng.standard_normal(shape)
        else:
            value = rng.standard_normal(shape) / np.sqrt(int(np.prod(shape[1:])))
        out[key] = value.astype(np.float32)
    return out


TINY_IP_ADAPTER = "ip-adapter_sdxl.safetensors"


def tiny_ip_adapter_weights(folder: Path, plus: bool = False) -> dict[str, np.ndarray]:
    """An ip-adapter_sdxl for the tiny UNet and image encoder of ``folder``, under IP-Adapter's own keys (which are
    the IPAdapter cell's): ImageProjModel with 4 tokens or, with ``plus``, a one-layer Resampler of 4 queries and
    one 64-wide head (as ip-adapter-plus)."""
    unet = json.loads((folder / "unet" / "config.json").read_text())
    encoder = json.loads((folder / "image_encoder" / "config.json").read_text())
    info = {"kind": "image_proj_model", "num_tokens": 4, "clip_dim": encoder["projection_dim"]}
    if plus:
        info = {"kind": "resampler", "dim": 32, "depth": 1, "inner_dim": 64, "num_queries": 4, "ff_mult": 2}
        info["embedding_dim"] = encoder["hidden_size"]
    model = build_ip_adapter({**info, "cross_attention_dim": unet["cross_attention_dim"]}, unet)
    return random_weights(parameter_shapes(model), f"tiny-v{TINY_VERSION}:ip_adapter" + ("_plus" if plus else ""))


def tiny_model_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The built-in tiny SDXL as a diffusers folder, with a tiny image encoder (``image_encoder/``) and a tiny
    ip-adapter_sdxl (``ip_adapter/ip-adapter_sdxl.safetensors``), written atomically on first use."""
    from .weights.safetensors_io import save_safetensors

    target = Path(cache_dir or default_cache_dir()) / f"tiny-sdxl-v{TINY_VERSION}"
    if (target / "model_index.json").exists():
        return target
    presets = preset_dir("tiny")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=target.parent))
    try:
        for name in ("unet", "vae", "text_encoder", "text_encoder_2", "image_encoder"):
            (staging / name).mkdir()
            shutil.copy(presets / name / "config.json", staging / name / "config.json")
            config = json.loads((presets / name / "config.json").read_text())
            weights = random_weights(parameter_shapes(build_component(name, config)), f"tiny-v{TINY_VERSION}:{name}")
            filename = "diffusion_pytorch_model.safetensors" if name in ("unet", "vae") else "model.safetensors"
            save_safetensors(weights, staging / name / filename)
        for name in ("tokenizer", "tokenizer_2", "scheduler"):
            shutil.copytree(presets / name, staging / name)
        (staging / "ip_adapter").mkdir()
        save_safetensors(tiny_ip_adapter_weights(staging), staging / "ip_adapter" / TINY_IP_ADAPTER)
        index = {"_class_name": "StableDiffusionXLPipeline", "_mindone_story_tiny": TINY_VERSION}
        (staging / "model_index.json").write_text(json.dumps(index, indent=2))
        try:
            os.replace(staging, target)
        except OSError:  # another process finished first
            if not (target / "model_index.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
