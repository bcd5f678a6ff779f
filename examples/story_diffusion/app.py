"""A local Gradio demo of StoryDiffusion and Story-Adapter on SDXL (MindSpore, graph mode by default).

    python examples/story_diffusion/app.py --sd_model_name tiny            # the built-in tiny model, no download
    python examples/story_diffusion/app.py --model_path /models/RealVisXL_V4.0 --port 7860
    python examples/story_diffusion/app.py --sd_model_name RealVision --cache_dir ./cache_dir --share

Every request writes a fresh folder under --output_dir (panels, pages, story.json, as the CLIs do) and offers it
as a zip. Models load on first use and stay loaded (up to --max_models pipelines); requests queue, one at a time.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a local demo
import gradio as gr  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # app_logic.py and frontend.py, also when imported
import app_logic as logic  # noqa: E402

from mindone_story.errors import StoryError, describe  # noqa: E402
from mindone_story.models.freeu import APP_FREEU  # noqa: E402
from mindone_story.runs.characters import check_model, save_characters  # noqa: E402
from mindone_story.runs.story_diffusion import run_story  # noqa: E402
from mindone_story.story.comic import DEFAULT_FONT_SIZE, LAYOUTS  # noqa: E402
from mindone_story.story.prompts import ADAPTER_STYLES, DEFAULT_STYLE_NAME, STYLE_NAMES  # noqa: E402

FREEU_TEXT = ",".join(map(str, APP_FREEU))  # the FreeU field's default: the app's factors

log = logging.getLogger("mindone_story.app")
EXAMPLE_CHARACTERS = "[Bob] a man, wearing a black suit\n[Alice] a woman, wearing a white shirt"
EXAMPLE_STORY = """[Bob] at home, read new paper #at home, the newspaper says the weather is fine
[Alice] in the garden, watering flowers #Alice waters her flowers
[Bob] on the road, near the forest #Bob goes for a walk
[Alice] under a tree, reading a book #Alice reads under the old oak
[NC] a path through the woods, sunlight #a sunny afternoon
[Bob] and [Alice] meet under the tree #they meet at last"""
EXAMPLE_ADAPTER_STORY = """a small red fox wearing a blue scarf wakes up in a burrow
a small red fox wearing a blue scarf walks through a snowy forest
a small red fox wearing a blue scarf meets an old owl on a branch
a small red fox wearing a blue scarf looks at the stars on a hill"""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    p.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    p.add_argument("--share", action="store_true", help="also serve through a public Gradio link")
    p.add_argument("--sd_model_name", default="RealVision", help=f"the model chosen at start: {logic.MODEL_NAMES}")
    p.add_argument("--model_path", default=None, help="a diffusers folder or a single file (overrides the name)")
    p.add_argument("--cache_dir", default="./cache_dir", help="where hub downloads are kept (Hugging Face layout)")
    p.add_argument("--image_encoder_path", default=None, help="Story-Adapter: IP-Adapter's CLIP image encoder")
    p.add_argument("--ip_ckpt", default=None, help="Story-Adapter: ip-adapter_sdxl.bin / .safetensors")
    p.add_argument("--output_dir", default="outputs/app", help="one folder (and zip) per request under it")
    p.add_argument("--max_models", type=int, default=2, help="loaded pipelines kept in memory")
    p.add_argument(
        "--dtype", default=None, choices=["fp32", "fp16", "bf16"], help="default: fp16 on Ascend, fp32 on CPU"
    )
    p.add_argument("--mode", default="graph", choices=["graph", "pynative"])
    p.add_argument("--device", default=None, choices=["CPU", "Ascend", "Ascend-emulated"])
    return p.parse_args(argv)


def friendly(fn):
    """Bad input becomes a gr.Error with its message; anything else a short gr.Error (the traceback goes to the log)."""

    @functools.wraps(fn)  # keeps the signature, where Gradio finds the gr.Progress argument
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except (ValueError, OSError) as err:  # StoryError, the readers' errors, the file system's
            raise gr.Error(describe(err), print_exception=False) from None
        except Exception as err:  # noqa: BLE001 - never show a traceback in the page
            log.error("request failed:\n%s", traceback.format_exc())
            raise gr.Error(f"the run failed: {type(err).__name__}: {err}", print_exception=False) from None

    return wrapped


def build_demo(args: argparse.Namespace, cache: logic.ModelCache | None = None) -> gr.Blocks:
    cache = cache or logic.ModelCache(args.max_models)
    tiny = args.sd_model_name == "tiny" and not args.model_path
    size, steps = (128, 4) if tiny else (768, 50)

    def reporter(progress: gr.Progress):
        return lambda done, total, what: progress((done, total), desc=what, unit="panels")

    clip_pairs: dict[tuple[str, str], object] = {}  # the last CLIP pair used for the scores, kept loaded

    def scores(out: Path, model: str, image_encoder: str | None) -> str:
        """The story's CLIP scores as a table (metrics.json and metrics.png in its folder), or how to get them."""
        from mindone_story.metrics import evaluate, load_clip_pair, markdown_table

        if image_encoder is None:
            return f"\n\nCLIP scores need an image encoder: `python tools/evaluate_story.py {out} --image_encoder ...`"
        key = (str(logic.model_dir(model)), image_encoder)
        try:
            if key not in clip_pairs:
                clip_pairs.clear()
                clip_pairs[key] = load_clip_pair(*key, dtype=logic.dtype_of(args.dtype), mode=args.mode)
            return "\n\n" + markdown_table(evaluate(out, clip_pairs[key]))
        except (ValueError, OSError) as err:  # the story is made; only its scores are missing
            return f"\n\nno CLIP scores: {describe(err)}"

    def load(progress: gr.Progress, get, *key_args) -> tuple[object, str]:
        """A pipeline from the cache, and a note for the status line saying whether it was loaded now."""
        progress(0, desc="loading the model")
        before, start = cache.loads, time.time()
        pipe = get(cache, *key_args, args.dtype, args.mode)
        return pipe, f"loaded in {time.time() - start:.1f} s" if cache.loads > before else "already loaded"

    @friendly
    def story_diffusion(
        model_name,
        model_path,
        characters,
        story_text,
        style,
        id_length,
        sa32,
        sa64,
        steps,
        guidance,
        height,
        width,
        seed,
        typesetting,
        font_size,
        negative_prompt=logic.DEFAULT_NEGATIVE,
        freeu=FREEU_TEXT,
        ref_mode=logic.REF_MODES[0],
        ref_files=None,
        style_strength=20,
        kept=None,
        lora="",
        progress=gr.Progress(track_tqdm=True),  # noqa: B008 - Gradio's tracker; tqdm: hub download bars
    ):
        settings, id_length, layout = logic.story_diffusion_settings(
            style,
            id_length,
            sa32,
            sa64,
            steps,
            guidance,
            height,
            width,
            seed,
            typesetting,
            font_size,
            negative_prompt,
            freeu,
        )
        story, replay, recipes = logic.story_with_kept(kept, characters, story_text, id_length, settings)
        photos = logic.ref_photos(ref_mode, ref_files, story, style_strength)
        if photos is not None:
            from mindone_story.pipelines.photomaker import check_photos

            if recipes:
                raise StoryError("kept characters and reference photos cannot be combined yet: use one or the other")
            check_photos(story, settings.style_name, photos)
        loras = logic.loras_of(lora)
        model = logic.choose_model(model_name, model_path, args.cache_dir)
        models = {"model": model}
        if photos is None:
            pipe, loaded = load(progress, logic.story_diffusion_pipeline, model, loras)
        else:
            models["photomaker"] = logic.photomaker_file(model, args.cache_dir)
            pipe, loaded = load(progress, logic.photomaker_pipeline, model, loras, models["photomaker"])
        for recipe in recipes:
            check_model(recipe, pipe.sdxl.models.fingerprint, pipe.sdxl.models.loras)
        out = logic.new_output_dir(args.output_dir, "story_diffusion")
        start = time.time()
        extra = {"mode": args.mode, "dtype": args.dtype}
        result = run_story(
            pipe,
            story,
            settings,
            out,
            layout,
            models,
            extra,
            progress=reporter(progress),
            photos=photos,
            replay=replay,
        )
        save_characters(result.record, out)  # character_<Name>.json, in the zip: load them into a later story
        panels, pages = result.panels, result.pages
        captions = [f"{i}: {p.caption}" if p.caption else str(i) for i, p in enumerate(story.panels)]
        status = f"{len(panels)} panels, {len(pages)} page(s) in {time.time() - start:.1f} s (model {loaded}): `{out}`"
        status += scores(out, model, str(logic.model_dir(model) / "image_encoder") if model == "tiny" else None)
        return list(zip(map(str, panels), captions)), [str(p) for p in pages], str(logic.zip_folder(out)), status

    @friendly
    def story_adapter(
        model_name,
        model_path,
        image_encoder,
        ip_ckpt,
        story_text,
        style,
        rounds,
        steps,
        height,
        width,
        seed,
        guidance,
        progress=gr.Progress(track_tqdm=True),  # noqa: B008 - Gradio's tracker; tqdm: hub download bars
    ):
        settings = logic.story_adapter_settings(story_text, style, rounds, steps, height, width, seed, guidance)
        model = logic.choose_model(model_name, model_path, args.cache_dir)
        files = logic.adapter_files(model, image_encoder, ip_ckpt, args.cache_dir)
        pipe, loaded = load(progress, logic.story_adapter_pipeline, files)
        out = logic.new_output_dir(args.output_dir, "story_adapter")
        start = time.time()
        rounds = logic.run_story_adapter(pipe, settings, files, out, reporter(progress))
        last = [(str(p), f"round {len(rounds) - 1}, panel {i}") for i, p in enumerate(rounds[-1])]
        every = [(str(p), f"round {r}, panel {i}") for r, row in enumerate(rounds) for i, p in enumerate(row)]
        status = (
            f"{len(rounds)} rounds of {len(rounds[-1])} panels in {time.time() - start:.1f} s (model {loaded}): `{out}`"
        ) + scores(out, model, files["image_encoder_path"])
        return last, every, str(logic.zip_folder(out)), status

    def model_fields(prefix: str):
        with gr.Row():
            name = gr.Dropdown(logic.MODEL_NAMES, value=args.sd_model_name, label="model", elem_id=f"{prefix}-model")
            path = gr.Textbox(args.model_path or "", label="or a local path (diffusers folder or .safetensors)")
        return name, path

    def number(label, value, elem_id, **kw):  # no minimum: app_logic checks, with a message naming the field
        return gr.Number(value, label=label, precision=0, elem_id=elem_id, **kw)

    with gr.Blocks(title="mindone-story") as demo:
        gr.Markdown(
            "# mindone-story\nConsistent characters across a story on SDXL, in MindSpore "
            f"({args.mode} mode). StoryDiffusion shares attention between the panels of each character; Story-Adapter "
            "redraws the whole story for a few rounds, each looking at all panels of the last."
        )
        with gr.Tab("StoryDiffusion", elem_id="tab-sd"):
            with gr.Row():
                with gr.Column():
                    sd_model = model_fields("sd")
                    characters = gr.Textbox(
                        EXAMPLE_CHARACTERS,
                        lines=3,
                        label="characters: one '[Name] description' per line",
                        elem_id="sd-characters",
                    )
                    story = gr.Textbox(
                        EXAMPLE_STORY,
                        lines=8,
                        elem_id="sd-story",
                        label="story: one panel per line; [NC] = no character, text after # = caption",
                    )
                    style = gr.Dropdown(list(STYLE_NAMES), value=DEFAULT_STYLE_NAME, label="style", elem_id="sd-style")
                    with gr.Row():
                        id_length = number("id_length", 2, "sd-id-length")
                        sd_steps = number("steps", steps, "sd-steps")
                        guidance = gr.Number(5.0, label="guidance", elem_id="sd-guidance")
                        seed = number("seed", 3407, "sd-seed")
                    with gr.Row():
                        sa32 = gr.Slider(0, 1, 0.5, step=0.05, label="sa32: token share at 1/32 resolution")
                        sa64 = gr.Slider(0, 1, 0.5, step=0.05, label="sa64: token share at 1/16 resolution")
                    with gr.Row():
                        height = number("height", size, "sd-height", step=32)
                        width = number("width", size, "sd-width", step=32)
                    with gr.Row():
                        typesetting = gr.Dropdown(list(LAYOUTS), value="Four Pannel", label="typesetting")
                        font_size = number("caption font size", round(DEFAULT_FONT_SIZE * size / 768), "sd-font-size")
                    negative = gr.Textbox(
                        logic.DEFAULT_NEGATIVE, lines=2, label="negative prompt", elem_id="sd-negative"
                    )
                    freeu = gr.Textbox(FREEU_TEXT, label="FreeU: 'off' or s1,s2,b1,b2", elem_id="sd-freeu")
                    ref_mode = gr.Radio(
                        list(logic.REF_MODES), value=logic.REF_MODES[0], label="mode", elem_id="sd-ref-mode"
                    )
                    with gr.Group(visible=False) as ref_group:
                        ref_files = gr.File(
                            file_count="multiple",
                            file_types=["image"],
                            label="reference photos: one per character with 'img' (e.g. 'a man img'), in order",
                            elem_id="sd-ref-files",
                        )
                        style_strength = gr.Slider(15, 50, 20, step=1, label="Style strength of Ref Image (%)")
                    ref_mode.change(lambda m: gr.update(visible=m == logic.REF_MODES[1]), ref_mode, ref_group)
                    kept = gr.File(
                        file_count="multiple",
                        file_types=[".json"],
                        label="kept characters (character_*.json from an earlier run's zip): replayed exactly",
                        elem_id="sd-kept",
                    )
                    sd_lora = gr.Textbox(
                        "", lines=1, label="LoRA files: one PATH[:SCALE] per line, fused at load", elem_id="sd-lora"
                    )
                    sd_go = gr.Button("Generate", variant="primary", elem_id="sd-generate")
                with gr.Column():
                    sd_gallery = gr.Gallery(label="panels", columns=3, format="png", elem_id="sd-gallery")
                    sd_pages = gr.Gallery(label="pages", columns=1, format="png", elem_id="sd-pages")
                    sd_zip = gr.File(label="download (panels, pages, story.json, characters)", elem_id="sd-zip")
                    sd_status = gr.Markdown(elem_id="sd-status")
            sd_go.click(
                story_diffusion,
                [
                    *sd_model,
                    characters,
                    story,
                    style,
                    id_length,
                    sa32,
                    sa64,
                    sd_steps,
                    guidance,
                    height,
                    width,
                    seed,
                    typesetting,
                    font_size,
                    negative,
                    freeu,
                    ref_mode,
                    ref_files,
                    style_strength,
                    kept,
                    sd_lora,
                ],
                [sd_gallery, sd_pages, sd_zip, sd_status],
                api_name="story_diffusion",
                concurrency_id="models",
            )
        with gr.Tab("Story-Adapter", elem_id="tab-sa"):
            with gr.Row():
                with gr.Column():
                    sa_model = model_fields("sa")
                    with gr.Row():
                        encoder = gr.Textbox(args.image_encoder_path or "", label="image encoder (empty for tiny)")
                        ip_ckpt = gr.Textbox(args.ip_ckpt or "", label="IP-Adapter file (empty for tiny)")
                    sa_story = gr.Textbox(
                        EXAMPLE_ADAPTER_STORY, lines=6, label="story: one panel prompt per line", elem_id="sa-story"
                    )
                    sa_style = gr.Radio(list(ADAPTER_STYLES), value="comic", label="style", elem_id="sa-style")
                    with gr.Row():
                        rounds = number("rounds (after round 0)", 3 if tiny else 10, "sa-rounds")
                        sa_steps = number("steps", steps, "sa-steps")
                        sa_guidance = gr.Number(5.0, label="guidance")
                        sa_seed = number("seed", 0, "sa-seed")
                    with gr.Row():
                        sa_height = number("height", size if tiny else 1024, "sa-height", step=32)
                        sa_width = number("width", size if tiny else 1024, "sa-width", step=32)
                    sa_go = gr.Button("Generate", variant="primary", elem_id="sa-generate")
                with gr.Column():
                    sa_gallery = gr.Gallery(label="last round", columns=3, format="png", elem_id="sa-gallery")
                    sa_rounds = gr.Gallery(label="every round", columns=4, format="png", elem_id="sa-rounds")
                    sa_zip = gr.File(label="download (every round, story.json)", elem_id="sa-zip")
                    sa_status = gr.Markdown(elem_id="sa-status")
            sa_go.click(
                story_adapter,
                [
                    *sa_model,
                    encoder,
                    ip_ckpt,
                    sa_story,
                    sa_style,
                    rounds,
                    sa_steps,
                    sa_height,
                    sa_width,
                    sa_seed,
                    sa_guidance,
                ],
                [sa_gallery, sa_rounds, sa_zip, sa_status],
                api_name="story_adapter",
                concurrency_id="models",
            )
    demo.queue(default_concurrency_limit=1)  # one run at a time, both tabs: the pipelines hold per-run state
    return demo


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import mindspore as ms

    from mindone_story.layers import set_device

    if args.device:
        set_device(args.device)
    ms.runtime.launch_blocking()  # PyNative's async dispatch threads halve the speed on few cores
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    demo = build_demo(args)
    demo.launch(
        server_name=args.host,
        server_port=args.port,
        share=args.share,
        allowed_paths=[str(Path(args.output_dir).resolve())],
        footer_links=["api", "settings"],
    )


if __name__ == "__main__":
    main()
