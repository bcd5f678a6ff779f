"""A StoryDiffusion run on disk: panels (each saved as soon as it is decoded), pages, and the run record.

``run_story`` checks everything (settings, layout, story, memory, the output folder) before any work, follows the
folder rule of ``runs.files``, and with ``resume=True`` continues a run that was stopped: the recorded settings,
story and model must be the ones given, the finished panels are read back (each checked to be a whole PNG), the id
phases run again (later panels read the banks they write) and only the unfinished later panels are made. Panels are
deterministic per ``(seed, panel)``, so a resumed story is byte-identical to an uninterrupted one.
"""

from __future__ import annotations

import io
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from .. import checks
from ..errors import RecordError
from ..parallel import InOrder, Lockstep, World
from ..pipelines.sdxl import StepCallback
from ..pipelines.story_diffusion import Replay
from ..story.comic import DEFAULT_FONT_SIZE, LAYOUTS, make_pages
from ..story.prompts import Story
from .characters import LATER_SETTINGS, replay_section
from .files import png_bytes, prepare, read_png, save_png
from .record import RunRecord

METHOD = "StoryDiffusion"
BANK_DIR = ".id_bank"  # a bank kept on disk: scratch, deleted when the run ends
Progress = Callable[[int, int, str], None]  # (done, total, what) -> None


@dataclass(frozen=True)
class PageLayout:
    """How panels become pages: one of ``LAYOUTS`` and the caption font size (default: 45 px at 768 px wide)."""

    typesetting: str = "Four Pannel"
    font_size: int | None = None

    def __post_init__(self):
        checks.one_of("typesetting", self.typesetting, LAYOUTS)
        if self.font_size is not None:
            object.__setattr__(self, "font_size", checks.whole("font_size", self.font_size, 1, 1000))

    def size_for(self, width: int) -> int:
        return self.font_size if self.font_size is not None else max(8, round(DEFAULT_FONT_SIZE * width / 768))


@dataclass
class StoryRun:
    folder: Path
    panels: list[Path]
    pages: list[Path]
    record: RunRecord


def _story_section(pipe, story: Story, settings, replay: Replay) -> dict[str, Any]:
    positive, negative = pipe.prompts(story, settings)
    cut = pipe.truncation(story, settings)
    chunks = settings.long_prompts and (replay.text_chunks or pipe.text_chunks(story, settings))
    return {
        **({"text_chunks": chunks} if chunks else {}),  # long_prompts: 77-token chunks per prompt, the run's shape
        **({"replay": replay_section(replay)} if replay_section(replay) else {}),  # kept characters, parts
        "characters": {c.name: c.description for c in story.characters},
        "id_length": story.id_length,
        "id_panels": {k: list(v) for k, v in story.id_panels.items()},
        "panels": [
            {
                "index": i,
                "text": p.text,
                "prompt": positive[i],
                "negative_prompt": negative[i],
                "caption": p.caption,
                "characters": list(p.characters),
                "noise_seed": replay.noise_seed(settings.seed, i),
                "dropped": cut.get(i, {}),  # text past CLIP's 77 tokens, not seen by the model
            }
            for i, p in enumerate(story.panels)
        ],
    }


def panel_name(index: int) -> str:
    return f"panel_{index:03d}.png"


def run_story(
    pipe,
    story: Story,
    settings,
    folder: str | Path,
    layout: PageLayout = PageLayout(),
    models: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: Progress | None = None,
    on_step: StepCallback | None = None,
    photos=None,
    bank: str = "auto",
    world: World | None = None,
    replay: Replay | None = None,
    extend: bool = False,
) -> StoryRun | None:
    """Generate ``story`` with a StoryDiffusionPipeline into ``folder``.

    ``models`` (paths or names of the files loaded) and ``extra`` (run options such as the mode) are recorded
    beside the settings; ``progress(done, total, what)`` is called after every panel and ``on_step(done, total)``
    after every sampler step of a batch. ``photos``: the characters' reference photos (``RefPhotos``), recorded in
    the settings. ``bank``: where the id bank is kept (see the pipeline); on disk it is the
    folder's ``.id_bank`` (one per rank), deleted when the run ends. With a ``world`` of several ranks (``parallel``)
    the later panels are split across them and rank 0 writes every file; it returns None on the other ranks.
    ``replay``: seeds kept from earlier runs (``runs.characters``); ``extend``: the folder's run is continued with
    more panels (``continued_story`` gives story and replay)."""
    world, folder, replay = world or World(), Path(folder), replay or Replay()
    bank_dir = folder / (BANK_DIR if world.size == 1 else f"{BANK_DIR}.rank{world.rank}")
    pipe.check(story, settings, photos, bank, bank_dir)  # memory and disk, before the folder is touched
    record_settings = {**settings.to_dict(), "typesetting": layout.typesetting, "font_size": layout.font_size}
    record_settings |= photos.to_record() if photos is not None else {}
    record_settings |= extra or {}
    loaded = pipe.sdxl.models
    record_models = {**{k: str(v) for k, v in (models or {}).items()}, "fingerprint": loaded.fingerprint}
    record_models["loras"] = loaded.loras  # path, scale and fingerprint of each LoRA fused into the model
    story_section = _story_section(pipe, story, settings, replay)
    world.same("settings, story or model", [settings.to_dict(), loaded.fingerprint, story_section])
    total = len(story.panels)
    images: dict[int, Image.Image] = {}
    old = record = None
    before = 0  # panels of the run that is continued

    def begin() -> list[int]:  # rank 0 alone reads and writes the folder
        nonlocal old, record, before
        old = prepare(folder, METHOD, resume=resume or extend, overwrite=overwrite)
        for stale in folder.glob(f"{BANK_DIR}*"):  # a killed run's banks on disk
            shutil.rmtree(stale, ignore_errors=True)
        if old is not None:
            before = len(old.story.get("panels") or [])
            _check_same_run(old, record_settings, record_models, story_section, extend)
            record = old
            record.story = story_section
            for i in record.require("progress", "panels", list):
                if not isinstance(i, int) or not 0 <= i < total:
                    raise RecordError(f"{record.where}: 'progress.panels' lists {i!r}, not a panel of this story")
                images[i] = read_png(folder / panel_name(i))
            record.progress = {**record.progress, "done": False}
        else:
            record = RunRecord(METHOD, record_settings, record_models, story_section, {"panels": [], "done": False})
        record.save(folder)
        return sorted(images)

    made = world.from_root(begin)
    start = time.time()
    if progress and world.root:
        progress(len(images), total, "panels")

    def on_panel(index: int, image: Image.Image) -> None:
        images[index] = image
        if index not in record.progress["panels"]:
            save_png(image, folder / panel_name(index))
            record.progress["panels"] = sorted(record.progress["panels"] + [index])
            record.add_file(folder, panel_name(index))
        if progress:
            progress(len(images), total, f"panel {index + 1}")

    # every rank runs the id phases (they write the banks in memory); the later panels' batches still to make are
    # shared round-robin, and their images reach rank 0 in the order one process makes them
    pending = [b for b in pipe.read_batches(story, settings, replay) if not set(made).issuperset(b)]
    mine = world.share(pending)
    ids = {i for tile in story.id_panels.values() for i in tile}
    arrived = InOrder([i for b in pending for i in b], lambda i, png: on_panel(i, Image.open(io.BytesIO(png))))
    with Lockstep(world, arrived if world.root else None) as step:

        def made_here(index: int, image: Image.Image) -> None:
            if index in ids:
                if world.root:
                    on_panel(index, image)
            else:
                step.put(lambda: (index, png_bytes(image)))

        try:
            skip = set(made) | {i for b in pending if b not in mine for i in b}
            pipe(
                story,
                settings,
                on_panel=made_here,
                on_step=on_step,
                skip=sorted(skip),
                photos=photos,
                replay=replay,
                bank=bank,
                bank_dir=bank_dir,
            )
        except Exception as e:
            step.fail(e)
            raise
    if not world.root:
        return None
    ordered = [images[i] for i in range(total)]
    pages = make_pages(ordered, layout.typesetting, story.captions, layout.size_for(settings.width), seed=settings.seed)
    names = [f"page_{k:02d}.png" for k in range(len(pages))]
    for name, page in zip(names, pages):
        save_png(page, folder / name)
        if name not in record.files:
            record.files.append(name)
    record.progress = {"panels": record.progress["panels"], "pages": names, "done": True}
    grown = {"continued": f"{before} -> {total} panels"} if extend else {}
    record.log.append({"resumed": old is not None and not extend, **grown, "seconds": round(time.time() - start, 2)})
    record.save(folder)
    return StoryRun(folder, [folder / panel_name(i) for i in range(total)], [folder / n for n in names], record)


def _check_same_run(old: RunRecord, settings: dict, models: dict, story: dict, extend: bool = False) -> None:
    """A resumed run must make the same images: same settings, story and model files (a continued one: its story
    begins with the recorded one)."""
    recorded = {**LATER_SETTINGS, **old.settings}
    diffs = [f"{k}: recorded {recorded.get(k)!r}, given {v!r}" for k, v in settings.items() if recorded.get(k) != v]
    if old.models.get("fingerprint") != models["fingerprint"]:
        diffs.append("the model files differ from the recorded ones (fingerprint)")
    if extend:  # the recorded panels first; the replay grows by the new part (continued_story carries it over)
        old_story = {k: v for k, v in old.story.items() if k != "replay"}
        made = len(old.story.get("panels") or [])
        story = {**{k: v for k, v in story.items() if k != "replay"}, "panels": story["panels"][:made]}
    else:
        old_story = old.story
    if old_story != story:
        diffs.append("the story (characters or panels) differs from the recorded one")
    if diffs:
        what = "continue" if extend else "resume"
        raise RecordError(f"cannot {what}: the run was made with other settings: " + "; ".join(diffs[:5]))


def kept(folder: str | Path) -> str:
    """What a stopped run left in ``folder``, for the front ends' interrupt message."""
    from .record import peek

    raw = peek(folder) or {}
    progress, story = raw.get("progress") or {}, raw.get("story") or {}
    made, total = len(progress.get("panels") or []), len(story.get("panels") or [])
    return f"{made} of {total} panels kept in {folder}; run again with resume to continue" if total else ""
