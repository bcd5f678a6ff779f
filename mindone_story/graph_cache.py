"""Compiled graphs kept on disk across runs, so that a second story skips the compiles (measured: the SDXL UNet's first
call at 512 px on CPU takes 19 s from the cache against 50 s compiled; README, "Compiled graphs on disk").

MindSpore's compile cache keys a graph on the hash of its Python source files only: measured with 2.10, a cell
whose construct reads ``self.scale`` returned the first run's result for another scale, and a graph compiled for 3
elements returned 3 elements for an input of 4. So each graph gets a directory of its own, named by everything that
can shape it: MindSpore's version, the library's source, the device backend, the function, the whole cell tree it
belongs to (every cell's type and Python attributes, every Parameter's name, shape and dtype, the bytes of constant
tensors, the Primitives and their attributes) and the call's input signature. The cache is switched on for that
one compile only, and off again before anything else compiles. Weights are not in the cache: a loaded graph reads the
live Parameters.

MindSpore numbers the graphs it caches in compile order across the process, so a graph compiled at another position
than last time is a miss (compiled and saved again beside the old file, both the same graph): safe, only slower.
Only a cell's methods are cached (a plain function's globals and closures are not in the key). What the key cannot
see is Python state outside the cell tree that a ``construct`` reads at trace time (a mutable module global, an
attribute of a helper object that is neither a cell nor a dataclass, described by its type alone): the library keeps
none (tests/test_graph_cache.py checks every compiled cell of the pipelines), and ``MINDONE_STORY_GRAPH_CACHE=0``
is the default (off); ``=1`` keeps graphs in ``<cache>/graphs``, ``=DIR`` in DIR. Opt-in for now: see ``directory``. A directory that cannot be made means a compile without the cache.
Two runs saving the same graph at the same time can leave a broken file: MindSpore then logs "Load MindIR file
failed", compiles, and writes the file again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import hashlib
import json
import os
import types
from collections.abc import Callable, Iterator
from pathlib import Path, PurePath

import mindspore as ms
import numpy as np
from mindspore import nn
from mindspore.ops import Primitive

from .config import default_cache_dir
from .layers import backend

ENV = "MINDONE_STORY_GRAPH_CACHE"
_CELL_BASE = frozenset(vars(nn.Cell()))  # MindSpore's own bookkeeping on every cell (ids, creation times, hooks)


def directory() -> Path | None:
    """Where compiled graphs are kept, or None when the cache is off: **off unless** ``MINDONE_STORY_GRAPH_CACHE``
    names a directory (``1``: ``<cache>/graphs``). In the demo's browser test a warm cache gave PhotoMaker's id
    encoder a graph whose output shape was not its own (a RuntimeError in the next op, in a long-running server that
    had served other stories first); the cause is not found, so the cache stays opt-in until it is."""
    value = os.environ.get(ENV, "")
    if value in ("", "0"):
        return None
    return default_cache_dir() / "graphs" if value == "1" else Path(value)


@functools.lru_cache(maxsize=1)
def _library_source() -> str:
    root = Path(__file__).parent
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.suffix in (".py", ".cc", ".json") and p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def describe(value, depth: int = 0, seen: set | None = None):
    """A JSON-able description of a value as a graph would freeze it (never an address or an id)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return repr(value)  # keeps nan, inf and every bit of the value
    if isinstance(value, ms.Parameter):
        return ["param", value.name, list(value.shape), str(value.dtype)]
    if isinstance(value, ms.Tensor):  # a constant in the graph: its bytes matter
        data = value.asnumpy()
        return ["tensor", list(data.shape), str(value.dtype), hashlib.sha256(data.tobytes()).hexdigest()]
    if isinstance(value, np.ndarray):
        return ["array", list(value.shape), str(value.dtype), hashlib.sha256(value.tobytes()).hexdigest()]
    if isinstance(value, np.generic):
        return ["scalar", str(value.dtype), repr(value.item())]
    if isinstance(value, (tuple, list)):
        return [type(value).__name__, bool(getattr(value, "__ms_mutable__", False))] + [
            describe(v, depth + 1, seen) for v in value
        ]
    if isinstance(value, dict):
        return ["dict"] + [
            [str(k), describe(v, depth + 1, seen)] for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))
        ]
    if isinstance(value, nn.Cell):  # a cell of the tree being walked: which one; any other (a plain list's): in full
        if seen is None or id(value) in seen:
            return ["cell", _qualname(type(value))]
        return ["cell", _qualname(type(value)), cell_tree(value, seen)]
    if isinstance(value, Primitive):
        attrs = {k: describe(v, depth + 1, seen) for k, v in sorted(value.attrs.items())}
        func = getattr(value, "func", None)  # ops.Custom: the kernel library path and function name
        return ["primitive", _qualname(type(value)), value.name, attrs, func if isinstance(func, str) else None]
    if isinstance(value, types.MethodType):
        return ["method", _qualname(type(value.__self__)), value.__func__.__qualname__]
    if isinstance(value, (types.FunctionType, types.BuiltinFunctionType, functools.partial, type)):
        if isinstance(value, functools.partial):
            return ["partial", describe(value.func, depth + 1, seen), describe(value.args, depth + 1, seen)]
        return ["function", getattr(value, "__module__", None), getattr(value, "__qualname__", repr(value))]
    if isinstance(value, PurePath):
        return ["path", str(value)]
    if isinstance(value, enum.Enum):
        return ["enum", _qualname(type(value)), value.name]
    if isinstance(value, ms.dtype.Type):
        return ["dtype", str(value)]
    if dataclasses.is_dataclass(value) and depth < 4:
        fields = {f.name: describe(getattr(value, f.name), depth + 1, seen) for f in dataclasses.fields(value)}
        return ["dataclass", _qualname(type(value)), fields]
    return ["object", _qualname(type(value))]


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def cell_tree(cell: nn.Cell, seen: set | None = None) -> list:
    """Every cell under ``cell``: its name, type, train flag, own attributes, Primitives and Parameters. A cell held
    outside the tree (in a plain list, which MindSpore does not register) is walked where it is found."""
    cells = list(cell.cells_and_names())
    seen = set() if seen is None else seen
    seen.update(id(sub) for _, sub in cells)
    out = []
    for name, sub in cells:
        attrs = {k: describe(v, 0, seen) for k, v in sorted(vars(sub).items()) if k not in _CELL_BASE}
        params = [[k, describe(p)] for k, p in sub._params.items() if p is not None]  # noqa: SLF001
        prims = [[k, describe(p)] for k, p in sub._primitives.items()]  # noqa: SLF001
        buffers = [[k, describe(b)] for k, b in sorted(getattr(sub, "_buffers", {}).items())]  # noqa: SLF001
        out.append([name, _qualname(type(sub)), sub.training, attrs, params, prims, buffers])
    return out


def signature(value):
    """What a graph's input fixes: a tensor's shape and dtype (not its values), a constant's value, a tuple's
    structure and whether it is ``ms.mutable``."""
    if isinstance(value, ms.Tensor):
        return ["input", list(value.shape), str(value.dtype)]
    if isinstance(value, (tuple, list)):
        return [type(value).__name__, bool(getattr(value, "__ms_mutable__", False))] + [signature(v) for v in value]
    if isinstance(value, dict):
        return ["dict"] + [[str(k), signature(v)] for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))]
    return describe(value)


def key(fn: Callable, args: tuple) -> str:
    """The name of ``fn``'s graph for these inputs: equal keys mean the same compiled graph."""
    owner = getattr(fn, "__self__", None)
    whole = {
        "mindspore": ms.__version__,
        "library": _library_source(),
        "backend": describe(backend()),
        "function": [getattr(fn, "__module__", None), getattr(fn, "__qualname__", repr(fn))],
        "cells": cell_tree(owner) if isinstance(owner, nn.Cell) else None,
        "inputs": signature(args),
    }
    return hashlib.sha256(json.dumps(whole, sort_keys=True).encode()).hexdigest()[:32]


@contextlib.contextmanager
def entry(fn: Callable, args: tuple) -> Iterator[None]:
    """Compile ``fn`` for ``args`` inside: through the cache directory of this graph when the cache is on."""
    root = directory()
    if root is None or not isinstance(getattr(fn, "__self__", None), nn.Cell):
        yield  # only a cell's method: a plain function's globals and closures are not in the key
        return
    path = root / key(fn, args)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:  # a read-only or full cache: the run goes on, compiling as without the cache
        yield
        return
    ms.set_context(enable_compile_cache=True, compile_cache_path=str(path))
    try:
        yield
    finally:
        ms.set_context(enable_compile_cache=False)
