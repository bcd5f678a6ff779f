"""The run record (``story.json``): one versioned format for both methods, validated when read.

A record holds what was asked (``settings``), with which files (``models``: paths and fingerprints), the story
(``story``: per-method panel data), how far the run got (``progress``), every file the run has written (``files``,
relative to the folder, in order) and a ``log``. It is rewritten atomically after every file, so it always lists
exactly the finished files on disk. Reading checks the format, the version, the method and every field's type, and
each problem is a ``RecordError`` naming the file, the field and what to do.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import RecordError
from .files import write_json

RECORD = "story.json"
FORMAT = "mindone-story run"
VERSION = 1
METHODS = ("StoryDiffusion", "Story-Adapter")

# field -> type; every field is required
_FIELDS: dict[str, type] = {
    "format": str,
    "version": int,
    "method": str,
    "created": str,
    "settings": dict,
    "models": dict,
    "story": dict,
    "progress": dict,
    "files": list,
    "log": list,
}
_FRESH = "remove the folder or write the new run elsewhere"


@dataclass
class RunRecord:
    method: str
    settings: dict[str, Any]
    models: dict[str, Any]
    story: dict[str, Any]
    progress: dict[str, Any]
    files: list[str] = field(default_factory=list)
    log: list[dict[str, Any]] = field(default_factory=list)
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    source: Path | None = field(default=None, compare=False, repr=False)  # the file it was read from

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "method": self.method,
            "created": self.created,
            "settings": self.settings,
            "models": self.models,
            "story": self.story,
            "progress": self.progress,
            "files": self.files,
            "log": self.log,
        }

    def save(self, folder: Path) -> None:
        write_json(self.to_dict(), Path(folder) / RECORD)

    def add_file(self, folder: Path, name: str) -> None:
        """Record a file the run has just written (atomically), and save."""
        if name not in self.files:
            self.files.append(name)
        self.save(folder)

    @classmethod
    def read(cls, folder: str | Path, method: str | None = None) -> RunRecord:
        path = Path(folder) / RECORD
        if not path.is_file():
            raise RecordError(f"{path} does not exist: there is no run to continue in {folder}")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise RecordError(f"{path} is not UTF-8 text: it is not a run record; {_FRESH}") from None
        except json.JSONDecodeError as e:
            raise RecordError(f"{path} is not valid JSON ({e.msg}, line {e.lineno}): cut short? {_FRESH}") from None
        if not isinstance(raw, dict):
            raise RecordError(f"{path} holds a JSON {type(raw).__name__}, not a run record; {_FRESH}")
        if raw.get("format") != FORMAT:
            what = "an older mindone-story" if "method" in raw else "another program"
            raise RecordError(f"{path} was not written in this run-record format (by {what}?); {_FRESH}")
        for name, kind in _FIELDS.items():
            if name not in raw:
                raise RecordError(f"{path}: field {name!r} is missing; the record is incomplete; {_FRESH}")
            if not isinstance(raw[name], kind) or (kind is int and isinstance(raw[name], bool)):
                raise RecordError(
                    f"{path}: field {name!r} must be a JSON {kind.__name__}, got {type(raw[name]).__name__}; {_FRESH}"
                )
        if raw["version"] > VERSION:
            raise RecordError(f"{path} has record version {raw['version']}; this mindone-story reads up to {VERSION}")
        if raw["method"] not in METHODS:
            raise RecordError(f"{path}: unknown method {raw['method']!r}; {_FRESH}")
        if method is not None and raw["method"] != method:
            raise RecordError(f"{path} records a {raw['method']} run, not a {method} one: choose another folder")
        bad = [f for f in raw["files"] if not isinstance(f, str) or Path(f).is_absolute() or ".." in Path(f).parts]
        if bad:
            raise RecordError(f"{path}: field 'files' lists {bad[0]!r}, not a file inside the folder; {_FRESH}")
        return cls(**{k: raw[k] for k in _FIELDS if k not in ("format", "version")}, source=path)

    @property
    def where(self) -> str:
        return str(self.source or RECORD)

    def require(self, section: str, name: str, kind: type | tuple[type, ...]) -> Any:
        """``self.<section>[name]``, checked to be present and of ``kind``: a clear error for a hand-edited record."""
        value = getattr(self, section).get(name)
        if value is None or not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise RecordError(f"{self.where}: field '{section}.{name}' is missing or not a JSON {names}; {_FRESH}")
        return value


def peek(folder: str | Path) -> dict[str, Any] | None:
    """The raw record in ``folder`` if it parses as a JSON object, else None (for messages about a folder)."""
    try:
        raw = json.loads((Path(folder) / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return raw if isinstance(raw, dict) else None
