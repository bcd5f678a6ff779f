"""Consistent self-attention against a faithful PyTorch re-implementation of StoryDiffusion's released processor
(tests/fixtures/make_story_fixtures.py, spec in tests/fixtures/STORY_FIXTURES.md), with the random draws injected.

Write phases fill our own id bank; read phases then read it. Tolerance: relative error max|ours - ref| / max|ref|.
"""

from __future__ import annotations

import json

import mindspore as ms
import numpy as np
import pytest
from conftest import FIXTURES, TINY_SDXL, rel_err
from mindspore import Tensor

from mindone_story.pretrained import load_component
from mindone_story.processors.consistent import install
from mindone_story.processors.id_bank import Draws, IdBank, Phase
from mindone_story.weights.safetensors_io import SafetensorsFile

TOL = 1e-4
# phase -> (characters written, characters each image reads)
PHASES = {
    "writeA": ("A", [[], [], []]),
    "writeB": ("B", [[], [], []]),
    "read0": (None, [["A"]]),
    "read1": (None, [["A"]]),
    "readAB": (None, [["A", "B"]]),
    "readbatch": (None, [["A"], ["A"]]),
}


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(FIXTURES / "story_consistent.npz"))


def _unet():
    folder = TINY_SDXL / "unet"
    config = json.loads((folder / "config.json").read_text())
    unet, _ = load_component("unet", config, SafetensorsFile(folder / "diffusion_pytorch_model.safetensors"), "fixture")
    return unet, install(unet)


def _phase(ref, name, processors, bank):
    write_as, reads = PHASES[name]
    n = len(reads)
    masks = [ref[f"{name}.mask32"][:, :n], ref[f"{name}.mask64"][:, :n]]
    draws = Draws(masks, ref[f"{name}.gate"])
    tokens = [int(ref["layer_tokens"][0]), int(ref["layer_tokens"][-1])]
    # every read phase gets room for both characters' banks, so all single-panel reads share one compiled graph
    bank_images = None if write_as else 6
    return Phase(processors, tokens, list(ref["sa"]), draws, bank, write_as, reads, bank_images)


def _run(ref, mode):
    unet, processors = _unet()
    step = ms.jit(unet.construct) if mode == "graph" else unet.construct
    bank, errors = IdBank(), {}
    for name in PHASES:
        phase = _phase(ref, name, processors, bank)
        args = [Tensor(ref[f"{name}.{k}"]) for k in ("encoder_hidden_states", "text_embeds", "time_ids")]
        for s in range(ref[f"{name}.timestep"].shape[0]):
            t = Tensor(ref[f"{name}.timestep"][s : s + 1].astype(np.float32))
            out = step(Tensor(ref[f"{name}.sample"][s]), t, *args, phase.inputs(s))
            phase.collect(s)
            errors[(name, s)] = rel_err(out.asnumpy(), ref[f"{name}.out"][s])
    return errors


@pytest.mark.parametrize("mode", ["pynative", "graph"])
def test_write_and_read_phases_match_the_original(ref, mode):
    errors = _run(ref, mode)
    bad = {k: v for k, v in errors.items() if not v < TOL}
    assert not bad, f"relative errors above {TOL}: {bad}"


def test_compiled_unet_follows_every_story_control(ref):
    """One compiled graph, many per-call values: gates, gather indices, validity masks and bank tokens each change
    the output, and each output equals PyNative's for the same values (nothing is frozen at compile time)."""
    from mindone_story.processors.consistent import StoryTensors

    unet, processors = _unet()
    rng = np.random.default_rng(0)
    n, tokens, layers = 2, [16, 64], len(processors)
    channels = [p.capture.shape[-1] for p in processors]
    bank_width, gather = [8, 32], [24, 96]
    # every image may gather the other image's tokens and 8/32 bank slots
    base = StoryTensors(
        gates=np.ones(layers, np.float32),
        banks=[
            rng.standard_normal((2, bank_width[p.level], c)).astype(np.float32) for p, c in zip(processors, channels)
        ],
        index=[
            np.stack(
                [
                    np.r_[np.arange(t, 2 * t)[: g - w], 2 * t + np.arange(w)],
                    np.r_[np.arange(0, t)[: g - w], 2 * t + np.arange(w)],
                ]
            )
            for t, g, w in zip(tokens, gather, bank_width)
        ],
        valid=[np.zeros((n, g), np.float32) for g in gather],
        capture=[np.arange(4) for _ in tokens],
    )
    from mindone_story.processors.consistent import set_capture_shapes

    set_capture_shapes(processors, [4, 4])
    args = [
        Tensor(ref["read0.sample"][1][:1].repeat(4, 0)),
        Tensor(np.array([961.0], np.float32)),
        Tensor(ref["writeA.encoder_hidden_states"][:4]),
        Tensor(ref["writeA.text_embeds"][:4]),
        Tensor(ref["writeA.time_ids"][:4]),
    ]
    step = ms.jit(unet.construct)

    def both(story):
        compiled = step(*args, story.as_tuple()).asnumpy()
        assert rel_err(compiled, unet.construct(*args, story.as_tuple()).asnumpy()) < TOL
        return compiled

    first = both(base)
    variants = {
        "gates": StoryTensors(np.zeros(layers, np.float32), base.banks, base.index, base.valid, base.capture),
        # (a permutation of the same positions would not change attention: keys form a set)
        "index": StoryTensors(base.gates, base.banks, [np.zeros_like(i) for i in base.index], base.valid, base.capture),
        "valid": StoryTensors(
            base.gates,
            base.banks,
            base.index,
            [np.where(rng.random(v.shape) < 0.5, -1e9, 0).astype(np.float32) for v in base.valid],
            base.capture,
        ),
        "banks": StoryTensors(base.gates, [b[:, ::-1] * 2.0 for b in base.banks], base.index, base.valid, base.capture),
    }
    for name, story in variants.items():
        assert rel_err(both(story), first) > 1e-3, f"changing {name} did not change the compiled output"
