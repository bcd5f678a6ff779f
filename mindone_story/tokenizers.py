"""CLIP's BPE tokenizers for SDXL, built from the vocabulary the project ships, so single-file checkpoints (which carry
no tokenizer) work offline.

``assets/clip/bpe_simple_vocab_16e6.txt.gz`` is OpenAI CLIP's merge list as distributed in open_clip_torch (MIT,
license beside it). The vocabulary is derived from it as CLIP does: the 256 byte symbols, the same with ``</w>``,
one token per merge (the first 48,894), then ``<|startoftext|>`` and ``<|endoftext|>``: 49,408 tokens. SDXL's two
tokenizers share it; the second pads with ``!`` instead of ``<|endoftext|>``.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
from pathlib import Path

VOCAB_GZ = Path(__file__).resolve().parent / "assets" / "clip" / "bpe_simple_vocab_16e6.txt.gz"
VOCAB_SIZE = 49408
_MERGES = VOCAB_SIZE - 2 * 256 - 2


def bytes_to_unicode() -> list[str]:
    """CLIP's reversible map of the 256 byte values to printable characters, in CLIP's order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def clip_vocabulary() -> tuple[dict[str, int], list[str]]:
    """(token -> id, merge lines) of CLIP's tokenizer."""
    lines = gzip.open(VOCAB_GZ).read().decode("utf-8").split("\n")
    merges = lines[1 : 1 + _MERGES]
    symbols = bytes_to_unicode()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_tokenizer(folder: Path, vocab: dict[str, int], merges: list[str], pad_token: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": pad_token,
    }
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "do_lower_case": True,
        "errors": "replace",
        "clean_up_tokenization_spaces": True,
        **special,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")


def sdxl_tokenizer_root(cache_dir: str | os.PathLike) -> Path:
    """A folder with ``tokenizer/`` and ``tokenizer_2/`` as SDXL's diffusers folders have them, written once."""
    root = Path(cache_dir) / "clip-tokenizers-v1"
    if (root / "tokenizer_2" / "special_tokens_map.json").exists():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".clip-", dir=root.parent))
    try:
        vocab, merges = clip_vocabulary()
        write_tokenizer(staging / "tokenizer", vocab, merges, "<|endoftext|>")
        write_tokenizer(staging / "tokenizer_2", vocab, merges, "!")
        try:
            os.replace(staging, root)
        except OSError:  # another process finished first
            if not (root / "tokenizer_2" / "special_tokens_map.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root
