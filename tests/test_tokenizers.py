"""CLIP's tokenizer, built from the shipped vocabulary, gives CLIP's token ids (so single files work offline)."""

from __future__ import annotations

from transformers import CLIPTokenizer

from mindone_story.tokenizers import VOCAB_SIZE, sdxl_tokenizer_root


def test_built_tokenizers_match_clip(tmp_path):
    root = sdxl_tokenizer_root(tmp_path)
    first, second = (CLIPTokenizer.from_pretrained(str(root / name)) for name in ("tokenizer", "tokenizer_2"))
    assert len(first) == VOCAB_SIZE
    # the ids of openai/clip-vit-large-patch14 for these words
    assert first("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    pad = {"padding": "max_length", "max_length": 8}
    assert first("a cat", **pad).input_ids == [49406, 320, 2368] + [49407] * 5
    assert second("a cat", **pad).input_ids == [49406, 320, 2368, 49407] + [0] * 4  # SDXL's tokenizer_2 pads with "!"
    assert sdxl_tokenizer_root(tmp_path) == root  # built once
