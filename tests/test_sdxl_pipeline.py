"""The SDXL pipeline against diffusers' StableDiffusionXLPipeline (3 steps, the same initial noise), and the
built-in tiny model."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TINY_SDXL, rel_err

from mindone_story.pipelines.sdxl import SDXLPipeline
from mindone_story.pretrained import load_sdxl, tiny_model_dir


@pytest.fixture(scope="module")
def models():
    return load_sdxl(TINY_SDXL)


@pytest.mark.parametrize("mode", ["pynative", "graph"])
def test_pipeline_matches_diffusers(models, io, mode):
    pipe = SDXLPipeline(models, mode=mode)
    embeds = pipe.encode_prompts(["a man with a black suit"], ["blurry"])
    context = embeds.context.asnumpy()
    assert rel_err(context[0], io["pipe.negative_prompt_embeds"][0]) < 1e-4
    assert rel_err(context[1], io["pipe.prompt_embeds"][0]) < 1e-4
    assert rel_err(embeds.pooled.asnumpy()[1], io["pipe.pooled_prompt_embeds"][0]) < 1e-4
    for scheduler, key in (("euler", "pipe"), ("ddim", "pipe_ddim")):
        latents = pipe.denoise(io["pipe.latents"], embeds, 3, 5.0, scheduler)
        assert rel_err(pipe.decode_array(latents), io[f"{key}.image"]) < 1e-3, scheduler


def test_no_negative_prompt_gives_zero_unconditional_embeddings(models):
    """SDXL's force_zeros_for_empty_prompt: without a negative prompt the unconditional half is zeros."""
    embeds = SDXLPipeline(models, mode="pynative").encode_prompts(["a cat"], None)
    assert np.all(embeds.context.asnumpy()[0] == 0) and np.all(embeds.pooled.asnumpy()[0] == 0)
    assert np.abs(embeds.context.asnumpy()[1]).max() > 0


def test_size_must_be_a_multiple_of_32(models):
    with pytest.raises(ValueError, match="height must be a multiple of 32, got 100"):
        SDXLPipeline(models, mode="pynative").initial_noise(0, 1, 100, 128)


def test_tiny_model_is_built_once_and_deterministic(tmp_path):
    first = tiny_model_dir(tmp_path / "a")
    again = tiny_model_dir(tmp_path / "a")
    other = tiny_model_dir(tmp_path / "b")
    assert first == again
    for name in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        assert (first / name).read_bytes() == (other / name).read_bytes()
    images = SDXLPipeline(load_sdxl(first), mode="pynative")(["a man"], None, 64, 64, steps=2, seed=3)
    assert images[0].size == (64, 64)
    assert np.asarray(images[0]).std() > 1.0  # not a blank image


def test_dropped_text_is_what_clip_cuts_off(models):
    """The reported text starts at the first word that does not fit whole in the 77-token window."""
    pipe = SDXLPipeline(models, mode="pynative")
    tokenizer = models.tokenizer
    words = "a man with a black suit walks through the old city under heavy rain at night".split()
    prompt = " ".join(words * 8)
    short, long = pipe.dropped_text(["a man with a black suit", prompt])
    assert short == ""
    assert long and prompt.endswith(" " + long)
    kept = prompt[: -len(long) - 1]
    first = long.split()[0]
    assert len(tokenizer(kept).input_ids) <= 77 < len(tokenizer(f"{kept} {first}").input_ids)
