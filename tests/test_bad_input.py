"""Bad input through the real CLIs, as subprocesses: a non-zero exit, one line that names the problem, no
traceback, and every file that existed before unchanged (or, where the folder rule allows replacing, no file of the
old run left). One test per class of fault, several cases each."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mindone_story.pretrained import tiny_model_dir
from mindone_story.runs.record import RunRecord

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "examples" / "story_diffusion" / "run.py"
ADAPTER = ROOT / "examples" / "story_diffusion" / "run_story_adapter.py"
CONVERT = ROOT / "tools" / "convert_weights.py"
TINY = ["--sd_model_name", "tiny", "--height", "64", "--width", "64", "--steps", "1", "--no_progress"]
TWO = ["--story", None, "--id_length", "1", "--mode", "pynative"]  # --story filled in by story()
ADAPTER_TINY = ["--story", "a cat", "--rounds", "1", "--steps", "1", "--height", "64", "--width", "64"]
ADAPTER_TINY += ["--seed", "1", "--mode", "pynative", "--no_progress"]


def cli(script: Path, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, str(script), *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )


def refused(result: subprocess.CompletedProcess, *words: str) -> str:
    """The run failed with exit status 2 and a one-line message holding ``words``, and no traceback."""
    err = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    last = err[-1]
    assert last.startswith("error: ") and all(w in last for w in words), result.stderr
    return last


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def story(tmp_path: Path, text: str = "a walk in the park\nat the beach\n[NC] an empty street\n") -> list[str]:
    path = tmp_path / "story.txt"
    path.write_text(text, encoding="utf-8")
    return [str(path) if a is None else a for a in TWO]


# -- 1. errors after the model loads are messages too -----------------------------------------------------------
def test_broken_model_files_after_loading_starts(tmp_path):
    no_vae = tmp_path / "no_vae"
    shutil.copytree(tiny_model_dir(), no_vae)
    shutil.rmtree(no_vae / "vae")
    base = ["--height", "64", "--width", "64", "--output_dir", tmp_path / "out"]
    refused(cli(RUN, "--model_path", no_vae, *base), "vae")
    cut = tmp_path / "cut"
    shutil.copytree(tiny_model_dir(), cut)
    unet = cut / "unet" / "diffusion_pytorch_model.safetensors"
    unet.write_bytes(unet.read_bytes()[: unet.stat().st_size // 2])
    refused(cli(RUN, "--model_path", cut, *base), str(unet))
    refused(cli(ADAPTER, "--base_model_path", cut, "--image_encoder_path", cut / "image_encoder", "--ip_ckpt",
                cut / "ip_adapter" / "ip-adapter_sdxl.safetensors", "--output_dir", tmp_path / "sa"), str(unet))  # fmt: skip
    assert not (tmp_path / "out").exists() and not (tmp_path / "sa").exists()


# -- 2 and 3. every value checked before any work; zero is a value ----------------------------------------------
@pytest.mark.parametrize(
    "script,args,words",
    [
        (RUN, ["--font_size", "-5"], ["font_size must be at least 1, got -5"]),
        (RUN, ["--font_size", "0"], ["font_size must be at least 1, got 0"]),
        (RUN, ["--height", "0"], ["height must be at least 1, got 0"]),
        (RUN, ["--steps", "0"], ["steps must be at least 1, got 0"]),
        (RUN, ["--sampling_steps", "0"], ["steps must be at least 1, got 0"]),
        (RUN, ["--guidance_scale", "nan"], ["guidance_scale must be a finite number"]),
        (RUN, ["--sa32", "inf"], ["sa32 must be a finite number"]),
        (RUN, ["--id_length", "0"], ["id_length must be a positive integer, got 0"]),
        (RUN, ["--read_batch", "0"], ["read_batch must be at least 1, got 0"]),
        (ADAPTER, ["--steps", "0"], ["steps must be at least 1, got 0"]),
        (ADAPTER, ["--guidance_scale", "nan"], ["guidance_scale must be a finite number"]),
        (ADAPTER, ["--width", "0"], ["width must be at least 1, got 0"]),
    ],
)
def test_values_refused_before_any_work(tmp_path, script, args, words):
    base = TINY if script is RUN else ["--story", "a cat", "--no_progress"]
    out = tmp_path / "out"
    refused(cli(script, *base, *args, "--output_dir", out), *words)
    assert not out.exists()


def test_size_that_cannot_fit_is_refused_with_an_estimate(tmp_path):
    out = tmp_path / "out"
    result = cli(RUN, *TINY, "--height", "100000", "--width", "100000", "--mode", "pynative", "--output_dir", out)
    refused(result, "100000x100000", "needs at least", "available")
    assert not out.exists()


# -- 4. output folders: never mixed, never silently replaced ----------------------------------------------------
def test_output_folder_rule(tmp_path):
    out = tmp_path / "out"
    first = cli(RUN, *TINY, *story(tmp_path, "one\ntwo\nthree\nfour\n"), "--output_dir", out)
    assert first.returncode == 0, first.stderr
    before = snapshot(out)
    assert "panel_003.png" in before
    # a second story into the same folder is refused, and the first one is untouched
    refused(cli(RUN, *TINY, *story(tmp_path), "--output_dir", out), "holds a StoryDiffusion run", "overwrite")
    refused(cli(ADAPTER, *ADAPTER_TINY, "--output_dir", out), "holds a StoryDiffusion run")
    refused(cli(ADAPTER, "--output_dir", out, "--resume"), "records a StoryDiffusion run, not a Story-Adapter one")
    assert snapshot(out) == before
    # --overwrite replaces it: no panel or page of the old story is left beside the new ones
    (out / "notes.txt").write_text("mine")
    second = cli(RUN, *TINY, *story(tmp_path), "--output_dir", out, "--overwrite")
    assert second.returncode == 0, second.stderr
    left = sorted(snapshot(out))
    assert left == ["notes.txt", "page_00.png", "panel_000.png", "panel_001.png", "panel_002.png", "story.json"]
    # a path that is a file, or inside one
    afile = tmp_path / "afile"
    afile.write_text("x")
    refused(cli(RUN, *TINY, "--output_dir", afile), "is a file, not a folder")
    refused(cli(ADAPTER, *ADAPTER_TINY, "--output_dir", afile / "sub"), "which is a file")
    assert afile.read_text() == "x"
    # files named like a run's outputs, without a record, are not overwritten either
    loose = tmp_path / "loose"
    loose.mkdir()
    (loose / "panel_000.png").write_bytes(b"not mine to replace")
    refused(cli(RUN, *TINY, "--output_dir", loose), "files of another run (panel_000.png)")
    assert (loose / "panel_000.png").read_bytes() == b"not mine to replace"


def test_failed_writes_leave_no_temporary_file(tmp_path, monkeypatch):
    """A full disk during a write: the target keeps its old bytes and no .tmp file is left (write_atomic)."""
    from mindone_story.runs import files

    target = tmp_path / "story.json"
    target.write_text("old")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", full)
    with pytest.raises(OSError):
        files.write_json({"a": 1}, target)
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["story.json"]
    from mindone_story.errors import describe

    assert describe(OSError(errno.ENOSPC, "x", str(target))) == f"no space left on the device: {target}"


# -- 5. records read back: validated, with the file and the field named -----------------------------------------
def _adapter_record(folder: Path, **changes) -> Path:
    settings = {"prompts": ["a cat"], "style": "comic", "seed": 1, "rounds": 1, "steps": 1, "height": 64, "width": 64}
    settings |= {"guidance_scale": 5.0, "freeu": None}
    record = RunRecord("Story-Adapter", settings, {"base_model_path": "tiny"}, {}, {"round": 0, "panels": 0})
    record.progress["done"] = False
    raw = record.to_dict()
    for key, value in changes.items():
        section, _, name = key.partition("__")
        if name and value is None:
            del raw[section][name]
        elif name:
            raw[section][name] = value
        elif value is None:
            del raw[section]
        else:
            raw[section] = value
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "story.json").write_text(json.dumps(raw))
    return folder


@pytest.mark.parametrize(
    "write,words",
    [
        (
            lambda f: (f / "story.json").write_text('{"format": "mindone-story run", "vers'),
            ["not valid JSON", "story.json"],
        ),
        (lambda f: (f / "story.json").write_text("[1, 2]"), ["holds a JSON list, not a run record"]),
        (lambda f: (f / "story.json").write_bytes(b"\xff\xfe\x00"), ["is not UTF-8 text"]),
        (lambda f: _adapter_record(f, progress=None), ["field 'progress' is missing"]),
        (lambda f: _adapter_record(f, settings="x"), ["field 'settings' must be a JSON dict, got str"]),
        (lambda f: _adapter_record(f, settings__steps=None), ["run/story.json: field 'settings.steps' is missing"]),
        (lambda f: _adapter_record(f, settings__height=100), ["recorded settings are not valid", "multiple of 32"]),
        (lambda f: _adapter_record(f, progress__round=5), ["progress (round 5, 0 panels) does not fit", "1 rounds"]),
        (lambda f: _adapter_record(f, version=99), ["record version 99"]),
        (lambda f: _adapter_record(f, format=None), ["not written in this run-record format"]),
    ],
)
def test_resume_reads_records_strictly(tmp_path, write, words):
    folder = tmp_path / "run"
    folder.mkdir()
    write(folder)
    before = snapshot(folder)
    refused(cli(ADAPTER, "--output_dir", folder, "--resume"), *words)
    assert snapshot(folder) == before


def test_resume_with_a_cut_short_panel(tmp_path):
    out = tmp_path / "sa"
    done = cli(ADAPTER, *ADAPTER_TINY, "--output_dir", out)
    assert done.returncode == 0, done.stderr
    raw = json.loads((out / "story.json").read_text())
    raw["progress"] = {"round": 1, "panels": 0, "done": False}  # as if killed right after round 0
    raw["files"] = ["round_00/panel_000.png"]
    (out / "story.json").write_text(json.dumps(raw))
    png = out / "round_00" / "panel_000.png"
    png.write_bytes(png.read_bytes()[:100])
    refused(cli(ADAPTER, "--output_dir", out, "--resume"), str(png), "not a whole PNG")


# -- 6. paths and text ------------------------------------------------------------------------------------------
def test_story_paths_and_text(tmp_path):
    out = ["--output_dir", tmp_path / "out"]
    refused(cli(RUN, *TINY, "--story", tmp_path, *out), f"the story file {tmp_path} is a folder")
    refused(cli(ADAPTER, "--story", tmp_path, *out), f"the story file {tmp_path} is a folder")
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("un café\n".encode("latin-1"))
    refused(cli(RUN, *TINY, "--story", latin, *out), f"the story file {latin} is not UTF-8 text")
    refused(cli(ADAPTER, "--story", latin, *out), f"the story file {latin} is not UTF-8 text")
    few = story(tmp_path, "one panel\n")
    last = refused(cli(RUN, *TINY, *few, "--id_length", "2", *out), "the character needs 2 id panels")
    assert "Hero" not in last
    assert not (tmp_path / "out").exists()


def test_converter_errors_are_one_line(tmp_path):
    refused(cli(CONVERT, "--input", tmp_path / "nope.safetensors", "--output", tmp_path / "o"), "nope.safetensors")
    refused(cli(CONVERT, "--input", tiny_model_dir(), "--output", tmp_path / "o", "--max_shard_size", "lots"),
            "max_shard_size must be a size")  # fmt: skip
