"""The id bank's size and storage: its predicted size is what it holds, storing it in the compute dtype's width
loses nothing, and it goes to disk exactly when it cannot fit in memory."""

from __future__ import annotations

from collections import namedtuple

import mindspore as ms
import numpy as np
import pytest

from mindone_story import checks
from mindone_story.errors import StoryError
from mindone_story.processors import id_bank
from mindone_story.processors.id_bank import IdBank, _bf16_float, _bf16_high

STORY = "[Bob] a\n[Bob] b\n[Bob] c\n[NC] d"


@pytest.fixture(scope="module")
def pipe():
    """fp16 on CPU: the half-width storage is what is tested; fp32 storage runs in every other story test."""
    from mindone_story.pipelines.story_diffusion import StoryDiffusionPipeline
    from mindone_story.pretrained import load_sdxl, tiny_model_dir

    return StoryDiffusionPipeline(load_sdxl(tiny_model_dir(), ms.float16), mode="graph")


def _run(pipe, **settings):
    from mindone_story.pipelines.story_diffusion import StoryDiffusionSettings
    from mindone_story.story.prompts import story_from_text

    story = story_from_text("[Bob] a man", STORY, 2)
    settings = StoryDiffusionSettings(height=64, width=64, steps=3, freeu=None, **settings)
    held = {}
    images = pipe(story, settings, on_panel=lambda i, image: held.setdefault(i, pipe.bank.nbytes()), bank="memory")
    return pipe.bank_size(story, settings), held, {i: np.asarray(im) for i, im in images.items()}


def test_bank_size_is_what_the_bank_holds(pipe):
    """With sa32 = sa64 = 1 every token is sampled, so the expected size is exact: 2 CFG halves x tokens x channels
    x layers x id images x steps after the first, in the compute dtype's width (2 bytes here); the call releases
    the bank."""
    size, held, _ = _run(pipe, sa32=1.0, sa64=1.0)
    assert held[1] == size > 0 and pipe.bank.nbytes() == 0  # after the id panels: the whole bank
    tokens, channels = pipe.level_tokens(64, 64), [p.capture.shape[-1] for p in pipe.processors]
    levels = [p.level for p in pipe.processors]
    assert size == 2 * sum(tokens[lv] * c for lv, c in zip(levels, channels)) * 2 * (3 - 1) * 2


def test_half_width_storage_is_lossless(pipe, monkeypatch):
    """The UNet casts bank tokens to the compute dtype, so keeping them in fp16 gives the very images that keeping
    them in fp32 gives."""
    _, _, half = _run(pipe)
    monkeypatch.setitem(id_bank._STORAGE, "Float16", id_bank._STORAGE["Float32"])
    _, held, full = _run(pipe)
    assert held[1] > 0 and all(np.array_equal(half[i], full[i]) for i in full)


def test_bf16_storage_rounds_as_the_cast():
    """bf16 is kept as the high 16 bits of fp32, rounded to nearest, ties to even, as a cast to bf16 rounds."""
    cases = {
        1 + 2**-8: 1.0,  # a tie: to the even neighbour
        1 + 3 * 2**-8: 1 + 2**-6,  # a tie: to the even neighbour, upwards
        1 + 2**-8 + 2**-20: 1 + 2**-7,  # past the tie
        -(1 + 2**-9): -1.0,
        3.0: 3.0,
    }
    for x, rounded in cases.items():
        assert _bf16_float(_bf16_high(np.array([x], np.float32)))[0] == np.float32(rounded), x
    exact = (np.random.default_rng(0).standard_normal(1000).astype(np.float32).view(np.uint32) & 0xFFFF0000).view(
        np.float32
    )
    assert np.array_equal(_bf16_float(_bf16_high(exact)), exact) and _bf16_high(exact).nbytes == exact.nbytes // 2
    bank = IdBank(ms.bfloat16)
    bank.add("Bob", 1, 0, [exact.reshape(2, 1, -1)[:, :, :250], exact.reshape(2, 1, -1)[:, :, 250:]])
    assert bank.nbytes() == 2000 and np.array_equal(
        np.concatenate(bank.images("Bob", 1, 0), 2), exact.reshape(2, 1, -1)
    )
    assert bank.images("Bob", 0, 0) == []  # step 0 is never read, so never banked


def test_bank_goes_to_disk_exactly_when_memory_is_short(monkeypatch, tmp_path):
    gb = 1 << 30
    monkeypatch.delenv("MINDONE_STORY_SKIP_MEMORY_CHECK", raising=False)
    monkeypatch.setattr(checks, "available_memory", lambda: 20 * gb)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(checks.shutil, "disk_usage", lambda path: usage(100 * gb, 70 * gb, 30 * gb))
    assert checks.bank_place(11 * gb, gb, "auto", tmp_path / "bank") == "memory"
    assert checks.bank_place(25 * gb, gb, "auto", tmp_path / "bank") == "disk"
    assert checks.bank_place(11 * gb, gb, "disk", tmp_path / "a" / "b") == "disk"  # checked where it will be made
    with pytest.raises(StoryError, match=r"^the id bank needs 25\.0 GB and this machine has 20\.0 GB available"):
        checks.bank_place(25 * gb, gb, "memory")
    with pytest.raises(
        StoryError, match=rf"needs 40\.0 GB, more than the 20\.0 GB of memory .* {tmp_path} has 30\.0 GB"
    ):
        checks.bank_place(40 * gb, gb, "auto", tmp_path / "bank")
    with pytest.raises(StoryError, match="unknown id bank place 'ram'"):
        checks.bank_place(gb, gb, "ram")
    monkeypatch.setenv("MINDONE_STORY_SKIP_MEMORY_CHECK", "1")
    assert checks.bank_place(25 * gb, gb, "auto") == "memory"


def test_bank_on_disk_reads_back_every_add(tmp_path):
    """Windows add to the same (character, step, layer) again and again: every add is its own memory-mapped file,
    read back in order, and the folder is removed on close (and cleared when a bank is made there again)."""
    rng = np.random.default_rng(1)
    added = [rng.standard_normal((2, n, 8)).astype(np.float32) for n in (3, 1, 4, 2)]
    (tmp_path / "bank").mkdir()
    (tmp_path / "bank" / "stale.npy").write_bytes(b"left by a killed run")
    bank = IdBank(ms.float32, tmp_path / "bank")
    assert not (tmp_path / "bank" / "stale.npy").exists()
    for window in range(3):
        bank.add("Bob", 1, 0, added[window : window + 2])
    expected = added[0:2] + added[1:3] + added[2:4]
    got = bank.images("Bob", 1, 0)
    assert len(got) == 6 and all(np.array_equal(a, b) for a, b in zip(got, expected))
    assert isinstance(bank._chunks[("Bob", 1, 0)][0][0], np.memmap) and len(list((tmp_path / "bank").iterdir())) == 3
    assert bank.nbytes() == sum(a.nbytes for a in expected)
    bank.close()
    assert not (tmp_path / "bank").exists()
