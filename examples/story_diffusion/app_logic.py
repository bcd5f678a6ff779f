"""What the Gradio demo does, without Gradio: form values to a story and settings, a small cache of loaded
pipelines, runs into fresh output folders, and zips. ``app.py`` holds only the page; these functions are tested
through it and can be called directly.

Bad input raises ``ValueError`` or ``FileNotFoundError`` with a message meant for the user; the app shows it as a
``gr.Error``. Runs write the same output folders as the CLIs: ``run.py``'s panels, pages and story.json for
StoryDiffusion, ``run_story_adapter.py``'s rounds and story.json for Story-Adapter.
"""

from __future__ import annotations

import gc
import os
import shutil
import threading
import time
import uuid
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from run import build_story, dtype_of  # the StoryDiffusion CLI beside this file

from mindone_story.models_registry import MODELS, resolve_model
from mindone_story.pipelines.story_diffusion import DEFAULT_NEGATIVE, StorySettings
from mindone_story.story.comic import LAYOUTS
from mindone_story.story.output import Progress
from mindone_story.story.prompts import STYLE_NAMES, Story

MODEL_NAMES = list(MODELS)  # "tiny" included


# -- form values ---------------------------------------------------------------------------------------------------
def as_int(name: str, value: Any, low: int | None = None) -> int:
    """A whole number from a form field (Gradio's Number gives floats); ``low`` is the smallest allowed."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a whole number, got {value!r}") from None
    if not number.is_integer():
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    if low is not None and number < low:
        raise ValueError(f"{name} must be at least {low}, got {int(number)}")
    return int(number)


def as_float(name: str, value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None


def check_size(height: int, width: int) -> None:
    if height % 32 or width % 32:
        raise ValueError(f"height and width must be multiples of 32, got {height}x{width}")


def choose_model(name: str | None, path: str | None, cache_dir: str | os.PathLike) -> str:
    """The checkpoint to load: a local path if one is typed, else the named model's folder, or "tiny"."""
    path = (path or "").strip()
    if not path and not name:
        raise ValueError(f"choose a model ({', '.join(MODEL_NAMES)}) or type a local path")
    return str(resolve_model(name, path or None, cache_dir))


def story_diffusion_settings(
    style: str,
    id_length: Any,
    sa32: Any,
    sa64: Any,
    steps: Any,
    guidance: Any,
    height: Any,
    width: Any,
    seed: Any,
    typesetting: str,
    font_size: Any,
    negative_prompt: str = DEFAULT_NEGATIVE,
    freeu: str | None = None,
) -> tuple[StorySettings, int, str, int]:
    """(settings, id_length, typesetting, font size) from the StoryDiffusion tab, checked."""
    if style not in STYLE_NAMES:
        raise ValueError(f"unknown style {style!r}; choose one of {', '.join(STYLE_NAMES)}")
    if typesetting not in LAYOUTS:
        raise ValueError(f"unknown typesetting {typesetting!r}; choose one of {', '.join(LAYOUTS)}")
    height, width = as_int("height", height, 32), as_int("width", width, 32)
    check_size(height, width)
    settings = StorySettings(
        height=height,
        width=width,
        steps=as_int("steps", steps, 1),
        guidance_scale=as_float("guidance", guidance),
        seed=as_int("seed", seed, 0),
        sa32=as_float("sa32", sa32),
        sa64=as_float("sa64", sa64),
        style_name=style,
        negative_prompt=negative_prompt,
        **({} if freeu is None else {"freeu": freeu}),  # 'off' or s1,s2,b1,b2; checked by StorySettings
    )
    settings.check()
    return settings, as_int("id_length", id_length, 1), typesetting, as_int("caption font size", font_size, 1)


def parse_form_story(characters: str, story_text: str, id_length: int, folder: Path) -> Story:
    """The story as the CLI reads it: ``story.txt`` is written into the run's folder and parsed by run.py's
    ``build_story`` (a character box of ``[Name] description`` lines, or one plain description of the hero)."""
    if not (characters or "").strip():
        raise ValueError("the character box is empty: write one '[Name] description' line per character")
    if not (story_text or "").strip():
        raise ValueError("the story is empty: write one panel per line")
    path = folder / "story.txt"
    path.write_text(story_text, encoding="utf-8")
    return build_story(characters, str(path), id_length)


# -- models ----------------------------------------------------------------------------------------------------------
class ModelCache:
    """Loaded pipelines by key (method, model files, mode), least recently used first out. Each pipeline owns its
    models: StoryDiffusion and Story-Adapter install different attention processors into the UNet."""

    def __init__(self, size: int = 2):
        self.size, self._items, self._lock = max(1, size), OrderedDict(), threading.Lock()
        self.loads = 0  # how many pipelines were built: the tests check that a second request builds none

    def get(self, key: tuple, build: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            while len(self._items) >= self.size:
                self._items.popitem(last=False)
                gc.collect()
            value = self._items[key] = build()
            self.loads += 1
            return value


def model_dir(model: str) -> Path:
    from mindone_story.pretrained import tiny_model_dir

    return tiny_model_dir() if model == "tiny" else Path(model)


def story_diffusion_pipeline(cache: ModelCache, model: str, dtype: str | None, mode: str):
    def build():
        from mindone_story.pipelines.story_diffusion import StoryDiffusionPipeline
        from mindone_story.pretrained import load_sdxl

        return StoryDiffusionPipeline(load_sdxl(model_dir(model), dtype_of(dtype)), mode=mode)

    return cache.get(("StoryDiffusion", model, dtype, mode), build)


# -- runs ------------------------------------------------------------------------------------------------------------
def remove_folder(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)


def new_output_dir(root: str | os.PathLike, method: str) -> Path:
    folder = Path(root) / f"{method}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    folder.mkdir(parents=True)
    return folder


def zip_folder(folder: Path) -> Path:
    """``<folder>.zip`` beside the folder, its files under the folder's name (story.json, panels, pages, rounds)."""
    target = folder.with_name(folder.name + ".zip")
    tmp = target.with_name(f".{target.name}.tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and not path.name.startswith("."):
                zf.write(path, Path(folder.name) / path.relative_to(folder))
    os.replace(tmp, target)
    return target


# -- Story-Adapter ---------------------------------------------------------------------------------------------------
def story_adapter_settings(
    story_text: str, style: str, rounds: Any, steps: Any, height: Any, width: Any, seed: Any, guidance: Any
):
    """Story-Adapter's settings from its tab: one panel prompt per non-blank line."""
    from mindone_story.pipelines.story_adapter import StorySettings as AdapterSettings

    prompts = [line.strip() for line in (story_text or "").splitlines() if line.strip()]
    if not prompts:
        raise ValueError("the story is empty: write one panel prompt per line")
    height, width = as_int("height", height, 32), as_int("width", width, 32)
    check_size(height, width)
    return AdapterSettings(
        prompts=tuple(prompts),
        style=style,
        seed=as_int("seed", seed, 0),
        rounds=as_int("rounds", rounds, 0),
        steps=as_int("steps", steps, 1),
        height=height,
        width=width,
        guidance_scale=as_float("guidance", guidance),
    )


def adapter_files(model: str, image_encoder: str | None, ip_ckpt: str | None) -> dict[str, str]:
    """The three paths Story-Adapter loads; the tiny model brings its own image encoder and IP-Adapter."""
    image_encoder, ip_ckpt = (image_encoder or "").strip(), (ip_ckpt or "").strip()
    if model == "tiny":
        from mindone_story.pretrained import TINY_IP_ADAPTER, tiny_model_dir

        root = tiny_model_dir()
        image_encoder = image_encoder or str(root / "image_encoder")
        ip_ckpt = ip_ckpt or str(root / "ip_adapter" / TINY_IP_ADAPTER)
    missing = [label for label, value in (("image encoder", image_encoder), ("IP-Adapter file", ip_ckpt)) if not value]
    if missing:
        raise ValueError(f"Story-Adapter on {model} needs the path of its {' and '.join(missing)}")
    for label, value in (("image encoder", image_encoder), ("IP-Adapter file", ip_ckpt)):
        if not Path(value).exists():
            raise FileNotFoundError(f"{label} not found: {value}")
    return {"base_model_path": model, "image_encoder_path": image_encoder, "ip_ckpt": ip_ckpt}


def story_adapter_pipeline(cache: ModelCache, files: dict[str, str], dtype: str | None, mode: str):
    def build():
        from mindone_story.pipelines.story_adapter import StoryAdapterPipeline
        from mindone_story.pretrained import load_ip_adapter_models, load_sdxl

        models = load_sdxl(model_dir(files["base_model_path"]), dtype_of(dtype))
        ip = load_ip_adapter_models(files["ip_ckpt"], files["image_encoder_path"], models.unet.config, dtype_of(dtype))
        return StoryAdapterPipeline(models, ip, mode=mode)

    return cache.get(("Story-Adapter", *files.values(), dtype, mode), build)


class _Reporting:
    """The Story-Adapter pipeline as generate_story sees it, reporting each panel it makes."""

    def __init__(self, pipe, on_panel: Callable[[], None]):
        self._pipe, self._on_panel = pipe, on_panel

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def panel(self, *args, **kwargs):
        image = self._pipe.panel(*args, **kwargs)
        self._on_panel()
        return image


def run_story_adapter(
    pipe, settings, files: dict[str, str], out: Path, progress: Progress | None = None
) -> list[list[Path]]:
    """Every round of the story into ``out`` (run_story_adapter.py's folder); returns the panel files by round."""
    from mindone_story.pipelines.story_adapter import generate_story, panel_path

    n, total, made = len(settings.prompts), len(settings.prompts) * (settings.rounds + 1), [0]

    def on_panel():
        made[0] += 1
        if progress:
            r, i = divmod(made[0] - 1, n)
            progress(made[0], total, f"round {r}/{settings.rounds}, panel {i + 1}/{n}")

    if progress:
        progress(0, total, f"round 0/{settings.rounds}")
    generate_story(_Reporting(pipe, on_panel), settings, out, models=files, progress=False)
    return [[out / panel_path(r, i) for i in range(n)] for r in range(settings.rounds + 1)]
