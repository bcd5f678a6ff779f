"""FreeU against diffusers (tests/fixtures/make_freeu_fixtures.py): the FFT-free skip filter against fourier_filter
on every size from 1x1 to 9x9 and at 24x24, and the UNet step against enable_freeu at a power-of-two latent and at
one whose FreeU blocks see odd and non-power-of-two sizes, in both modes; the factors are tensor inputs of the
compiled graph. Tolerance: relative error max|ours - ref| / max|ref|."""

from __future__ import annotations

import json

import mindspore as ms
import numpy as np
import pytest
from conftest import FIXTURES, TINY_SDXL, rel_err
from mindspore import Tensor

from mindone_story.models.freeu import APP_FREEU, freeu_factors, freeu_tensor, skip_filter
from mindone_story.pipelines.sdxl import SDXLPipeline
from mindone_story.pretrained import load_component, load_sdxl
from mindone_story.weights.safetensors_io import SafetensorsFile

TOL = 1e-5
MODES = ["pynative", "graph"]
ARGS = ("sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids")
OTHER = (0.9, 0.2, 1.3, 1.05)  # the fixture's second set of factors


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(FIXTURES / "freeu_io.npz"))


@pytest.fixture(scope="module")
def unet():
    folder = TINY_SDXL / "unet"
    weights = next(folder.glob("*.safetensors"))
    model, _ = load_component("unet", json.loads((folder / "config.json").read_text()), SafetensorsFile(weights), "")
    return model


def test_skip_filter_matches_fourier_filter_at_every_size(ref):
    sizes = [key.split(".")[1] for key in ref if key.startswith("filter.") and key.endswith(".in")]
    assert len(sizes) == 82
    for size in sizes:
        out = skip_filter(Tensor(ref[f"filter.{size}.in"]), Tensor(0.4, ms.float32)).asnumpy()
        assert rel_err(out, ref[f"filter.{size}.out"]) < TOL, size


def test_skip_filter_keeps_the_dtype_and_filters_in_fp32(ref):
    x = ref["filter.24x24.in"]
    out = skip_filter(Tensor(x, ms.float16), Tensor(0.4, ms.float32))
    assert out.dtype == ms.float16
    expected = skip_filter(Tensor(x.astype(np.float16).astype(np.float32)), Tensor(0.4, ms.float32)).asnumpy()
    assert np.array_equal(out.asnumpy(), expected.astype(np.float16))


@pytest.mark.parametrize("mode", MODES)
def test_unet_step_matches_enable_freeu(unet, io, ref, mode):
    step = ms.jit(unet.construct) if mode == "graph" else unet.construct
    pow2 = [Tensor(io[f"unet.{k}"]) for k in ARGS]
    odd = [Tensor(ref[f"odd.{k}"]) for k in ARGS]
    assert rel_err(step(*pow2, None, freeu_tensor(APP_FREEU)).asnumpy(), ref["pow2.out"]) < TOL
    assert rel_err(step(*odd, None, freeu_tensor(APP_FREEU)).asnumpy(), ref["odd.out"]) < TOL
    if mode == "graph":  # the same compiled graph, other factors: they are inputs, not frozen constants
        assert rel_err(step(*pow2, None, freeu_tensor(OTHER)).asnumpy(), ref["pow2.out_b"]) < TOL
        assert rel_err(step(*pow2, None, freeu_tensor(APP_FREEU)).asnumpy(), ref["pow2.out"]) < TOL


def test_pipeline_with_freeu_matches_diffusers(io, ref):
    """SDXLPipeline.denoise(freeu=...) against StableDiffusionXLPipeline after unet.enable_freeu (DDIM, 3 steps)."""
    pipe = SDXLPipeline(load_sdxl(TINY_SDXL), mode="pynative")
    embeds = pipe.encode_prompts(["a man with a black suit"], ["blurry"])
    latents = pipe.denoise(io["pipe.latents"], embeds, 3, 5.0, "ddim", freeu=APP_FREEU)
    assert rel_err(pipe.decode_array(latents), ref["pipe.image"]) < 1e-4


@pytest.mark.parametrize(
    "value,expected",
    [
        (None, None),
        ("off", None),
        (" OFF ", None),
        ("0.6,0.4,1.1,1.2", (0.6, 0.4, 1.1, 1.2)),
        ([1, 2, 3, 4], (1.0, 2.0, 3.0, 4.0)),
        ((0.5, "0.5", 1, 1.5), (0.5, 0.5, 1.0, 1.5)),
    ],
)
def test_freeu_factors(value, expected):
    assert freeu_factors(value) == expected


@pytest.mark.parametrize(
    "value,message",
    [
        ("on", "FreeU takes 'off' or four numbers s1,s2,b1,b2, got 'on'"),
        ("0.6,0.4,1.1", "four numbers"),
        ("0.6,0.4,1.1,x", "four numbers"),
        ((0.6, 0.4, 1.1, True), "four numbers"),
        (1.0, "four numbers"),
        ("0.6,0,1.1,1.2", "finite and nonzero"),
        ("0.6,nan,1.1,1.2", "finite and nonzero"),
    ],
)
def test_bad_freeu_factors_are_one_line_errors(value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        freeu_factors(value)
    assert "\n" not in str(err.value)
