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

from frontend import check_loras, dtype_of, lora_arg  # the demo reads --dtype and LoRAs as the CLIs do

from mindone_story import checks
from mindone_story.errors import StoryError
from mindone_story.models_registry import MODELS, resolve_model
from mindone_story.pipelines.story_diffusion import DEFAULT_NEGATIVE, StoryDiffusionSettings
from mindone_story.runs.story_diffusion import PageLayout, Progress
from mindone_story.story.prompts import Story, story_from_text

MODEL_NAMES = list(MODELS)  # "tiny" included


# -- form values: the library's own checks, so a rule is written once -------------------------------------------
def choose_model(name: str | None, path: str | None, cache_dir: str | os.PathLike) -> str:
    """The checkpoint to load: a local path if one is typed, else the named model's folder, or "tiny"."""
    path = (path or "").strip()
    if not path and not name:
        raise StoryError(f"choose a model ({', '.join(MODEL_NAMES)}) or type a local path")
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
) -> tuple[StoryDiffusionSettings, int, PageLayout]:
    """(settings, id_length, page layout) from the StoryDiffusion tab, checked."""
    settings = StoryDiffusionSettings(
        height=checks.whole("height", height),
        width=checks.whole("width", width),
        steps=checks.whole("steps", steps),
        guidance_scale=guidance,
        seed=checks.whole("seed", seed),
        sa32=sa32,
        sa64=sa64,
        style_name=style,
        negative_prompt=negative_prompt,
        **({} if freeu is None else {"freeu": freeu}),  # 'off' or s1,s2,b1,b2; checked by StoryDiffusionSettings
    )
    layout = PageLayout(typesetting, checks.whole("caption font size", font_size, 1))
    return settings, checks.whole("id_length", id_length, 1), layout


def parse_form_story(characters: str, story_text: str, id_length: int) -> Story:
    """The story as the CLI reads it: a character box of ``[Name] description`` lines (or one plain description of
    the hero) and one panel per line."""
    if not (characters or "").strip():
        raise StoryError("the character box is empty: write one '[Name] description' line per character")
    if not (story_text or "").strip():
        raise StoryError("the story is empty: write one panel per line")
    return story_from_text(characters, story_text, id_length)


def story_with_kept(files: list | None, characters: str, story_text: str, id_length: int, settings):
    """(story, replay, recipes): with kept character files (``character_*.json``, saved beside every demo run),
    their id panels open the story and replay exactly; the character box may add more characters."""
    from mindone_story.runs import characters as kept

    paths = [getattr(f, "name", f) for f in files or []]  # Gradio gives paths (or tempfile wrappers)
    if not paths:
        return parse_form_story(characters, story_text, id_length), None, []
    recipes = [kept.read_character(path) for path in paths]
    for recipe in recipes:
        kept.check_settings(recipe, settings)
    box = characters if "[" in (characters or "") else ""  # a plain description: the files' characters only
    story, replay = kept.story_with_characters(recipes, box, story_text or "", id_length)
    return story, replay, recipes


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


def loras_of(text: str | None) -> tuple[tuple[str, float], ...]:
    """The LoRA field: one PATH[:SCALE] per line (as --lora), each file checked to exist, each scale a number."""
    specs = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return tuple(check_loras([lora_arg(spec) for spec in specs]))


def story_diffusion_pipeline(cache: ModelCache, model: str, loras: tuple, dtype: str | None, mode: str):
    """A StoryDiffusion pipeline with ``loras`` fused (a model of its own in the cache: LoRAs change the weights)."""

    def build():
        from mindone_story.pipelines.story_diffusion import StoryDiffusionPipeline
        from mindone_story.pretrained import load_sdxl

        return StoryDiffusionPipeline(load_sdxl(model_dir(model), dtype_of(dtype), list(loras)), mode=mode)

    return cache.get(("StoryDiffusion", model, loras, dtype, mode), build)


# -- reference photos (PhotoMaker v1) --------------------------------------------------------------------------------
REF_MODES = ("Only Using Textual Description", "Using Ref Images")  # the original app's switch


def ref_photos(ref_mode: str, files: list | None, story: Story, ratio: Any):
    """The uploaded photos as RefPhotos, or None in text-only mode. As the original app: one photo per character
    whose description has the trigger word, in character-box order (several per character: the CLI and the API)."""
    from mindone_story.pipelines.photomaker import TRIGGER, RefPhotos

    checks.one_of("reference mode", ref_mode, REF_MODES)
    if ref_mode == REF_MODES[0]:
        return None
    files = [str(getattr(f, "name", f)) for f in files or [] if f]
    names = [c.name for c in story.characters if TRIGGER in c.description]
    if not names:
        raise StoryError(
            f"Using Ref Images: write the trigger word after a class word, e.g. '[Bob] a man {TRIGGER}, ...'"
        )
    if len(files) != len(names):
        listed = ", ".join(f"[{n}]" for n in names)
        raise StoryError(f"Using Ref Images: upload one photo for each of {listed}, in that order; got {len(files)}")
    return RefPhotos.from_paths({n: [f] for n, f in zip(names, files)}, checks.number("style strength", ratio))


def photomaker_file(model: str, cache_dir: str | os.PathLike) -> str:
    """The PhotoMaker v1 file for ``model``: the tiny model's own, else photomaker-v1.bin from the hub (cached)."""
    from mindone_story.hub import HubError, resolve
    from mindone_story.pipelines.photomaker import PHOTOMAKER_V1, tiny_photomaker_file

    if model == "tiny":
        return str(tiny_photomaker_file())
    try:
        return str(resolve(PHOTOMAKER_V1, cache_dir))
    except HubError as e:
        raise StoryError(f"Using Ref Images: {e}") from None


def photomaker_pipeline(cache: ModelCache, model: str, loras: tuple, photomaker: str, dtype: str | None, mode: str):
    """A StoryDiffusion pipeline with the PhotoMaker LoRA fused and its id encoder (a model of its own in the cache:
    the LoRA changes the UNet's weights)."""

    def build():
        from mindone_story.pipelines.photomaker import load_photomaker
        from mindone_story.pipelines.story_diffusion import StoryDiffusionPipeline
        from mindone_story.pretrained import load_sdxl

        models = load_sdxl(model_dir(model), dtype_of(dtype), [*loras, (photomaker, 1.0)])
        return StoryDiffusionPipeline(models, mode=mode, photomaker=load_photomaker(photomaker, dtype_of(dtype)))

    return cache.get(("StoryDiffusion+PhotoMaker", model, loras, photomaker, dtype, mode), build)


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
    from mindone_story.pipelines.story_adapter import StoryAdapterSettings

    prompts = [line.strip() for line in (story_text or "").splitlines() if line.strip()]
    if not prompts:
        raise StoryError("the story is empty: write one panel prompt per line")
    return StoryAdapterSettings(
        prompts=tuple(prompts),
        style=style,
        seed=checks.whole("seed", seed),
        rounds=checks.whole("rounds", rounds),
        steps=checks.whole("steps", steps),
        height=checks.whole("height", height),
        width=checks.whole("width", width),
        guidance_scale=guidance,
    )


def adapter_files(
    model: str, image_encoder: str | None, ip_ckpt: str | None, cache_dir: str | os.PathLike = "./cache_dir"
) -> dict[str, str]:
    """The three paths Story-Adapter loads (hub references downloaded); the tiny model brings its own image encoder
    and IP-Adapter."""
    from mindone_story.hub import HubError, resolve

    image_encoder, ip_ckpt = (image_encoder or "").strip(), (ip_ckpt or "").strip()
    if model == "tiny":
        from mindone_story.pretrained import TINY_IP_ADAPTER, tiny_model_dir

        root = tiny_model_dir()
        image_encoder = image_encoder or str(root / "image_encoder")
        ip_ckpt = ip_ckpt or str(root / "ip_adapter" / TINY_IP_ADAPTER)
    missing = [label for label, value in (("image encoder", image_encoder), ("IP-Adapter file", ip_ckpt)) if not value]
    if missing:
        raise StoryError(f"Story-Adapter on {model} needs the path of its {' and '.join(missing)}")
    try:
        image_encoder, ip_ckpt = (str(resolve(v, cache_dir)) for v in (image_encoder, ip_ckpt))
    except HubError as e:
        raise StoryError(f"Story-Adapter: {e}") from None
    return {"base_model_path": model, "image_encoder_path": image_encoder, "ip_ckpt": ip_ckpt}


def story_adapter_pipeline(cache: ModelCache, files: dict[str, str], dtype: str | None, mode: str):
    def build():
        from mindone_story.pipelines.story_adapter import StoryAdapterPipeline
        from mindone_story.pretrained import load_ip_adapter_models, load_sdxl

        models = load_sdxl(model_dir(files["base_model_path"]), dtype_of(dtype))
        ip = load_ip_adapter_models(files["ip_ckpt"], files["image_encoder_path"], models.unet.config, dtype_of(dtype))
        return StoryAdapterPipeline(models, ip, mode=mode)

    return cache.get(("Story-Adapter", *files.values(), dtype, mode), build)


def run_story_adapter(
    pipe, settings, files: dict[str, str], out: Path, progress: Progress | None = None
) -> list[list[Path]]:
    """Every round of the story into ``out`` (run_story_adapter.py's folder); returns the panel files by round."""
    from mindone_story.runs.story_adapter import generate_story, panel_path

    n, total = len(settings.prompts), len(settings.prompts) * (settings.rounds + 1)

    def on_panel(r: int, i: int, rounds: int, n: int) -> None:
        if progress:
            progress(r * n + i + 1, total, f"round {r}/{rounds}, panel {i + 1}/{n}")

    if progress:
        progress(0, total, f"round 0/{settings.rounds}")
    generate_story(pipe, settings, out, models=files, on_panel=on_panel)
    return [[out / panel_path(r, i) for i in range(n)] for r in range(settings.rounds + 1)]
