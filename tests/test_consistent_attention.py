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
from mindone_story.story.consistent import install
from mindone_story.story.id_bank import Draws, IdBank, Phase
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
