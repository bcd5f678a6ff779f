"""Fused fp32 CPU kernels (``cpu_kernels.cc``) as MindSpore ``Custom(func_type="aot")`` ops.

The C++ source is compiled with the host's g++ on first use (``-O3 -march=native -fopenmp``, a few seconds), linked
against the oneDNN library that MindSpore ships (for SGEMM), into a cache
keyed by the source, the compiler and the CPU's instruction-set flags, so a shared home directory never hands one
machine another's binary. Without a compiler, or with ``MINDONE_STORY_CPU_KERNELS=0``, :func:`library` returns None
and ``layers`` composes the same functions from MindSpore ops (correct, 15-40x slower per op on CPU).
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import mindspore
from mindspore import ops

from .config import default_cache_dir

_SOURCE = Path(__file__).with_name("cpu_kernels.cc")
_FLAGS = ["-std=c++17", "-O3", "-march=native", "-fno-trapping-math", "-fopenmp", "-shared", "-fPIC"]
# SGEMM comes from the oneDNN that MindSpore ships (already loaded in the process; the rpath finds the same file).
_MS_LIB = os.path.join(os.path.dirname(mindspore.__file__), "lib")
_LINK = [f"-L{_MS_LIB}", "-l:libdnnl.so.3", f"-Wl,-rpath,{_MS_LIB}"]
_UNBUILT = object()
_built: object = _UNBUILT  # path of the library, or None once a build was refused or failed


def cache_dir() -> Path:
    return default_cache_dir() / "cpu_kernels"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor()


def _build(compiler: str) -> str:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256(
        "\0".join([_SOURCE.read_text(), " ".join(_FLAGS + _LINK), version, platform.machine(), _cpu_flags()]).encode()
    ).hexdigest()[:16]
    target = cache_dir() / f"cpu_kernels-{key}.so"
    if target.exists():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: concurrent first uses never load a half-written library.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([compiler, *_FLAGS, "-o", tmp, str(_SOURCE), *_LINK], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(done.stderr.strip()[-2000:])
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return str(target)


def library() -> str | None:
    """Path of the compiled kernel library, building it on the first call; None if the kernels are unavailable."""
    global _built
    if _built is _UNBUILT:
        _built = None
        if os.environ.get("MINDONE_STORY_CPU_KERNELS", "1") == "0":
            return None
        compiler = shutil.which(os.environ.get("CXX", "g++"))
        why = None
        if platform.system() != "Linux":
            why = "MindSpore's Custom aot ops run on Linux only"
        elif compiler is None:
            why = "no C++ compiler found (install g++ or set CXX)"
        else:
            try:
                _built = _build(compiler)
            except (OSError, RuntimeError, subprocess.CalledProcessError) as err:
                why = f"building {_SOURCE.name} failed: {err}"
        if why:
            warnings.warn(
                f"mindone_story: fused CPU kernels unavailable ({why}); GroupNorm, LayerNorm, GELU, SiLU and "
                "convolutions run as composed MindSpore ops, several times slower.",
                RuntimeWarning,
                stacklevel=2,
            )
    return _built


def op(name: str, out_shape, out_dtype=None, tag: str = "") -> ops.Custom:
    """The Custom op running kernel ``name``; ``tag`` tells apart ops of one kernel whose output shapes differ for
    the same input shapes (PyNative caches inferred shapes per op name, attributes and input shapes)."""
    path = library()
    if path is None:
        raise RuntimeError("fused CPU kernels are unavailable; check cpu_kernels.library() before calling op()")
    custom = ops.Custom(f"{path}:{name}", out_shape=out_shape, out_dtype=out_dtype or _first, func_type="aot")
    if tag:
        custom.add_prim_attr("mindone_story_tag", tag)
    return custom


def _first(dtype, *_):
    return dtype
