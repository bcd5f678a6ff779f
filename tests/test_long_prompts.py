"""Prompts past 77 tokens (``long_prompts``) against compel 2.3.1's CompelForSDXL on the tiny SDXL
(tests/fixtures/compel_io.npz, made by make_compel_fixtures.py)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURES, TINY_SDXL, rel_err

from mindone_story.pipelines import long_prompts
from mindone_story.pipelines.sdxl import SDXLPipeline
from mindone_story.pretrained import load_sdxl

CASES = ("batch", "brutal", "short")  # a batch of 3, 2 and 1 chunks; a cut inside a word; one chunk

TOL = 1e-4  # fp32 against torch fp32, as the encoders' parity


@pytest.fixture(scope="module")
def io():
    return dict(np.load(FIXTURES / "compel_io.npz"))


def texts(io, case) -> tuple[list[str], list[str]]:
    return [str(t) for t in io[f"{case}.prompts"]], [str(t) for t in io[f"{case}.negatives"]]


@pytest.fixture(scope="module")
def models():
    return load_sdxl(TINY_SDXL)


@pytest.mark.parametrize("case", CASES)
def test_chunks_are_compels(models, io, case):
    """Sentence, phrase, word and plain cuts, each chunk with its own start and end token and padded."""
    prompts, negatives = texts(io, case)
    for i, text in enumerate(prompts + negatives):
        chunks = long_prompts.chunks_of(models.tokenizer, text)
        np.testing.assert_array_equal(np.concatenate(chunks), io[f"{case}.tokens.{i}"])


@pytest.mark.parametrize("mode", ["pynative", "graph"])
@pytest.mark.parametrize("case", CASES)
def test_embeddings_match_compel(models, io, case, mode):
    """Chunks concatenated, the first chunk's end-token state copied, shorter prompts padded with the empty
    prompt's encoding, pooled from the 77-token truncation."""
    pipe = SDXLPipeline(models, mode=mode)
    prompts, negatives = texts(io, case)
    chunks = pipe.text_chunks(prompts + negatives)
    embeds = pipe.encode_prompts(prompts, negatives, chunks)
    n = len(prompts)
    context, pooled = embeds.context.asnumpy(), embeds.pooled.asnumpy()
    assert rel_err(context[n:], io[f"{case}.embeds"]) < TOL
    assert rel_err(context[:n], io[f"{case}.negative_embeds"]) < TOL
    assert rel_err(pooled[n:], io[f"{case}.pooled"]) < TOL
    assert rel_err(pooled[:n], io[f"{case}.negative_pooled"]) < TOL


def test_one_chunk_is_the_plain_encoding(models):
    """A prompt within CLIP's window gives the default (truncating) encoding exactly."""
    pipe = SDXLPipeline(models, mode="pynative")
    plain = pipe.encode_prompts(["a man with a black suit"], ["blurry"])
    one = pipe.encode_prompts(["a man with a black suit"], ["blurry"], chunks=1)
    np.testing.assert_array_equal(one.context.asnumpy(), plain.context.asnumpy())
    np.testing.assert_array_equal(one.pooled.asnumpy(), plain.pooled.asnumpy())


def test_too_few_chunks_is_refused(models, io):
    long = texts(io, "batch")[0][0]
    with pytest.raises(ValueError, match="needs 3 chunks of 75 tokens, not 2"):
        long_prompts.chunked_ids(models.tokenizer, [long], 2)


LONG = "walks through the old city at night, under heavy rain, past the closed shops. " * 2


def test_story_pads_every_batch_to_the_runs_chunks(tmp_path, monkeypatch):
    """Batched id panels of different lengths (consistent attention) and a read panel: every UNet call of
    the run gets the same text length (so a compiled run keeps one graph per batch size; PyNative here, for speed),
    the count is recorded, and nothing is reported dropped."""
    from mindone_story.pipelines.story_diffusion import StoryDiffusionPipeline, StoryDiffusionSettings
    from mindone_story.pretrained import tiny_model_dir
    from mindone_story.runs.story_diffusion import run_story
    from mindone_story.story.prompts import parse_story

    pipe = StoryDiffusionPipeline(load_sdxl(tiny_model_dir()), mode="pynative")
    story = parse_story("[Bob] a man", f"[Bob] wakes up\n[Bob] {LONG}\n[Bob] has breakfast", 2)
    settings = StoryDiffusionSettings(height=64, width=64, steps=1, long_prompts=True)
    shapes = []
    encode = pipe.sdxl.encode_prompts
    monkeypatch.setattr(pipe.sdxl, "encode_prompts", lambda *a: shapes.append(encode(*a).context.shape) or encode(*a))
    result = run_story(pipe, story, settings, tmp_path / "run")
    chunks = pipe.text_chunks(story, settings)  # the styled negative prompt is the longest text here
    assert chunks > 2 and result.record.story["text_chunks"] == chunks
    assert shapes == [(4, chunks * 77, 96), (2, chunks * 77, 96)]  # the id batch of 2, then the read panel
    assert result.record.settings["long_prompts"] is True
    assert all(p["dropped"] == {} for p in result.record.story["panels"])


def test_story_adapter_long_prompts_with_reference_tokens():
    """Story-Adapter's decoupled cross-attention takes the text and image tokens apart (no 77 in the split): a
    round with references runs on 3-chunk text, and a story within 77 tokens gives the default images exactly."""
    from mindone_story import StoryAdapterPipeline, StoryAdapterSettings
    from mindone_story.pretrained import TINY_IP_ADAPTER, load_ip_adapter_models, tiny_model_dir

    root = tiny_model_dir()
    models = load_sdxl(root)
    ip = load_ip_adapter_models(root / "ip_adapter" / TINY_IP_ADAPTER, root / "image_encoder", models.unet.config)
    pipe = StoryAdapterPipeline(models, ip, mode="pynative")
    small = dict(style="realistic", seed=3, rounds=1, steps=1, height=64, width=64)  # "a cat" styled: 1 chunk
    short = ("a cat", "a dog")
    plain = pipe(StoryAdapterSettings(short, **small))
    chunked = pipe(StoryAdapterSettings(short, long_prompts=True, **small))
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(plain[1], chunked[1]))
    settings = StoryAdapterSettings(("a cat", "a cat " + LONG), long_prompts=True, **small)
    assert pipe.embeds(settings.model_prompts[0], settings).context.shape == (2, 3 * 77, 96)
    cut = pipe(StoryAdapterSettings(("a cat", "a cat " + LONG), **small))
    full = pipe(settings)
    assert not np.array_equal(np.asarray(cut[1][1]), np.asarray(full[1][1]))


def test_txt2img_long_prompts_flag(tmp_path):
    """The shared flag reaches plain SDXL: the record says so, and words past 77 tokens change the image (cut
    without the flag, they do not)."""
    import json
    import subprocess

    root = Path(__file__).resolve().parents[1]
    script = root / "examples" / "story_diffusion" / "txt2img.py"
    base = [sys.executable, str(script), "--height", "64", "--width", "64", "--steps", "1", "--mode", "pynative"]
    env = {**os.environ, "PYTHONPATH": str(root)}
    images = {}
    for name, tail, flag in (("a", "red hat", []), ("b", "blue coat", []), ("c", "blue coat", ["--long_prompts"])):
        out = tmp_path / name
        argv = [*base, "--prompt", "a man with a black suit " * 8 + tail, *flag, "--output_dir", str(out)]
        done = subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert json.loads((out / "txt2img.json").read_text())["long_prompts"] is bool(flag)
        images[name] = (out / "image_00.png").read_bytes()
    # the tails are past 77 tokens: cut alike, or seen
    assert images["a"] == images["b"] != images["c"]
