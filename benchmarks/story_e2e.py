"""Whole stories, ours (MindSpore graph mode, the library's pipelines) against the originals' algorithms on PyTorch.

The model folder (``--config sdxl``) is a diffusers SDXL folder written once under ``.cache/`` from the SDXL preset
configs, with deterministic random weights (``random_weights``: every tensor seeded by its own name, generated and
written one tensor at a time) stored as fp16 safetensors, as RealVisXL is published. The tokenizers are the tiny
presets' (a small vocabulary: every id stays below SDXL's vocabulary size). Beside the base model it holds the CLIP
image encoder chosen by ``--image_encoder`` and an ip-adapter_sdxl made for it:

    image_encoder/          CLIP ViT-bigG (IP-Adapter's sdxl_models/image_encoder, the Story-Adapter runner's default)
    image_encoder_vit_h/    CLIP ViT-H (IP-Adapter's models/image_encoder)
    ip_adapter/ip-adapter_sdxl.safetensors        for bigG (ImageProjModel, 4 tokens, clip_dim 1280)
    ip_adapter/ip-adapter_sdxl_vit-h.safetensors  for ViT-H (clip_dim 1024)

The default is ViT-H: in fp32 (both frameworks on CPU) the base model is 3.47 B parameters, 13.9 GB, and with
ViT-bigG (1.84 B, 7.4 GB) and its adapter (0.35 B, 1.4 GB) the weights alone are 22.7 GB, which does not fit in
24 GB beside a 512 px denoising; with ViT-H (0.63 B, 2.5 GB) they are 17.8 GB. Both adapters are the same
ImageProjModel (4 tokens) and the same per-layer to_k_ip/to_v_ip, so the algorithm measured is the same.

Each component is written to a staging folder and renamed into place, so an interrupted write leaves no half
component; a rerun writes only what is missing. The base model and ViT-H take ~8.3 GB of disk (fp16):

    python benchmarks/story_e2e.py --config sdxl --write_model_only

``--presets tiny`` writes the same folder from the tiny preset configs (seconds; for checking this script).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import ROOT, LazyTensor

MODEL_VERSION = 1  # bump when the presets or the weight recipe change, so folders are rebuilt
BASE = ("unet", "vae", "text_encoder", "text_encoder_2")
# encoder choice -> (folder, its preset, the ip-adapter file made for it)
ENCODERS = {
    "bigg": ("image_encoder", "image_encoder_bigg", "ip-adapter_sdxl.safetensors"),
    "vit_h": ("image_encoder_vit_h", "image_encoder_vit_h", "ip-adapter_sdxl_vit-h.safetensors"),
}
DIFFUSERS_INDEX = {
    "_class_name": "StableDiffusionXLPipeline",
    "_diffusers_version": "0.39.0",
    "force_zeros_for_empty_prompt": True,
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
}


# -- the model folder ---------------------------------------------------------------------------------------------
def model_folder(presets: str, cache_dir: Path) -> Path:
    return cache_dir / f"story-e2e-{presets}-v{MODEL_VERSION}"


def _preset_config(presets: str, component: str) -> dict:
    from mindone_story.config import preset_dir

    if component.startswith("image_encoder") and presets == "tiny":
        return json.loads((preset_dir("tiny") / "image_encoder" / "config.json").read_text())
    if component.startswith("image_encoder"):
        return json.loads((preset_dir(component) / "config.json").read_text())
    name = "scheduler_config.json" if component == "scheduler" else "config.json"
    return json.loads((preset_dir(presets) / component / name).read_text())


def _fp16_random(shapes: dict[str, tuple[int, ...]], seed_text: str) -> dict[str, LazyTensor]:
    """The weights as lazy fp16 tensors: each generated (``random_weights``, seeded by its name) as it is written."""
    from mindone_story.pretrained import random_weights

    def make(key):
        return random_weights({key: shapes[key]}, seed_text)[key].astype(np.float16)

    return {k: LazyTensor(tuple(s), "F16", functools.partial(make, k)) for k, s in shapes.items()}


def _write_component(target: Path, write) -> None:
    """``write(staging)`` fills a staging folder, which then becomes ``target`` (atomic; skipped if present)."""
    if target.exists():
        return
    t0 = time.perf_counter()
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        write(staging)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"  wrote {target.name} in {time.perf_counter() - t0:.0f} s", flush=True)


def write_model(folder: Path, presets: str, encoders=tuple(ENCODERS)) -> Path:
    """The diffusers folder of the module docstring, with the image encoders ``encoders``; idempotent."""
    from mindone_story.config import preset_dir
    from mindone_story.models.load import parameter_shapes
    from mindone_story.pretrained import build_component, build_ip_adapter
    from mindone_story.weights.safetensors_io import save_safetensors

    seed = f"story-e2e-v{MODEL_VERSION}"
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer", "tokenizer_2"):
        _write_component(
            folder / name, lambda d, name=name: shutil.copytree(preset_dir("tiny") / name, d, dirs_exist_ok=True)
        )
    scheduler = _preset_config(presets, "scheduler")
    _write_component(folder / "scheduler", lambda d: (d / "scheduler_config.json").write_text(json.dumps(scheduler)))

    def model(name, config, d):
        (d / "config.json").write_text(json.dumps(config, indent=2))
        shapes = parameter_shapes(build_component(name.removesuffix("_vit_h"), config))
        filename = "diffusion_pytorch_model.safetensors" if name in ("unet", "vae") else "model.safetensors"
        save_safetensors(_fp16_random(shapes, f"{seed}:{name}"), d / filename)

    for name in BASE:
        _write_component(folder / name, functools.partial(model, name, _preset_config(presets, name)))
    unet = _preset_config(presets, "unet")
    for choice in encoders:
        encoder_dir, encoder_preset, adapter = ENCODERS[choice]
        encoder = _preset_config(presets, encoder_preset)
        _write_component(folder / encoder_dir, functools.partial(model, encoder_dir, encoder))
        target = folder / "ip_adapter" / adapter
        if not target.exists():
            target.parent.mkdir(exist_ok=True)
            info = {"kind": "image_proj_model", "num_tokens": 4, "clip_dim": encoder["projection_dim"]}
            info["cross_attention_dim"] = unet["cross_attention_dim"]
            shapes = parameter_shapes(build_ip_adapter(info, unet))
            save_safetensors(_fp16_random(shapes, f"{seed}:ip_adapter_{choice}"), target)  # atomic itself
    index = folder / "model_index.json"
    if not index.exists():
        index.write_text(json.dumps({**DIFFUSERS_INDEX, "_story_e2e": MODEL_VERSION, "_presets": presets}, indent=2))
    return folder


# -- command line -------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=("tiny", "sdxl"), default="tiny", help="tiny: tiny_model_dir(); sdxl: written")
    p.add_argument("--presets", default="sdxl", help="the configs of the written folder (tiny: to check the writer)")
    p.add_argument("--cache_dir", default=str(ROOT / ".cache"), help="where the written folder goes")
    p.add_argument("--image_encoder", choices=tuple(ENCODERS), default="vit_h", help="see the module docstring")
    p.add_argument("--write_model_only", action="store_true", help="write the model folder and stop")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.config == "sdxl":
        folder = model_folder(args.presets, Path(args.cache_dir))
        t0 = time.perf_counter()
        write_model(folder, args.presets, (args.image_encoder,))
        print(f"model folder {folder} ({time.perf_counter() - t0:.0f} s)", flush=True)
    if args.write_model_only:
        return 0
    raise SystemExit("the story runs come next")


if __name__ == "__main__":
    sys.exit(main())
