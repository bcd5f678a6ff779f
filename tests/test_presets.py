"""run.py --preset: mindone's defaults (the default) or the released app's, each overridable by its flag."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "story_diffusion"))
import run as story_cli  # noqa: E402

from mindone_story.pipelines.story_diffusion import APP_NEGATIVE, DEFAULT_NEGATIVE  # noqa: E402


@pytest.mark.parametrize(
    "extra, want",
    [
        ([], (50, 3407, DEFAULT_NEGATIVE, "Four Pannel")),
        (["--preset", "app"], (35, 0, APP_NEGATIVE, "Classic Comic Style")),
        (["--preset", "app", "--seed", "5", "--typesetting", "Four Pannel"], (35, 5, APP_NEGATIVE, "Four Pannel")),
    ],
)
def test_preset_gives_the_defaults(monkeypatch, tmp_path, extra, want):
    seen = {}

    def fake_run_story(pipe, story, settings, out, layout, **kwargs):
        seen.update(settings=settings, layout=layout)
        raise SystemExit(0)  # nothing is generated

    monkeypatch.setattr(story_cli, "TINY", {"height": 64, "width": 64})  # keep the preset's steps on the tiny model
    monkeypatch.setattr(story_cli, "run_story", fake_run_story)
    argv = ["--sd_model_name", "tiny", "--id_length", "1", "--output_dir", str(tmp_path / "o"), *extra]
    with pytest.raises(SystemExit):
        story_cli.main(argv)
    s = seen["settings"]
    assert (s.steps, s.seed, s.negative_prompt, seen["layout"].typesetting) == want
