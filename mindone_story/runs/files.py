"""Output files and folders: atomic writes, verified reads, and the rule for a folder that already holds a run.

The rule: a run writes into a folder that does not exist, holds nothing named like a run's outputs, or holds a run
record of its own method that it continues (``resume``). A folder holding another run is refused, unless
``overwrite`` is given; then every file of the old run (those its record lists and every file named like a run's
output) is removed before the new run writes anything, so no old panel or page is left beside the new ones. Other
files in the folder are never touched.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
from pathlib import Path

from PIL import Image

from ..errors import OutputFolderError

RECORD = "story.json"
# names a run writes: story.json, panel_000.png, page_00.png, round_00/, metrics (.json, .png), character_*.json, temp files
_OUTPUT_NAME = re.compile(
    r"(story\.json|metrics\.(json|png)|character_.+\.json|panel_\d+\.png|page_\d+\.png|round_\d+|\..*\.tmp)"
)


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, flush it to disk, then rename over ``path``; on any failure
    (a full disk, Ctrl-C) the temporary file is removed and ``path`` keeps its old content."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def save_png(image: Image.Image, path: Path) -> None:
    write_atomic(path, png_bytes(image))


def write_json(data: dict, path: Path) -> None:
    # allow_nan=False: a NaN setting can never reach a record (it would not be valid JSON)
    write_atomic(path, json.dumps(data, indent=2, ensure_ascii=False, allow_nan=False).encode("utf-8"))


def read_png(path: Path) -> Image.Image:
    """A recorded PNG, fully decoded; a missing or cut-short file is an OutputFolderError naming it."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except FileNotFoundError:
        raise OutputFolderError(f"{path} is recorded in {RECORD} but missing; the run cannot be continued") from None
    except (OSError, SyntaxError) as e:
        raise OutputFolderError(f"{path} is recorded in {RECORD} but is not a whole PNG ({e})") from None


def _outputs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if _OUTPUT_NAME.fullmatch(p.name))


def check_writable(folder: Path) -> None:
    """Create ``folder`` if needed and prove a file can be written there, before any work starts."""
    if folder.exists() and not folder.is_dir():
        raise OutputFolderError(f"the output folder {folder} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}.tmp"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise OutputFolderError(f"cannot write to the output folder {folder}: {reason}") from None


def prepare(folder: Path, method: str, resume: bool = False, overwrite: bool = False, dry_run: bool = False):
    """Apply the folder rule for a new or resumed run of ``method``; returns the record to continue, or None.
    ``dry_run`` checks only (front ends call it before loading a model): nothing is created or removed."""
    from .record import RunRecord, peek

    folder = Path(folder)
    if resume and overwrite:
        raise OutputFolderError("resume continues the run in the folder and overwrite replaces it: choose one")
    if folder.exists() and not folder.is_dir():
        raise OutputFolderError(f"the output folder {folder} is a file, not a folder")
    if resume:
        record = RunRecord.read(folder, method)
        if not dry_run:
            check_writable(folder)
        return record
    outputs = _outputs(folder) if folder.is_dir() else []
    if outputs and not overwrite:
        raw = peek(folder)
        if raw is not None and (folder / RECORD).exists():
            what = f"a {raw.get('method', 'mindone-story')} run"
        else:
            what = (
                f"files of another run ({', '.join(p.name for p in outputs[:3])}{', ...' if len(outputs) > 3 else ''})"
            )
        raise OutputFolderError(
            f"the output folder {folder} holds {what}: continue it (resume), replace it (overwrite), or choose "
            "another folder"
        )
    if dry_run:
        parent = next((p for p in [folder, *folder.parents] if p.exists()), None)
        if parent is not None and not parent.is_dir():
            raise OutputFolderError(f"the output folder {folder} is inside {parent}, which is a file")
        if parent is not None and not os.access(parent, os.W_OK):
            raise OutputFolderError(f"cannot write to the output folder {folder}: permission denied")
        return None
    if outputs:
        _remove_run(folder, outputs)
    check_writable(folder)
    return None


def _remove_run(folder: Path, outputs: list[Path]) -> None:
    """Remove an old run: the files its record lists, then everything named like a run's output."""
    from .record import peek

    raw = peek(folder) or {}
    listed = [
        folder / f
        for f in raw.get("files", [])
        if isinstance(f, str) and not Path(f).is_absolute() and ".." not in Path(f).parts
    ]
    for path in listed + [p for p in outputs if p.name != RECORD] + [folder / RECORD]:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
