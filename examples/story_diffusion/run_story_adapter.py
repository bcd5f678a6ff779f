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

from frontend import (
    add_common,
    add_lora,
    add_output,
    add_parallel,
    check_loras,
    setup,
    start_parallel,
    warn_truncation,
)

from mindone_story.errors import StoryError, main_guard
from mindone_story.runs import files
from mindone_story.runs.story_adapter import METHOD, kept
from mindone_story.story.prompts import ADAPTER_STYLES, read_story_file

# a short built-in story for trying the method; real stories come with --story
SAMPLE_STORY = [
    "a small red fox wearing a blue scarf wakes up in a burrow",
    "a small red fox wearing a blue scarf walks through a snowy forest",
    "a small red fox wearing a blue scarf meets an old owl on a branch",
    "a small red fox wearing a blue scarf looks at the stars on a hill",
]
DEFAULTS = {"style": "comic", "rounds": 10, "steps": 50, "height": 1024, "width": 1024, "guidance_scale": 5.0}
TINY_DEFAULTS = {"steps": 4, "height": 128, "width": 128}  # the tiny model is a smoke test, not a picture
SETTINGS = tuple(DEFAULTS) + ("seed",)
PATHS = ("base_model_path", "image_encoder_path", "ip_ckpt")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--base_model_path",
        "--model",
        dest="base_model_path",
        default=None,
        help="an SDXL diffusers folder or single file, a hub id owner/name[@revision]; 'tiny' (the default)",
    )
    p.add_argument(
        "--image_encoder_path", default=None, help="IP-Adapter's CLIP image encoder: a folder, file or hub reference"
    )
    p.add_argument(
        "--ip_ckpt", default=None, help="ip-adapter_sdxl.bin / .safetensors (or -plus): a file or hub reference"
    )
    p.add_argument("--cache_dir", default="./cache_dir", help="where hub downloads are kept (Hugging Face layout)")
    p.add_argument("--local_files_only", action="store_true", help="no network: use the files in --cache_dir only")
    p.add_argument("--story", nargs="+", default=None, help="panel prompts, or one file with a prompt per line")
    p.add_argument("--style", default=None, choices=sorted(ADAPTER_STYLES), help="default comic")
    p.add_argument("--rounds", type=int, default=None, help="refinement rounds after round 0 (default 10)")
    add_common(p, "DDIM steps (default 50; 4 for the tiny model)", "default 1024 (128 for the tiny model)")
    p.add_argument("--freeu", default=None, help="'off' (the default, as the original) or s1,s2,b1,b2")
    add_lora(p)
    add_output(p, "outputs/story_adapter")
    add_parallel(p)
    return p.parse_args(argv)


def read_story(values: list[str] | None) -> list[str]:
    """Prompts from the command line, or one text file of them (a value naming a file is read as one)."""
    if values is None:
        return list(SAMPLE_STORY)
    if len(values) == 1 and values[0].strip() and (Path(values[0]).exists() or values[0].endswith((".txt", ".json"))):
        prompts = [line.strip() for line in read_story_file(values[0]).splitlines() if line.strip()]
        if not prompts:
            raise StoryError(f"the story file {values[0]} has no prompts")
        return prompts
    return values


def resolve(args: argparse.Namespace):
    """Settings and model paths: from the flags, or on --resume from story.json (flags given must agree)."""
    from mindone_story.models.freeu import freeu_factors
    from mindone_story.pipelines.story_adapter import StoryAdapterSettings
    from mindone_story.pretrained import TINY_IP_ADAPTER, tiny_model_dir
    from mindone_story.runs.story_adapter import progress_of, settings_of

    given = {k: getattr(args, k) for k in SETTINGS}
    paths = {k: getattr(args, k) for k in PATHS}
    prompts = None if args.story is None else read_story(args.story)
    freeu, long_prompts = freeu_factors(args.freeu), args.long_prompts
    if args.resume:
        record = files.prepare(Path(args.output_dir), METHOD, resume=True, dry_run=True)
        recorded = settings_of(record).to_dict()
        progress_of(record, settings_of(record))  # a record that claims more than its settings allow
        clash = [
            f"--{k} {v!r} (recorded {recorded[k]!r})" for k, v in given.items() if v is not None and v != recorded[k]
        ]
        if prompts is not None and list(prompts) != recorded["prompts"]:
            clash.append("--story (other prompts than the recorded ones)")
        if args.freeu is not None and (list(freeu) if freeu else None) != recorded["freeu"]:
            clash.append(f"--freeu {args.freeu!r} (recorded {recorded['freeu']!r})")
        if long_prompts and not recorded["long_prompts"]:
            clash.append("--long_prompts (recorded without)")
        if clash:
            raise StoryError("cannot resume with other settings: " + "; ".join(clash))
        given = {k: recorded[k] for k in given}
        prompts, freeu, long_prompts = recorded["prompts"], recorded["freeu"], recorded["long_prompts"]
        paths = {k: record.models.get(k) if v is None else v for k, v in paths.items()}
    else:
        files.prepare(Path(args.output_dir), METHOD, overwrite=args.overwrite, dry_run=True)
    if all(v is None for v in paths.values()):
        paths["base_model_path"] = "tiny"
    tiny = paths["base_model_path"] == "tiny"
    for k, v in {**DEFAULTS, **(TINY_DEFAULTS if tiny else {})}.items():
        given[k] = v if given[k] is None else given[k]
    if given["seed"] is None:
        given["seed"] = secrets.randbelow(100001)  # the original's random.randint(0, 100000); recorded
    settings = StoryAdapterSettings(
        prompts=tuple(read_story(None) if prompts is None else prompts), freeu=freeu, long_prompts=long_prompts, **given
    )
    if tiny:
        root = tiny_model_dir()
        paths["image_encoder_path"] = paths["image_encoder_path"] or str(root / "image_encoder")
        paths["ip_ckpt"] = paths["ip_ckpt"] or str(root / "ip_adapter" / TINY_IP_ADAPTER)
    missing = [f"--{k}" for k, v in paths.items() if v is None]
    if missing:
        raise StoryError(f"{', '.join(missing)} required with a base model other than 'tiny'")
    from mindone_story.hub import parse_reference

    for flag, path in paths.items():  # a local path must exist; a hub reference is fetched after these checks
        if path != "tiny" and parse_reference(path) is None and not Path(path).exists():
            raise StoryError(f"--{flag}: {path} does not exist")
    return settings, paths


def run(args: argparse.Namespace, world) -> int:
    # bad input fails here, before any model is loaded; rank 0 reads the record (and draws the seed) for all ranks
    settings, paths = world.from_root(lambda: resolve(args))
    loras = check_loras(args.lora)
    dtype = setup(args.device, args.dtype, args.attention)

    import mindspore as ms
    from tqdm.auto import tqdm

    from mindone_story.hub import HubError
    from mindone_story.hub import resolve as fetch
    from mindone_story.pipelines.story_adapter import StoryAdapterPipeline
    from mindone_story.pretrained import load_ip_adapter_models, load_sdxl, tiny_model_dir
    from mindone_story.runs.story_adapter import generate_story
    from mindone_story.weights import read_sdxl

    out = Path(args.output_dir)
    fp16 = dtype == ms.float16  # fetch the fp16 weights where the run is fp16
    files = {}  # local paths as they are, hub references from the cache or downloaded
    for k, v in paths.items():
        try:
            files[k] = v if v == "tiny" else fetch(v, args.cache_dir, None, args.local_files_only, fp16, print)
        except HubError as e:
            raise StoryError(f"--{k}: {e}") from None
    base = tiny_model_dir() if paths["base_model_path"] == "tiny" else files["base_model_path"]
    # the adapter and its encoder are checked against each other and the UNet before the big weights load
    ip = load_ip_adapter_models(files["ip_ckpt"], files["image_encoder_path"], read_sdxl(base).configs["unet"], dtype)
    models = load_sdxl(base, dtype, loras)
    pipe = StoryAdapterPipeline(models, ip, mode=args.mode)
    if world.root:
        warn_truncation(pipe.truncation(settings))
    print(f"seed {settings.seed}, {len(settings.prompts)} panels, {settings.rounds} rounds -> {out}", flush=True)
    bar = tqdm(
        total=len(settings.prompts) * (settings.rounds + 1),
        desc="panels",
        disable=args.no_progress or not world.root,
        delay=1,
    )

    def on_panel(r: int, i: int, rounds: int, n: int) -> None:
        bar.n = r * n + i + 1
        bar.set_postfix_str(f"round {r}/{rounds}")

    record = generate_story(
        pipe, settings, out, paths, args.resume, args.overwrite, on_panel if world.root else None, world
    )
    bar.close()
    if world.root:
        print(f"done: {record.settings['rounds'] + 1} rounds of {len(record.settings['prompts'])} panels in {out}")
    return 0


def main(argv=None) -> int:
    world = start_parallel(argv)  # under msrun: join the job before anything can fail
    args = parse_args(argv)
    return main_guard(lambda: run(args, world), lambda: kept(args.output_dir), world.label)


if __name__ == "__main__":
    sys.exit(main())
