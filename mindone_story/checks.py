"""The checks every front end shares: each rule is written once, raises ``StoryError`` with a one-line message that
names the setting, and runs before any work starts. Zero is a value, never "the default"; numbers must be finite."""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .errors import StoryError

SIZE_MULTIPLE = 32  # SDXL: the VAE's 8x and the UNet's three 2x down-samplings


def whole(name: str, value: Any, low: int | None = None, high: int | None = None) -> int:
    """A whole number (an int, or a float with no fraction, as form fields give) within [low, high]."""
    if isinstance(value, bool):
        raise StoryError(f"{name} must be a whole number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise StoryError(f"{name} must be a whole number, got {value!r}") from None
    if not math.isfinite(number) or not number.is_integer():
        raise StoryError(f"{name} must be a whole number, got {value!r}")
    number = int(number)
    if low is not None and number < low:
        raise StoryError(f"{name} must be at least {low}, got {number}")
    if high is not None and number > high:
        raise StoryError(f"{name} must be at most {high}, got {number}")
    return number


def number(name: str, value: Any, low: float | None = None, high: float | None = None) -> float:
    """A finite number within [low, high]."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise StoryError(f"{name} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(x):
        raise StoryError(f"{name} must be a finite number, got {value!r}")
    if (low is not None and x < low) or (high is not None and x > high):
        bounds = (
            f"within [{low}, {high}]"
            if low is not None and high is not None
            else (f"at least {low}" if low is not None else f"at most {high}")
        )
        raise StoryError(f"{name} must be {bounds}, got {x:g}")
    return x


def one_of(name: str, value: Any, options: Iterable[str]) -> str:
    options = list(options)
    if value not in options:
        raise StoryError(f"unknown {name} {value!r}; choose one of: {', '.join(map(str, options))}")
    return value


def image_size(height: Any, width: Any) -> tuple[int, int]:
    """Height and width in pixels: positive multiples of 32."""
    h, w = whole("height", height, 1), whole("width", width, 1)
    for name, value in (("height", h), ("width", w)):
        if value % SIZE_MULTIPLE:
            raise StoryError(f"{name} must be a multiple of {SIZE_MULTIPLE}, got {value}")
    return h, w


def seed(value: Any) -> int:
    return whole("seed", value, 0, 2**63 - 1)


# -- memory ------------------------------------------------------------------------------------------------------
def available_memory() -> int | None:
    """Bytes the host can still give (MemAvailable), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if n < 1024 or unit == "PB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PB"


def least_memory(
    unet_config, vae_config, height: int, width: int, batch: int, scores_in_memory: bool
) -> tuple[int, str]:
    """A lower bound on the activation memory of one denoising call and one decode, and what dominates it:

    - the VAE decoder's last block holds an input and an output of ``block_out_channels[0]`` fp32 channels at full
      size (one image at a time);
    - the math attention path (CPU) holds a [2·batch, heads, S, S] fp32 score matrix at the finest attention level
      (FlashAttentionScore does not: ``scores_in_memory=False``).
    """
    vae = 2 * 4 * vae_config.block_out_channels[0] * height * width
    levels = [i for i, kind in enumerate(unet_config.down_block_types) if "CrossAttn" in kind]
    attention = 0
    if levels and scores_in_memory:
        level = levels[0]
        scale = vae_config.downscale << level
        tokens = (height // scale) * (width // scale)
        heads = unet_config.heads[level]
        attention = 2 * batch * heads * tokens * tokens * 4
    return (
        (vae, "the VAE decoder's activations at full size")
        if vae >= attention
        else (
            attention,
            "the attention scores at the finest attention level",
        )
    )


def fits(unet_config, vae_config, height: int, width: int, batch: int, scores_in_memory: bool) -> None:
    """Refuse a request whose memory lower bound exceeds what the host has available (CPU runs)."""
    need, what = least_memory(unet_config, vae_config, height, width, batch, scores_in_memory)
    have = available_memory()
    if have is not None and need > have and os.environ.get("MINDONE_STORY_SKIP_MEMORY_CHECK") != "1":
        raise StoryError(
            f"a {height}x{width} panel (batch {batch}) needs at least {_human(need)} for {what}, and this machine has "
            f"{_human(have)} available: choose a smaller height and width"
        )


BANK_PLACES = ("auto", "memory", "disk")


def bank_place(size: int, activations: int, choice: str = "auto", folder: str | Path | None = None) -> str:
    """Where StoryDiffusion's id bank of ``size`` bytes goes: ``"memory"``, or ``"disk"`` (memory-mapped files in
    ``folder``, default the temporary directory). ``auto`` keeps it in memory when it fits beside one call's
    ``activations`` with a 10% margin, else on disk; both places hold the same bytes, so the images are the same."""
    one_of("id bank place", choice, BANK_PLACES)
    have = available_memory()
    unchecked = have is None or os.environ.get("MINDONE_STORY_SKIP_MEMORY_CHECK") == "1"
    in_memory = unchecked or size + activations <= 0.9 * have
    if choice == "memory" or (choice == "auto" and in_memory):
        if not in_memory:
            raise StoryError(
                f"the id bank needs {_human(size)} and this machine has {_human(have)} available beside the model: "
                "keep it on disk, or choose a smaller size or fewer steps"
            )
        return "memory"
    where = Path(folder) if folder is not None else Path(tempfile.gettempdir())
    existing = next(p for p in (where, *where.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if size > free and not unchecked:
        memory = "" if choice == "disk" else f"more than the {_human(have)} of memory available, and "
        raise StoryError(
            f"the id bank needs {_human(size)}, {memory}{existing} has {_human(free)} free: choose a smaller size or "
            "fewer steps"
        )
    return "disk"
