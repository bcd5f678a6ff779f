"""Prompts past CLIP's 77 tokens, encoded in chunks with compel's convention for SDXL.

compel (damian0815/compel 2.3-2.4, ``CompelForSDXL``, ``truncate_long_prompts=False``; its
``embeddings_provider.py``), which this follows token for token:
- the prompt's tokens (no start or end token) are cut into chunks of at most 75 (77 minus the two markers), each cut
  just after the last full stop among the next 75 tokens; failing that after the last ',' '.' ';' ':'; failing
  that after the last whole word; failing that at 75 tokens;
- each chunk becomes ``[BOS] chunk [EOS] pad...`` (77 ids, the tokenizer's own padding id), goes through the
  encoder on its own, and the chunks' hidden states are concatenated along the sequence;
- the end tokens' states are left as they are: ``Compel`` and ``CompelForSDXL`` default to
  ``SplitLongTextMode.SENTENCES`` alone (the ``COPY_FIRST_CLS_TOKEN`` default is ``EmbeddingsProvider``'s, which
  ``Compel`` overrides);
- prompts of a batch with fewer chunks are padded with the empty prompt's encoding (``[BOS][EOS] pad...``);
- the pooled embedding is the bigG encoder's on the plain 77-token truncation, as diffusers gives it.

Here the chunk count is chosen by the caller (a run pads every prompt to its longest prompt's count), so every
batch of a run has the same sequence length and each compiled graph keeps one shape.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

SENTENCE = (".</w>",)
PHRASE = (".</w>", ",</w>", ";</w>", ":</w>")


def _cut(tokens: Sequence[str], size: int) -> int:
    """How many of ``tokens`` the next chunk takes (compel's ``_find_next_best_split_point``, mode SENTENCES)."""
    if len(tokens) <= size:
        return size
    head = tokens[:size]
    for fits in (lambda t: t in SENTENCE, lambda t: t in PHRASE, lambda t: t.endswith("</w>")):
        for i in range(len(head) - 1, -1, -1):
            if fits(head[i]):
                return i + 1
    return size


def chunks_of(tokenizer, prompt: str) -> list[list[int]]:
    """The prompt as chunks of 77 ids, each ``[BOS] part [EOS] pad...``."""
    width = tokenizer.model_max_length
    ids = tokenizer(prompt, truncation=False, verbose=False).input_ids
    ids = ids[1:] if ids and ids[0] == tokenizer.bos_token_id else ids
    ids = ids[:-1] if ids and ids[-1] == tokenizer.eos_token_id else ids
    out = []
    while True:
        take = _cut(tokenizer.convert_ids_to_tokens(ids), width - 2)
        part = [tokenizer.bos_token_id, *ids[:take], tokenizer.eos_token_id]
        out.append(part + [tokenizer.pad_token_id] * (width - len(part)))
        ids = ids[take:]
        if not ids:
            return out


def chunk_count(tokenizer, prompts: Sequence[str]) -> int:
    """The most chunks any of ``prompts`` needs (1 for prompts within CLIP's window)."""
    return max([len(chunks_of(tokenizer, p)) for p in prompts] + [1])


def chunked_ids(tokenizer, prompts: Sequence[str], chunks: int) -> np.ndarray:
    """Token ids [N * chunks, 77]: each prompt's chunks, then empty-prompt chunks up to ``chunks``."""
    empty = chunks_of(tokenizer, "")[0]
    ids = []
    for n, prompt in enumerate(prompts):
        own = chunks_of(tokenizer, prompt)
        if len(own) > chunks:
            raise ValueError(
                f"prompt {n} needs {len(own)} chunks of {tokenizer.model_max_length - 2} tokens, not {chunks}"
            )
        ids += own + [empty] * (chunks - len(own))
    return np.asarray(ids, np.int32)
