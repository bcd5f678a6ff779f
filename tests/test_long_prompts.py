"""Prompts past 77 tokens (``long_prompts``) against compel 2.3.1's CompelForSDXL on the tiny SDXL
(tests/fixtures/compel_io.npz, made by make_compel_fixtures.py)."""

from __future__ import annotations

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
