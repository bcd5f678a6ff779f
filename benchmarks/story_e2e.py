"""Whole stories, ours (MindSpore graph mode, the library's pipelines) against the originals' algorithms on PyTorch
(torch 2.13.0 CPU, diffusers 0.39.0): wall time and peak memory of a StoryDiffusion story and of a Story-Adapter round.

    python benchmarks/story_e2e.py --config sdxl --write_model_only                  # once: the model folder
    python benchmarks/story_e2e.py --method storydiffusion --config sdxl             # 512 px, 4 id + 4 later panels
    python benchmarks/story_e2e.py --method storyadapter --config sdxl               # 512 px, 10 panels
    python benchmarks/story_e2e.py --method storydiffusion --config tiny --size 128 --steps 2   # checks the script
    python benchmarks/story_e2e.py --method storyadapter --config tiny --size 64 --steps 2

Run it with /work/venv/bin/python (MindSpore; the parent and the MindSpore child); the PyTorch child runs under
``--torch_python`` (default /work/venv-torch/bin/python). Each framework runs in its own child process, one after the
other (two SDXL copies do not fit in 24 GB), PyTorch first. The parent holds no model: it polls the child's RSS (with
its descendants) every 0.5 s and kills it above ``--max_rss_gb`` (default 21) or when the machine's MemAvailable falls
below ``--min_avail_gb``; the table then says "killed at N GB". Peak RSS is the child's ``ru_maxrss``: after loading,
the high-water mark is reset (``/proc/self/clear_refs``), so "peak − loaded" is the run's own peak over the loaded
RSS, and "peak RSS" the larger of the load's and the run's peaks. Both children load the same folder from disk
(diffusers ``from_pretrained(..., torch_dtype=torch.float32)`` per component; ours ``load_sdxl`` and
``load_ip_adapter_models``, fp32 on CPU); load time is reported apart from the story time.

StoryDiffusion (``--method storydiffusion``): one character, ``--ids`` id panels and ``--later`` later panels, DDIM
``--steps``, guidance 5, sa32 = sa64 = ``--sa``, FreeU off on both sides (diffusers' default; ours ``freeu=None``),
style "(No style)" with mindone's negative prompt: the parent makes the prompt strings with the library's
``apply_style`` and the MindSpore child checks they are the ones its pipeline makes. Every panel starts from the
noise ours draws for it (seed (seed, panel)), handed to diffusers as ``latents=``. Ours: the whole
``StoryDiffusionPipeline(load_sdxl(folder), mode="graph")(story, settings)`` call, graph compiles included.
PyTorch: ``StableDiffusionXLPipeline`` with the released app's consistent self-attention processor
(tests/fixtures/make_story_fixtures.py, an independent re-implementation of gradio_app_sdxl_specific_id_low_vram.py)
on every up-block attn1, driven as the app's ``process_generation`` drives it: the globals reset and the seeds set
before each pipe() call, the id panels as one batch in write mode, then each later panel alone in read mode; the
token subsets drawn as the app draws them (``torch.rand(id_length + 1, N) < sa`` at the first layer of step 0 and
after the last layer of every UNet call) and each layer's gate by ``random.random()``, step 0 plain. Reported: the
id (write) phase and the later panels, and per UNet call the median time of a plain step (step 0) against a
consistent one (steps >= 1), per phase kind; ours' first call of each graph (the compile) is left out of those
medians, so ours' write phase has no plain figure. The panels of the two sides are not expected to match (each side
draws its own token subsets and gates); their difference is printed for information only.

Story-Adapter (``--method storyadapter``): one GRCA round of ``--panels`` panels over as many given references (smooth
random colour fields from a seeded numpy rng, as PNG files both sides read), scale ``--scale``, DDIM ``--steps``
(Story-Adapter's DDIM config), guidance 5, the 'comic' wrapper and the original's negative prompt, every panel from
the one initial noise (ours ``pipe.noise(settings)``, given to diffusers as ``latents=``; DDIM's init_noise_sigma is
1). Ours: ``StoryAdapterPipeline(models, ip, mode="graph")``, ``pipe.reference(images, scale)`` once (encoding,
projection and each layer's reference K/V), then ``pipe.panel(...)`` per panel. PyTorch: the SDXL pipeline with the
IP-Adapter loaded (``load_ip_adapter``, IPAdapterAttnProcessor2_0) and, as the original's ``get_image_embeds``, all N
references resized to 256x256, CLIP-processed and encoded as one batch for every panel (N^2 encodings a round), zero
embeddings for the unconditional half (tests/fixtures/make_ip_adapter_fixtures.py). The reference share is ours'
``pipe.reference`` time (its encoder compile included: ``encoder_compile_s`` in the JSON) and PyTorch's
preprocessing + encoder time over the round; PyTorch also re-projects the tokens to K/V at every step, inside its
UNet calls. The parent compares the two sides' panels (uint8 PNG): max and mean absolute difference.

Compile estimate (ours): per network and input signature, its first call minus the median of its later calls
(benchmarks/story_memory.py's ``Timed``). The second call of a graph is also slower than the later ones (first-run
allocations), which the estimate does not count.

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
component; a rerun writes only what is missing. The base model and ViT-H take ~8.3 GB of disk (fp16).
``--presets tiny`` writes the same folder from the tiny preset configs (seconds; for checking the writer), and
``--config tiny`` uses the built-in ``tiny_model_dir()``.

Prints a markdown table (framework rows; MindSpore/PyTorch ratios of time and peak RSS) and writes JSON (``--out``,
default benchmarks/results/story_e2e_<method>_<config>_<size>.json) with the command, source revision, versions,
machine, every UNet call and the images' folder.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import (
    GB,
    ROOT,
    LazyTensor,
    child_env,
    cpu_model,
    memory_pressure,
    rss_bytes,
    source_revision,
    tree_rss_bytes,
    wait_for_memory,
)

MODEL_VERSION = 1  # bump when the presets or the weight recipe change, so folders are rebuilt
BASE = ("unet", "vae", "text_encoder", "text_encoder_2")
# encoder choice -> (folder, its preset, the ip-adapter file made for it)
ENCODERS = {
    "bigg": ("image_encoder", "image_encoder_bigg", "ip-adapter_sdxl.safetensors"),
    "vit_h": ("image_encoder_vit_h", "image_encoder_vit_h", "ip-adapter_sdxl_vit-h.safetensors"),
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
    from mindone_story.weights import SDXL_MODEL_INDEX
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
        index.write_text(
            json.dumps(
                {**SDXL_MODEL_INDEX, "_diffusers_version": "0.39.0", "_story_e2e": MODEL_VERSION, "_presets": presets},
                indent=2,
            )
        )
    return folder


# -- what both sides get ------------------------------------------------------------------------------------------
CHARACTER = "[Hero] a man with a black suit"
SD_STYLE = "(No style)"  # the template "{prompt}": both sides see the story's own text


def story_text(ids: int, later: int) -> str:
    lines = [f"[Hero] stands in scene {k}" for k in range(ids)]
    return "\n".join(lines + [f"[Hero] walks through place {k} #panel {k}" for k in range(later)])


def adapter_prompts(panels: int) -> list[str]:
    return [f"a man with a black suit, scene {k} of the story" for k in range(panels)]


def reference_images(panels: int, size: int, seed: int):
    """The previous round's panels: smooth random colour fields (a seeded numpy rng), as PIL images."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    coarse = [rng.integers(0, 256, (max(size // 32, 2),) * 2 + (3,), dtype=np.uint8) for _ in range(panels)]
    return [Image.fromarray(c).resize((size, size), Image.BICUBIC) for c in coarse]


def spec_of(args, folder: Path, workdir: Path) -> dict:
    """Everything both children need, as JSON: the model files, the settings, the exact prompt strings."""
    from mindone_story.pipelines.story_adapter import DDIM_CONFIG, NEGATIVE_PROMPT
    from mindone_story.pipelines.story_diffusion import DEFAULT_NEGATIVE
    from mindone_story.pretrained import TINY_IP_ADAPTER
    from mindone_story.story.prompts import apply_style, parse_story, styled

    spec = {"method": args.method, "folder": str(folder), "size": args.size, "steps": args.steps, "seed": args.seed}
    spec |= {"guidance": args.guidance, "threads": args.threads, "workdir": str(workdir)}
    if args.method == "storydiffusion":
        story = parse_story(CHARACTER, story_text(args.ids, args.later), args.ids)
        styled_panels = [apply_style(SD_STYLE, p.prompt, DEFAULT_NEGATIVE) for p in story.panels]
        spec |= {
            "ids": args.ids,
            "later": args.later,
            "sa": [args.sa, args.sa],
            "style": SD_STYLE,
            "window": args.window,
        }
        spec |= {"character": CHARACTER, "story": story_text(args.ids, args.later), "negative": DEFAULT_NEGATIVE}
        spec["prompts"] = [p for p, _ in styled_panels]
        spec["negatives"] = [n for _, n in styled_panels]
        spec["id_panels"] = list(story.id_panels["Hero"])
        spec["later_panels"] = list(story.other_indices)
        # every panel's initial noise as ours draws it (SDXLPipeline.initial_noise, seed (seed, panel)); the PyTorch
        # side gets it as latents=, so both start from the same noise (the token draws and gates still differ)
        shape = (1, 4, args.size // 8, args.size // 8)
        noise = [np.random.default_rng([args.seed, i]).standard_normal(shape) for i in range(len(story.panels))]
        np.save(workdir / "noise.npy", np.concatenate(noise).astype(np.float32))
    else:
        encoder, _, adapter = (
            ("image_encoder", None, TINY_IP_ADAPTER) if args.config == "tiny" else ENCODERS[args.image_encoder]
        )
        spec |= {"encoder": str(folder / encoder), "adapter": str(folder / "ip_adapter" / adapter)}
        spec |= {"raw_prompts": adapter_prompts(args.panels), "style": "comic", "scale": args.scale}
        spec |= {"prompts": [styled(p, "comic") for p in spec["raw_prompts"]], "negative": NEGATIVE_PROMPT}
        spec["ddim"] = DDIM_CONFIG
        refs = reference_images(args.panels, args.size, args.seed + 1)
        spec["references"] = []
        for i, image in enumerate(refs):
            image.save(workdir / f"reference_{i:03d}.png")
            spec["references"].append(str(workdir / f"reference_{i:03d}.png"))
        # the one initial noise of the round, as StoryAdapterPipeline.noise draws it (the MindSpore child checks)
        shape = (1, 4, args.size // 8, args.size // 8)
        np.save(workdir / "noise.npy", np.random.default_rng(args.seed).standard_normal(shape).astype(np.float32))
    spec["noise"] = str(workdir / "noise.npy")
    return spec


# -- the children -------------------------------------------------------------------------------------------------
def maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak() -> bool:
    """Reset the kernel's RSS high-water mark (ru_maxrss follows it), so the next reading is the run's own peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def save_images(images, folder: Path) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, image in enumerate(images):
        image.save(folder / f"panel_{i:03d}.png")
        names.append(str(folder / f"panel_{i:03d}.png"))
    return names


def step_summary(calls: list[dict]) -> dict:
    """Median seconds of a plain UNet call (step 0: the originals' consistent attention starts at step 1) and of a
    later one, per phase kind; calls marked ``compile`` (a graph's first call) are left out."""
    out = {}
    for kind in sorted({c["kind"] for c in calls}):
        clean = [c for c in calls if c["kind"] == kind and not c.get("compile")]
        plain = [c["s"] for c in clean if c["step"] == 0]
        later = [c["s"] for c in clean if c["step"] > 0]
        out[kind] = {
            "plain_step_s": statistics.median(plain) if plain else None,
            "consistent_step_s": statistics.median(later) if later else None,
            "calls": len([c for c in calls if c["kind"] == kind]),
        }
    return out


def ms_child(spec: dict) -> dict:
    import mindspore as ms

    from mindone_story.layers import set_device

    set_device("CPU")
    ms.runtime.launch_blocking()  # as examples/story_diffusion/run.py
    from story_memory import Timed

    from mindone_story.pretrained import load_ip_adapter_models, load_sdxl

    report = {"versions": {"mindspore": ms.__version__}, "rss_after_import": rss_bytes()}
    t0 = time.perf_counter()
    models = load_sdxl(spec["folder"])
    if spec["method"] == "storydiffusion":
        from mindone_story.pipelines.story_diffusion import StoryDiffusionPipeline, StoryDiffusionSettings
        from mindone_story.story.prompts import parse_story

        pipe = StoryDiffusionPipeline(models, mode="graph")
    else:
        from PIL import Image

        from mindone_story.pipelines.story_adapter import StoryAdapterPipeline, StoryAdapterSettings

        ip = load_ip_adapter_models(spec["adapter"], spec["encoder"], models.unet.config)
        pipe = StoryAdapterPipeline(models, ip, mode="graph")
    report["load_s"] = time.perf_counter() - t0
    report["rss_loaded"], report["maxrss_load"] = rss_bytes(), maxrss()
    report["peak_reset"] = reset_peak()

    sdxl = pipe.sdxl
    sdxl._unet = unet = Timed(sdxl._unet)
    sdxl._vae_decode = vae = Timed(sdxl._vae_decode)
    sdxl._text = text = [Timed(f) for f in sdxl._text]
    kinds = []  # per UNet call: (phase kind, step)
    size, steps = spec["size"], spec["steps"]
    if spec["method"] == "storydiffusion":
        phases, run = [], pipe._run

        def timed_run(story, settings, indices, write_as, reads, *rest, **kw):
            kind = "write" if write_as is not None else "read"
            before, t = len(unet.calls), time.perf_counter()
            out = run(story, settings, indices, write_as, reads, *rest, **kw)
            phases.append({"kind": kind, "panels": len(indices), "s": time.perf_counter() - t})
            kinds.extend((kind, k) for k in range(len(unet.calls) - before))
            return out

        pipe._run = timed_run
        story = parse_story(spec["character"], spec["story"], spec["ids"])
        settings = StoryDiffusionSettings(
            height=size, width=size, steps=steps, guidance_scale=spec["guidance"], seed=spec["seed"],
            sa32=spec["sa"][0], sa64=spec["sa"][1], style_name=spec["style"], negative_prompt=spec["negative"],
            scheduler="ddim", freeu=None, window=spec["window"],
        )  # fmt: skip
        assert pipe.prompts(story, settings) == (spec["prompts"], spec["negatives"]), "the two sides' prompts differ"
        noise = np.concatenate([sdxl.initial_noise([spec["seed"], i], 1, size, size) for i in range(len(story.panels))])
        assert np.array_equal(noise, np.load(spec["noise"])), "the two sides' initial noise differs"
        t0 = time.perf_counter()
        images = pipe(story, settings)
        report["story_s"] = time.perf_counter() - t0
        report["phases"] = phases
        report["bank_bytes"] = pipe.bank_size(story, settings)
        images = [images[i] for i in range(len(images))]
    else:
        pipe.references._encode = encoder = Timed(pipe.references._encode)
        settings = StoryAdapterSettings(
            prompts=tuple(spec["raw_prompts"]), style=spec["style"], seed=spec["seed"], rounds=1, steps=steps,
            height=size, width=size, guidance_scale=spec["guidance"],
        )  # fmt: skip
        assert settings.model_prompts == spec["prompts"], "the two sides' prompts differ"
        noise = pipe.noise(settings)
        assert np.array_equal(noise, np.load(spec["noise"])), "the two sides' initial noise differs"
        refs = [Image.open(p) for p in spec["references"]]
        t0 = time.perf_counter()
        reference = pipe.reference(refs, spec["scale"])
        report["reference_s"] = time.perf_counter() - t0
        panels, images = [], []
        for prompt in spec["prompts"]:
            t = time.perf_counter()
            images.append(pipe.panel(prompt, noise, settings, reference))
            panels.append(time.perf_counter() - t)
            kinds.extend(("panel", k) for k in range(steps))
        report["round_s"] = time.perf_counter() - t0
        report["panel_s"] = panels
        report["encoder_calls"] = len(encoder.calls)
        report["encoder_s"] = sum(s for _, s in encoder.calls)
        report["encoder_compile_s"] = encoder.compile_seconds()[0]
    seen = set()
    calls = []
    for (sig, s), (kind, step) in zip(unet.calls, kinds):
        calls.append({"kind": kind, "step": step, "s": s, "compile": sig not in seen})
        seen.add(sig)
    report["unet_calls"] = calls
    report["unet_graphs"] = len(seen)
    report["steps"] = step_summary(calls)
    compile_s = unet.compile_seconds()[0] + vae.compile_seconds()[0] + sum(t.compile_seconds()[0] for t in text)
    report["compile_estimate_s"] = compile_s + report.get("encoder_compile_s", 0.0)
    report["vae_s"] = sum(s for _, s in vae.calls)
    report["maxrss_run"] = maxrss()
    report["images"] = save_images(images, Path(spec["workdir"]) / "mindspore")
    return report


def torch_pipeline(folder: str, scheduler):
    """diffusers' SDXL pipeline from the folder's components (the built-in tiny folder has no full model_index)."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    fp32 = {"torch_dtype": torch.float32}
    return StableDiffusionXLPipeline(
        vae=AutoencoderKL.from_pretrained(folder, subfolder="vae", **fp32),
        text_encoder=CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", **fp32),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2", **fp32),
        tokenizer=CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer_2"),
        unet=UNet2DConditionModel.from_pretrained(folder, subfolder="unet", **fp32).eval(),
        scheduler=scheduler,
    )


def torch_child(spec: dict) -> dict:
    import random

    import diffusers
    import torch
    from diffusers import DDIMScheduler

    sys.path.insert(0, str(ROOT / "tests" / "fixtures"))
    import make_story_fixtures as ref  # the re-implementation of the app's processor (it sets torch's globals)

    class AppState(ref.StoryState):
        """The app's random sources in place of the fixture's injected ones: at the first layer of step 0 and after
        the last layer of every UNet call, ``torch.rand(total_length, N) < sa32|sa64`` per level, total_length =
        id_length + 1 (``cal_attn_indice_xl_effcient_memory``); ``random.random()`` for each layer's gate."""

        def __init__(self, total_count, ids, sa, height, width):
            super().__init__(total_count)
            self.height, self.width, self.total_length, self.sa = height, width, ids + 1, sa

        def draw_indices(self):
            for level, tokens in (
                (0, (self.height // 32) * (self.width // 32)),
                (1, (self.height // 16) * (self.width // 16)),
            ):
                mask = torch.rand(self.total_length, tokens) < self.sa[level]
                indices = [torch.nonzero(mask[i], as_tuple=True)[0] for i in range(self.total_length)]
                setattr(self, ("indices32", "indices64")[level], indices)

        def random(self):
            return random.random()

    torch.use_deterministic_algorithms(False)
    torch.set_num_threads(spec["threads"])
    report = {"versions": {"torch": torch.__version__, "diffusers": diffusers.__version__}}
    report["rss_after_import"] = rss_bytes()
    size, steps, folder = spec["size"], spec["steps"], spec["folder"]
    t0 = time.perf_counter()
    if spec["method"] == "storydiffusion":  # the app: DDIMScheduler.from_config(pipe.scheduler.config)
        config = json.loads((Path(folder) / "scheduler" / "scheduler_config.json").read_text())
        pipe = torch_pipeline(folder, DDIMScheduler.from_config(config))
    else:
        from PIL import Image
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        pipe = torch_pipeline(folder, DDIMScheduler(**spec["ddim"]))
        adapter = Path(spec["adapter"])
        pipe.load_ip_adapter(str(adapter.parent), subfolder="", weight_name=adapter.name, image_encoder_folder=None)
        encoder = CLIPVisionModelWithProjection.from_pretrained(spec["encoder"], torch_dtype=torch.float32).eval()
        side = encoder.config.image_size  # CLIPImageProcessor() is 224, SDXL encoders' size
        processor = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    pipe.set_progress_bar_config(disable=True)
    report["load_s"] = time.perf_counter() - t0
    report["rss_loaded"], report["maxrss_load"] = rss_bytes(), maxrss()
    report["peak_reset"] = reset_peak()

    calls, vae_s = [], []
    where = {"kind": "panel"}

    def pre(_module, _args):
        where["t"] = time.perf_counter()
        where["step"] = state.cur_step if spec["method"] == "storydiffusion" else len(calls) % steps

    def post(_module, _args, _out):
        calls.append({"kind": where["kind"], "step": where["step"], "s": time.perf_counter() - where["t"]})

    pipe.unet.register_forward_pre_hook(pre)
    pipe.unet.register_forward_hook(post)
    decode = pipe.vae.decode

    def timed_decode(*a, **kw):
        t = time.perf_counter()
        out = decode(*a, **kw)
        vae_s.append(time.perf_counter() - t)
        return out

    pipe.vae.decode = timed_decode

    def generate(prompts, negatives, **kw):
        return pipe(
            prompts, negative_prompt=negatives, num_inference_steps=steps, guidance_scale=spec["guidance"],
            height=size, width=size, **kw,
        ).images  # fmt: skip

    if spec["method"] == "storydiffusion":
        layers = [n for n in pipe.unet.attn_processors if n.startswith("up_blocks") and n.endswith("attn1.processor")]
        state = AppState(len(layers), spec["ids"], spec["sa"], size, size)
        ref.install(pipe.unet, state)  # the app's set_attention_processor
        prompts, negatives, noise = spec["prompts"], spec["negatives"], np.load(spec["noise"])
        images, phases = {}, []

        def phase(indices, write):
            """One pipe() call as process_generation makes it: globals reset, seeds set, the panels as one batch."""
            state.write, state.cur_character = write, ["Hero"]
            state.cur_step = state.attn_count = 0
            where["kind"] = "write" if write else "read"
            random.seed(spec["seed"])  # the app's setup_seed
            np.random.seed(spec["seed"])
            torch.manual_seed(spec["seed"])
            t = time.perf_counter()
            latents = torch.from_numpy(noise[indices])  # in place of the app's generator: ours' noise
            out = generate([prompts[i] for i in indices], [negatives[i] for i in indices], latents=latents)
            phases.append({"kind": where["kind"], "panels": len(indices), "s": time.perf_counter() - t})
            images.update(zip(indices, out))

        t0 = time.perf_counter()
        with torch.inference_mode():
            phase(spec["id_panels"], True)  # the id panels: one write call
            for i in spec["later_panels"]:  # then each later panel alone, reading the bank
                phase([i], False)
        report["story_s"] = time.perf_counter() - t0
        report["phases"] = phases
        gates = [passed for step, _, _, passed in state.log if step > 0]  # the app: about 70% pass
        report["consistent_share"] = sum(gates) / max(len(gates), 1)
        images = [images[i] for i in range(len(images))]
    else:
        pipe.set_ip_adapter_scale(spec["scale"])
        noise = torch.from_numpy(np.load(spec["noise"]))  # diffusers multiplies by init_noise_sigma (1 for DDIM)
        refs = [Image.open(p) for p in spec["references"]]
        panels, encode_s, images = [], [], []
        t0 = time.perf_counter()
        with torch.inference_mode():
            for prompt in spec["prompts"]:
                t = time.perf_counter()
                # as the original's get_image_embeds, for every panel: all N references, 256x256, CLIP-processed,
                # encoded as one batch; zero embeddings for the unconditional half (the fixture's convention)
                pixels = processor(images=[im.resize((256, 256)) for im in refs], return_tensors="pt").pixel_values
                embeds = encoder(pixels).image_embeds
                encode_s.append(time.perf_counter() - t)
                ip = [torch.stack([torch.zeros_like(embeds), embeds])]
                images += generate(prompt, spec["negative"], ip_adapter_image_embeds=ip, latents=noise.clone())
                panels.append(time.perf_counter() - t)
        report["round_s"] = time.perf_counter() - t0
        report["panel_s"], report["encoder_s"] = panels, sum(encode_s)
        report["encoder_calls"] = len(encode_s) * len(refs)  # images through the encoder
    report["unet_calls"] = calls
    report["steps"] = step_summary(calls)
    report["vae_s"] = sum(vae_s)
    report["maxrss_run"] = maxrss()
    report["images"] = save_images(images, Path(spec["workdir"]) / "torch")
    return report


def child_main(args) -> int:
    spec = json.loads(Path(args.spec).read_text())
    report = (ms_child if args.child == "mindspore" else torch_child)(spec)
    report["rss_end"] = rss_bytes()
    Path(args.result).write_text(json.dumps(report, indent=1))
    return 0


# -- the parent ---------------------------------------------------------------------------------------------------
def run_child(framework: str, args, spec_file: Path, workdir: Path) -> dict:
    """One framework in its own process, watched: killed above --max_rss_gb or when the machine runs short."""
    result, log_path = workdir / f"result_{framework}.json", workdir / f"log_{framework}.txt"
    python = sys.executable if framework == "mindspore" else args.torch_python
    cmd = [python, str(Path(__file__).resolve()), "--child", framework, "--spec", str(spec_file)]
    cmd += ["--result", str(result)]
    env = dict(child_env(), HF_HUB_OFFLINE="1")
    t0, peak, killed = time.time(), 0, None
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        while proc.poll() is None:
            rss = tree_rss_bytes(proc.pid)
            peak = max(peak, rss)
            killed = memory_pressure(rss, int(args.max_rss_gb * GB), int(args.min_avail_gb * GB))
            if killed is None and time.time() - t0 > args.timeout_s:
                killed = f"no result within --timeout_s {args.timeout_s:.0f} s"
            if killed:
                killed = f"killed at {rss / GB:.1f} GB: {killed}"
                os.killpg(proc.pid, signal.SIGKILL)  # the child's own session: only what we started
                break
            time.sleep(0.5)
        proc.wait()
    wall = time.time() - t0
    if killed or proc.returncode or not result.exists():
        tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
        return {"error": killed or f"exit {proc.returncode}: {' | '.join(tail)}", "log": str(log_path)}
    return {**json.loads(result.read_text()), "peak_rss_sampled": peak, "process_s": wall, "log": str(log_path)}


def image_difference(a: list[str], b: list[str]) -> dict:
    from PIL import Image

    diffs = [np.abs(np.asarray(Image.open(x), np.int16) - np.asarray(Image.open(y), np.int16)) for x, y in zip(a, b)]
    return {"max_abs": int(max(d.max() for d in diffs)), "mean_abs": float(np.mean([d.mean() for d in diffs]))}


def summarise(r: dict) -> dict:
    """The reported figures of one child: peak = max(load peak, run peak) (the high-water mark is reset between)."""
    if "error" in r:
        return r
    peak = max(r["maxrss_load"], r["maxrss_run"]) if r["peak_reset"] else r["maxrss_run"]
    run_peak = r["maxrss_run"] if r["peak_reset"] else None
    out = {"load_s": r["load_s"], "peak_rss_gb": peak / GB, "loaded_rss_gb": r["rss_loaded"] / GB}
    out["peak_minus_loaded_gb"] = None if run_peak is None else (run_peak - r["rss_loaded"]) / GB
    if "story_s" in r:
        out["story_s"] = r["story_s"]
        for kind in ("write", "read"):
            out[f"{kind}_s"] = sum(p["s"] for p in r["phases"] if p["kind"] == kind)
    else:
        out["round_s"] = r["round_s"]
        out["panel_s_median"] = statistics.median(r["panel_s"])
        out["reference_s"] = r.get("reference_s", r["encoder_s"])  # ours: pipe.reference(); torch: every encoding
        out["reference_share"] = out["reference_s"] / r["round_s"]
    if "compile_estimate_s" in r:
        out["compile_estimate_s"] = r["compile_estimate_s"]
    out["steps"] = r["steps"]
    return out


def fmt(v, digits=1) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def table(res: dict) -> str:
    rows = res["frameworks"]
    sd = res["method"] == "storydiffusion"
    head = ["framework", "load s", "story s" if sd else "round s"]
    head += ["id (write) s", "later s"] if sd else ["per panel s", "reference encoding s (share)"]
    head += ["UNet call: plain / consistent s" if sd else "UNet call s", "peak RSS GB", "peak − loaded GB"]
    lines = [f"| {' | '.join(head)} |", "|" + "---|" * len(head)]
    for fw in ("torch", "mindspore"):
        r = rows.get(fw)
        if r is None:
            continue
        if "error" in r:
            lines.append(f"| {fw} | {r['error']} |" + " |" * (len(head) - 2))
            continue
        total = r["story_s"] if sd else r["round_s"]
        cells = [
            fw,
            fmt(r["load_s"]),
            fmt(total) + (f" (compile ~{r['compile_estimate_s']:.0f})" if fw != "torch" else ""),
        ]
        if sd:
            cells += [fmt(r["write_s"]), fmt(r["read_s"])]
            cells.append(
                "; ".join(
                    f"{k} {fmt(v['plain_step_s'], 2)} / {fmt(v['consistent_step_s'], 2)}" for k, v in r["steps"].items()
                )
            )
        else:
            cells += [fmt(r["panel_s_median"]), f"{fmt(r['reference_s'])} ({r['reference_share']:.0%})"]
            cells.append(fmt(r["steps"]["panel"]["consistent_step_s"], 2))
        cells += [fmt(r["peak_rss_gb"], 2), fmt(r["peak_minus_loaded_gb"], 2)]
        lines.append(f"| {' | '.join(cells)} |")
    if res.get("ratio"):
        q = res["ratio"]
        lines.append(
            f"\nMindSpore / PyTorch: {'story' if sd else 'round'} time {fmt(q['time'], 2)}x "
            f"({fmt(q['time_without_compile'], 2)}x without the compile estimate), peak RSS {fmt(q['peak_rss'], 2)}x"
        )
    if "image_difference" in res:
        d = res["image_difference"]
        lines.append(f"panels, MindSpore against PyTorch (uint8): max |diff| {d['max_abs']}, mean {d['mean_abs']:.2f}")
        if sd:
            lines[-1] += " (not expected to match: the sides draw token subsets and gates from their own generators)"
    return "\n".join(lines)


def prepare_main(args) -> int:
    """The model folder (written if missing) and the children's spec, in a process of its own: the library (and
    so MindSpore, ~0.4 GB) is imported here, never in the watching parent."""
    if args.config == "sdxl":
        folder = model_folder(args.presets, Path(args.cache_dir))
        t0 = time.perf_counter()
        write_model(folder, args.presets, (args.image_encoder,))
        print(f"model folder {folder} ({time.perf_counter() - t0:.0f} s)", flush=True)
        label = "sdxl" if args.presets == "sdxl" else f"written-{args.presets}"
    else:
        from mindone_story.pretrained import tiny_model_dir

        folder, label = tiny_model_dir(), "tiny"
    if not args.write_model_only:
        spec = {**spec_of(args, folder, Path(args.prepare)), "label": label}
        (Path(args.prepare) / "spec.json").write_text(json.dumps(spec, indent=1))
    return 0


def parent_main(args, argv: list[str]) -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    workdir = Path(tempfile.mkdtemp(prefix="story_e2e_"))
    subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv, "--prepare", str(workdir)], check=True)
    if args.write_model_only:
        workdir.rmdir()
        return 0
    spec_file = workdir / "spec.json"
    spec = json.loads(spec_file.read_text())
    folder, label = spec["folder"], spec["label"]
    frameworks = ["torch", "mindspore"] if args.framework == "both" else [args.framework]
    raw = {}
    for fw in frameworks:  # one after the other: two SDXL copies do not fit in 24 GB
        if not wait_for_memory(args.wait_free_gb, args.timeout_s):
            raise SystemExit(f"MemAvailable stayed below {args.wait_free_gb} GB")
        print(f"{fw}: running ({workdir / f'log_{fw}.txt'})", flush=True)
        raw[fw] = run_child(fw, args, spec_file, workdir)
        done = raw[fw].get("error") or f"done in {raw[fw]['process_s']:.0f} s"
        print(f"  {fw}: {done}", flush=True)
    res = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "source": source_revision(),
        "machine": {"cpu": cpu_model(), "vcpus": os.cpu_count(), "mem_total_gb": round(mem_total_gb(), 1)},
        "method": args.method,
        "config": label,
        "folder": str(folder),
        "size": args.size,
        "spec": {k: v for k, v in spec.items() if k not in ("references",)},
        "frameworks": {fw: summarise(r) for fw, r in raw.items()},
        "raw": raw,
        "workdir": str(workdir),
    }
    res["versions"] = {k: v for r in raw.values() for k, v in r.get("versions", {}).items()}
    ok = {fw: r for fw, r in res["frameworks"].items() if "error" not in r}
    if len(ok) == 2:
        key = "story_s" if args.method == "storydiffusion" else "round_s"
        ms, pt = ok["mindspore"], ok["torch"]
        res["ratio"] = {
            "time": ms[key] / pt[key],
            "time_without_compile": (ms[key] - ms["compile_estimate_s"]) / pt[key],
            "peak_rss": ms["peak_rss_gb"] / pt["peak_rss_gb"],
        }
        res["image_difference"] = image_difference(raw["mindspore"]["images"], raw["torch"]["images"])
    dest = Path(args.out or ROOT / "benchmarks" / "results" / f"story_e2e_{args.method}_{label}_{args.size}.json")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(res, indent=1))
    print(f"\n### {args.method}, {label}, {args.size} px, {args.steps} steps ({res['date']}, {res['source']})\n")
    print(table(res))
    print(f"\nJSON: {dest}\nimages and logs: {workdir}")
    return 0 if len(ok) == len(frameworks) else 1


def mem_total_gb() -> float:
    with open("/proc/meminfo") as f:
        return int(f.readline().split()[1]) * 1024 / GB


# -- command line -------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=("storydiffusion", "storyadapter"), default="storydiffusion")
    p.add_argument("--config", choices=("tiny", "sdxl"), default="tiny", help="tiny: tiny_model_dir(); sdxl: written")
    p.add_argument("--presets", default="sdxl", help="the configs of the written folder (tiny: to check the writer)")
    p.add_argument("--cache_dir", default=str(ROOT / ".cache"), help="where the written folder goes")
    p.add_argument("--image_encoder", choices=tuple(ENCODERS), default="vit_h", help="see the module docstring")
    p.add_argument("--write_model_only", action="store_true", help="write the model folder and stop")
    p.add_argument("--size", type=int, default=512, help="image side in pixels")
    p.add_argument("--steps", type=int, default=3, help="DDIM steps")
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ids", type=int, default=4, help="storydiffusion: id panels")
    p.add_argument("--later", type=int, default=4, help="storydiffusion: later panels")
    p.add_argument("--sa", type=float, default=0.5, help="storydiffusion: sa32 = sa64")
    p.add_argument(
        "--window", type=int, default=None, help="storydiffusion, ours only: id panels per write batch (the app: all)"
    )
    p.add_argument("--panels", type=int, default=10, help="storyadapter: panels (and references)")
    p.add_argument("--scale", type=float, default=0.4, help="storyadapter: the reference weight")
    p.add_argument("--framework", choices=("both", "torch", "mindspore"), default="both")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
    p.add_argument("--torch_python", default="/work/venv-torch/bin/python", help="the PyTorch child's interpreter")
    p.add_argument("--max_rss_gb", type=float, default=21.0, help="watchdog: kill a child whose RSS exceeds this")
    p.add_argument("--min_avail_gb", type=float, default=1.0, help="watchdog: kill a child if MemAvailable drops below")
    p.add_argument("--timeout_s", type=float, default=4 * 3600)
    p.add_argument("--wait_free_gb", type=float, default=0.0, help="before each child, wait for this MemAvailable")
    p.add_argument("--out", default=None, help="JSON result path")
    p.add_argument("--child", choices=("torch", "mindspore"), help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--prepare", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.child:
        return child_main(args)
    return prepare_main(args) if args.prepare else parent_main(args, argv)


if __name__ == "__main__":
    sys.exit(main())
