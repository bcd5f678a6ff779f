"""A Story-Adapter run on disk: ``round_00/panel_000.png`` ... and the run record, resumable panel by panel.

Every file is written atomically and the record is updated after each panel, so a killed run resumes at its first
unrecorded panel and loses nothing it recorded. Round r's references are the tokens of round r-1's images, each
encoded alone; a resumed run reads those images back from their PNG files (lossless, each checked to be whole), so
it gives the same bytes as an uninterrupted one, with any number of ranks.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import RecordError
from ..parallel import Lockstep, World
from ..pipelines.story_adapter import DDIM_CONFIG, NEGATIVE_PROMPT, StoryAdapterSettings
from ..processors.grca import REFERENCE_SIZE
from .files import png_bytes, prepare, read_png, write_atomic
from .record import RunRecord

METHOD = "Story-Adapter"
# (round, panel, rounds, panels) after each panel is written
PanelProgress = Callable[[int, int, int, int], None]


def panel_path(round_index: int, panel: int) -> str:
    return f"round_{round_index:02d}/panel_{panel:03d}.png"


LATER_FIELDS = {"long_prompts"}  # settings added after the first record format; absent means the default


def settings_of(record: RunRecord) -> StoryAdapterSettings:
    """The recorded settings, checked as new ones are (a hand-edited value is a RecordError naming it)."""
    import dataclasses

    names = [f.name for f in dataclasses.fields(StoryAdapterSettings)]
    names = [n for n in names if n in record.settings or n not in LATER_FIELDS]  # older records: the default
    missing = [n for n in names if n not in record.settings]
    if missing:
        raise RecordError(f"{record.where}: field 'settings.{missing[0]}' is missing; the record is incomplete")
    try:
        return StoryAdapterSettings(**{n: record.settings[n] for n in names})
    except ValueError as e:
        raise RecordError(f"{record.where}: the recorded settings are not valid: {e}") from None


def progress_of(record: RunRecord, settings: StoryAdapterSettings) -> tuple[int, int, bool]:
    """(round, panels done in it, done), checked against the settings."""
    r = record.require("progress", "round", int)
    made = record.require("progress", "panels", int)
    done = record.require("progress", "done", bool)
    n = len(settings.prompts)
    if not (0 <= r <= settings.rounds and 0 <= made <= n):
        raise RecordError(
            f"{record.where}: progress (round {r}, {made} panels) does not fit the recorded settings "
            f"({settings.rounds} rounds of {n} panels)"
        )
    return r, made, done


def generate_story(
    pipe,
    settings: StoryAdapterSettings,
    folder: str | Path,
    models: dict[str, Any] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    on_panel: PanelProgress | None = None,
    world: World | None = None,
) -> RunRecord | None:
    """Run (or resume) a whole story into ``folder``; returns the final record (on rank 0; None on other ranks).

    ``models`` (paths or names) is recorded beside the pipeline's fingerprints; on resume the settings and the
    fingerprints must equal the recorded ones. With a ``world`` of several ranks (``parallel``), each round's
    panels are split across the ranks, each rank encodes the references it made and the tokens are gathered, so
    every rank builds the round's K/V; only rank 0 reads or writes ``folder``."""
    world = world or World()
    folder = Path(folder)
    record: RunRecord | None = None

    def begin() -> tuple[int, int, bool]:
        nonlocal record
        record, start, first, done = _open(pipe, settings, folder, models, resume, overwrite)
        return start, first, done

    start, first, done = world.from_root(begin)
    if done:
        return record
    n = len(settings.prompts)
    prompts, noise = settings.model_prompts, pipe.noise(settings)
    reference, encoded = None, 0
    if start > 0:  # resumed: the previous round's panels from their lossless files
        held = {i: read_png(folder / panel_path(start - 1, i)) for i in range(n)} if world.root else {}
        reference, encoded = _reference(pipe, world, held, n, settings.scales[start - 1])
    for r in range(start, settings.rounds + 1):
        began = time.time()
        # the images of this round this rank holds: those it makes, and (rank 0) those already on disk
        held = {i: read_png(folder / panel_path(r, i)) for i in range(first)} if world.root else {}
        if world.root:
            (folder / f"round_{r:02d}").mkdir(exist_ok=True)

        def write(result: tuple[int, bytes], r=r) -> None:
            i, png = result
            name = panel_path(r, i)
            write_atomic(folder / name, png)
            record.progress = {"round": r, "panels": i + 1, "done": False}
            record.add_file(folder, name)
            if on_panel:
                on_panel(r, i, settings.rounds, n)

        # round-robin shares: each wave holds the next panels in order, so rank 0 writes them in order
        with Lockstep(world, write if world.root else None) as step:
            for i in world.share(range(first, n)):

                def make(i=i, held=held, reference=reference) -> tuple[int, bytes]:
                    held[i] = pipe.panel(prompts[i], noise, settings, reference)
                    return i, png_bytes(held[i])

                step.put(make)
        if world.root:
            record.log.append(
                {
                    "round": r,
                    "scale": settings.scales[r - 1] if r else 0.0,
                    "panels_made": n - first,
                    "reference_encodings": encoded,
                    "seconds": round(time.time() - began, 3),
                }
            )
            last = r == settings.rounds
            record.progress = {"round": r if last else r + 1, "panels": n if last else 0, "done": last}
            record.save(folder)
        if r < settings.rounds:
            reference, encoded = _reference(pipe, world, held, n, settings.scales[r])
        first = 0
    return record


def _reference(pipe, world: World, held: dict, n: int, scale: float):
    """The next round's reference from the images each rank holds: each encodes its own, the tokens are gathered
    (in panel order); returns it and how many references were encoded."""
    tokens: dict[int, np.ndarray] = {}
    with Lockstep(world, tokens.update) as step:
        step.put(lambda: {i: pipe.references.panel_tokens(image) for i, image in sorted(held.items())})
    if sorted(tokens) != list(range(n)):
        raise RuntimeError(f"the ranks held references {sorted(tokens)} of {n} panels")
    return pipe.references.control_from_tokens(pipe.references.tokens_of([tokens[i] for i in range(n)]), scale), n


def _open(pipe, settings, folder: Path, models, resume: bool, overwrite: bool):
    """The folder rule and the record: a new one, or the recorded one checked against what is given."""
    old = prepare(folder, METHOD, resume=resume, overwrite=overwrite)
    if old is not None:
        record = old
        recorded = settings_of(record)
        start, first, done = progress_of(record, recorded)
        given = settings.to_dict()
        diffs = [f"{k}: recorded {v!r}, given {given[k]!r}" for k, v in recorded.to_dict().items() if v != given[k]]
        diffs += [
            f"{k} differs from the recorded file" for k, v in pipe.fingerprints.items() if record.models.get(k) != v
        ]
        if diffs:
            raise RecordError("cannot resume: the run was made with other settings or models: " + "; ".join(diffs[:5]))
        if not done:
            for name in record.files:  # every recorded panel whole before any work
                read_png(folder / name)
        return record, start, first, done
    paths = {k: str(v) for k, v in (models or {}).items() if v is not None}
    story = {
        "model_prompts": settings.model_prompts,
        "negative_prompt": NEGATIVE_PROMPT,
        "scales": settings.scales,
        "scheduler": {"name": "ddim", **DDIM_CONFIG},
        "reference_size": REFERENCE_SIZE,
    }
    progress = {"round": 0, "panels": 0, "done": False}
    record = RunRecord(
        METHOD, {**settings.to_dict(), "mode": pipe.mode}, {**paths, **pipe.fingerprints}, story, progress
    )
    record.save(folder)
    return record, 0, 0, False


def kept(folder: str | Path) -> str:
    """What a stopped run left in ``folder``, for the front ends' interrupt message."""
    from .record import peek

    raw = peek(folder) or {}
    files = [f for f in raw.get("files") or [] if isinstance(f, str)]
    return f"{len(files)} panels kept in {folder}; run again with resume to continue" if files else ""
