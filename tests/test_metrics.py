"""Story metrics: CLIP features and scores against transformers' CLIPModel (tests/fixtures/make_metrics_fixtures.py)
in both modes, evaluate() on a tiny story of each method through tools/evaluate_story.py, and bad input."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURES, TINY_SDXL, rel_err
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import evaluate_story  # noqa: E402

from mindone_story.errors import StoryError  # noqa: E402
from mindone_story.metrics import (  # noqa: E402
    CELL,
    HEATMAP,
    MARGIN,
    METRICS,
    PAD,
    clip_i,
    clip_t,
    evaluate,
    heatmap_size,
    load_clip_pair,
    markdown_table,
)

TOL = 1e-4  # relative, features and scores (measured: 6e-7 text, 5e-7 image)
CLIP_DIR = FIXTURES / "metrics" / "tiny_clip"
LONG = "a woman reading " + "a very long book about mountains and rivers and " * 4 + "at night"
CHARACTERS = "[Bob] a man with a black suit\n[Alice] a woman in a white shirt"
STORY = f"[Bob] wakes up #morning\n[Alice] reads a book\n[Bob] has breakfast\n[Alice] {LONG}\n[NC] a city street"


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(FIXTURES / "metrics" / "metrics_io.npz"))


@pytest.mark.parametrize("mode", ["pynative", "graph"])
@pytest.mark.parametrize("layout", ["sdxl+image_encoder", "clip_model"])
def test_features_and_scores_match_transformers(ref, mode, layout):
    if layout == "clip_model":
        pair = load_clip_pair(clip_model=CLIP_DIR, mode=mode)
    else:
        pair = load_clip_pair(TINY_SDXL, TINY_SDXL / "image_encoder", mode=mode)
    ids, counts = pair.tokens(["a man with a black suit", LONG, ""])
    assert np.array_equal(ids, ref["input_ids"]) and counts[1] > 77 >= counts[0]
    pixels = pair.preprocess([Image.fromarray(a) for a in ref["images"]])
    assert np.abs(pixels - ref["pixel_values"]).max() < 1e-5
    text, image = pair.text_features(ref["input_ids"]), pair.image_features(ref["pixel_values"])
    assert rel_err(text, ref["text_features"]) < TOL
    assert rel_err(image, ref["image_features"]) < TOL
    assert rel_err(clip_t(image, text), ref["clip_t"]) < TOL
    assert rel_err(clip_i(image), ref["clip_i"]) < TOL
    # the compiled towers take their inputs as tensors: other inputs, other features
    assert rel_err(pair.text_features(ref["input_ids"][::-1]), ref["text_features"][::-1]) < TOL


def other_encoder(folder: Path) -> Path:
    """An image encoder like the tiny one but projecting to 16: whole and loadable, the wrong partner."""
    from mindone_story.pretrained import model_shapes, random_weights
    from mindone_story.weights import save_safetensors

    folder.mkdir()
    cfg = {**json.loads((TINY_SDXL / "image_encoder" / "config.json").read_text()), "projection_dim": 16}
    (folder / "config.json").write_text(json.dumps(cfg))
    save_safetensors(
        random_weights(model_shapes({"image_encoder": cfg})["image_encoder"], "other"), folder / "model.safetensors"
    )
    return folder


def test_mismatched_pair_is_one_line(tmp_path):
    wide = other_encoder(tmp_path / "image_encoder")
    with pytest.raises(StoryError, match="projects to 32 and the image encoder to 16") as e:
        load_clip_pair(TINY_SDXL, wide)
    assert "\n" not in str(e.value)
    from mindone_story.metrics import check_pair

    bigg_text = {"hidden_size": 1280, "projection_dim": 1024}
    vit_h_image = {"hidden_size": 1280, "projection_dim": 1024}
    with pytest.raises(StoryError, match="a ViT-bigG text encoder with a ViT-H image encoder"):
        check_pair(bigg_text, vit_h_image, "x")
    assert check_pair({"hidden_size": 1280, "projection_dim": 1280}, {"hidden_size": 1664, "projection_dim": 1280}, "")


# -- whole stories -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stories(tmp_path_factory):
    from mindone_story import StoryAdapterPipeline, StoryAdapterSettings, generate_story
    from mindone_story.pipelines.story_diffusion import StoryDiffusionPipeline, StoryDiffusionSettings
    from mindone_story.pretrained import TINY_IP_ADAPTER, load_ip_adapter_models, load_sdxl, tiny_model_dir
    from mindone_story.runs.story_diffusion import run_story
    from mindone_story.story.prompts import parse_story

    root = tiny_model_dir()
    models = load_sdxl(root)
    sd = tmp_path_factory.mktemp("sd")
    story = parse_story(CHARACTERS, STORY, id_length=1)
    settings = StoryDiffusionSettings(height=64, width=64, steps=1, seed=1)
    run_story(StoryDiffusionPipeline(models, mode="pynative"), story, settings, sd, models={"model": "tiny"})
    ip = load_ip_adapter_models(root / "ip_adapter" / TINY_IP_ADAPTER, root / "image_encoder", models.unet.config)
    sa = tmp_path_factory.mktemp("sa")
    sa_settings = StoryAdapterSettings(
        ("a cat on a roof", "a dog in a park", "a cat and a dog"), seed=3, rounds=1, steps=1, height=64, width=64
    )
    paths = {"base_model_path": "tiny", "image_encoder_path": str(root / "image_encoder")}
    # a fresh model: StoryDiffusionPipeline put its consistent attention into the first one's UNet
    generate_story(StoryAdapterPipeline(load_sdxl(root), ip, mode="pynative"), sa_settings, sa, models=paths)
    return sd, sa


def test_story_diffusion_story(stories, capsys):
    sd, _ = stories
    assert evaluate_story.main([str(sd), "--mode", "pynative"]) == 0
    assert "CLIP-T" in capsys.readouterr().out
    m = json.loads((sd / METRICS).read_text())
    record = json.loads((sd / "story.json").read_text())
    assert m["method"] == "StoryDiffusion" and m["max_tokens"] == 77
    matrix = np.array(m["clip_i"]["matrix"])
    assert matrix.shape == (5, 5) and np.allclose(np.diag(matrix), 1, atol=1e-5) and np.allclose(matrix, matrix.T)
    chars = m["clip_i"]["characters"]
    assert {n: c["panels"] for n, c in chars.items()} == {"Alice": [1, 3], "Bob": [0, 2]}  # [NC] panel 4 in none
    assert chars["Bob"]["mean"] == pytest.approx(matrix[0, 2], abs=1e-6)
    assert m["clip_i"]["all"] == pytest.approx(matrix[np.triu_indices(5, 1)].mean(), abs=1e-6)
    # the scores are the built-in tiny pair's (the CLI's default here) on the panel files and the recorded prompts
    from mindone_story.pretrained import tiny_model_dir

    pair = load_clip_pair(tiny_model_dir(), tiny_model_dir() / "image_encoder", mode="pynative")
    images = [Image.open(sd / f"panel_{i:03d}.png") for i in range(5)]
    feats = pair.image_features(pair.preprocess(images))
    styled = [p["prompt"] for p in record["story"]["panels"]]
    from mindone_story.story.prompts import parse_story

    plain = parse_story(CHARACTERS, STORY, 1).prompts  # tags replaced by descriptions, no caption, no style
    assert "[Bob]" not in plain[0] and "morning" not in plain[0] and "black suit" in plain[0]
    for kind, prompts in (("styled", styled), ("plain", plain)):
        expected = clip_t(feats, pair.text_features(pair.tokens(prompts)[0]))
        assert np.allclose(m["clip_t"][kind], expected, atol=1e-3), kind
        counts = pair.tokens(prompts)[1]
        cut = [(t["panel"], t["tokens"]) for t in m["truncated"] if t["prompt"] == kind]
        assert cut == [(i, c) for i, c in enumerate(counts) if c > 77] and (kind == "styled" or cut[0][0] == 3)
    assert m["clip_t_mean"]["plain"] == pytest.approx(np.mean(m["clip_t"]["plain"]), abs=1e-3)
    table = markdown_table(m)  # the demo's
    assert f"| 3 | {m['clip_t']['plain'][3]:.2f} | {m['clip_t']['styled'][3]:.2f} |" in table
    assert f"Bob {chars['Bob']['mean']:.3f}" in table
    with Image.open(sd / HEATMAP) as png:
        width, height = heatmap_size(5, 4)  # CLIP-T, all pairs, Alice, Bob
        assert png.height == height and png.width >= width == MARGIN + 5 * CELL + PAD


def test_story_adapter_story_per_round(stories):
    _, sa = stories
    assert evaluate_story.main([str(sa), "--mode", "graph"]) == 0
    m = json.loads((sa / METRICS).read_text())
    assert m["method"] == "Story-Adapter" and [r["round"] for r in m["rounds"]] == [0, 1]
    for r in m["rounds"]:
        assert len(r["clip_t"]["plain"]) == 3 and np.array(r["clip_i"]["matrix"]).shape == (3, 3)
        assert r["clip_i"]["characters"] == {}
    assert m["rounds"][0]["clip_i"]["matrix"] != m["rounds"][1]["clip_i"]["matrix"]  # round 1 differs
    with Image.open(sa / HEATMAP) as png:
        assert png.height == heatmap_size(3, 2)[1] and png.width >= 2 * heatmap_size(3, 2)[0]  # a map per round


def fails(capsys, *argv: str) -> str:
    assert evaluate_story.main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


def test_bad_input_is_one_line(stories, tmp_path, capsys):
    sd, _ = stories
    assert "is not a story folder" in fails(capsys, str(tmp_path))
    cut = tmp_path / "cut"
    shutil.copytree(sd, cut)
    (cut / "panel_002.png").unlink()
    assert "panel_002.png is missing" in fails(capsys, str(cut), "--mode", "pynative")
    (cut / "panel_002.png").write_bytes((sd / "panel_002.png").read_bytes()[:100])
    assert "panel_002.png is not a whole PNG" in fails(capsys, str(cut), "--mode", "pynative")
    wide = other_encoder(tmp_path / "image_encoder")
    assert "not one CLIP model" in fails(capsys, str(sd), "--image_encoder", str(wide))
    assert "--clip_model holds both towers" in fails(
        capsys, str(sd), "--clip_model", str(CLIP_DIR), "--image_encoder", str(wide)
    )
    record = json.loads((sd / "story.json").read_text())
    unfinished = tmp_path / "unfinished"
    shutil.copytree(sd, unfinished)
    (unfinished / "story.json").write_text(json.dumps({**record, "progress": {**record["progress"], "done": False}}))
    with pytest.raises(StoryError, match="is not finished"):
        evaluate(unfinished, load_clip_pair(clip_model=CLIP_DIR, mode="pynative"))


def test_cli_encoder_choice(stories, tmp_path, capsys):
    """--clip_model scores with the CLIPModel folder; a story of a real model needs --image_encoder."""
    sd, _ = stories
    copy = tmp_path / "copy"
    shutil.copytree(sd, copy)
    assert evaluate_story.main([str(copy), "--clip_model", str(CLIP_DIR), "--mode", "pynative"]) == 0
    assert json.loads((copy / METRICS).read_text())["encoders"] == {"clip_model": str(CLIP_DIR), "family": "custom"}
    record = json.loads((copy / "story.json").read_text())
    record["models"]["model"] = str(TINY_SDXL)  # a model folder, not the built-in tiny one
    (copy / "story.json").write_text(json.dumps(record))
    assert "--image_encoder is required" in fails(capsys, str(copy))
