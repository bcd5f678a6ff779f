"""What the command-line front ends share: one flag vocabulary (the originals' spellings kept as aliases), the
device and dtype setup, and the top-level error handler. The library below speaks no CLI."""

from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # transformers' "no PyTorch found" notice: we use none
# a failed (or interrupted) graph compile dumps rank_<id>/om/analyze_fail.ir under MS_OM_PATH, by default the
# working folder: the stray rank_0/ in a checkout. (MS_DEV_SAVE_GRAPHS_PATH does not move it: measured.)
os.environ.setdefault("MS_OM_PATH", os.path.join(tempfile.gettempdir(), "mindone_story-graphs"))

from mindone_story.errors import StoryError

MODES = {"graph": "graph", "pynative": "pynative", "0": "graph", "1": "pynative"}  # mindone's 0 = GRAPH_MODE


def warn_truncation(cut: dict[int, dict[str, str]]) -> None:
    """Never cut silently: one line per panel whose prompt CLIP's 77 tokens cut, one per negative prompt cut (a
    pipeline's ``truncation``)."""
    for i, parts in sorted(cut.items()):
        if "prompt" in parts:
            print(f"warning: panel {i}: the prompt passes CLIP's 77 tokens; dropped: {parts['prompt']!r}")
    for text in sorted({parts["negative_prompt"] for parts in cut.values() if "negative_prompt" in parts}):
        print(f"warning: the negative prompt passes CLIP's 77 tokens; dropped: {text!r}")


def mode(value: str) -> str:
    if value not in MODES:
        raise argparse.ArgumentTypeError(f"choose graph, pynative, 0 (graph) or 1 (pynative), got {value!r}")
    return MODES[value]


def add_common(p: argparse.ArgumentParser, steps_help: str, size_help: str) -> None:
    """Flags every runner has, with one name each (and the originals' names as aliases)."""
    p.add_argument("--steps", "--sampling_steps", dest="steps", type=int, default=None, help=steps_help)
    p.add_argument("--height", type=int, default=None, help=size_help)
    p.add_argument("--width", type=int, default=None, help=size_help)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--guidance_scale", type=float, default=None, help="classifier-free guidance (default 5.0)")
    p.add_argument("--mode", type=mode, default="graph", help="graph (default, also 0) or pynative (also 1)")
    p.add_argument(
        "--device",
        default=None,
        choices=["CPU", "Ascend", "Ascend-emulated"],  # layers.DEVICES (not imported here: --help stays fast)
        help="default: MindSpore's default device; Ascend-emulated runs the Ascend branch on CPU with its contracts",
    )
    p.add_argument("--attention", default=None, choices=["math", "flash"], help="default: flash on Ascend, math on CPU")
    p.add_argument(
        "--dtype", default=None, choices=["fp32", "fp16", "bf16"], help="default: fp32 on CPU, fp16 on Ascend"
    )
    p.add_argument(
        "--long_prompts",
        action="store_true",
        help="encode prompts past CLIP's 77 tokens in 77-token chunks, as compel does, instead of cutting them",
    )
    p.add_argument("--no_progress", action="store_true", help="no progress bars")


def lora_arg(spec: str) -> tuple[str, str]:
    """PATH[:SCALE]; a path may itself hold colons, so only a number after the last one is a scale."""
    path, _, scale = spec.rpartition(":")
    try:
        float(scale)
    except ValueError:
        return spec, "1.0"
    return (path, scale) if path else (spec, "1.0")


def add_lora(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        type=lora_arg,
        metavar="PATH[:SCALE]",
        help="a LoRA file (kohya, peft or diffusers layout) fused at load, scale default 1.0; repeatable",
    )


def check_loras(loras: list[tuple[str, str]]) -> list[tuple[str, float]]:
    """Each LoRA file exists and its scale is a finite number, before any work."""
    from pathlib import Path

    from mindone_story import checks

    for path, _ in loras:
        if not Path(path).is_file():
            raise StoryError(f"LoRA file not found: {path}")
    return [(path, checks.number(f"the scale of LoRA {path}", scale)) for path, scale in loras]


def add_output(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--output_dir", default=default)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="continue the run recorded in output_dir/story.json")
    group.add_argument(
        "--overwrite", action="store_true", help="replace the run in output_dir (its panels, pages and record)"
    )


def add_parallel(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--parallel",
        action="store_true",
        help="split the panels across the ranks msrun starts (automatic under msrun): msrun --worker_num=N ...",
    )


def start_parallel(argv=None):
    """Join the msrun job, if there is one, before the arguments are checked: a rank that stopped before
    ``init()`` would leave the others waiting for the cluster to form. The device is set first (``init()`` picks
    the collective backend from it; msrun gives each rank its device id)."""
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    p.add_argument("--parallel", action="store_true")
    p.add_argument("--device", default=None)
    known, _ = p.parse_known_args(argv)
    from mindone_story import parallel

    if known.device in ("CPU", "Ascend", "Ascend-emulated") and (known.parallel or parallel.launched()):
        from mindone_story.layers import set_device

        set_device(known.device)
    return parallel.start(known.parallel)


def setup(device: str | None, dtype: str | None, attention: str | None = None):
    """Set the backend (before any model is built) and return the MindSpore dtype to load in (the device's default
    when none is asked for); a dtype the device cannot run is refused here, before any work."""
    import mindspore as ms

    from mindone_story.layers import backend, compute_dtype, set_device

    if device or attention:
        set_device(device or backend().device, attention)
    ms.runtime.launch_blocking()  # PyNative's async dispatch threads halve the speed on few cores
    return compute_dtype(dtype_of(dtype))


def dtype_of(name: str | None):
    """The MindSpore dtype of a --dtype value (None: the device's default, decided by the loaders)."""
    import mindspore as ms

    return {None: None, "fp32": ms.float32, "fp16": ms.float16, "bf16": ms.bfloat16}[name]
