"""Plain SDXL text-to-image with mindone-story's MindSpore SDXL stack.

python examples/story_diffusion/txt2img.py --model tiny --prompt "a man with a black suit" --output_dir outputs
python examples/story_diffusion/txt2img.py --model /path/to/RealVisXL_V4.0 --height 1024 --width 1024
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from frontend import add_common, setup

from mindone_story.errors import StoryError, main_guard
from mindone_story.pipelines.schedulers import SCHEDULERS


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model", "--model_path", dest="model", default="tiny", help="'tiny', a diffusers folder or a .safetensors"
    )
    p.add_argument("--prompt", action="append", help="a prompt; repeat for a batch")
    p.add_argument("--negative_prompt", default=None)
    add_common(p, "default 50 (4 for the tiny model)", "default 1024 (128 for the tiny model)")
    p.add_argument("--scheduler", default="ddim", choices=sorted(SCHEDULERS))
    p.add_argument("--output_dir", default="outputs/txt2img")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    from mindone_story import checks

    tiny = args.model == "tiny"
    height, width = checks.image_size(
        (128 if tiny else 1024) if args.height is None else args.height,
        (128 if tiny else 1024) if args.width is None else args.width,
    )
    steps = checks.whole("steps", (4 if tiny else 50) if args.steps is None else args.steps, 1, 1000)
    guidance = checks.number("guidance_scale", 5.0 if args.guidance_scale is None else args.guidance_scale, 0.0)
    seed = checks.seed(0 if args.seed is None else args.seed)
    prompts = args.prompt or ["a man with a black suit"]
    if not tiny and not Path(args.model).exists():
        raise StoryError(f"model {args.model} does not exist")
    from mindone_story.runs import files

    out = Path(args.output_dir)
    files.check_writable(out)
    dtype = setup(args.device, args.dtype, args.attention)

    from mindone_story.pipelines.sdxl import SDXLPipeline
    from mindone_story.pretrained import load_sdxl, tiny_model_dir

    models = load_sdxl(tiny_model_dir() if tiny else args.model, dtype)
    pipe = SDXLPipeline(models, mode=args.mode)
    start = time.time()
    negatives = [args.negative_prompt] * len(prompts) if args.negative_prompt is not None else None
    images = pipe(
        prompts, negatives, height, width, steps, guidance, seed, args.scheduler, long_prompts=args.long_prompts
    )
    for i, image in enumerate(images):
        files.save_png(image, out / f"image_{i:02d}.png")
    record = {
        "prompts": prompts,
        "negative_prompt": args.negative_prompt,
        "height": height,
        "width": width,
        "steps": steps,
        "guidance_scale": guidance,
        "scheduler": args.scheduler,
        "long_prompts": args.long_prompts,
        "seed": seed,
        "model": str(args.model),
        "model_fingerprint": models.fingerprint,
        "seconds": round(time.time() - start, 2),
    }
    files.write_json(record, out / "txt2img.json")
    print(f"wrote {len(images)} image(s) to {out}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    return main_guard(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
