"""The Gradio demo driven through gradio_client on the tiny model (64x64, 2 steps, id_length 2): a StoryDiffusion
run, a repeat on the loaded model, a Story-Adapter run, and bad input coming back as the app's error text."""

from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from app_server import app_log, serve_app  # noqa: E402

from mindone_story.story.comic import make_pages  # noqa: E402
from mindone_story.story.prompts import apply_style, parse_story  # noqa: E402

CHARACTERS = "[Bob] a man with a black suit\n[Alice] a woman in a white shirt"
STORY = """[Bob] wakes up #Bob wakes up
[Alice] reads a book
[Bob] has breakfast
[Alice] goes to work
[Bob] and [Alice] meet in the park #they meet
"""
FORM = {
    "model_name": "tiny",
    "model_path": "",
    "characters": CHARACTERS,
    "story_text": STORY,
    "style": "Comic book",
    "id_length": 2,
    "sa32": 0.5,
    "sa64": 0.5,
    "steps": 2,
    "guidance": 5.0,
    "height": 64,
    "width": 64,
    "seed": 7,
    "typesetting": "Four Pannel",
    "font_size": 8,
    "negative_prompt": "blurry",
    "freeu": "0.9,0.2,1.3,1.05",
}
ADAPTER_FORM = {
    "model_name": "tiny",
    "model_path": "",
    "image_encoder": "",
    "ip_ckpt": "",
    "story_text": "a fox in a blue scarf wakes up\n\na fox in a blue scarf walks in the snow\n",
    "style": "film",
    "rounds": 2,
    "steps": 2,
    "height": 64,
    "width": 64,
    "seed": 5,
    "guidance": 5.0,
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("app")
    with serve_app(folder, "--cache_dir", str(folder / "no_models")) as url:
        yield url, folder


@pytest.fixture(scope="module")
def client(server, tmp_path_factory):
    return Client(server[0], verbose=False, download_files=str(tmp_path_factory.mktemp("downloads")))


@pytest.fixture(scope="module")
def sd_run(client):
    return client.predict(**FORM, api_name="/story_diffusion")


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def unzip(path, tmp_path: Path) -> Path:
    with zipfile.ZipFile(path) as zf:
        zf.extractall(tmp_path)
        (top,) = {Path(name).parts[0] for name in zf.namelist()}
    return tmp_path / top


def test_story_diffusion_run(sd_run, tmp_path):
    gallery, pages, archive, status = sd_run
    assert [item["caption"] for item in gallery] == [
        "0: Bob wakes up",
        "1: [Alice] reads a book",
        "2: [Bob] has breakfast",
        "3: [Alice] goes to work",
        "4: they meet",
    ]
    assert "5 panels, 2 page(s)" in status and "model loaded in" in status
    folder = unzip(archive, tmp_path)
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["character_Alice.json", "character_Bob.json", "metrics.json", "metrics.png"] + [
        "page_00.png",
        "page_01.png",
    ] + [f"panel_{i:03d}.png" for i in range(5)] + ["story.json"]
    # the CLIP scores of the tiny pair, as a table under the status line and in metrics.json
    metrics = json.loads((folder / "metrics.json").read_text())
    assert f"| mean | {metrics['clip_t_mean']['plain']:.2f} |" in status and "CLIP-I: all pairs" in status
    record = json.loads((folder / "story.json").read_text())
    # the record holds what the form asked for, and the prompts the story parser and style give
    story = parse_story(CHARACTERS, STORY, 2)
    assert record["story"]["id_panels"] == {"Bob": [0, 2], "Alice": [1, 3]} and record["story"]["id_length"] == 2
    assert record["story"]["panels"][0]["prompt"] == apply_style("Comic book", story.panels[0].prompt)[0]
    assert record["story"]["panels"][0]["negative_prompt"] == apply_style("Comic book", "", "blurry")[1]
    assert record["files"][:5] == [f"panel_{i:03d}.png" for i in (0, 2, 1, 3, 4)]
    s = record["settings"]
    assert (s["seed"], s["steps"], s["height"], s["width"], s["sa32"]) == (7, 2, 64, 64, 0.5)
    assert s["mode"] == "graph" and s["font_size"] == 8 and s["freeu"] == [0.9, 0.2, 1.3, 1.05]
    # the gallery shows the saved panels, and the pages are those panels typeset
    panels = [pixels(item["image"]) for item in gallery]
    for i, panel in enumerate(panels):
        assert panel.shape == (64, 64, 3) and panel.std() > 1.0  # an image, not a blank
        assert np.array_equal(panel, pixels(folder / f"panel_{i:03d}.png"))
    expected = make_pages([Image.fromarray(p) for p in panels], "Four Pannel", story.captions, 8, seed=7)
    assert len(pages) == 2
    for page, want in zip(pages, expected):
        assert np.array_equal(pixels(page["image"]), np.asarray(want.convert("RGB")))


def test_repeat_reuses_the_loaded_model_and_gives_the_same_images(client, sd_run):
    gallery, _, _, status = client.predict(**FORM, api_name="/story_diffusion")
    assert "model already loaded" in status
    for again, first in zip(gallery, sd_run[0]):
        assert np.array_equal(pixels(again["image"]), pixels(first["image"]))


def test_story_diffusion_with_a_lora(client, sd_run, tmp_path):
    """The LoRA field fuses the file into a model of its own (the plain one stays cached) and the record lists it."""
    lora = Path(__file__).resolve().parent / "fixtures" / "lora" / "peft.safetensors"
    gallery, _, archive, status = client.predict(**FORM, lora=f"{lora}:0.8", api_name="/story_diffusion")
    assert "model loaded in" in status
    loras = json.loads((unzip(archive, tmp_path) / "story.json").read_text())["models"]["loras"]
    assert [(entry["path"], entry["scale"]) for entry in loras] == [(str(lora), 0.8)]
    plain = [pixels(item["image"]) for item in sd_run[0]]
    assert not any(np.array_equal(pixels(item["image"]), p) for item, p in zip(gallery, plain))


def test_story_diffusion_with_a_reference_photo(client, tmp_path):
    """The "Using Ref Images" switch with an upload: the tiny model's PhotoMaker, the photo recorded."""
    from gradio_client import handle_file

    photo = Path(__file__).resolve().parent / "fixtures" / "photomaker" / "photo_0.png"
    form = {**FORM, "characters": "[Bob] a man img, with a black suit", "story_text": "[Bob] wakes up\n[Bob] eats\n"}
    form |= {"ref_mode": "Using Ref Images", "ref_files": [handle_file(str(photo))], "style_strength": 30}
    gallery, _, archive, status = client.predict(**form, api_name="/story_diffusion")
    assert len(gallery) == 2 and "2 panels" in status
    record = json.loads((unzip(archive, tmp_path) / "story.json").read_text())
    assert list(record["settings"]["ref_images"]) == ["Bob"] and record["settings"]["style_strength_ratio"] == 30
    assert record["models"]["photomaker"].endswith("photomaker-tiny.safetensors")


def test_story_adapter_run(client, tmp_path):
    last, every, archive, status = client.predict(**ADAPTER_FORM, api_name="/story_adapter")
    assert "3 rounds of 2 panels" in status
    assert "| round | CLIP-T |" in status and "\n| 2 | " in status  # the scores of every round
    assert [item["caption"] for item in last] == ["round 2, panel 0", "round 2, panel 1"]
    assert [item["caption"] for item in every] == [f"round {r}, panel {i}" for r in range(3) for i in range(2)]
    folder = unzip(archive, tmp_path)
    record = json.loads((folder / "story.json").read_text())
    assert record["method"] == "Story-Adapter" and record["progress"]["done"]
    s = record["settings"]
    assert s["prompts"] == ["a fox in a blue scarf wakes up", "a fox in a blue scarf walks in the snow"]
    assert (s["rounds"], s["steps"], s["height"], s["seed"], s["style"]) == (
        2,
        2,
        64,
        5,
        "film",
    )
    for r in range(3):
        for i in range(2):
            image = pixels(folder / f"round_{r:02d}" / f"panel_{i:03d}.png")
            assert image.shape == (64, 64, 3)
            assert np.array_equal(image, pixels(every[2 * r + i]["image"]))
    assert np.array_equal(pixels(last[1]["image"]), pixels(folder / "round_02" / "panel_001.png"))
    # later rounds see the earlier ones: the panels change from round 0 to round 1
    assert not np.array_equal(pixels(every[0]["image"]), pixels(every[2]["image"]))


def test_kept_character_from_the_zip_replays_its_panels(client, sd_run, tmp_path):
    """Bob's file from the first run's zip, loaded into a new story: his id panels (0 and 2 there) open it, equal."""
    from gradio_client import handle_file

    folder = unzip(sd_run[2], tmp_path)
    form = {
        **FORM,
        "characters": "",
        "story_text": "[Bob] at home\n",
        "kept": [handle_file(folder / "character_Bob.json")],
    }
    gallery, _, _, _ = client.predict(**form, api_name="/story_diffusion")
    assert len(gallery) == 3
    for k, j in ((0, 0), (1, 2)):
        assert np.array_equal(pixels(gallery[k]["image"]), pixels(folder / f"panel_{j:03d}.png")), (k, j)
    other = {**form, "steps": 3}
    with pytest.raises(AppError, match="was made with other settings: steps 2"):
        client.predict(**other, api_name="/story_diffusion")


@pytest.mark.parametrize(
    "api_name, change, message",
    [
        (
            "/story_diffusion",
            {"story_text": "[Carol] runs\n"},
            "names [Carol], which the character box does not define",
        ),
        ("/story_diffusion", {"height": 100}, "height must be a multiple of 32, got 100"),
        ("/story_diffusion", {"story_text": "  \n"}, "the story is empty"),
        ("/story_diffusion", {"id_length": 3}, "character [Bob] needs 3 id panels"),
        ("/story_diffusion", {"model_name": "Nope"}, "Nope is not in the list of choices"),  # Gradio's check
        ("/story_diffusion", {"model_name": "SDXL"}, "not (completely) in the cache"),
        ("/story_diffusion", {"freeu": "on"}, "FreeU takes 'off' or four numbers s1,s2,b1,b2, got 'on'"),
        (
            "/story_diffusion",
            {"ref_mode": "Using Ref Images", "characters": CHARACTERS.replace("a man", "a man img")},
            "upload one photo for each of [Bob], in that order; got 0",
        ),
        ("/story_diffusion", {"lora": "/no/such.safetensors:0.5"}, "LoRA file not found: /no/such.safetensors"),
        ("/story_adapter", {"story_text": ""}, "the story is empty"),
        ("/story_adapter", {"rounds": -1}, "rounds must be at least 0, got -1"),
        ("/story_adapter", {"style": "comic", "steps": 0}, "steps must be at least 1, got 0"),
    ],
)
def test_bad_input_returns_the_error_text(server, client, api_name, change, message):
    form = {**(FORM if api_name == "/story_diffusion" else ADAPTER_FORM), **change}
    tracebacks = app_log(server[1]).count("Traceback")
    with pytest.raises(AppError) as err:
        client.predict(**form, api_name=api_name)
    assert message in str(err.value)
    assert "Traceback" not in str(err.value)
    if "choices" not in message:  # Gradio logs a traceback for its own checks; the app's own errors log none
        assert app_log(server[1]).count("Traceback") == tracebacks
