"""Each model against its PyTorch original (diffusers / transformers) on the same fp16-stored weights and inputs.

The references come from tests/fixtures/make_fixtures.py. Tolerance: relative error max|ours - ref| / max|ref|.
"""

from __future__ import annotations

import json

import mindspore as ms
import numpy as np
import pytest
from conftest import TINY_SDXL, rel_err
from mindspore import Tensor

from mindone_story.pretrained import load_component
from mindone_story.weights.safetensors_io import SafetensorsFile

TOL = 1e-4
MODES = ["pynative", "graph"]


def _load(name: str):
    folder = TINY_SDXL / name
    config = json.loads((folder / "config.json").read_text())
    weights = next(folder.glob("*.safetensors"))
    model, _ = load_component(name, config, SafetensorsFile(weights), str(weights))
    return model


def _run(fn, mode: str):
    return ms.jit(fn) if mode == "graph" else fn


@pytest.fixture(scope="module")
def unet():
    return _load("unet")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", ["unet", "unet2"])
def test_unet(unet, io, mode, case):
    args = [
        Tensor(io[f"{case}.{k}"]) for k in ("sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids")
    ]
    out = _run(unet.construct, mode)(*args).asnumpy()
    assert rel_err(out, io[f"{case}.out"]) < TOL


@pytest.mark.parametrize("mode", MODES)
def test_vae(io, mode):
    vae = _load("vae")
    mean, logvar = _run(vae.encode, mode)(Tensor(io["vae.image"]))
    assert rel_err(mean.asnumpy(), io["vae.posterior_mean"]) < TOL
    assert rel_err(logvar.asnumpy(), io["vae.posterior_logvar"]) < TOL
    decoded = _run(vae.decode, mode)(Tensor(io["vae.latent"])).asnumpy()
    assert rel_err(decoded, io["vae.decoded"]) < TOL


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "name,prefix,pooled", [("text_encoder", "te", "pooler_output"), ("text_encoder_2", "te2", "text_embeds")]
)
def test_text_encoders(io, mode, name, prefix, pooled):
    model = _load(name)
    last, penultimate, pool = _run(model.construct, mode)(Tensor(io[f"{prefix}.input_ids"].astype(np.int32)))
    assert rel_err(last.asnumpy(), io[f"{prefix}.last_hidden_state"]) < TOL
    assert rel_err(penultimate.asnumpy(), io[f"{prefix}.penultimate"]) < TOL
    assert rel_err(pool.asnumpy(), io[f"{prefix}.{pooled}"]) < TOL


@pytest.mark.parametrize("mode", MODES)
def test_image_encoder(io, mode):
    model = _load("image_encoder")
    embeds, last, penultimate = _run(model.construct, mode)(Tensor(io["ie.pixel_values"]))
    assert rel_err(embeds.asnumpy(), io["ie.image_embeds"]) < TOL
    assert rel_err(last.asnumpy(), io["ie.last_hidden_state"]) < TOL
    assert rel_err(penultimate.asnumpy(), io["ie.penultimate"]) < TOL


def test_compiled_unet_follows_tensor_inputs(unet, io):
    """A compiled graph must not freeze a per-call value: a new timestep tensor gives the new PyNative output."""
    args = [Tensor(io[f"unet.{k}"]) for k in ("sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids")]
    step = ms.jit(unet.construct)
    first = step(*args).asnumpy()
    args[1] = Tensor(np.array([500.0, 7.0], np.float32))
    second = step(*args).asnumpy()
    assert rel_err(second, first) > 1e-2
    assert rel_err(second, unet(*args).asnumpy()) < TOL


@pytest.mark.parametrize("size", [224, 32])
def test_clip_preprocessing(io, size):
    """IP-Adapter's CLIPImageProcessor: shortest side bicubic, centre crop, CLIP mean/std (a non-square image)."""
    from PIL import Image

    from mindone_story.models.clip_preprocess import clip_preprocess

    image = Image.open(TINY_SDXL / "test_image.png")
    assert rel_err(clip_preprocess([image], size), io[f"pre.pixel_values_{size}"]) < 1e-6
