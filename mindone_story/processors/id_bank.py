"""The host side of consistent self-attention: random draws, the id bank, and the per-step story tensors.

A *phase* is one sampler run over a batch of images: a write phase generates id images of one character (all of
them, or a window of them), a read phase generates later panels. Before a phase every random draw is made on the
host (token masks per step and image, one gate number per step and layer), so tensor shapes are known up front and
the compiled UNet is built once per phase. After each UNet call, :meth:`Phase.collect` moves the captured sampled
hidden states into the bank.

Memory: the bank holds, per character, step and layer, the sampled tokens of that character's id images only, so
it is bounded by id_length, never by the story's length. Read panels can run in batches of any size. Its size is
``bank_bytes``; where it does not fit in memory beside the model it lives in memory-mapped files (``IdBank``).
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .consistent import ConsistentSelfAttention, StoryTensors, gates_from_draws, padded, set_capture_shapes


@dataclass
class Draws:
    """All random draws of a phase: ``masks[level]`` bool [steps, n, tokens], ``gates`` float [steps, layers]."""

    masks: list[np.ndarray]
    gates: np.ndarray

    @classmethod
    def sample(
        cls, rng: np.random.Generator, steps: int, n: int, tokens: Sequence[int], rates: Sequence[float], layers: int
    ) -> Draws:
        masks = [rng.random((steps, n, t)) < rate for t, rate in zip(tokens, rates)]
        return cls(masks, rng.random((steps, layers)))


class IdBank:
    """``images(character, step, layer)``: that character's id images' sampled tokens, a list of [2, count, C].

    Stored as exactly what the UNet reads: the processor casts bank tokens to the compute dtype, so they are kept
    in that dtype's width (fp16 as float16, bf16 as the high halves of fp32, fp32 as is), which is lossless.
    Step 0 is never banked: every layer runs plain self-attention there, in every phase. With ``folder`` the
    arrays are written there as ``.npy`` files and read back memory-mapped, so the page cache, not the process,
    holds them; ``close`` deletes the folder."""

    def __init__(self, dtype=None, folder: str | Path | None = None):
        self.encode, self.decode = _STORAGE[str(dtype or "Float32")]
        self.folder = None if folder is None else Path(folder)
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)  # a killed run's leftovers are never read
            self.folder.mkdir(parents=True)
        self._chunks: dict[tuple[str, int, int], list[tuple[np.ndarray, list[int]]]] = {}
        self._known: dict[str, int] = {}  # character -> banked images
        self._files = 0

    def images(self, character: str, step: int, layer: int) -> list[np.ndarray]:
        if character not in self._known:
            raise KeyError(f"no id bank for character {character!r}; generate its id panels first")
        out = []
        for stored, counts in self._chunks.get((character, step, layer), []):
            out += np.split(self.decode(stored), np.cumsum(counts)[:-1], axis=1)
        return out

    def image_count(self, character: str) -> int:
        return self._known.get(character, 0)

    def add(self, character: str, step: int, layer: int, images: list[np.ndarray]) -> None:
        self._known.setdefault(character, 0)
        if step < 1 or not images:
            return
        stored = self.encode(np.concatenate(images, axis=1))
        if self.folder is not None:
            self._files += 1  # a new file per add: a memory-mapped file is never rewritten
            path = self.folder / f"{self._files}.npy"
            np.save(path, stored)
            stored = np.load(path, mmap_mode="r")
        self._chunks.setdefault((character, step, layer), []).append((stored, [a.shape[1] for a in images]))

    def count_images(self, character: str, added: int) -> None:
        """Record that ``added`` more id images of ``character`` are banked (once per write phase)."""
        self._known[character] = self._known.get(character, 0) + added

    def nbytes(self) -> int:
        return sum(a.nbytes for chunks in self._chunks.values() for a, _ in chunks)

    def close(self) -> None:
        self._chunks.clear()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


def _bf16_high(a: np.ndarray) -> np.ndarray:
    """fp32 -> the bf16 it casts to (round to nearest even), kept as its 16 high bits."""
    u = np.ascontiguousarray(a, np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def _bf16_float(h: np.ndarray) -> np.ndarray:
    return (np.asarray(h).astype(np.uint32) << 16).view(np.float32)


_STORAGE = {  # str(mindspore dtype) -> (encode, decode)
    "Float32": (lambda a: np.asarray(a, np.float32), np.asarray),
    "Float16": (lambda a: np.asarray(a).astype(np.float16), np.asarray),
    "BFloat16": (_bf16_high, _bf16_float),
}


def bank_bytes(
    processors: Sequence[ConsistentSelfAttention],
    tokens: Sequence[int],
    rates: Sequence[float],
    images: int,
    steps: int,
    dtype=None,
) -> int:
    """The expected size of a bank of ``images`` id images over ``steps`` steps (tokens are Bernoulli(rate))."""
    itemsize = 4 if str(dtype or "Float32") == "Float32" else 2
    per_image_step = sum(2 * rates[p.level] * tokens[p.level] * p.capture.shape[-1] for p in processors)
    return int(images * max(steps - 1, 0) * per_image_step * itemsize)


def sample_width(tokens: int, rate: float, sigmas: float = 6.0) -> int:
    """A fixed upper bound on one image's Bernoulli(rate) token count: mean + 6 sigma, at most ``tokens``. Fixed
    widths keep tensor shapes equal across phases and characters, so the UNet compiles once per batch size."""
    mean, sd = tokens * rate, (tokens * rate * (1.0 - rate)) ** 0.5
    return max(1, min(tokens, int(np.ceil(mean + sigmas * sd))))


class Phase:
    """The story inputs of one sampler run; call ``inputs(step)`` before and ``collect(step)`` after each UNet call."""

    def __init__(
        self,
        processors: list[ConsistentSelfAttention],
        tokens: Sequence[int],
        rates: Sequence[float],
        draws: Draws,
        bank: IdBank,
        write_as: str | None,
        reads: Sequence[Sequence[str]],
        bank_images: int | None = None,
        recent: int | None = None,
    ):
        """``write_as``: the character whose id images this batch is (write mode: each image also attends to the
        others' sampled tokens, and the sampled tokens go to the bank), or None (read mode). ``reads[i]``: the
        characters whose banked tokens image ``i`` attends to. ``bank_images``: how many banked images the pool
        holds at most (default: exactly what this phase reads), so that all read batches of a story share shapes.
        ``recent``: read only each character's ``recent`` most recently banked images (the sliding window)."""
        self.processors, self.tokens, self.draws, self.bank = processors, list(tokens), draws, bank
        self.recent = recent
        self.n, self.write_as = len(reads), write_as
        self.reads = [list(chars) for chars in reads]
        self.chars = sorted({c for chars in self.reads for c in chars})
        self.counts = [m.sum(-1) for m in draws.masks]  # [steps, n] per level
        self.sample_width = [sample_width(t, r) for t, r in zip(tokens, rates)]
        images = bank_images if bank_images is not None else self._banked_images()
        self.bank_width = [max(1, images * w) for w in self.sample_width]
        peers = (self.n - 1) * np.array(self.sample_width) if write_as else np.zeros(len(tokens), int)
        self.gather_width = [max(1, int(p) + b) for p, b in zip(peers, self.bank_width)]
        for level, counts in enumerate(self.counts):
            if counts.size and counts.max() > self.sample_width[level]:
                raise ValueError(f"a token draw of {counts.max()} exceeds the fixed width {self.sample_width[level]}")
        self.use_captures()

    def use_captures(self) -> None:
        """Size the processors' capture Parameters for this phase (done when it is made; again after another phase
        on the same processors, whose shapes differ)."""
        counts = [self.n * w for w in self.sample_width] if self.write_as else [1] * len(self.tokens)
        set_capture_shapes(self.processors, counts)

    def _banked(self, char: str, step: int, layer: int) -> list[np.ndarray]:
        images = self.bank.images(char, step, layer)
        return images[-self.recent :] if self.recent else images

    def _banked_images(self) -> int:
        counts = [self.bank.image_count(c) for c in self.chars]
        return sum(min(n, self.recent) if self.recent else n for n in counts)

    def _bank_segments(self, chars: Sequence[str], step: int, layer: int) -> list[int]:
        return [a.shape[1] for c in chars for a in self._banked(c, step, layer)]

    def _first_layer(self, level: int) -> int:
        return next(p.layer for p in self.processors if p.level == level)

    # -- per step -----------------------------------------------------------------------------------------------
    def _rows(self, level: int, step: int) -> list[np.ndarray]:
        """Pool positions each image gathers: other images' sampled tokens (write), then its banks' tokens."""
        n, tokens = self.n, self.tokens[level]
        mask = self.draws.masks[level][step]
        layer = self._first_layer(level)
        offsets, start = {}, n * tokens
        for c in self.chars:
            sizes = self._bank_segments([c], step, layer)
            offsets[c] = np.arange(start, start + sum(sizes))
            start += sum(sizes)
        rows = []
        for i in range(n):
            parts = [j * tokens + np.flatnonzero(mask[j]) for j in range(n) if j != i] if self.write_as else []
            parts += [offsets[c] for c in self.reads[i]]
            rows.append(np.concatenate(parts) if parts else np.zeros(0, np.int64))
        return rows

    def inputs(self, step: int) -> tuple:
        levels = range(len(self.tokens))
        index, valid = zip(*(padded(self._rows(lv, step), self.gather_width[lv]) for lv in levels))
        capture = []
        for lv in levels:
            if self.write_as is None:
                capture.append(np.zeros(1, np.int64))
                continue
            rows = [i * self.tokens[lv] + np.flatnonzero(self.draws.masks[lv][step][i]) for i in range(self.n)]
            capture.append(padded(rows, self.sample_width[lv])[0].reshape(-1))
        banks = []
        for proc in self.processors:
            bank = np.zeros((2, self.bank_width[proc.level], proc.capture.shape[-1]), np.float32)
            parts = [a for c in self.chars for a in self._banked(c, step, proc.layer)]
            if parts:
                joined = np.concatenate(parts, 1)
                if joined.shape[1] > bank.shape[1]:
                    raise ValueError(f"{joined.shape[1]} banked tokens exceed the pool width {bank.shape[1]}")
                bank[:, : joined.shape[1]] = joined
            banks.append(bank)
        gates = gates_from_draws(step, self.draws.gates[step])
        return StoryTensors(gates, banks, list(index), list(valid), capture).as_tuple()

    def collect(self, step: int) -> None:
        """Move this step's captured sampled hidden states into the bank (write phases only)."""
        if self.write_as is None:
            return
        if step == 0:  # plain attention everywhere at step 0: nothing to bank
            self.bank.count_images(self.write_as, self.n)
            return
        for proc in self.processors:
            captured = proc.capture.asnumpy()
            width = self.sample_width[proc.level]
            counts = self.counts[proc.level][step]
            images = [captured[:, i * width : i * width + counts[i]].copy() for i in range(self.n)]
            self.bank.add(self.write_as, step, proc.layer, images)
