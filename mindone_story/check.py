"""Check an installation on a device: the tiny StoryDiffusion story (two characters, write and read phases, windows)
on the device in its default dtype, against the same story in fp32 on CPU (run in a child process, as a process
has one device). Prints one PASS or FAIL line and exits 0 or 1.

    python -m mindone_story.check --device Ascend            # on an NPU: fp16, FlashAttentionScore, mint kernels
    python -m mindone_story.check --device Ascend-emulated   # the same code path on CPU, contracts checked
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

CHARACTERS = "[Bob] a man with a black suit\n[Alice] a woman in a white shirt"
STORY = "[Bob] wakes up\n[Alice] reads a book\n[Bob] has breakfast\n[Alice] goes to work\n[Bob] and [Alice] meet\n"
TOLERANCE = 1.5e-2  # relative, max|ours - ref| / max|ref| over each phase's final latents (mindone's fp16 figure)


def tiny_story_latents(mode: str, dtype=None) -> list[np.ndarray]:
    """The final latents of each phase of the tiny story (64x64, 2 steps, id_length 2, window 1): Bob's two
    windows, Alice's two, and the read phase with both; on the backend chosen now."""

    from .pipelines.story_diffusion import StoryDiffusionPipeline, StoryDiffusionSettings
    from .pretrained import load_sdxl, tiny_model_dir
    from .story.prompts import parse_story

    pipe = StoryDiffusionPipeline(load_sdxl(tiny_model_dir(), dtype), mode=mode)
    seen = record_latents(pipe)
    pipe(parse_story(CHARACTERS, STORY, 2), StoryDiffusionSettings(height=64, width=64, steps=2, seed=7, window=1))
    return seen


def record_latents(pipe) -> list[np.ndarray]:
    """From now on, the final latents of every denoise call of ``pipe`` (each phase or panel), in fp32."""
    import mindspore as ms

    seen, denoise = [], pipe.sdxl.denoise

    def recording(*args, **kwargs):
        out = denoise(*args, **kwargs)
        seen.append(out.astype(ms.float32).asnumpy())
        return out

    pipe.sdxl.denoise = recording
    return seen


def rel_errors(ours: list[np.ndarray], ref: list[np.ndarray]) -> list[float]:
    return [float(np.abs(a - b).max() / np.abs(b).max()) for a, b in zip(ours, ref)]


def cpu_reference(mode: str) -> list[np.ndarray]:
    """The fp32 CPU latents, from a child process."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "reference.npz"
        cmd = [sys.executable, "-m", "mindone_story.check", "--device", "CPU", "--mode", mode, "--save", str(out)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        saved = np.load(out)
        return [saved[k] for k in sorted(saved.files, key=int)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="Ascend", choices=["CPU", "Ascend", "Ascend-emulated"])
    p.add_argument("--mode", default="graph", choices=["graph", "pynative"])
    p.add_argument("--save", default=None, help=argparse.SUPPRESS)  # the child process's output
    args = p.parse_args(argv)
    import mindspore as ms

    from .layers import backend, default_dtype, set_device

    set_device(args.device)
    ms.runtime.launch_blocking()
    if args.save:
        np.savez(args.save, **{str(i): a for i, a in enumerate(tiny_story_latents(args.mode, ms.float32))})
        return 0
    ref = cpu_reference(args.mode)
    ours = tiny_story_latents(args.mode)
    errors = rel_errors(ours, ref)
    ok = len(ours) == len(ref) and all(np.isfinite(a).all() for a in ours) and max(errors) < TOLERANCE
    b = backend()
    print(
        f"{'PASS' if ok else 'FAIL'}: tiny story on {b.device} ({default_dtype()}, {b.attention} attention, "
        f"{args.mode}) against CPU fp32: max relative error {max(errors):.2e} (limit {TOLERANCE:.1e}) "
        f"over {len(ours)} phases"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
