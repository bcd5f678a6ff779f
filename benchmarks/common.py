"""What the benchmark scripts share: process and machine memory readings, the memory watchdog's test, the source
revision stamp, the children's environment, and lazily generated random weights.

The scripts run as ``python benchmarks/<name>.py`` (their children too), so this folder is on ``sys.path``.
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess
import sys
import time
import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mindone_story.weights.safetensors_io import LazyTensor, LazyWeights  # noqa: E402  (numpy only: torch side too)

GB = 1024**3


def rss_bytes(pid: int | str = "self") -> int:
    """Current VmRSS of one process (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def tree_rss_bytes(pid: int) -> int:
    """VmRSS of a process and all its descendants."""
    total, todo = 0, [pid]
    while todo:
        pid = todo.pop()
        total += rss_bytes(pid)
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return total


def mem_available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def memory_pressure(rss: int, max_rss: int, min_avail: int) -> str | None:
    """Why a watched child must be killed now, or None: its RSS above the cap, or the machine running short."""
    if rss > max_rss:
        return f"RSS above the {max_rss / GB:.1f} GB cap"
    if mem_available_bytes() < min_avail:
        return f"machine MemAvailable below {min_avail / GB:.1f} GB"
    return None


def wait_for_memory(gb: float, timeout_s: float) -> bool:
    """Wait until the machine's MemAvailable reaches ``gb`` (others share the machine); False on timeout."""
    deadline = time.time() + timeout_s
    while mem_available_bytes() < gb * GB:
        if time.time() > deadline:
            return False
        time.sleep(15)
    return True


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def source_revision() -> str:
    """The commit of the library being measured (and whether mindone_story/ differs from it)."""
    stamp = ROOT / ".commit"  # written by whoever exports a snapshot (git archive has no .git)
    if stamp.exists():
        return stamp.read_text().strip()
    try:
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", "mindone_story"], capture_output=True, text=True
        ).stdout.strip()
        return head + (" + uncommitted changes in mindone_story/" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def child_env(isa: str = "default") -> dict:
    """The children's environment; ``isa`` other than "default" caps oneDNN (``ONEDNN_MAX_CPU_ISA``). Not needed
    since the library's CPU convolution became a MatMul (layers.Conv2d), and the cap halves MatMul speed on
    AVX-512 CPUs."""
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    env.setdefault("MINDONE_STORY_GRAPH_CACHE", "0")  # every run compiles, as a first run does (export it to differ)
    if isa != "default":
        env["ONEDNN_MAX_CPU_ISA"] = isa
    return env


class LazyRandomWeights(LazyWeights):
    """``mindone_story.pretrained.random_weights`` one tensor at a time: each tensor is seeded by its own name, so the
    values equal the eager ones, and no second full copy of the weights is ever held. Keeps a CRC32 per tensor
    handed out, so two processes can show they loaded the same weights."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], seed_text: str):
        self.tensors = {k: LazyTensor(tuple(s), "F32", functools.partial(self._make, k)) for k, s in shapes.items()}
        self.seed_text = seed_text
        self.crc = {}

    def _make(self, key: str) -> np.ndarray:
        from mindone_story.pretrained import random_weights

        value = random_weights({key: self.shape(key)}, self.seed_text)[key]
        self.crc[key] = zlib.crc32(value.tobytes())
        return value

    def checksum(self) -> str:
        digest = 0
        for key in sorted(self.crc):
            digest = zlib.crc32(f"{key}:{self.crc[key]}".encode(), digest)
        return f"{digest:08x}"


def random_unet(preset: str, seed_text: str):
    """A UNet of a preset ("tiny", "sdxl") on CPU with deterministic random weights, as the pipelines build it; returns
    (unet, its config dict). Imports MindSpore (MindSpore children only)."""
    import json

    import mindspore as ms

    from mindone_story.layers import set_device

    set_device("CPU")
    ms.runtime.launch_blocking()  # as examples/story_diffusion/run.py
    from mindone_story.models.load import load_state, parameter_shapes
    from mindone_story.pretrained import build_component

    config = json.loads((ROOT / "mindone_story" / "presets" / preset / "unet" / "config.json").read_text())
    unet = build_component("unet", config)
    unet.set_train(False)
    load_state(unet, LazyRandomWeights(parameter_shapes(unet), seed_text), "random weights")
    return unet, config


def unet_inputs(config: dict, latent: int, batch: int, seed: int) -> tuple:
    """One UNet call's positional inputs at timestep 500: random latents, text context and pooled embeds (seeded)."""
    from mindspore import Tensor

    rng = np.random.default_rng(seed)
    add = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
    size = float(8 * latent)
    return (
        Tensor(rng.standard_normal((batch, config["in_channels"], latent, latent)).astype(np.float32)),
        Tensor(np.array([500.0], np.float32)),
        Tensor(rng.standard_normal((batch, 77, config["cross_attention_dim"])).astype(np.float32)),
        Tensor(rng.standard_normal((batch, add)).astype(np.float32)),
        Tensor(np.tile(np.array([[size, size, 0, 0, size, size]], np.float32), (batch, 1))),
    )
