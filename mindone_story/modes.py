"""How the networks run: ``graph`` (each wrapped once with ``ms.jit``, shapes fixed per run) or ``pynative``."""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Callable

import mindspore as ms

from . import graph_cache
from .errors import StoryError

MODES = ("graph", "pynative")


def compiled(fn: Callable, mode: str) -> Callable:
    if mode not in MODES:
        raise StoryError(f"unknown mode {mode!r}; use 'graph' or 'pynative'")
    if mode == "pynative":
        return fn
    jitted = ms.jit(fn)
    compiled_for = set()  # input signatures this function has compiled for (a new one compiles, through the cache)

    def call(*args):
        signature = json.dumps(graph_cache.signature(args))
        if signature in compiled_for:
            out = jitted(*args)
        else:
            with graph_cache.entry(fn, args):
                out = jitted(*args)
            compiled_for.add(signature)
        _give_ctrl_c_back()
        return out

    return call


def _give_ctrl_c_back() -> None:
    """Every graph compile installs MindSpore's C-level SIGINT handler, which stops the compile and ends the process
    with SIGTERM (front ends turn that into a Ctrl-C: ``errors.main_guard``). Between compiles, Ctrl-C is Python's
    again: reinstall its handler (where Python's own is in force and we are on the main thread, the only one that may
    set handlers)."""
    if threading.current_thread() is threading.main_thread():
        handler = signal.getsignal(signal.SIGINT)
        if handler is signal.default_int_handler:
            signal.signal(signal.SIGINT, handler)
