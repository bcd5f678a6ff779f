"""Characters kept across runs (run.py --save_characters / --character) and comics continued (--continue), on the
tiny model in PyNative: replayed panels are byte-identical, and every bad character file is one line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "story_diffusion"))
import run as story_cli  # noqa: E402

BOX = "[Bob] a man with a black suit\n[Alice] a woman in a white shirt"
STORY = "[Bob] wakes up\n[Bob] has breakfast\n[Alice] reads a book\n[Alice] goes to work\n[Bob] at the beach #sea"
MORE = "[Alice] in the park #later\n[NC] a city street at night"
FAST = ["--sd_model_name", "tiny", "--height", "64", "--width", "64", "--sampling_steps", "1", "--mode", "pynative"]
FAST += ["--id_length", "2", "--no_progress"]


def pngs(folder: Path, pattern: str = "p*_*.png") -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob(pattern))}


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    """Bob's and Alice's id panels, then a later Bob panel; the characters saved."""
    root = tmp_path_factory.mktemp("chars")
    (root / "story.txt").write_text(STORY)
    out = root / "first"
    argv = FAST + ["--general_prompt", BOX, "--story", str(root / "story.txt"), "--output_dir", str(out)]
    assert story_cli.main(argv + ["--save_characters"]) == 0
    return out


def test_saved_character_is_a_small_recipe(first):
    record = json.loads((first / "story.json").read_text())
    assert {"character_Bob.json", "character_Alice.json"} <= set(record["files"])
    alice = json.loads((first / "character_Alice.json").read_text())
    assert alice["format"] == "mindone-story character" and alice["version"] == 1
    assert [p["text"] for p in alice["id_panels"]] == ["[Alice] reads a book", "[Alice] goes to work"]
    assert [p["noise_seed"] for p in alice["id_panels"]] == [[3407, 2], [3407, 3]]
    assert alice["phase_seeds"] == [1] and alice["models"]["fingerprint"] == record["models"]["fingerprint"]
    assert (first / "character_Alice.json").stat().st_size < 4096
    print("character file:", (first / "character_Alice.json").stat().st_size, "bytes")


def test_loaded_characters_replay_their_panels_byte_for_byte(first, tmp_path):
    """Alice loaded first and Bob second: each character's replayed id panels are the first run's, at new
    positions, and the later panel drawn again is the first run's, byte for byte."""
    (tmp_path / "later.txt").write_text("[Bob] at the beach #sea")
    argv = FAST + ["--story", str(tmp_path / "later.txt"), "--output_dir", str(tmp_path / "second")]
    argv += ["--character", str(first / "character_Alice.json"), "--character", str(first / "character_Bob.json")]
    assert story_cli.main(argv) == 0
    old, new = pngs(first, "panel_*.png"), pngs(tmp_path / "second", "panel_*.png")
    moved = {0: 2, 1: 3, 2: 0, 3: 1, 4: 4}  # second run's panel -> first run's
    for k, j in moved.items():
        assert new[f"panel_{k:03d}.png"] == old[f"panel_{j:03d}.png"], (k, j)


def test_continued_comic_equals_the_whole_story_drawn_at_once(first, tmp_path):
    """--continue adds panels and pages; the recorded panels are not rewritten, and the result is the comic of the
    whole story made in one run."""
    import shutil

    out = tmp_path / "continued"
    shutil.copytree(first, out)
    (tmp_path / "more.txt").write_text(MORE)
    before = {p: (out / p).stat().st_mtime_ns for p in pngs(out, "panel_*.png")}
    argv = ["--continue", str(out), "--story", str(tmp_path / "more.txt"), "--no_progress"]
    assert story_cli.main(argv) == 0
    (tmp_path / "all.txt").write_text(STORY + "\n" + MORE)
    whole = tmp_path / "whole"
    argv = FAST + ["--general_prompt", BOX, "--story", str(tmp_path / "all.txt"), "--output_dir", str(whole)]
    assert story_cli.main(argv) == 0
    assert pngs(out) == pngs(whole) and len(pngs(out, "page_*.png")) == 2  # 7 panels: four, then three
    assert {p: (out / p).stat().st_mtime_ns for p in before} == before
    record = json.loads((out / "story.json").read_text())
    assert len(record["story"]["panels"]) == 7 and record["story"]["replay"] == {"parts": [5]}
    assert record["log"][-1]["continued"] == "5 -> 7 panels" and record["progress"]["done"]
    assert story_cli.main(["--continue", str(out), "--no_progress"]) == 0  # nothing new (an interrupted one's finish)
    assert pngs(out) == pngs(whole)


def edited(first: Path, tmp_path: Path, **changes) -> Path:
    data = json.loads((first / "character_Bob.json").read_text())
    for key, value in changes.items():
        section, _, name = key.partition("__")
        if name:
            data[section][name] = value
        else:
            data[section] = value
    path = tmp_path / "bob.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(
    "make, extra, message",
    [
        (lambda f, t: t.joinpath("x.json").write_bytes(b"\x89PNG") and t / "x.json", [], "is not a character file"),
        (lambda f, t: f / "story.json", [], "is not a mindone-story character file"),
        (lambda f, t: t / "none.json", [], "does not exist"),
        (lambda f, t: edited(f, t, version=9), [], "has character version 9"),
        (lambda f, t: edited(f, t, id_panels=None), [], "incomplete or edited"),
        (lambda f, t: edited(f, t, models__fingerprint="0" * 64), [], "was made with other model weights"),
        (lambda f, t: f / "character_Bob.json", ["--height", "128"], "other settings: height 64 (this run: 128)"),
        (lambda f, t: f / "character_Bob.json", ["--sampling_steps", "3"], "other settings: steps 1 (this run: 3)"),
        (lambda f, t: f / "character_Bob.json", ["--id_length", "1"], "has 2 id panels, this story 1"),
    ],
)
def test_bad_character_file_is_one_line(first, tmp_path, capsys, make, extra, message):
    argv = FAST + extra + ["--character", str(make(first, tmp_path)), "--output_dir", str(tmp_path / "o")]
    assert story_cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--steps", "3"], "--continue takes its settings from the record; drop --steps"),
        ([], "does not exist: there is no run to continue"),
    ],
)
def test_bad_continue_is_one_line(tmp_path, capsys, argv, message):
    assert story_cli.main(["--continue", str(tmp_path / "none"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
