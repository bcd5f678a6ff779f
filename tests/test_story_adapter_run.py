"""examples/story_diffusion/run_story_adapter.py: a run killed mid-round by a real signal resumes to the same bytes as
an uninterrupted run; every bad input gives a clear error before any model is loaded."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mindone_story.pretrained import TINY_IP_ADAPTER, tiny_model_dir
from mindone_story.weights import SafetensorsFile, save_safetensors

ROOT = Path(__file__).resolve().parents[1]
RUNNER = ROOT / "examples" / "story_diffusion" / "run_story_adapter.py"
sys.path.insert(0, str(RUNNER.parent))
import run_story_adapter  # noqa: E402

# 2 panels, rounds 0..2, 64x64, 2 steps, PyNative (no compile): about ten seconds of work per run
SMALL = [
    "--story",
    "a cat on a roof",
    "a dog in a park",
    "--rounds",
    "2",
    "--steps",
    "2",
    "--height",
    "64",
    "--width",
    "64",
    "--seed",
    "7",
    "--mode",
    "pynative",
    "--no_progress",
]


def runner(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, str(RUNNER), *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def progress(folder: Path) -> dict | None:
    try:  # story.json is replaced atomically: it is either absent or whole
        return json.loads((folder / "story.json").read_text())["progress"]
    except FileNotFoundError:
        return None


def pngs(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.glob("round_*/panel_*.png"))}


def test_killed_run_resumes_to_the_same_images(tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    reference = runner(*SMALL, "--output_dir", str(whole))  # runs beside the interrupted one
    victim = runner(*SMALL, "--output_dir", str(cut))
    deadline = time.time() + 600
    while time.time() < deadline and victim.poll() is None:
        state = progress(cut)
        if state and state["round"] == 1 and state["panels"] >= 1:
            victim.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    victim.wait(60)
    assert victim.returncode == -signal.SIGKILL, victim.stdout.read()
    state = progress(cut)
    assert state == {"round": 1, "panels": 1, "done": False}, state  # killed inside round 1
    kept = (cut / "round_01" / "panel_000.png").stat().st_mtime_ns
    assert not (cut / "round_02").exists()

    resumed = subprocess.run(
        [sys.executable, str(RUNNER), "--output_dir", str(cut), "--resume", "--no_progress"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert reference.wait(600) == 0, reference.stdout.read()

    assert len(pngs(whole)) == 6 and pngs(cut) == pngs(whole)  # byte-equal PNGs, every round
    assert (cut / "round_01" / "panel_000.png").stat().st_mtime_ns == kept  # the finished panel was not redone
    record = json.loads((cut / "story.json").read_text())
    assert record["progress"] == {"round": 2, "panels": 2, "done": True}
    assert sorted(record["files"]) == sorted(pngs(whole))
    assert [(e["round"], e["panels_made"]) for e in record["log"]] == [(0, 2), (1, 1), (2, 2)]
    assert [e["reference_encodings"] for e in record["log"]] == [0, 2, 2]  # N encodings per round, not N^2
    assert record["settings"]["seed"] == 7 and record["story"]["scales"] == [0.3, 0.5]
    assert not list(cut.rglob(".*.tmp"))  # no temporary file left behind


# -- errors ------------------------------------------------------------------------------------------------------
def fails(capsys, *args: str) -> str:
    assert run_story_adapter.main(list(args)) == 2
    return capsys.readouterr().err


def test_empty_story(capsys, tmp_path):
    assert "the story is empty" in fails(capsys, "--story", "", "--output_dir", str(tmp_path / "a"))
    blank = tmp_path / "story.txt"
    blank.write_text("\n  \n")
    assert "has no prompts" in fails(capsys, "--story", str(blank), "--output_dir", str(tmp_path / "b"))
    err = fails(capsys, "--story", str(tmp_path / "nope.txt"))
    assert f"the story file {tmp_path / 'nope.txt'} does not exist" in err
    assert not (tmp_path / "a").exists()


def test_missing_files(capsys, tmp_path):
    out = ["--output_dir", str(tmp_path / "out")]
    err = fails(capsys, "--ip_ckpt", str(tmp_path / "ip-adapter_sdxl.bin"), "--base_model_path", "tiny", *out)
    assert f"--ip_ckpt: {tmp_path / 'ip-adapter_sdxl.bin'} does not exist" in err
    err = fails(
        capsys,
        "--base_model_path",
        str(tmp_path / "RealVisXL_V4.0"),
        "--image_encoder_path",
        "x",
        "--ip_ckpt",
        "y",
        *out,
    )
    assert "--base_model_path" in err and "does not exist" in err
    err = fails(capsys, "--base_model_path", str(tmp_path), *out)
    assert "--image_encoder_path, --ip_ckpt required with a base model other than 'tiny'" in err
    assert "there is no run to continue" in fails(capsys, "--resume", *out)


def test_ip_adapter_for_another_image_encoder(capsys, tmp_path):
    """An adapter whose projection expects 16-wide image embeddings, beside the tiny encoder (projection 32)."""
    good = SafetensorsFile(tiny_model_dir() / "ip_adapter" / TINY_IP_ADAPTER)
    weights = {k: good[k] for k in good}
    weights["image_proj.proj.weight"] = np.zeros((weights["image_proj.proj.weight"].shape[0], 16), np.float32)
    save_safetensors(weights, tmp_path / "ip-adapter_other.safetensors")
    err = fails(
        capsys,
        "--base_model_path",
        "tiny",
        "--ip_ckpt",
        str(tmp_path / "ip-adapter_other.safetensors"),
        "--output_dir",
        str(tmp_path / "out"),
    )
    assert "needs image features of width 16" in err and "projection_dim is 32" in err


def test_existing_run_and_clashing_resume(capsys, tmp_path):
    from mindone_story.runs.record import RunRecord

    out = tmp_path / "out"
    out.mkdir()
    settings = {"prompts": ["a cat"], "style": "comic", "seed": 3, "rounds": 1, "steps": 2, "height": 64, "width": 64}
    settings |= {"guidance_scale": 5.0, "freeu": None}
    progress = {"round": 0, "panels": 0, "done": False}
    RunRecord("Story-Adapter", settings, {"base_model_path": "tiny"}, {}, progress).save(out)
    assert "holds a Story-Adapter run" in fails(capsys, "--output_dir", str(out), "--story", "a cat")
    err = fails(capsys, "--output_dir", str(out), "--resume", "--seed", "4")
    assert "cannot resume with other settings: --seed 4 (recorded 3)" in err
    err = fails(capsys, "--output_dir", str(out), "--resume", "--story", "a dog")
    assert "other prompts" in err
    err = fails(capsys, "--output_dir", str(out), "--resume", "--freeu", "0.6,0.4,1.1,1.2")
    assert "--freeu '0.6,0.4,1.1,1.2' (recorded None)" in err


@pytest.mark.parametrize(
    "bad,message",
    [
        (["--height", "100"], "height must be a multiple of 32, got 100"),
        (["--rounds", "-1"], "rounds must be at least 0"),
        (["--freeu", "0.6,0.4"], "FreeU takes 'off' or four numbers s1,s2,b1,b2, got '0.6,0.4'"),
    ],
)
def test_bad_settings(capsys, tmp_path, bad, message):
    assert message in fails(capsys, *bad, "--output_dir", str(tmp_path / "out"))


def test_in_memory_call_equals_the_on_disk_run(tmp_path):
    """StoryAdapterPipeline(settings) returns every round's images without files, equal to the runner's PNGs."""
    from mindone_story import StoryAdapterPipeline, StoryAdapterSettings, generate_story
    from mindone_story.pretrained import load_ip_adapter_models, load_sdxl

    root = tiny_model_dir()
    models = load_sdxl(root)
    ip = load_ip_adapter_models(root / "ip_adapter" / TINY_IP_ADAPTER, root / "image_encoder", models.unet.config)
    pipe = StoryAdapterPipeline(models, ip, mode="pynative")
    settings = StoryAdapterSettings(
        ("a cat on a roof", "a dog in a park"), seed=3, rounds=1, steps=2, height=64, width=64
    )
    seen = []
    rounds = pipe(settings, on_panel=lambda *a: seen.append(a))
    assert seen == [(0, 0, 1, 2), (0, 1, 1, 2), (1, 0, 1, 2), (1, 1, 1, 2)]
    generate_story(pipe, settings, tmp_path / "run")
    for r, images in enumerate(rounds):
        for i, image in enumerate(images):
            on_disk = np.asarray(Image.open(tmp_path / "run" / f"round_{r:02d}" / f"panel_{i:03d}.png"))
            assert np.array_equal(np.asarray(image), on_disk), (r, i)
    assert not np.array_equal(np.asarray(rounds[0][0]), np.asarray(rounds[1][0]))  # round 1 saw the references


def test_cli_warns_of_every_prompt_past_77_tokens(tmp_path, capsys, monkeypatch):
    """As run.py: one line per panel whose prompt is cut, one for the negative prompt; nothing is generated here."""
    from types import SimpleNamespace

    import mindone_story.runs.story_adapter as runs

    monkeypatch.setattr(runs, "generate_story", lambda *a, **k: SimpleNamespace(settings={"rounds": 0, "prompts": []}))
    long = "a cat " + "walks in the old city at night, " * 12 + "and sleeps"
    argv = [*SMALL[SMALL.index("--rounds") :], "--output_dir", str(tmp_path / "o")]
    assert run_story_adapter.main(["--story", "a cat", long, *argv]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    # the tiny tokenizer splits words finely: even the short panel loses the style's closing words
    assert lines[0] == "warning: panel 0: the prompt passes CLIP's 77 tokens; dropped: 'art, vibrant, highly detailed'"
    assert lines[1].startswith("warning: panel 1: the prompt passes CLIP's 77 tokens; dropped: '")
    assert lines[1].endswith("graphic novel art, vibrant, highly detailed'") and "and sleeps" in lines[1]
    assert len(lines[1]) > 300, lines[1]
    assert len(lines) == 2, lines  # the negative prompt fits
