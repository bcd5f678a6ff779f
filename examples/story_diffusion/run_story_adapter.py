"""Story-Adapter: a long story made consistent by regenerating every panel for several rounds, each round attending
to all panels of the previous one (global reference cross-attention through IP-Adapter SDXL).

    python examples/story_diffusion/run_story_adapter.py                       # built-in tiny model, no download
    python examples/story_diffusion/run_story_adapter.py --base_model_path RealVisXL_V4.0 \\
        --image_encoder_path IP-Adapter/sdxl_models/image_encoder \\
        --ip_ckpt IP-Adapter/sdxl_models/ip-adapter_sdxl.bin --story story.txt --style comic --output_dir out
    python examples/story_diffusion/run_story_adapter.py --output_dir out --resume   # continue an interrupted run

``--story`` takes prompts (one per panel) or one text file with a prompt per line. Output: ``round_00/`` (text
only) to ``round_<R>/``, each with ``panel_000.png`` ..., and ``story.json`` (prompts, seed, settings, model
fingerprints, progress). ``--resume`` continues from the first unrecorded panel of the last unfinished round; the
settings come from story.json (any flag given must agree with it).
"""

from __future__ import annotations

import argparse
import secrets
import sys
from pathlib import Path

# a short built-in story for trying the method; real stories come with --story
SAMPLE_STORY = [
    "a small red fox wearing a blue scarf wakes up in a burrow",
    "a small red fox wearing a blue scarf walks through a snowy forest",
    "a small red fox wearing a blue scarf meets an old owl on a branch",
    "a small red fox wearing a blue scarf looks at the stars on a hill",
]
DEFAULTS = {"style": "comic", "rounds": 10, "steps": 50, "height": 1024, "width": 1024}
TINY_DEFAULTS = {"steps": 4, "height": 128, "width": 128}  # the tiny model is a smoke test, not a picture


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--base_model_path",
        default=None,
        help="an SDXL diffusers folder or single file; 'tiny' (the default without weight paths)",
    )
    p.add_argument("--image_encoder_path", default=None, help="IP-Adapter's CLIP image encoder folder or file")
    p.add_argument("--ip_ckpt", default=None, help="ip-adapter_sdxl.bin / .safetensors (or ip-adapter-plus)")
    p.add_argument("--story", nargs="+", default=None, help="panel prompts, or one file with a prompt per line")
    p.add_argument("--style", default=None, choices=["comic", "film", "realistic"], help="default comic")
    p.add_argument("--rounds", type=int, default=None, help="refinement rounds after round 0 (default 10)")
    p.add_argument("--seed", type=int, default=None, help="one seed for every panel and round (default: random)")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default 50; 4 for the tiny model)")
    p.add_argument("--height", type=int, default=None, help="default 1024 (128 for the tiny model)")
    p.add_argument("--width", type=int, default=None, help="default 1024 (128 for the tiny model)")
    p.add_argument("--output_dir", default="outputs/story_adapter")
    p.add_argument("--resume", action="store_true", help="continue the run recorded in output_dir/story.json")
    p.add_argument("--mode", default="graph", choices=["graph", "pynative"])
    p.add_argument(
        "--device",
        default=None,
        choices=["CPU", "Ascend", "Ascend-emulated"],
        help="default: MindSpore's default device",
    )
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def read_story(values: list[str] | None) -> list[str]:
    if values is None:
        return list(SAMPLE_STORY)
    if len(values) == 1 and Path(values[0]).is_file():
        lines = Path(values[0]).read_text(encoding="utf-8").splitlines()
        prompts = [line.strip() for line in lines if line.strip()]
        if not prompts:
            raise ValueError(f"the story file {values[0]} has no prompts")
        return prompts
    if len(values) == 1 and values[0].endswith((".txt", ".json")) and not Path(values[0]).exists():
        raise FileNotFoundError(f"story file not found: {values[0]}")
    return values


def resolve(args: argparse.Namespace):
    """Settings and model paths: from the flags, or on --resume from story.json (flags given must agree)."""
    from mindone_story.pipelines.story_adapter import StoryRecord, StorySettings
    from mindone_story.pretrained import TINY_IP_ADAPTER, tiny_model_dir

    given = {k: getattr(args, k) for k in ("style", "rounds", "seed", "steps", "height", "width")}
    paths = {k: getattr(args, k) for k in ("base_model_path", "image_encoder_path", "ip_ckpt")}
    prompts = None if args.story is None else read_story(args.story)
    if args.resume:
        record = StoryRecord.read(Path(args.output_dir))
        recorded = record.settings.to_dict()
        clash = [
            f"--{k} {v!r} (recorded {recorded[k]!r})" for k, v in given.items() if v is not None and v != recorded[k]
        ]
        if prompts is not None and list(prompts) != recorded["prompts"]:
            clash.append("--story (other prompts than the recorded ones)")
        if clash:
            raise ValueError("cannot resume with other settings: " + "; ".join(clash))
        given = {k: recorded[k] for k in given}
        prompts = recorded["prompts"]
        paths = {k: record.models.get(k) if v is None else v for k, v in paths.items()}
    if paths["base_model_path"] is None and paths["image_encoder_path"] is None and paths["ip_ckpt"] is None:
        paths["base_model_path"] = "tiny"
    tiny = paths["base_model_path"] == "tiny"
    for k, v in {**DEFAULTS, **(TINY_DEFAULTS if tiny else {})}.items():
        given[k] = v if given[k] is None else given[k]
    if given["seed"] is None:
        given["seed"] = secrets.randbelow(100001)  # the original's random.randint(0, 100000); recorded
    settings = StorySettings(prompts=tuple(read_story(None) if prompts is None else prompts), **given)
    if tiny:
        root = tiny_model_dir()
        paths["image_encoder_path"] = paths["image_encoder_path"] or str(root / "image_encoder")
        paths["ip_ckpt"] = paths["ip_ckpt"] or str(root / "ip_adapter" / TINY_IP_ADAPTER)
    missing = [f"--{k}" for k, v in paths.items() if v is None]
    if missing:
        raise ValueError(f"{', '.join(missing)} required with a base model other than 'tiny'")
    return settings, paths


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        settings, paths = resolve(args)  # bad input fails here, before any model is loaded
        import mindspore as ms

        from mindone_story.pipelines.story_adapter import RECORD, StoryAdapterPipeline, generate_story
        from mindone_story.pretrained import load_ip_adapter_models, load_sdxl, tiny_model_dir
        from mindone_story.weights import read_sdxl

        out = Path(args.output_dir)
        if not args.resume and (out / RECORD).exists():
            raise FileExistsError(f"{out / RECORD} exists: pass --resume to continue that run, or another --output_dir")
        if args.device:
            from mindone_story.layers import set_device

            set_device(args.device)
        ms.runtime.launch_blocking()  # PyNative's async dispatch threads halve the speed on few cores
        base = tiny_model_dir() if paths["base_model_path"] == "tiny" else Path(paths["base_model_path"])
        for flag, path in (
            ("--base_model_path", base),
            ("--image_encoder_path", paths["image_encoder_path"]),
            ("--ip_ckpt", paths["ip_ckpt"]),
        ):
            if not Path(path).exists():
                raise FileNotFoundError(f"{flag}: {path} does not exist")
        # the adapter and its encoder are checked against each other and the UNet before the big weights load
        ip = load_ip_adapter_models(paths["ip_ckpt"], paths["image_encoder_path"], read_sdxl(base).configs["unet"])
        models = load_sdxl(base)
        pipe = StoryAdapterPipeline(models, ip, mode=args.mode)
        print(f"seed {settings.seed}, {len(settings.prompts)} panels, {settings.rounds} rounds -> {out}", flush=True)
        record = generate_story(pipe, settings, out, models=paths, resume=args.resume, progress=not args.no_progress)
    except (ValueError, FileNotFoundError, FileExistsError) as e:  # LayoutError and WeightFileError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"done: {record.settings.rounds + 1} rounds of {len(record.settings.prompts)} panels in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
