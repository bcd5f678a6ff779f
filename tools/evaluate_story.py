"""Measure a finished story: CLIP-T per panel, the CLIP-I matrix and per-character consistency (README, "Measuring
consistency"). Writes OUTPUT_DIR/metrics.json and OUTPUT_DIR/metrics.png.

python tools/evaluate_story.py outputs/story                      # a story made with the tiny model
python tools/evaluate_story.py outputs/story --image_encoder h94/IP-Adapter/sdxl_models/image_encoder
python tools/evaluate_story.py outputs/story --clip_model /models/clip-vit-large-patch14

Encoders by default: the built-in tiny pair for a tiny-model story; otherwise the recorded model's text_encoder_2
with --image_encoder (required for StoryDiffusion; Story-Adapter's recorded image encoder otherwise).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from mindone_story.errors import StoryError, main_guard


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("output_dir", help="a finished story's folder (with story.json)")
    p.add_argument(
        "--text_encoder", default=None, help="an SDXL folder or file (its text_encoder_2); default: the run's"
    )
    p.add_argument("--image_encoder", default=None, help="IP-Adapter's SDXL image encoder: a folder, file or hub name")
    p.add_argument("--clip_model", default=None, help="a transformers CLIPModel folder or hub name (both towers)")
    p.add_argument("--mode", choices=["graph", "pynative"], default="graph")
    p.add_argument("--cache_dir", default="./cache_dir", help="where hub downloads are kept (Hugging Face layout)")
    p.add_argument("--local_files_only", action="store_true", help="use only files already in the cache")
    return p.parse_args(argv)


def encoders(args: argparse.Namespace) -> dict[str, str]:
    """The encoder files to load, from the flags or the run record, checked before any model is loaded."""
    from mindone_story.pretrained import tiny_model_dir
    from mindone_story.runs.record import RECORD, RunRecord

    folder = Path(args.output_dir)
    if not (folder / RECORD).is_file():
        raise StoryError(f"{folder} is not a story folder: it has no {RECORD}")
    if args.clip_model:
        if args.text_encoder or args.image_encoder:
            raise StoryError("--clip_model holds both towers: give it alone, or --text_encoder and --image_encoder")
        return {"clip_model": args.clip_model}
    record = RunRecord.read(folder)
    model = record.models.get("model" if record.method == "StoryDiffusion" else "base_model_path")
    tiny = model == "tiny"
    text = args.text_encoder or (str(tiny_model_dir()) if tiny else model)
    image = args.image_encoder or (str(tiny_model_dir() / "image_encoder") if tiny else None)
    if image is None and record.method == "Story-Adapter":
        image = record.models.get("image_encoder_path")
    if image is None:
        raise StoryError(
            "--image_encoder is required (IP-Adapter's SDXL image encoder, the bigG partner of SDXL's "
            "text_encoder_2), or give --clip_model"
        )
    if text is None:
        raise StoryError(f"{folder / RECORD} records no model: give --text_encoder or --clip_model")
    return {"text_encoder": text, "image_encoder": image}


def run(args: argparse.Namespace) -> int:
    paths = encoders(args)
    from mindone_story.hub import HubError, resolve
    from mindone_story.metrics import HEATMAP, METRICS, evaluate, load_clip_pair

    files = {}
    for flag, path in paths.items():
        try:
            files[flag] = str(resolve(path, args.cache_dir, None, args.local_files_only, False, print))
        except HubError as e:
            raise StoryError(f"--{flag}: {e}") from None
    pair = load_clip_pair(**files, mode=args.mode)
    result = evaluate(args.output_dir, pair)
    for r in result.get("rounds", [result]):
        t, i = r["clip_t_mean"], r["clip_i"]
        head = f"round {r['round']}: " if "round" in r else ""
        chars = "".join(f", {n} {c['mean']:.3f}" for n, c in i["characters"].items() if c["mean"] is not None)
        all_pairs = f", CLIP-I {i['all']:.3f}" if i["all"] is not None else ""
        print(f"{head}CLIP-T {t['plain']:.2f} (styled {t['styled']:.2f}){all_pairs}{chars}")
    if result["truncated"]:
        print(f"{len(result['truncated'])} prompt(s) longer than {result['max_tokens']} tokens were cut, as CLIP does")
    out = Path(args.output_dir)
    print(f"wrote {out / METRICS} and {out / HEATMAP}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    return main_guard(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
