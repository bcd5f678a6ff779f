"""StoryDiffusion comics with consistent characters (MindSpore, graph mode by default).

    python examples/story_diffusion/run.py --general_prompt "a man with a black suit" --sd_model_name RealVision \\
        --style_name "Comic book"
    python examples/story_diffusion/run.py --sd_model_name tiny --output_dir outputs/story   # built-in tiny model
    python examples/story_diffusion/run.py --model_path RealVisXL_V4.0.safetensors \\
        --general_prompt "[Bob] a man, wearing a black suit
    [Alice] a woman, wearing a white shirt" --story story.txt --typesetting "Classic Comic Style"

A story file has one panel per line: ``[Bob] at home, read new paper #at home, the newspaper says...``; ``[NC]``
marks a panel without characters; text after ``#`` is the caption. With a plain --general_prompt (no ``[Name]``),
it describes the one character of every panel, as in the original notebook.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mindone_story.models_registry import MODELS, resolve_model
from mindone_story.pipelines.schedulers import SCHEDULERS
from mindone_story.pipelines.story_diffusion import DEFAULT_NEGATIVE, StoryDiffusionPipeline, StorySettings
from mindone_story.story.comic import DEFAULT_FONT_SIZE, LAYOUTS
from mindone_story.story.output import write_story
from mindone_story.story.prompts import STYLE_NAMES, Story, parse_story

# the default story of mindone's run.py: six actions and two more, for one character
DEFAULT_ACTIONS = [
    "wake up in the bed",
    "have breakfast",
    "is on the road, go to the company",
    "work in the company",
    "running in the playground",
    "reading book in the home",
    "siting on the sofa",
    "on the bed, at night",
]
HERO = "Hero"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--height", type=int, default=None, help="default 768 (128 for the tiny model)")
    p.add_argument("--width", type=int, default=None, help="default 768 (128 for the tiny model)")
    p.add_argument("--sd_model_name", default="RealVision", help=f"one of {sorted(MODELS)}")
    p.add_argument("--model_path", default=None, help="a diffusers folder or a single file (overrides sd_model_name)")
    p.add_argument("--style_name", default="Comic book", help=f"one of {STYLE_NAMES}")
    p.add_argument("--cache_dir", default="./cache_dir", help="where --sd_model_name folders are looked up")
    p.add_argument("--output_dir", default="outputs")
    p.add_argument(
        "--general_prompt",
        default="a man with a black suit",
        help="the character box ('[Name] description' lines) or one plain description",
    )
    p.add_argument("--story", default=None, help="a file with one panel per line (default: mindone's 8 actions)")
    p.add_argument("--negative_prompt", default=DEFAULT_NEGATIVE)
    p.add_argument("--sampling_steps", type=int, default=None, help="default 50 (4 for the tiny model)")
    p.add_argument("--guidance_scale", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=3407)
    p.add_argument("--id_length", type=int, default=4)
    p.add_argument("--sa32", type=float, default=0.5, help="share of 1/32-resolution tokens each image sees")
    p.add_argument("--sa64", type=float, default=0.5, help="share of 1/16-resolution tokens each image sees")
    p.add_argument("--window", type=int, default=None, help="id panels per write batch (bounds memory)")
    p.add_argument("--read_batch", type=int, default=1, help="later panels per batch")
    p.add_argument("--scheduler", default="ddim", choices=sorted(SCHEDULERS))
    p.add_argument("--typesetting", default="Four Pannel", choices=list(LAYOUTS))
    p.add_argument(
        "--font_size",
        type=int,
        default=None,
        help=f"caption font size (default {DEFAULT_FONT_SIZE} at 768 px wide, scaled with the width)",
    )
    p.add_argument(
        "--dtype", default=None, choices=["fp32", "fp16", "bf16"], help="default: fp32 on CPU, fp16 on Ascend"
    )
    p.add_argument("--mode", default="graph", choices=["graph", "pynative"])
    p.add_argument("--device", default=None, choices=["CPU", "Ascend", "Ascend-emulated"])
    p.add_argument("--attention", default=None, choices=["math", "flash"], help="default: flash on Ascend, math on CPU")
    p.add_argument("--local_files_only", action="store_true", help="accepted for compatibility: nothing is downloaded")
    return p.parse_args(argv)


def build_story(general_prompt: str, story_file: str | None, id_length: int) -> Story:
    lines = Path(story_file).read_text(encoding="utf-8") if story_file else None
    if "[" in general_prompt:
        if lines is None:
            raise ValueError("a character box in --general_prompt needs a --story file naming the characters")
        return parse_story(general_prompt, lines, id_length)
    if lines is None:
        lines = "\n".join(f"[{HERO}],{action} #{action}" for action in DEFAULT_ACTIONS)
    else:  # a plain description: every panel without a tag is about the one character
        lines = "\n".join(
            line if ("[" in line or not line.strip()) else f"[{HERO}],{line.split('#')[0]} #{line.rpartition('#')[2]}"
            for line in lines.splitlines()
        )
    return parse_story(f"[{HERO}] {general_prompt}", lines, id_length)


def dtype_of(name: str | None):
    import mindspore as ms

    return {None: None, "fp32": ms.float32, "fp16": ms.float16, "bf16": ms.bfloat16}[name]


def main(argv=None) -> int:
    args = parse_args(argv)
    import mindspore as ms

    from mindone_story.layers import backend, compute_dtype, set_device
    from mindone_story.pretrained import load_sdxl, tiny_model_dir

    if args.device or args.attention:
        set_device(args.device or backend().device, args.attention)
    ms.runtime.launch_blocking()
    tiny = args.sd_model_name == "tiny" and not args.model_path
    args.height = args.height or (128 if tiny else 768)
    args.width = args.width or (128 if tiny else 768)
    args.sampling_steps = args.sampling_steps or (4 if tiny else 50)
    args.font_size = args.font_size or max(8, round(DEFAULT_FONT_SIZE * args.width / 768))
    if args.style_name not in STYLE_NAMES:
        raise SystemExit(f"error: unknown style {args.style_name!r}; choose one of {STYLE_NAMES}")
    try:
        compute_dtype(dtype_of(args.dtype))  # a dtype the device cannot run fails here, before any work
        story = build_story(args.general_prompt, args.story, args.id_length)
        settings = StorySettings(
            args.height,
            args.width,
            args.sampling_steps,
            args.guidance_scale,
            args.seed,
            args.sa32,
            args.sa64,
            args.style_name,
            args.negative_prompt,
            args.scheduler,
            args.window,
            args.read_batch,
        )
        settings.check()
        model = resolve_model(args.sd_model_name, args.model_path, args.cache_dir)
        if args.height % 32 or args.width % 32:
            raise ValueError(f"height and width must be multiples of 32, got {args.height}x{args.width}")
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from None

    models = load_sdxl(tiny_model_dir() if model == "tiny" else model, dtype_of(args.dtype))
    pipe = StoryDiffusionPipeline(models, mode=args.mode)
    out = Path(args.output_dir)
    extra = {"mode": args.mode, "dtype": args.dtype}
    panels, pages = write_story(pipe, story, settings, out, args.typesetting, args.font_size, model, extra)
    print(f"wrote {len(panels)} panels and {len(pages)} page(s) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
