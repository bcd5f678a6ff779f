"""``sd_model_name`` -> the checkpoint to load: a named model's hub repository, any ``owner/name`` hub reference, or
the built-in tiny model. A plain copy of the repository under the cache directory (``SG161222/RealVisXL_V4.0`` or
``RealVisXL_V4.0``) is used as it is; otherwise the files come from the Hugging Face cache layout under it, and are
downloaded there when missing (see ``hub.py``)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from . import hub

MODELS = {
    "Juggernaut": "RunDiffusion/Juggernaut-XL-v8",
    "RealVision": "SG161222/RealVisXL_V4.0",
    "SDXL": "stabilityai/stable-diffusion-xl-base-1.0",
    "Unstable": "stablediffusionapi/sdxl-unstable-diffusers-y",
    "tiny": "built-in",
}


def resolve_model(
    sd_model_name: str | None,
    model_path: str | None,
    cache_dir: str | os.PathLike,
    revision: str | None = None,
    local_files_only: bool = False,
    fp16: bool = False,
    progress: Callable[[str], None] | None = None,
) -> Path | str:
    """The checkpoint to load: ``model_path`` if given (a local path or a hub reference), else the named model
    (a name of ``MODELS`` or an ``owner/name`` reference), downloaded if needed; or "tiny"."""
    options = dict(revision=revision, local_files_only=local_files_only, fp16=fp16, progress=progress)
    if model_path:
        return hub.resolve(model_path, cache_dir, **options)
    if sd_model_name == "tiny":
        return "tiny"
    repo = MODELS.get(sd_model_name or "") or (sd_model_name if hub.parse_reference(sd_model_name or "") else None)
    if repo is None:
        raise ValueError(f"unknown model {sd_model_name!r}: choose one of {sorted(MODELS)} or a hub id owner/name")
    cache_dir = Path(cache_dir)
    for folder in (cache_dir / repo, cache_dir / repo.split("/")[1]):  # a plain copy (git clone, --local-dir)
        if folder.is_dir() and not revision and not hub.missing_files(folder):
            return folder
    return hub.resolve(repo, cache_dir, **options)
