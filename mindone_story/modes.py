"""How the networks run: ``graph`` (each wrapped once with ``ms.jit``, shapes fixed per run) or ``pynative``."""

from __future__ import annotations

from collections.abc import Callable

import mindspore as ms

from .errors import StoryError

MODES = ("graph", "pynative")


def compiled(fn: Callable, mode: str) -> Callable:
    if mode not in MODES:
        raise StoryError(f"unknown mode {mode!r}; use 'graph' or 'pynative'")
    return ms.jit(fn) if mode == "graph" else fn
