"""PhotoMaker checkpoints (TencentARC/PhotoMaker ``photomaker-v1.bin``): a dict ``{"id_encoder": ..., "lora_weights":
...}`` saved with torch.save, or the same flattened with ``id_encoder.`` / ``lora_weights.`` prefixes in a
.safetensors file. The safe unpickler flattens the .bin to the same prefixed keys, so one reader serves both.

- ``id_encoder``: PhotoMaker's PhotoMakerIDEncoder, transformers CLIPVisionModelWithProjection names plus
  ``visual_projection_2.weight`` and ``fuse_module.*``; mapped strictly (``keymaps.plan``) onto our
  ``models/photomaker.py`` cell, whose names are the checkpoint's.
- ``lora_weights``: rank-64 LoRA on every UNet attention projection in the older diffusers attention-processor
  layout (``unet.<attention>.processor.to_{q,k,v,out}_lora.{down,up}.weight``); ``lora.read_lora`` reads a
  PhotoMaker file through :func:`lora_part` and fuses it like any LoRA file.

PhotoMaker V2 (``photomaker-v2.bin``) adds a ``qformer_perceiver`` that takes InsightFace face embeddings; we have
no InsightFace (an ONNX face detector and ArcFace model outside MindSpore), so a V2 file is refused by name.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from . import keymaps as L
from . import shapes as S
from .layouts import open_weights
from .safetensors_io import WeightFileError

ID_PREFIX, LORA_PREFIX = "id_encoder.", "lora_weights."
CONFIG_KEY = "mindone_story.photomaker_config"  # safetensors metadata of our tiny files: the tower's config


class PhotoMakerError(L.LayoutError):
    """A PhotoMaker file we cannot use (not PhotoMaker, V2, or keys that do not fit); the message says which."""


class Prefixed(Mapping[str, np.ndarray]):
    """The keys of ``source`` under ``prefix``, without it (lazy, as the source)."""

    def __init__(self, source: L.LazySource, prefix: str):
        self._source, self._prefix = source, prefix
        self._keys = [k[len(prefix) :] for k in source if k.startswith(prefix)]
        self.metadata = getattr(source, "metadata", None)
        self.path = getattr(source, "path", None)

    def __getitem__(self, key: str) -> np.ndarray:
        return self._source[self._prefix + key]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._source.shape(self._prefix + key))

    def dtype(self, key: str) -> str:
        return self._source.dtype(self._prefix + key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self._prefix + key in self._source


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
    return Prefixed(source, LORA_PREFIX)


def photomaker_shapes(config: Any) -> S.Shapes:
    """Our (= the checkpoint's) id-encoder keys and shapes: the CLIP vision tower with projection, then
    ``visual_projection_2`` and the fuse module (two MLPs with LayerNorm, and a LayerNorm)."""
    from ..models.photomaker import PhotoMakerConfig

    cfg = config if isinstance(config, PhotoMakerConfig) else PhotoMakerConfig.from_dict(config)
    v, c = S.as_dict(cfg.vision), cfg.context_dim
    out = S.clip_vision_shapes(v)
    S._linear(out, "visual_projection_2", c - v["projection_dim"], v["hidden_size"], bias=False)
    for name, dim_in in (("mlp1", 2 * c), ("mlp2", c)):
        S._norm(out, f"fuse_module.{name}.layernorm", dim_in)
        S._linear(out, f"fuse_module.{name}.fc1", c, dim_in)
        S._linear(out, f"fuse_module.{name}.fc2", c, c)
    S._norm(out, "fuse_module.layer_norm", c)
    return out


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
    """The id encoder of a PhotoMaker v1 file, strictly mapped (every key once, every shape checked) before any
    tensor is read; ``.config`` is the PhotoMakerConfig (given, from our tiny files' metadata, or ViT-L/14)."""
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
    mapped = L.plan(
        Prefixed(source, ID_PREFIX), lambda k: [(k, "copy")], photomaker_shapes(cfg), f"{path} (id_encoder)"
    )
    mapped.config = cfg
    return mapped
