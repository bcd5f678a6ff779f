"""Output folders: atomic file writes, and a StoryDiffusion run written as panels, pages and story.json.

Every file is written to a temporary name in its folder and renamed over the target, so an interrupted run leaves
only whole files; story.json is rewritten after each panel, so it always lists exactly the panels on disk.
"""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from .comic import make_pages
from .prompts import Story

Progress = Callable[[int, int, str], None]  # (done, total, what) -> None
RECORD = "story.json"


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, flush it to disk, then rename over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def save_png(image: Image.Image, path: Path) -> None:
    write_atomic(path, png_bytes(image))


def write_json(data: dict, path: Path) -> None:
    write_atomic(path, json.dumps(data, indent=2, ensure_ascii=False).encode("utf-8"))


def write_story(
    pipe,
    story: Story,
    settings,
    out: Path,
    typesetting: str,
    font_size: int,
    model: str,
    extra: dict | None = None,
    progress: Progress | None = None,
    show_progress: bool = True,
) -> tuple[list[Path], list[Path]]:
    """Generate ``story`` with a StoryDiffusionPipeline into ``out``: each panel as soon as it is decoded, then the
    pages, with story.json (prompts, noise seeds, settings, model fingerprint) kept current. Returns the panel and
    page files."""
    out.mkdir(parents=True, exist_ok=True)
    positive, negative = pipe.prompts(story, settings)
    cut = pipe.truncation(story, settings)
    record = {
        "method": "StoryDiffusion",
        "model": str(model),
        "model_fingerprint": pipe.sdxl.models.fingerprint,
        "settings": settings.to_dict() | {"id_length": story.id_length} | (extra or {}),
        "typesetting": typesetting,
        "font_size": font_size,
        "characters": {c.name: c.description for c in story.characters},
        "id_panels": story.id_panels,
        "panels": [
            {
                "index": i,
                "text": p.text,
                "prompt": positive[i],
                "negative_prompt": negative[i],
                "caption": p.caption,
                "characters": list(p.characters),
                "noise_seed": [settings.seed, i],
                "dropped": cut.get(i, {}),  # text past CLIP's 77 tokens, not seen by the model
                "file": None,
            }
            for i, p in enumerate(story.panels)
        ],
        "pages": [],
    }
    write_json(record, out / RECORD)
    start, total, done = time.time(), len(story.panels), []
    if progress:
        progress(0, total, "panels")

    def on_panel(index: int, image: Image.Image) -> None:
        name = f"panel_{index:03d}.png"
        save_png(image, out / name)
        record["panels"][index]["file"] = name
        write_json(record, out / RECORD)
        done.append(index)
        if progress:
            progress(len(done), total, f"panel {index + 1}")

    images = pipe(story, settings, on_panel=on_panel, progress=show_progress)
    pages = make_pages([images[i] for i in range(total)], typesetting, story.captions, font_size, seed=settings.seed)
    for k, page in enumerate(pages):
        save_png(page, out / f"page_{k:02d}.png")
    record["pages"] = [f"page_{k:02d}.png" for k in range(len(pages))]
    record["seconds"] = round(time.time() - start, 2)
    write_json(record, out / RECORD)
    return [out / p["file"] for p in record["panels"]], [out / name for name in record["pages"]]
