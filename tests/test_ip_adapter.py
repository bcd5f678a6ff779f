"""IP-Adapter and Story-Adapter's round against diffusers' own IP-Adapter code, in PyNative and graph mode.

References: tests/fixtures/layouts/ip_adapter_unet_io.npz (the micro UNet with the base and the plus adapter, from
make_layout_fixtures.py) and tests/fixtures/ip_adapter/story_adapter_io.npz (one decoupled cross-attention layer
and a Story-Adapter round through StableDiffusionXLPipeline on the tiny SDXL, from make_ip_adapter_fixtures.py).
Tolerance: relative error max|ours - ref| / max|ref| <= 1e-4.
"""

from __future__ import annotations

import json

import mindspore as ms
import numpy as np
import pytest
from conftest import FIXTURES, TINY_SDXL, rel_err
from mindspore import Tensor
from PIL import Image

from mindone_story.models.ip_adapter import attn2_modules, install, uninstall
from mindone_story.pipelines.story_adapter import NEGATIVE_PROMPT, StoryAdapterPipeline, StoryAdapterSettings
from mindone_story.pretrained import load_component, load_ip_adapter, load_ip_adapter_models, load_sdxl
from mindone_story.processors.grca import GlobalReference, reference_pixels, round_scales
from mindone_story.story.prompts import styled
from mindone_story.weights.layouts import read_sdxl

TOL = 1e-4
MODES = ["pynative", "graph"]
LAYOUTS = FIXTURES / "layouts"
IP = FIXTURES / "ip_adapter"
UNET_ARGS = ("sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids")


def _run(fn, mode: str):
    return ms.jit(fn) if mode == "graph" else fn


# -- the UNet with an adapter: micro SDXL, base (ImageProjModel) and plus (Resampler) ------------------------------
@pytest.fixture(scope="module")
def micro():
    configs = {c: LAYOUTS / "configs" / c / "config.json" for c in ("unet", "vae", "text_encoder", "text_encoder_2")}
    weights = read_sdxl(LAYOUTS / "sgm_micro.safetensors", configs=configs)["unet"]
    unet, _ = load_component("unet", weights.config, weights, "sgm_micro", ms.float32)
    return unet, dict(np.load(LAYOUTS / "ip_adapter_unet_io.npz"))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("variant,stem", [("base", "ip_adapter_micro"), ("plus", "ip_adapter_plus_micro")])
def test_unet_with_ip_adapter_matches_diffusers(micro, mode, variant, stem):
    """diffusers ran the batch of 2 with each row's own image (scale 1): our K/V rows are those two images. ``mode``
    compiles the projection (ImageProjModel or Resampler) and the K/V; the UNet with the adapter runs compiled in
    test_round_matches_diffusers and test_scale_is_a_tensor_input_of_the_compiled_unet (one graph compile fewer)."""
    unet, io = micro
    encoder = json.loads((LAYOUTS / "configs" / "image_encoder" / "config.json").read_text())
    adapter = load_ip_adapter(LAYOUTS / f"{stem}.safetensors", unet.config, encoder)
    install(unet, adapter)
    try:
        embeds = io[f"{variant}.image_embeds"]
        project = _run(adapter.project, mode)
        tokens = ms.ops.concat([project(Tensor(embeds[b])) for b in range(2)])
        keys, values = _run(adapter.reference_kv, mode)(tokens)
        story = ms.mutable((Tensor(np.float32(1.0)), keys, values))
        out = unet(*[Tensor(io[k]) for k in UNET_ARGS], story).asnumpy()
    finally:
        uninstall(unet, adapter)
    assert rel_err(out, io[f"{variant}.out"]) < TOL
    assert rel_err(io["noip.out"], io[f"{variant}.out"]) > 0.05  # the adapter matters: the test can fail


# -- a Story-Adapter round on the tiny SDXL ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sa_io():
    return dict(np.load(IP / "story_adapter_io.npz"))


@pytest.fixture(scope="module")
def refs():
    return [Image.open(IP / f"reference_{i}.png") for i in range(3)]


@pytest.fixture(scope="module", params=MODES)
def pipe(request):
    models = load_sdxl(TINY_SDXL)
    ip = load_ip_adapter_models(IP / "ip-adapter_tiny.safetensors", TINY_SDXL / "image_encoder", models.unet.config)
    return StoryAdapterPipeline(models, ip, mode=request.param)


def test_reference_preprocessing_and_styles(sa_io, refs):
    """256x256 resize then CLIPImageProcessor; the original's comic wrapper, negative prompt and DDIM."""
    from mindone_story.pipelines.schedulers import make_scheduler
    from mindone_story.pipelines.story_adapter import DDIM_CONFIG

    timesteps = make_scheduler("ddim", DDIM_CONFIG, 3).timesteps.asnumpy()
    assert timesteps.tolist() == sa_io["round.timesteps"].tolist()
    assert rel_err(reference_pixels(refs, 32), sa_io["ref.pixel_values"]) < 1e-6
    assert styled("a man with a black suit reads a book", "comic") == str(sa_io["prompts"][0])
    assert NEGATIVE_PROMPT == str(sa_io["negative_prompt"][0])
    assert styled("x", "realistic") == "best quality, high quality, x"
    assert round_scales(10)[0] == 0.3 and round_scales(10)[-1] == 0.5 and len(round_scales(10)) == 10


def test_reference_tokens(pipe, sa_io, refs):
    """N images -> 4N tokens, image by image; the unconditional half is the projection of zero embeddings."""
    before = pipe.references.images_encoded
    tokens = pipe.references.tokens(refs).asnumpy()
    assert pipe.references.images_encoded - before == len(refs)
    assert rel_err(tokens, sa_io["ref.tokens"]) < TOL


def test_decoupled_attention_layer(pipe, sa_io):
    unet = pipe.sdxl.models.unet
    modules = pipe.references.ip_adapter.modules
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn2"
    attn = attn2_modules(unet, [name])[0]
    reference = pipe.references.control_from_tokens(Tensor(sa_io["ref.tokens"]), float(sa_io["attn.scale"][0]))
    assert attn.processor.layer == modules.index(name)
    args = (Tensor(sa_io["attn.hidden_states"]), Tensor(sa_io["attn.context"]))
    out = _run(attn.construct, pipe.mode)(*args, reference.inputs(0)).asnumpy()
    assert rel_err(out, sa_io["attn.out"]) < TOL
    plain = attn.construct(*args, None).asnumpy()
    assert rel_err(plain, sa_io["attn.out"]) > 1e-2


def test_round_matches_diffusers(pipe, sa_io, refs):
    """Each panel of a round: the same initial noise, all references' tokens, scale 0.4, DDIM, CFG 5.0."""
    settings = StoryAdapterSettings(("unused",), steps=3, height=64, width=64)
    reference = pipe.reference(refs, 0.4)
    for p in range(2 if pipe.mode == "graph" else 1):  # PyNative pays per panel, the graph per compile
        latents = pipe.latents(str(sa_io["prompts"][p]), sa_io["round.latents"], settings, reference)
        assert rel_err(latents.asnumpy(), sa_io[f"round.panel{p}.step_latents"][-1]) < TOL
        assert rel_err(pipe.sdxl.decode_array(latents), sa_io[f"round.panel{p}.image"]) < TOL
    assert rel_err(sa_io["round.panel0.image"], sa_io["round0.panel0.image"]) > 1e-2  # the references matter


def test_round_zero_is_text_only(pipe, sa_io):
    if pipe.mode == "graph":
        pytest.skip("text-only UNet graph: covered by test_sdxl_pipeline; one mode keeps the suite short")
    settings = StoryAdapterSettings(("unused",), steps=3, height=64, width=64)
    latents = pipe.latents(str(sa_io["prompts"][0]), sa_io["round.latents"], settings, None)
    assert rel_err(pipe.sdxl.decode_array(latents), sa_io["round0.panel0.image"]) < TOL


def test_scale_is_a_tensor_input_of_the_compiled_unet(pipe, sa_io):
    """A new scale reaches a compiled graph (no frozen Python value) and equals PyNative's result."""
    if pipe.mode != "graph":
        pytest.skip("compares the graph against PyNative")
    unet = pipe.sdxl.models.unet
    g = np.random.default_rng(0)
    args = (
        Tensor(g.standard_normal((2, 4, 8, 8)).astype(np.float32)),
        Tensor(np.array([500.0], np.float32)),
        Tensor(g.standard_normal((2, 77, 96)).astype(np.float32)),
        Tensor(g.standard_normal((2, 32)).astype(np.float32)),
        Tensor(np.tile(np.array([[64, 64, 0, 0, 64, 64]], np.float32), (2, 1))),
    )
    tokens = Tensor(sa_io["ref.tokens"])
    low, high = (pipe.references.control_from_tokens(tokens, s) for s in (0.3, 0.9))
    compiled = pipe.sdxl._unet  # the pipeline's own compiled step
    out_low = compiled(*args, low.inputs(0)).asnumpy()
    out_high = compiled(*args, high.inputs(0)).asnumpy()
    assert rel_err(out_high, out_low) > 1e-3
    assert rel_err(out_high, unet.construct(*args, high.inputs(0)).asnumpy()) < TOL
    assert isinstance(high, GlobalReference) and high.scale == 0.9


def test_prompts_are_encoded_once_per_run(pipe, monkeypatch):
    """Every round reuses a panel's text conditioning; the cache keeps only the current story's prompts."""
    settings = StoryAdapterSettings(("a cat on a roof", "a dog in a park"), steps=1, height=64, width=64)
    real, calls = pipe.sdxl.encode_prompts, []
    monkeypatch.setattr(pipe.sdxl, "encode_prompts", lambda p, n, chunks: calls.append(p) or real(p, n, chunks))
    first = [pipe.embeds(p, settings) for p in settings.model_prompts]
    for _ in range(2):  # two more rounds
        assert [pipe.embeds(p, settings) for p in settings.model_prompts] == first
    assert calls == [[p] for p in settings.model_prompts]
    fresh = real([settings.model_prompts[0]], [NEGATIVE_PROMPT])
    assert np.array_equal(first[0].context.asnumpy(), fresh.context.asnumpy())
    other = StoryAdapterSettings(("a bird",), steps=1, height=64, width=64)
    pipe.embeds(other.model_prompts[0], other)
    assert list(pipe._embeds) == other.model_prompts
