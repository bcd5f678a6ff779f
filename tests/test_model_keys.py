"""Full-size models have exactly the keys and shapes of the real checkpoints (tests/fixtures/manifests/), built without
allocating their weights (parameters are lazily initialised)."""

from __future__ import annotations

import json
import resource
from pathlib import Path

import pytest

from mindone_story.config import preset_dir
from mindone_story.models.load import parameter_shapes
from mindone_story.pretrained import build_component

MANIFESTS = Path(__file__).resolve().parent / "fixtures" / "manifests"  # copies of ../shared/manifests
CASES = [
    ("unet", "sdxl/unet", "diffusers_sdxl_unet.json"),
    ("vae", "sdxl/vae", "diffusers_sdxl_vae.json"),
    ("text_encoder", "sdxl/text_encoder", "hf_clip_text_vit_l.json"),
    ("text_encoder_2", "sdxl/text_encoder_2", "hf_clip_text_bigg_proj.json"),
    ("image_encoder", "image_encoder_bigg", "hf_clip_vision_bigg_proj.json"),
    ("image_encoder", "image_encoder_vit_h", "hf_clip_vision_vit_h_proj.json"),
]


def _manifest(name: str) -> dict:
    return json.loads((MANIFESTS / name).read_text())


@pytest.mark.parametrize("component,preset,manifest", CASES)
def test_full_size_keys_and_shapes(component, preset, manifest):
    want = {k: tuple(v) for k, v in _manifest(manifest)["tensors"].items()}
    config = json.loads((preset_dir(preset) / "config.json").read_text())
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    got = parameter_shapes(build_component(component, config))
    assert sorted(set(want) - set(got)) == []
    assert sorted(set(got) - set(want)) == []
    assert {k: v for k, v in got.items() if want[k] != v} == {}
    # the 2.6 B-parameter UNet would need 10 GB in fp32; building it lazily must stay far below that
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert grown_mb < 1500, f"building {component} grew peak RSS by {grown_mb:.0f} MB"


def test_loading_is_strict_and_lists_the_keys():
    import numpy as np

    from mindone_story.errors import LayoutError
    from mindone_story.models.load import load_state

    config = json.loads((preset_dir("tiny/text_encoder") / "config.json").read_text())
    model = build_component("text_encoder", config)
    state = {k: np.zeros(s, np.float32) for k, s in parameter_shapes(model).items()}
    state["text_model.embeddings.position_ids"] = np.arange(77)[None]  # a known extra: ignored by name
    assert load_state(model, state, "ok") == ["text_model.embeddings.position_ids"]
    del state["text_model.final_layer_norm.bias"]
    state["text_model.encoder.layers.0.mlp.fc1.weight"] = np.zeros((3, 3), np.float32)
    state["text_model.extra.weight"] = np.zeros(1, np.float32)
    with pytest.raises(LayoutError) as err:
        load_state(model, state, "bad.safetensors")
    message = str(err.value)
    assert "bad.safetensors" in message
    assert "missing keys (1): text_model.final_layer_norm.bias" in message
    assert "unexpected keys (1): text_model.extra.weight" in message
    assert "text_model.encoder.layers.0.mlp.fc1.weight: file [3, 3], model [37, 32]" in message


@pytest.mark.parametrize("name", ["ip_adapter_sdxl.json", "ip_adapter_plus_sdxl_vit_h.json"])
def test_full_size_ip_adapter_cell_has_the_checkpoint_keys(name):
    """The IPAdapter cell for the SDXL UNet is named like the checkpoints (image_proj.*, ip_adapter.<2k+1>.*), and
    attn2 layer k is the module diffusers' load_ip_adapter gives index 2k + 1 (the recorded table)."""
    from mindone_story.models.ip_adapter import attn2_layers
    from mindone_story.pretrained import build_ip_adapter
    from mindone_story.weights.layouts import describe_image_proj, preset_configs

    want = {k: tuple(v) for k, v in _manifest(name)["tensors"].items()}

    class Header(dict):  # describe_image_proj reads shapes only
        shape = dict.__getitem__

    info = describe_image_proj(Header(want), list(want), Path(name))
    unet = build_component("unet", preset_configs("sdxl")["unet"])
    assert parameter_shapes(build_ip_adapter(info, unet)) == want
    table = _manifest("ip_adapter_sdxl_layer_order.json")["layers"]
    assert {str(2 * k + 1): (m, h) for k, (m, h) in enumerate(attn2_layers(unet))} == {
        i: (e["module"], e["hidden_size"]) for i, e in table.items()
    }
