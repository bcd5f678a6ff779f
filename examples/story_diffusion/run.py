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

Characters kept across runs, and comics continued (settings, characters and model from the record):

    python examples/story_diffusion/run.py ... --output_dir out --save_characters      # out/character_Bob.json
    python examples/story_diffusion/run.py --character out/character_Bob.json --story later.txt --output_dir out2
    python examples/story_diffusion/run.py --continue out --story more.txt              # more panels and pages
"""

from __future__ import annotations

import argparse
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

from mindone_story.checks import BANK_PLACES
from mindone_story.errors import StoryError, main_guard
from mindone_story.models.freeu import APP_FREEU
from mindone_story.models_registry import MODELS, resolve_model
from mindone_story.pipelines.photomaker import PHOTOMAKER_V1, RefPhotos, check_photos
from mindone_story.pipelines.schedulers import SCHEDULERS
from mindone_story.pipelines.story_diffusion import PRESETS, StoryDiffusionSettings
from mindone_story.runs import files
from mindone_story.runs.story_diffusion import METHOD, PageLayout, kept, run_story
from mindone_story.story.comic import DEFAULT_FONT_SIZE, LAYOUTS
from mindone_story.story.prompts import STYLE_NAMES, read_story_file, story_from_text

TINY = {"height": 128, "width": 128, "steps": 4}  # the tiny model is a smoke test, not a picture
DEFAULTS = {"height": 768, "width": 768, "guidance_scale": 5.0}  # and the preset's steps, seed, negative, layout


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--sd_model_name",
        "--model",
        dest="sd_model_name",
        default="RealVision",
        help=f"one of {sorted(MODELS)}, or a hub id owner/name",
    )
    p.add_argument(
        "--model_path", default=None, help="a diffusers folder, a single file or a hub reference (overrides the name)"
    )
    p.add_argument("--cache_dir", default="./cache_dir", help="where hub downloads are kept (Hugging Face layout)")
    p.add_argument("--revision", default=None, help="hub branch, tag or commit of the model (default main)")
    p.add_argument("--local_files_only", action="store_true", help="no network: use the files in --cache_dir only")
    p.add_argument("--style_name", "--style", dest="style_name", default="Comic book", help=f"one of {STYLE_NAMES}")
    p.add_argument(
        "--general_prompt",
        default="a man with a black suit",
        help="the character box ('[Name] description' lines) or one plain description",
    )
    p.add_argument("--story", default=None, help="a file with one panel per line (default: mindone's 8 actions)")
    p.add_argument(
        "--preset",
        default="mindone",
        choices=sorted(PRESETS),
        help="defaults for steps, seed, negative prompt and typesetting: mindone's run.py (default) or the released "
        "app's (35 steps, seed 0, its examples' negative prompt, Classic Comic Style); flags given override them",
    )
    p.add_argument("--negative_prompt", default=None, help="default: the preset's")
    add_common(p, "default 50 (4 for the tiny model)", "default 768 (128 for the tiny model)")
    p.add_argument("--id_length", type=int, default=None, help="default 4, or the loaded characters'")
    p.add_argument("--sa32", type=float, default=0.5, help="share of 1/32-resolution tokens each image sees")
    p.add_argument("--sa64", type=float, default=0.5, help="share of 1/16-resolution tokens each image sees")
    p.add_argument("--window", type=int, default=None, help="id panels per write batch (bounds memory)")
    p.add_argument("--read_batch", type=int, default=1, help="later panels per batch")
    p.add_argument(
        "--id_bank",
        default="auto",
        choices=BANK_PLACES,
        help="where the id bank is kept: auto (memory if it fits, else OUTPUT_DIR/.id_bank), memory or disk",
    )
    p.add_argument("--scheduler", default="ddim", choices=sorted(SCHEDULERS))
    p.add_argument(
        "--freeu", default=",".join(map(str, APP_FREEU)), help="'off' or s1,s2,b1,b2 (default: the app's values)"
    )
    p.add_argument("--typesetting", default=None, choices=list(LAYOUTS), help="default: the preset's")
    p.add_argument(
        "--font_size",
        type=int,
        default=None,
        help=f"caption font size (default {DEFAULT_FONT_SIZE} at 768 px wide, scaled with the width)",
    )
    p.add_argument(
        "--character",
        action="append",
        default=[],
        metavar="FILE",
        help="a character saved by --save_characters: its id panels open the story, replayed exactly; repeatable",
    )
    p.add_argument(
        "--save_characters", action="store_true", help="write output_dir/character_NAME.json for every character"
    )
    p.add_argument(
        "--continue",
        dest="continue_dir",
        default=None,
        metavar="OUTPUT_DIR",
        help="add --story's panels to the comic in OUTPUT_DIR (its settings, characters and model); no --story "
        "finishes an interrupted continuation",
    )
    add_lora(p)
    p.add_argument(
        "--ref_image",
        action="append",
        default=[],
        metavar="NAME=PATH[,PATH...]",
        help="reference photos of character NAME (PhotoMaker v1; its description needs the trigger word 'img' after "
        "the class word, e.g. 'a man img'); repeatable; with one plain description, NAME= may be left out",
    )
    p.add_argument(
        "--style_strength_ratio",
        type=float,
        default=20.0,
        help="percent of the steps (at most 30) sampled before the photos' identity is fused in (default 20)",
    )
    p.add_argument(
        "--photomaker",
        default=None,
        help=f"the PhotoMaker v1 file, a path or hub reference (default {PHOTOMAKER_V1}; the tiny model has its own)",
    )
    add_output(p, "outputs")
    add_parallel(p)
    return p.parse_args(argv)


CONTINUE_FLAGS = {"continue_dir", "story", "save_characters", "no_progress", "cache_dir", "local_files_only"}
CONTINUE_FLAGS |= {"parallel", "id_bank"}  # where the work and the bank go, not what is drawn


def continued(args: argparse.Namespace):
    """--continue: the recorded story with --story's lines after it, and everything else from the record."""
    from mindone_story.errors import StoryError
    from mindone_story.runs.characters import continued_story, settings_of
    from mindone_story.runs.record import RunRecord

    defaults = vars(parse_args([]))
    given = [k for k, v in vars(args).items() if k not in CONTINUE_FLAGS and v != defaults[k]]
    if given:
        raise StoryError(f"--continue takes its settings from the record; drop --{given[0]}")
    record = RunRecord.read(args.continue_dir, METHOD)
    if "ref_images" in record.settings:
        raise StoryError(f"{args.continue_dir}: a story with reference photos cannot be continued yet")
    story, replay = continued_story(record, read_story_file(args.story) if args.story else "")
    layout = PageLayout(record.settings.get("typesetting", "Four Pannel"), record.settings.get("font_size"))
    loras = [(lora["path"], lora["scale"]) for lora in record.models.get("loras", [])]
    extra = {"mode": record.settings.get("mode", "graph"), "dtype": record.settings.get("dtype")}
    model = record.models.get("model", "tiny")
    return story, replay, settings_of(record), layout, model, loras, extra, Path(args.continue_dir), None


def fresh(args: argparse.Namespace, recipes: list, world):
    """A new story (with --character files' characters first) and its settings, from the flags."""
    from mindone_story.runs import characters as kept_characters

    tiny = args.sd_model_name == "tiny" and not args.model_path
    defaults = {**DEFAULTS, **PRESETS[args.preset], **(TINY if tiny else {})}
    values = {k: defaults[k] if getattr(args, k) is None else getattr(args, k) for k in defaults}
    typesetting = values.pop("typesetting")
    settings = StoryDiffusionSettings(
        **values,
        sa32=args.sa32,
        sa64=args.sa64,
        style_name=args.style_name,
        scheduler=args.scheduler,
        window=args.window,
        read_batch=args.read_batch,
        freeu=args.freeu,
        long_prompts=args.long_prompts,
    )
    layout = PageLayout(typesetting, args.font_size)
    story_text = read_story_file(args.story) if args.story else None
    id_length = args.id_length if args.id_length is not None else len(recipes[0].id_panels) if recipes else 4
    if recipes:
        for recipe in recipes:
            kept_characters.check_settings(recipe, settings)
        box = args.general_prompt if "[" in args.general_prompt else ""  # a plain description: the files' only
        story, replay = kept_characters.story_with_characters(recipes, box, story_text or "", id_length)
    else:
        story, replay = story_from_text(args.general_prompt, story_text, id_length), None
    loras = check_loras(args.lora)
    photos = ref_photos(args.ref_image, story, args.style_strength_ratio)
    if photos is not None:
        check_photos(story, settings.style_name, photos)
    out = Path(args.output_dir)
    if world.root:  # the other ranks never touch the folder
        files.prepare(out, METHOD, resume=args.resume, overwrite=args.overwrite, dry_run=True)
    return story, replay, settings, layout, None, loras, {"mode": args.mode, "dtype": args.dtype}, out, photos


def run(args: argparse.Namespace, world) -> int:
    # everything is checked before a model is downloaded or loaded, or a file is written
    from mindone_story.runs import characters as kept_characters

    recipes = [kept_characters.read_character(path) for path in args.character]
    if args.continue_dir:
        story, replay, settings, layout, model, loras, extra, out, photos = continued(args)
    else:
        story, replay, settings, layout, model, loras, extra, out, photos = fresh(args, recipes, world)
    dtype = setup(args.device, extra["dtype"], args.attention)

    import mindspore as ms
    from tqdm.auto import tqdm

    if model is None:
        fp16 = dtype == ms.float16  # fetch the fp16 weights for an fp16 run
        model = resolve_model(
            args.sd_model_name, args.model_path, args.cache_dir, args.revision, args.local_files_only, fp16, print
        )

    from mindone_story.pipelines.story_diffusion import StoryDiffusionPipeline
    from mindone_story.pretrained import load_sdxl, tiny_model_dir

    encoder, recorded = None, {"model": model}
    if photos is not None:  # the PhotoMaker LoRA is fused into the UNet with the others, as the app's fuse_lora()
        from mindone_story.hub import resolve
        from mindone_story.pipelines.photomaker import load_photomaker, tiny_photomaker_file

        if args.photomaker is None and model == "tiny":
            photomaker = tiny_photomaker_file()
        else:
            photomaker = resolve(
                args.photomaker or PHOTOMAKER_V1, args.cache_dir, local_files_only=args.local_files_only, progress=print
            )
        encoder = load_photomaker(photomaker, dtype)
        loras = [*loras, (str(photomaker), 1.0)]
        recorded["photomaker"] = str(args.photomaker or photomaker)
    models = load_sdxl(tiny_model_dir() if model == "tiny" else model, dtype, loras)
    for recipe in recipes:
        kept_characters.check_model(recipe, models.fingerprint, models.loras)
    pipe = StoryDiffusionPipeline(models, mode=extra["mode"], photomaker=encoder)
    if world.root:  # one warning per cut prompt for the job, not one per rank (as the Story-Adapter runner)
        warn_truncation(pipe.truncation(story, settings))
    quiet = args.no_progress or not world.root
    panels = tqdm(total=len(story.panels), desc="panels", disable=quiet, delay=1)
    steps = tqdm(desc="steps", leave=False, disable=quiet, delay=1)

    def on_panel(done: int, total: int, what: str) -> None:
        panels.n = done
        panels.refresh()

    def on_step(done: int, total: int) -> None:
        if done == 1:  # a new batch
            steps.reset(total=total)
        steps.update(1)

    result = run_story(
        pipe,
        story,
        settings,
        out,
        layout,
        models=recorded,
        extra=extra,
        resume=args.resume,
        overwrite=args.overwrite,
        progress=on_panel,
        on_step=on_step,
        bank=args.id_bank,
        world=world,
        photos=photos,
        replay=replay,
        extend=bool(args.continue_dir),
    )
    steps.close()
    panels.close()
    if not world.root:
        return 0
    if args.save_characters:
        saved = kept_characters.save_characters(result.record, out)
        print(f"saved {len(saved)} character(s): {', '.join(p.name for p in saved)}")
    print(f"wrote {len(result.panels)} panels and {len(result.pages)} page(s) to {out}")
    return 0


def ref_photos(specs: list[str], story, ratio: float) -> RefPhotos | None:
    """--ref_image NAME=PATH[,PATH...] values as RefPhotos (each photo opened and checked), or None."""
    if not specs:
        return None
    paths: dict[str, list[str]] = {}
    for spec in specs:
        name, sep, files = spec.partition("=")
        if not sep:  # one plain description: its one character
            if len(story.characters) != 1:
                raise StoryError(f"--ref_image {spec!r}: name the character (NAME=PATH), the story has several")
            name, files = story.characters[0].name, spec
        if not files.strip():
            raise StoryError(f"--ref_image {spec!r}: no photo given")
        paths.setdefault(name.strip().strip("[]"), []).extend(f.strip() for f in files.split(",") if f.strip())
    return RefPhotos.from_paths(paths, ratio)


def main(argv=None) -> int:
    world = start_parallel(argv)  # under msrun: join the job before anything can fail
    args = parse_args(argv)
    return main_guard(lambda: run(args, world), lambda: kept(args.continue_dir or args.output_dir), world.label)


if __name__ == "__main__":
    sys.exit(main())
