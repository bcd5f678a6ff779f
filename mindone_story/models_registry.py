"""``--sd_model_name`` -> where the weights are. Nothing is downloaded: a named model is looked up under the cache
directory, in a folder named like its public repository (``SG161222/RealVisXL_V4.0``, ``RealVisXL_V4.0``) or in the
Hugging Face cache layout (``models--SG161222--RealVisXL_V4.0/snapshots/<revision>``)."""

from __future__ import annotations

import os
from pathlib import Path

MODELS = {
    "Juggernaut": "RunDiffusion/Juggernaut-XL-v8",
    "RealVision": "SG161222/RealVisXL_V4.0",
    "SDXL": "stabilityai/stable-diffusion-xl-base-1.0",
    "Unstable": "stablediffusionapi/sdxl-unstable-diffusers-y",
    "tiny": "built-in",
}
_REQUIRED = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")


def candidates(repo: str, cache_dir: Path) -> list[Path]:
    owner, name = repo.split("/")
    found = [cache_dir / owner / name, cache_dir / name]
    snapshots = cache_dir / f"models--{owner}--{name}" / "snapshots"
    if snapshots.is_dir():
        found += sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
    return found


def resolve_model(sd_model_name: str | None, model_path: str | None, cache_dir: str | os.PathLike) -> Path | str:
    """The checkpoint to load: ``model_path`` if given, else the named model's folder, or "tiny"."""
    if model_path:
        path = Path(model_path)
        if not path.exists():
            raise FileNotFoundError(f"--model_path {path} does not exist")
        return path
    if sd_model_name not in MODELS:
        raise ValueError(f"unknown model {sd_model_name!r}; choose one of {sorted(MODELS)} or pass --model_path")
    if sd_model_name == "tiny":
        return "tiny"
    repo, cache_dir = MODELS[sd_model_name], Path(cache_dir)
    for folder in candidates(repo, cache_dir):
        if all((folder / part).is_dir() for part in _REQUIRED):
            return folder
    tried = "\n  ".join(str(p) for p in candidates(repo, cache_dir))
    raise FileNotFoundError(
        f"model {sd_model_name!r} ({repo}) was not found under --cache_dir {cache_dir}; nothing is downloaded at run "
        f"time. Put the diffusers folder of {repo} (with {', '.join(_REQUIRED)} and scheduler/) at one of:\n  {tried}\n"
        f"for example with `huggingface-cli download {repo} --local-dir {cache_dir / repo}` on a machine with "
        "network access, or pass --model_path to a diffusers folder or a single .safetensors file."
    )
