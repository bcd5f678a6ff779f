"""PhotoMaker v1 (reference photos) against the original, in PyNative and graph mode.

References (tests/fixtures/make_photomaker_fixtures.py, PyTorch): manifests/photomaker_v1.json (the real file's
keys and shapes), photomaker/photomaker_tiny.bin (a tiny checkpoint in the real layout, torch.save'd),
photomaker/photomaker_io.npz (the original id encoder's embeddings and fused prompt embeddings, and the original
pipeline's 4-step DDIM sampling on the tiny SDXL with the LoRA fused by diffusers).
Tolerance: relative error max|ours - ref| / max|ref| <= 1e-4.
"""

from __future__ import annotations

import json

import mindspore as ms
import numpy as np
import pytest
from conftest import FIXTURES, TINY_SDXL, rel_err
from PIL import Image

from mindone_story.models.photomaker import PhotoMakerConfig
from mindone_story.pipelines.photomaker import (
    TRIGGER,
    PhotoMakerConditioning,
    RefPhotoError,
    RefPhotos,
    TriggerText,
    check_photos,
    load_photomaker,
)
from mindone_story.pipelines.sdxl import SDXLPipeline
from mindone_story.pretrained import load_sdxl, model_shapes
from mindone_story.story.prompts import story_from_text
from mindone_story.weights import LayoutError, LazyTensor, LazyWeights, check
from mindone_story.weights.layouts import preset_configs
from mindone_story.weights.lora import Names, map_lora
from mindone_story.weights.photomaker import ID_PREFIX, LORA_PREFIX, PhotoMakerError, check_parts, part

TOL = 1e-4
MODES = ["pynative", "graph"]
PM = FIXTURES / "photomaker"
CHECKPOINT = PM / "photomaker_tiny.bin"
PROMPTS = ["a photo of a man img, wearing a black suit, reading", "a man img, in the park . comic, vibrant"]
NEGATIVE = "bad anatomy, blurry"
STEPS, MERGE_STEP = 4, 1  # the fixture's style strength 40 %: int(0.4 * 4) = 1


def tiny_config() -> PhotoMakerConfig:
    vision = json.loads((TINY_SDXL / "image_encoder" / "config.json").read_text())
    return PhotoMakerConfig.from_dict({"vision": vision, "context_dim": 96})


def _no_read():
    raise AssertionError("the key and shape checks must not read tensors")


class Shapes(LazyWeights):
    """A weightless lazy source: keys and shapes only (what the strict checks read)."""

    def __init__(self, shapes: dict):
        self.tensors = {k: LazyTensor(tuple(v), "F16", _no_read) for k, v in shapes.items()}


@pytest.fixture(scope="module")
def io():
    return dict(np.load(PM / "photomaker_io.npz"))


@pytest.fixture(scope="module")
def manifest():
    return json.loads((FIXTURES / "manifests" / "photomaker_v1.json").read_text())["tensors"]


@pytest.fixture(scope="module")
def full_size():
    """The full-size id encoder's names and shapes: the model's own, built without parameter memory."""
    return model_shapes({"photomaker": PhotoMakerConfig.sdxl().to_dict()})["photomaker"]


# -- the checkpoint -----------------------------------------------------------------------------------------------
def test_full_size_keys_cover_the_real_file(manifest, full_size):
    """Every id_encoder key of photomaker-v1.bin is one of ours with its shape (the model's, and the reader's part
    passes the strict check), and every lora_weights key lands on a UNet projection of the full-size SDXL
    (weightless: shapes only)."""
    source = Shapes(manifest)
    want = {k.removeprefix(ID_PREFIX): tuple(v) for k, v in manifest.items() if k.startswith(ID_PREFIX)}
    assert full_size == want
    check(full_size, part(source, ID_PREFIX, "id_encoder"), "photomaker-v1.bin")
    check_parts(source, "photomaker-v1.bin")
    configs = preset_configs("sdxl")
    names = Names.of(configs, model_shapes(configs, ("unet", "text_encoder", "text_encoder_2")))
    lora = map_lora(part(source, LORA_PREFIX, "lora_weights"), names, "photomaker-v1.bin")
    assert lora.layouts == ["attn_processor"]
    assert len(lora.modules["unet"]) * 2 == sum(k.startswith(LORA_PREFIX) for k in manifest)
    assert {m.rank for m in lora.modules["unet"].values()} == {64}
    assert {m.scale for m in lora.modules["unet"].values()} == {1.0}  # no alphas: diffusers' alpha = rank


def test_v2_and_other_files_are_refused(manifest, full_size):
    with pytest.raises(PhotoMakerError, match="PhotoMaker V2 .*InsightFace"):
        check_parts(Shapes({**manifest, "id_encoder.qformer_perceiver.token_proj.0.weight": [1, 1]}), "v2.bin")
    with pytest.raises(PhotoMakerError, match="not a PhotoMaker v1 checkpoint"):
        check_parts(Shapes({**manifest, "image_proj.proj.weight": [1, 1]}), "x.bin")
    missing = Shapes({k: v for k, v in manifest.items() if k != "id_encoder.fuse_module.layer_norm.bias"})
    with pytest.raises(LayoutError, match=r"missing keys \(1\): fuse_module\.layer_norm\.bias"):
        check(full_size, part(missing, ID_PREFIX, "id_encoder"), "")


def test_the_loader_checks_the_file_against_the_model(tmp_path):
    """load_photomaker runs the one strict check against the id encoder built from the file's config: one
    LayoutError naming the file, the missing key and the mis-shaped one."""
    from mindone_story.pipelines.photomaker import tiny_photomaker_weights
    from mindone_story.weights import save_safetensors
    from mindone_story.weights.photomaker import CONFIG_KEY

    weights, cfg = tiny_photomaker_weights(TINY_SDXL)
    del weights[f"{ID_PREFIX}fuse_module.layer_norm.bias"]
    weights[f"{ID_PREFIX}visual_projection_2.weight"] = np.zeros((3, 3), np.float32)
    save_safetensors(weights, tmp_path / "pm.safetensors", {CONFIG_KEY: json.dumps(cfg.to_dict())})
    with pytest.raises(LayoutError) as err:
        load_photomaker(tmp_path / "pm.safetensors", ms.float32)
    assert "pm.safetensors (PhotoMaker id_encoder): the weights do not fit the model" in str(err.value)
    assert "missing keys (1): fuse_module.layer_norm.bias" in str(err.value)
    assert "visual_projection_2.weight (from id_encoder.visual_projection_2.weight): file [3, 3]" in str(err.value)


# -- the id encoder and the text ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sdxl():
    """The tiny SDXL with the PhotoMaker LoRA fused (read from the torch .bin) and its id encoder."""
    models = load_sdxl(TINY_SDXL, ms.float32, loras=[(CHECKPOINT, 1.0)])
    return models, load_photomaker(CHECKPOINT, ms.float32, tiny_config())


@pytest.mark.parametrize("mode", MODES)
def test_id_encoder_and_fused_prompt_match_the_original(sdxl, io, mode):
    models, encoder = sdxl
    cond = PhotoMakerConditioning(SDXLPipeline(models, mode=mode), encoder, mode)
    photos = [Image.open(PM / f"photo_{i}.png") for i in range(2)]
    ids = cond.encode_photos(photos)  # preprocessing included: the original ran CLIPImageProcessor
    assert rel_err(ids.asnumpy(), io["id_embeds"]) <= TOL
    for k, prompt in enumerate(PROMPTS):
        n = 2 if k == 0 else 1
        assert cond.text.text_only(prompt) == str(io[f"text_only_{k}"])
        (ids1, ids2), start = cond.text.expand(prompt, n)
        assert np.flatnonzero(io[f"mask_{k}"][0]).tolist() == list(range(start, start + n))
        fused, _ = cond._with_photos(prompt, ids[:n])
        assert rel_err(fused.asnumpy(), io[f"fused_{k}"]) <= TOL


@pytest.mark.parametrize("mode", MODES)
def test_photomaker_sampling_matches_the_original(sdxl, io, mode):
    """Two prompts (two photos, one photo) in one batch, 4 DDIM steps: text-only at steps 0-1, fused at 2-3. In
    graph mode the same compiled UNet then runs with the switch never taken: the per-step context is a graph
    input, so the output changes with it and equals the original's text-only run."""
    models, encoder = sdxl
    pipe = SDXLPipeline(models, mode=mode)
    cond = PhotoMakerConditioning(pipe, encoder, mode)
    ids = cond.encode_photos([Image.open(PM / f"photo_{i}.png") for i in range(2)])
    embeds = cond.embeds(PROMPTS, [NEGATIVE] * 2, [ids, ids[:1]], MERGE_STEP)
    latents = pipe.denoise(io["noise"], embeds, STEPS, 5.0, "ddim").asnumpy()
    assert rel_err(latents, io["latents"]) <= TOL
    if mode == "graph":
        never = cond.embeds(PROMPTS, [NEGATIVE] * 2, [ids, ids[:1]], STEPS)
        plain = pipe.denoise(io["noise"], never, STEPS, 5.0, "ddim").asnumpy()
        assert rel_err(plain, io["latents_text_only"]) <= TOL
        assert rel_err(plain, latents) > 1e-3


def test_trigger_count_is_the_tokenizers(sdxl):
    """check_photos counts the trigger as text; the tokenizers with the added token agree."""
    text = TriggerText(sdxl[0].tokenizer, sdxl[0].tokenizer_2)
    for prompt in ["a man img, reading", "imgimg a man", "no trigger", "a man img and img"]:
        ids = text.tokenizers[1].encode(prompt, add_special_tokens=False)
        assert ids.count(text.ids[1]) == prompt.count(TRIGGER)


# -- a whole story ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_reference_photo_story_matches_the_original(sdxl, io, mode):
    """[Bob] (two photos) in two id panels (one write batch), a later panel reading his bank, an [NC] panel: the
    original's process_generation with the same draws and noise (FreeU on, 3 DDIM steps, identity fused from step
    2). Latents per panel, before the VAE."""
    from mindone_story.pipelines.story_diffusion import StoryDiffusionPipeline, StoryDiffusionSettings

    models, encoder = sdxl
    pipe = StoryDiffusionPipeline(models, mode=mode, photomaker=encoder)
    try:
        story = story_from_text(
            "[Bob] a man img, wearing a black suit",
            "[Bob] reads\n[Bob] walks\n[Bob] in the park\n[NC] a city at night",
            2,
        )
        assert [p.prompt for p in story.panels] == io["story.prompts"].tolist()
        settings = StoryDiffusionSettings(
            height=128, width=128, steps=3, seed=3407, style_name="(No style)", negative_prompt=NEGATIVE
        )
        ref = RefPhotos({"Bob": tuple(Image.open(PM / f"photo_{i}.png") for i in range(2))}, {"Bob": ("a", "b")}, 40)
        latents, decode, encoded, encode = [], pipe.sdxl.decode, [], pipe.photomaker._id_embeds
        pipe.sdxl.decode = lambda x: (latents.extend(np.split(x.asnumpy(), x.shape[0])), decode(x))[1]
        pipe.photomaker._id_embeds = lambda x: (encoded.append(x.shape), encode(x))[1]
        pipe(story, settings, photos=ref)
        assert len(encoded) == 2  # Bob's two photos, once for the story's three phases
        for i, got in enumerate(latents):  # the run's order: the id batch, then each later panel
            assert rel_err(got, io[f"story.latents_{i}"]) <= TOL, i
    finally:
        from mindone_story.processors.consistent import uninstall

        uninstall(models.unet)


# -- bad input ----------------------------------------------------------------------------------------------------
BOX = "[Bob] a man img, wearing a black suit\n[Ann] a woman, in a red coat"
LINES = "[Bob] reads\n[Bob] walks\n[Ann] sings\n[Ann] runs\n[Bob] [Ann] talk\n[NC] a city"


def photos(**names) -> RefPhotos:
    image = Image.new("RGB", (8, 8))
    return RefPhotos({n: (image,) * k for n, k in names.items()}, {n: ("x.png",) * k for n, k in names.items()})


def test_panels_use_their_characters_photos():
    story = story_from_text(BOX, LINES, 2)
    assert check_photos(story, "Comic book", photos(Bob=2)) == ["Bob", "Bob", None, None, "Bob", None]


@pytest.mark.parametrize(
    "box,given,message",
    [
        (BOX, {"Bob": 1, "Ann": 1}, r"character \[Ann\] has reference photos but no trigger word 'img'"),
        (BOX.replace("suit", "suit img"), {"Bob": 1}, r"character \[Bob\] has 2 trigger words"),
        (BOX, {"Eve": 1}, r"reference photos for \[Eve\], which the story does not define"),
        (BOX, {}, r"character \[Bob\] has the trigger word 'img' but no reference photos"),
        (BOX.replace("woman", "woman img"), {"Bob": 1, "Ann": 1}, "panel 4 names 2 characters with reference photos"),
        ("[Bob]img man\n[Ann] a woman", {"Bob": 1}, "panel 0: the trigger word 'img' must follow a class word"),
    ],
)
def test_bad_photos_are_one_line_errors(box, given, message):
    with pytest.raises(RefPhotoError, match=message) as err:
        check_photos(story_from_text(box, LINES, 2), "(No style)", photos(**given))
    assert "\n" not in str(err.value)


def test_a_trigger_outside_the_descriptions_and_a_file_that_is_not_an_image(sdxl, tmp_path):
    story = story_from_text(BOX, LINES.replace("[NC] a city", "[NC] an img city"), 2)
    with pytest.raises(
        RefPhotoError, match="panel 5 has 1 trigger words 'img' where its characters' descriptions give 0"
    ):
        check_photos(story, "Comic book", photos(Bob=1))
    (tmp_path / "notes.png").write_text("not a photo")
    with pytest.raises(RefPhotoError, match="notes.png is not an image"):
        RefPhotos.from_paths({"Bob": [tmp_path / "notes.png"]})
    with pytest.raises(RefPhotoError, match="reference photo not found"):
        RefPhotos.from_paths({"Bob": [tmp_path / "missing.png"]})
    with pytest.raises(RefPhotoError, match="falls past CLIP's 77 tokens with 80 photos"):
        TriggerText(sdxl[0].tokenizer, sdxl[0].tokenizer_2).expand("a man img, reading", 80)
    with pytest.raises(ValueError, match="style_strength_ratio must be within"):
        RefPhotos.from_paths({"Bob": [PM / "photo_0.png"]}, 120)


# -- the CLI ------------------------------------------------------------------------------------------------------
ROOT = FIXTURES.parent.parent
RUN = ROOT / "examples" / "story_diffusion" / "run.py"
CLI_BOX = "[Bob] a man img, wearing a black suit\n[Ann] a woman, in a red coat"
CLI_STORY = "[Bob] reads\n[Ann] sings\n[NC] a city #the city"
CLI = ["--sd_model_name", "tiny", "--height", "64", "--width", "64", "--steps", "2", "--id_length", "1"]
CLI += ["--mode", "pynative", "--no_progress", "--general_prompt", CLI_BOX]


def cli(tmp_path, *args):
    import os
    import subprocess
    import sys

    (tmp_path / "story.txt").write_text(CLI_STORY)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, str(RUN), *CLI, "--story", str(tmp_path / "story.txt"), *map(str, args)]
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_cli_story_with_reference_photos(tmp_path):
    """The tiny model's own PhotoMaker file: Bob's two photos, Ann without; recorded in story.json."""
    photos = f"Bob={PM / 'photo_0.png'},{PM / 'photo_1.png'}"
    result = cli(tmp_path, "--ref_image", photos, "--style_strength_ratio", "50", "--output_dir", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "out" / "story.json").read_text())
    assert record["settings"]["ref_images"] == {"Bob": [str(PM / "photo_0.png"), str(PM / "photo_1.png")]}
    assert record["settings"]["style_strength_ratio"] == 50.0
    assert record["models"]["photomaker"].endswith("photomaker-tiny.safetensors")
    assert record["models"]["loras"][0]["layouts"] == ["attn_processor"]
    assert record["progress"]["done"] and len(record["progress"]["panels"]) == 3


@pytest.mark.parametrize(
    "args,words",
    [
        (["--ref_image", f"Eve={PM / 'photo_0.png'}"], ["reference photos for [Eve]"]),
        (["--ref_image", f"Bob={FIXTURES / 'README.md'}"], ["README.md is not an image"]),
        (["--ref_image", f"Bob={PM / 'photo_0.png'}", "--photomaker", CHECKPOINT], ["vision tower is 48 wide"]),
    ],
)
def test_cli_bad_photos_are_one_line_and_write_nothing(tmp_path, args, words):
    result = cli(tmp_path, *args, "--output_dir", tmp_path / "out")
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert last.startswith("error: ") and all(w in last for w in words), result.stderr
    assert not (tmp_path / "out").exists()
