"""PhotoMaker checkpoints (TencentARC/PhotoMaker ``photomaker-v1.bin``): a dict ``{"id_encoder": ..., "lora_weights":
...}`` saved with torch.save, or the same flattened with ``id_encoder.`` / ``lora_weights.`` prefixes in a
.safetensors file. The safe unpickler flattens the .bin to the same prefixed keys, so one reader serves both.

- ``id_encoder``: PhotoMaker's PhotoMakerIDEncoder, transformers CLIPVisionModelWithProjection names plus
  ``visual_projection_2.weight`` and ``fuse_module.*``: the names of our ``models/photomaker.py`` cell, so the
  part is only unprefixed (``part``) and checked strictly against that cell's own shapes (``keymaps.check``).
- ``lora_weights``: rank-64 LoRA on every UNet attention projection in the older diffusers attention-processor
  layout (``unet.<attention>.processor.to_{q,k,v,out}_lora.{down,up}.weight``); ``lora.read_lora`` reads a
  PhotoMaker file through :func:`lora_part` and fuses it like any LoRA file.

PhotoMaker V2 (``photomaker-v2.bin``) adds a ``qformer_perceiver`` that takes InsightFace face embeddings; we have
no InsightFace (an ONNX face detector and ArcFace model outside MindSpore), so a V2 file is refused by name.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from . import keymaps as L
from .layouts import open_weights
from .safetensors_io import WeightFileError

ID_PREFIX, LORA_PREFIX = "id_encoder.", "lora_weights."
CONFIG_KEY = "mindone_story.photomaker_config"  # safetensors metadata of our tiny files: the tower's config


class PhotoMakerError(L.LayoutError):
    """A PhotoMaker file we cannot use (not PhotoMaker, V2, or keys that do not fit); the message says which."""


def _own(key: str) -> list[tuple[str, L.Op]]:
    return [(key, "copy")]  # under its prefix, a part's names are ours


def part(source: L.LazySource, prefix: str, name: str) -> L.MappedWeights:
    """The keys of ``source`` under ``prefix``, named without it: a key map like any other (nothing is read)."""
    out = L.map_keys(source, _own, name, [k for k in source if k.startswith(prefix)], prefix)
    out.metadata = getattr(source, "metadata", None)  # (a LoRA's scales may be in it)
    return out


def is_photomaker(source: L.LazySource) -> bool:
    return any(k.startswith(ID_PREFIX) for k in source)


def check_parts(source: L.LazySource, path: Path) -> None:
    """A PhotoMaker v1 file holds exactly the two parts; V2 is refused with the reason."""
    keys = list(source)
    if any(k.startswith(f"{ID_PREFIX}qformer_perceiver.") for k in keys):
        raise PhotoMakerError(
            f"{path}: a PhotoMaker V2 file (its id encoder takes InsightFace face embeddings, which need the "
            "InsightFace detector and ArcFace models); only PhotoMaker v1 (photomaker-v1.bin) is supported"
        )
    other = [k for k in keys if not k.startswith((ID_PREFIX, LORA_PREFIX))]
    if other or not any(k.startswith(LORA_PREFIX) for k in keys) or not is_photomaker(source):
        raise PhotoMakerError(
            f"{path}: not a PhotoMaker v1 checkpoint (it holds id_encoder and lora_weights, nothing else); "
            + L.listing("other keys", other or sorted({k.split(".")[0] for k in keys}))
        )


def lora_part(source: L.LazySource, path: Path) -> L.LazySource:
    """The LoRA of a PhotoMaker file (checked to be v1), or ``source`` itself when it is no PhotoMaker file."""
    if not is_photomaker(source):
        return source
    check_parts(source, path)
    return part(source, LORA_PREFIX, f"{path} (lora_weights)")


def _config(source: L.LazySource, path: Path, config: Any) -> Any:
    from ..models.photomaker import PhotoMakerConfig

    if config is not None:
        return config if isinstance(config, PhotoMakerConfig) else PhotoMakerConfig.from_dict(config)
    raw = (getattr(source, "metadata", None) or {}).get(CONFIG_KEY)
    if raw:
        try:
            return PhotoMakerConfig.from_dict(json.loads(raw))
        except (ValueError, KeyError, TypeError) as e:
            raise PhotoMakerError(f"{path}: unreadable {CONFIG_KEY} metadata ({e})") from None
    return PhotoMakerConfig.sdxl()  # what PhotoMaker itself hard-codes


def read_photomaker(path: str | os.PathLike, config: Any = None) -> L.MappedWeights:
    """The id encoder of a PhotoMaker v1 file under our names, from the headers alone; ``.config`` is the
    PhotoMakerConfig (given, from our tiny files' metadata, or ViT-L/14). The strict check is the loader's, against
    the model built from that config (``pipelines.photomaker.load_photomaker``)."""
    path = Path(path)
    if not path.is_file():
        raise WeightFileError(f"{path}: PhotoMaker file not found")
    source = open_weights(path)
    check_parts(source, path)
    cfg = _config(source, path, config)
    patch = f"{ID_PREFIX}vision_model.embeddings.patch_embedding.weight"
    width = source.shape(patch)[0] if patch in source else None
    if width != cfg.vision.hidden_size:  # a tower of another size: say so in one line, before the key listing
        raise PhotoMakerError(
            f"{path}: the id encoder's vision tower is {width} wide where the config (ViT-L/14 for PhotoMaker v1, "
            f"or our tiny file's metadata) has {cfg.vision.hidden_size}"
        )
    weights = part(source, ID_PREFIX, f"{path} (id_encoder)")
    weights.config = cfg
    return weights
