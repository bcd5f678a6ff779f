"""Plain SDXL text-to-image with mindone-story's MindSpore SDXL stack.

python examples/story_diffusion/txt2img.py --model tiny --prompt "a man with a black suit" --output_dir outputs
python examples/story_diffusion/txt2img.py --model /path/to/RealVisXL_V4.0 --height 1024 --width 1024
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import mindspore as ms

from mindone_story.pipelines.schedulers import SCHEDULERS
from mindone_story.pipelines.sdxl import SDXLPipeline
from mindone_story.pretrained import load_sdxl, tiny_model_dir


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="'tiny' (built in), a diffusers folder or a single .safetensors")
    p.add_argument("--prompt", action="append", help="a prompt; repeat for a batch")
    p.add_argument("--negative_prompt", default=None)
    p.add_argument("--height", type=int, default=None, help="default: 1024, or 128 for the tiny model")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="default: 50, or 4 for the tiny model")
    p.add_argument("--guidance_scale", type=float, default=5.0)
    p.add_argument("--scheduler", default="ddim", choices=sorted(SCHEDULERS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mode", default="graph", choices=["graph", "pynative"])
    p.add_argument(
        "--device",
        default=None,
        choices=["CPU", "Ascend", "Ascend-emulated"],
        help="default: MindSpore's default device",
    )
    p.add_argument("--output_dir", default="outputs/txt2img")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device:
        from mindone_story.layers import set_device

        set_device(args.device)
    ms.runtime.launch_blocking()
    tiny = args.model == "tiny"
    height = args.height or (128 if tiny else 1024)
    width = args.width or (128 if tiny else 1024)
    steps = args.steps or (4 if tiny else 50)
    prompts = args.prompt or ["a man with a black suit"]
    models = load_sdxl(tiny_model_dir() if tiny else args.model)
    pipe = SDXLPipeline(models, mode=args.mode)
    start = time.time()
    negatives = [args.negative_prompt] * len(prompts) if args.negative_prompt is not None else None
    images = pipe(prompts, negatives, height, width, steps, args.guidance_scale, args.seed, args.scheduler)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        tmp = out / f".image_{i:02d}.png.tmp"
        image.save(tmp, format="PNG")
        os.replace(tmp, out / f"image_{i:02d}.png")
    record = {
        "prompts": prompts,
        "negative_prompt": args.negative_prompt,
        "height": height,
        "width": width,
        "steps": steps,
        "guidance_scale": args.guidance_scale,
        "scheduler": args.scheduler,
        "seed": args.seed,
        "model": str(args.model),
        "model_fingerprint": models.fingerprint,
        "seconds": round(time.time() - start, 2),
    }
    (out / "txt2img.json").write_text(json.dumps(record, indent=2))
    print(f"wrote {len(images)} image(s) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
