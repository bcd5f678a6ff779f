"""Characters kept across runs, and stories continued: both replay an earlier run's randomness from its record.

A character file is a recipe, not tensors (the id bank is gigabytes at 768 px; this is a few KB): the character's
description, its id panels as written with their noise seeds, the draw seed of each id tile, every setting that
decides the id images, the text chunk count and the model's fingerprint (with its LoRAs). Loading it puts its id
panels first in the new story with those seeds (``Replay``), so its id phase, and with it its id bank, are the first
run's byte for byte. A later panel is the same panel when its text, its noise seed ``(seed, panel)`` and its read
batch (seed and room) are the same: a story that begins with the same characters' id panels in the same order draws
its later panels as the first run did.

A continued story (``continued_story``) is the recorded one with more panel lines: the recorded characters,
settings and seeds, and a new part, so read batches never mix recorded and new panels.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..errors import RecordError, StoryError
from ..pipelines.story_diffusion import Replay, StoryDiffusionSettings, id_tiles
from ..story.prompts import _HERO, Story, as_hero, parse_story
from .files import write_json
from .record import RunRecord

FORMAT = "mindone-story character"
VERSION = 1
LATER_SETTINGS = {"long_prompts": False}  # settings added after the first records; absent means this value
RUN_ONLY = ("read_batch",)  # settings that do not touch the id phase


class CharacterError(StoryError):
    """A character file that cannot be read, is not one, or was made for another model or other settings."""


def replay_section(replay: Replay) -> dict[str, Any]:
    """The replay as JSON (empty when there is nothing to replay)."""
    out: dict[str, Any] = {}
    if replay.noise_seeds:
        out["noise_seeds"] = {str(i): list(s) for i, s in sorted(replay.noise_seeds.items())}
    if replay.id_phase_seeds:
        out["id_phase_seeds"] = {k: list(v) for k, v in replay.id_phase_seeds.items()}
    if replay.parts:
        out["parts"] = list(replay.parts)
    return out


def replay_of(record: RunRecord) -> Replay:
    """A record's replay (its story's ``replay`` and ``text_chunks``), checked."""
    raw = record.story.get("replay") or {}
    try:
        return Replay(
            {int(i): [int(x) for x in s] for i, s in (raw.get("noise_seeds") or {}).items()},
            {str(k): [int(x) for x in v] for k, v in (raw.get("id_phase_seeds") or {}).items()},
            tuple(int(p) for p in raw.get("parts") or ()),
            record.story.get("text_chunks"),
        )
    except (TypeError, ValueError, AttributeError):
        raise RecordError(f"{record.where}: field 'story.replay' is not valid; the record was edited?") from None


def settings_of(record: RunRecord) -> StoryDiffusionSettings:
    """The recorded StoryDiffusion settings, checked as new ones are."""
    values = {**LATER_SETTINGS, **record.settings}
    names = [f.name for f in fields(StoryDiffusionSettings)]
    missing = [n for n in names if n not in values]
    if missing:
        raise RecordError(f"{record.where}: field 'settings.{missing[0]}' is missing; the record is incomplete")
    try:
        return StoryDiffusionSettings(**{n: values[n] for n in names})
    except (TypeError, ValueError) as e:
        raise RecordError(f"{record.where}: the recorded settings are not valid: {e}") from None


# --- characters ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CharacterRecipe:
    name: str
    description: str
    id_panels: tuple[tuple[str, tuple[int, ...]], ...]  # (story line as written, noise seed)
    phase_seeds: tuple[int, ...]  # the draw seed of each id tile
    settings: dict[str, Any]  # StoryDiffusionSettings.to_dict() without the run-only ones
    text_chunks: int | None
    models: dict[str, Any]  # fingerprint and loras
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "name": self.name,
            "description": self.description,
            "id_panels": [{"text": t, "noise_seed": list(s)} for t, s in self.id_panels],
            "phase_seeds": list(self.phase_seeds),
            "settings": self.settings,
            "text_chunks": self.text_chunks,
            "models": self.models,
        }


def id_settings(settings: StoryDiffusionSettings) -> dict[str, Any]:
    return {k: v for k, v in settings.to_dict().items() if k not in RUN_ONLY}


def character_of(record: RunRecord, name: str) -> CharacterRecipe:
    """The recipe of one character of a StoryDiffusion run record."""
    story = record.story
    characters = record.require("story", "characters", dict)
    if name not in characters:
        raise CharacterError(f"{record.where}: no character [{name}] in this run (it has: {', '.join(characters)})")
    settings = settings_of(record)
    replay = replay_of(record)
    panels = record.require("story", "panels", list)
    id_panels = {k: list(v) for k, v in record.require("story", "id_panels", dict).items()}
    seeds = [seed for who, _, seed, _ in id_tiles(id_panels, settings.window, replay) if who == name]
    try:
        ids = tuple((panels[i]["text"], tuple(panels[i]["noise_seed"])) for i in id_panels[name])
    except (IndexError, KeyError, TypeError):
        raise RecordError(f"{record.where}: the panels of [{name}] are not valid; the record was edited?") from None
    models = {"fingerprint": record.models.get("fingerprint"), "loras": record.models.get("loras", [])}
    return CharacterRecipe(
        name, characters[name], ids, tuple(seeds), id_settings(settings), story.get("text_chunks"), models
    )


def file_name(name: str) -> str:
    return "character_" + re.sub(r"[^A-Za-z0-9_-]", "_", name) + ".json"


def save_character(recipe: CharacterRecipe, path: str | Path) -> Path:
    path = Path(path)
    write_json(recipe.to_dict(), path)
    return path


def read_character(path: str | Path) -> CharacterRecipe:
    """A character file, checked; every problem is one CharacterError naming the file."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CharacterError(f"the character file {path} does not exist") from None
    except IsADirectoryError:
        raise CharacterError(f"the character file {path} is a folder") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CharacterError(f"{path} is not a character file (not JSON text)") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise CharacterError(f"{path} is not a mindone-story character file")
    if not isinstance(raw.get("version"), int) or raw["version"] > VERSION:
        raise CharacterError(f"{path} has character version {raw.get('version')!r}; this reads up to {VERSION}")
    try:
        recipe = CharacterRecipe(
            str(raw["name"]),
            str(raw["description"]),
            tuple((str(p["text"]), tuple(int(x) for x in p["noise_seed"])) for p in raw["id_panels"]),
            tuple(int(x) for x in raw["phase_seeds"]),
            dict(raw["settings"]),
            None if raw["text_chunks"] is None else int(raw["text_chunks"]),
            dict(raw["models"]),
            str(path),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise CharacterError(f"{path}: the character file is incomplete or edited ({type(e).__name__}: {e})") from None
    if not recipe.id_panels:
        raise CharacterError(f"{path}: the character has no id panels")
    return recipe


def check_settings(recipe: CharacterRecipe, settings: StoryDiffusionSettings) -> None:
    """The id phase replays only under the recipe's settings: size, sampler, seed, style, negative prompt, ..."""
    given = id_settings(settings)
    diffs = [
        f"{k} {recipe.settings.get(k)!r} (this run: {v!r})" for k, v in given.items() if recipe.settings.get(k) != v
    ]
    if diffs:
        raise CharacterError(f"{recipe.source}: [{recipe.name}] was made with other settings: " + "; ".join(diffs[:4]))


def _lora_weights(loras: list) -> list:
    return [(lora.get("fingerprint"), lora.get("scale")) for lora in loras if isinstance(lora, dict)]


def check_model(recipe: CharacterRecipe, fingerprint: str, loras: list) -> None:
    """The same base weights and the same LoRAs at the same scales (their paths may differ)."""
    same_loras = _lora_weights(recipe.models.get("loras") or []) == _lora_weights(loras)
    if recipe.models.get("fingerprint") != fingerprint or not same_loras:
        raise CharacterError(
            f"{recipe.source}: [{recipe.name}] was made with other model weights (fingerprint "
            f"{str(recipe.models.get('fingerprint'))[:12]}..., this model {fingerprint[:12]}...)"
        )


def story_with_characters(
    recipes: list[CharacterRecipe], characters: str, story_text: str, id_length: int
) -> tuple[Story, Replay]:
    """A new story whose first panels are the kept characters' id panels (replayed with their seeds), then the
    story's lines; ``characters`` may define more characters ('[Name] description' lines, or '')."""
    names = [r.name for r in recipes]
    if len(set(names)) != len(names):
        raise CharacterError(f"the character [{names[0]}] is loaded twice")
    for r in recipes:
        if len(r.id_panels) != id_length:
            raise CharacterError(f"{r.source}: [{r.name}] has {len(r.id_panels)} id panels, this story {id_length}")
    chunks = {r.text_chunks for r in recipes}
    if len(chunks) > 1:
        raise CharacterError("the characters were made with different text chunk counts (long prompts)")
    box = "\n".join([f"[{r.name}]{r.description}" for r in recipes] + [characters])
    lines = [t for r in recipes for t, _ in r.id_panels] + [line for line in story_text.splitlines() if line.strip()]
    try:
        story = parse_story(box, "\n".join(lines), id_length)
    except ValueError as e:
        raise StoryError(str(e)) from None
    noise, start = {}, 0
    for r in recipes:
        noise.update({start + k: seed for k, (_, seed) in enumerate(r.id_panels)})
        start += len(r.id_panels)
    return story, Replay(noise, {r.name: r.phase_seeds for r in recipes}, (), chunks.pop() if chunks else None)


# --- continued stories ---------------------------------------------------------------------------------------------
def continued_story(record: RunRecord, more: str) -> tuple[Story, Replay]:
    """The recorded story with the panel lines of ``more`` after it (tagged as the recorded characters are), and the
    replay that keeps the recorded seeds, with a new part where the new panels begin."""
    characters = record.require("story", "characters", dict)
    panels = record.require("story", "panels", list)
    old = [p.get("text") if isinstance(p, dict) else None for p in panels]
    if not all(isinstance(t, str) for t in old):
        raise RecordError(f"{record.where}: field 'story.panels' is not valid; the record was edited?")
    new = [line for line in more.splitlines() if line.strip()]
    if list(characters) == [_HERO]:  # a plain description: untagged panels are about its one character
        new = [as_hero(line) for line in new]
    box = "\n".join(f"[{name}]{text}" for name, text in characters.items())
    try:
        story = parse_story(box, "\n".join(old + new), record.require("story", "id_length", int))
    except ValueError as e:
        raise StoryError(f"the continued story: {e}") from None
    replay = replay_of(record)
    if new:
        replay = Replay(replay.noise_seeds, replay.id_phase_seeds, (*replay.parts, len(old)), replay.text_chunks)
    return story, replay


def save_characters(record: RunRecord, folder: str | Path) -> list[Path]:
    """Write every character of a run as ``folder/character_<Name>.json`` and list the files in its record."""
    folder, paths = Path(folder), []
    for name in record.require("story", "characters", dict):
        paths.append(save_character(character_of(record, name), folder / file_name(name)))
        record.add_file(folder, paths[-1].name)
    return paths
