"""Key maps onto our names: full-size coverage from the manifests (no weights allocated), values against diffusers'
own conversions (tests/fixtures/layouts), and a clear error for every wrong file. That our names and shapes are the
original classes' is tests/test_model_keys.py's (the models are the one description of them)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from mindone_story.pretrained import check_sdxl
from mindone_story.weights import (
    LayoutError,
    LazyTensor,
    LazyWeights,
    SafetensorsFile,
    WeightFileError,
    save_safetensors,
)
from mindone_story.weights.layouts import (
    PRESETS,
    map_ip_adapter,
    map_single_file,
    preset_configs,
    read_image_encoder,
    read_ip_adapter,
    read_sdxl,
)

MANIFESTS = Path(__file__).resolve().parent / "fixtures" / "manifests"  # copies of ../shared/manifests
FIXTURES = Path(__file__).parent / "fixtures"
LAYOUTS = FIXTURES / "layouts"
MICRO = {c: LAYOUTS / "configs" / c / "config.json" for c in ("unet", "vae", "text_encoder", "text_encoder_2")}
SDXL = preset_configs("sdxl")
BIGG, VIT_H = PRESETS / "image_encoder_bigg" / "config.json", PRESETS / "image_encoder_vit_h" / "config.json"


def _no_read():
    raise AssertionError("coverage tests must not read tensors")


class Shapes(LazyWeights):
    """A lazy source made of shapes only, as the loaders see a file before reading any tensor."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]):
        self.shapes = {k: tuple(v) for k, v in shapes.items()}
        self.tensors = {k: LazyTensor(v, "F16", _no_read) for k, v in self.shapes.items()}


def manifest(name: str, with_optional: bool = False) -> dict[str, tuple[int, ...]]:
    doc = json.loads((MANIFESTS / name).read_text())
    out = {k: tuple(v) for k, v in doc["tensors"].items()}
    return out | ({k: tuple(v) for k, v in doc.get("optional_tensors", {}).items()} if with_optional else {})


def mapped_shapes(mapped) -> dict[str, tuple[int, ...]]:
    return {k: mapped.shape(k) for k in mapped}


# ---- full-size coverage: every key of the real layouts onto our names, every target covered ---------------------
@pytest.mark.parametrize("with_optional", [False, True])
def test_sgm_single_file_covers_every_parameter(with_optional):
    source = Shapes(manifest("sgm_sdxl_single_file.json", with_optional))
    mapped = map_single_file(source, SDXL, Path("sd_xl_base_1.0.safetensors"))
    targets = {
        "unet": "diffusers_sdxl_unet.json",
        "vae": "diffusers_sdxl_vae.json",
        "text_encoder": "hf_clip_text_vit_l.json",
        "text_encoder_2": "hf_clip_text_bigg_proj.json",
    }
    for comp, name in targets.items():
        assert mapped_shapes(mapped[comp]) == manifest(name), comp  # every target, each with its shape
    used = {mapped[c].rule(k)[0] for c in mapped for k in mapped[c]}
    ignored = {k for c in mapped for k, _ in mapped[c].ignored}
    assert used | ignored == set(source.shapes) and not used & ignored  # every source key used or ignored by name
    expected_ignored = {"conditioner.embedders.1.model.logit_scale", "denoiser.sigmas"}
    if with_optional:
        expected_ignored.add("conditioner.embedders.0.transformer.text_model.embeddings.position_ids")
    assert ignored == expected_ignored


def test_sgm_transposes_and_splits_are_named():
    mapped = map_single_file(Shapes(manifest("sgm_sdxl_single_file.json")), SDXL, Path("x.safetensors"))
    te2, vae = mapped["text_encoder_2"], mapped["vae"]
    assert te2.rule("text_projection.weight") == ("conditioner.embedders.1.model.text_projection", "transpose")
    q = "text_model.encoder.layers.31.self_attn.q_proj.weight"
    v = "text_model.encoder.layers.31.self_attn.v_proj.bias"
    assert te2.rule(q) == ("conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight", "q")
    assert te2.rule(v) == ("conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_bias", "v")
    assert vae.rule("decoder.mid_block.attentions.0.to_out.0.weight") == (
        "first_stage_model.decoder.mid.attn_1.proj_out.weight",
        "squeeze_1x1",
    )
    assert (
        vae.rule("decoder.up_blocks.0.upsamplers.0.conv.weight")[0]
        == "first_stage_model.decoder.up.3.upsample.conv.weight"
    )


@pytest.mark.parametrize("name, encoder", [("ip_adapter_sdxl.json", BIGG), ("ip_adapter_plus_sdxl_vit_h.json", VIT_H)])
def test_ip_adapter_keys_are_ours_and_the_projection_is_read(name, encoder):
    source = Shapes(manifest(name))
    mapped = map_ip_adapter(source, SDXL["unet"], encoder, Path(name))
    assert mapped_shapes(mapped) == source.shapes  # IP-Adapter's own names, all of them (the cell's: test_model_keys)
    assert mapped.config["kind"] == ("resampler" if "plus" in name else "image_proj_model")


def test_text_encoder_without_text_model_prefix():
    # transformers 5 saves CLIPTextModel without the text_model. prefix; both spellings map to our names.
    m = manifest("hf_clip_text_vit_l.json")
    stripped = Shapes({k.removeprefix("text_model."): v for k, v in m.items()})
    from mindone_story.weights.keymaps import hf_clip_key, map_keys

    assert mapped_shapes(map_keys(stripped, hf_clip_key, "te")) == m


# ---- values against the original code ---------------------------------------------------------------------------
def test_sgm_file_converts_like_diffusers_own_converters():
    ours = read_sdxl(LAYOUTS / "sgm_micro.safetensors", configs=MICRO)
    expected = SafetensorsFile(LAYOUTS / "sgm_micro_expected.safetensors")
    for comp, weights in ours.items():
        want = {k.split("/", 1)[1] for k in expected if k.startswith(f"{comp}/")}
        assert set(weights) == want, comp
        for k in want:
            got, ref = weights[k], expected[f"{comp}/{k}"]
            assert got.dtype == ref.dtype and got.shape == ref.shape and np.array_equal(got, ref), k
    assert {k for k, _ in ours["text_encoder"].ignored} == {
        "conditioner.embedders.0.transformer.text_model.embeddings.position_ids"
    }


@pytest.mark.parametrize("variant, stem", [("base", "ip_adapter_micro"), ("plus", "ip_adapter_plus_micro")])
@pytest.mark.parametrize("ext", ["bin", "safetensors"])
def test_ip_adapter_maps_like_diffusers_load_ip_adapter(variant, stem, ext):
    ours = read_ip_adapter(
        LAYOUTS / f"{stem}.{ext}", MICRO["unet"], LAYOUTS / "configs" / "image_encoder" / "config.json"
    )
    from mindone_story.models.ip_adapter import attn2_layers
    from mindone_story.pretrained import build_component

    # diffusers' load_ip_adapter put ip_adapter.<i> on these modules; ours go to attn2_layers()[(i - 1) // 2]
    expected = SafetensorsFile(LAYOUTS / "ip_adapter_expected.safetensors")
    modules = [m for m, _ in attn2_layers(build_component("unet", json.loads(MICRO["unet"].read_text())))]
    placed = {k: f"{variant}/{modules[int(k.split('.')[1]) // 2]}.{k.split('.', 2)[2]}" for k in ours if k[:3] == "ip_"}
    assert sorted(placed.values()) == sorted(k for k in expected if k.startswith(f"{variant}/"))
    assert all(np.array_equal(ours[k], expected[r]) for k, r in placed.items())
    raw = SafetensorsFile(LAYOUTS / f"{stem}.safetensors")
    assert set(ours) == set(raw) and all(np.array_equal(ours[k], raw[k]) for k in ours)
    assert ours.config["kind"] == ("resampler" if variant == "plus" else "image_proj_model")


def test_diffusers_folder_reads_as_is():
    folder = FIXTURES / "tiny_sdxl"
    ours = read_sdxl(folder)
    for comp in ("unet", "vae", "text_encoder", "text_encoder_2"):
        raw = SafetensorsFile(next((folder / comp).glob("*.safetensors")))
        assert set(ours[comp]) == set(raw) and all(np.array_equal(ours[comp][k], raw[k]) for k in raw)
        assert ours[comp].config == json.loads((folder / comp / "config.json").read_text())
    assert ours.configs["scheduler"]["_class_name"] and len(ours.fingerprint) == 16


def test_diffusers_folder_with_fp16_variant_and_shards(tmp_path):
    from mindone_story.weights import save_sharded

    src = FIXTURES / "tiny_sdxl"
    for comp in ("unet", "vae", "text_encoder", "text_encoder_2"):
        (tmp_path / comp).mkdir()
        shutil.copy(src / comp / "config.json", tmp_path / comp)
        raw = SafetensorsFile(next((src / comp).glob("*.safetensors")))
        if comp == "unet":  # sharded fp16 variant, as diffusers writes big UNets
            save_sharded(dict(raw.items()), tmp_path / comp, "diffusion_pytorch_model.fp16.safetensors", 2_000_000)
        else:
            stem = "diffusion_pytorch_model" if comp == "vae" else "model"
            shutil.copy(raw.path, tmp_path / comp / f"{stem}.fp16.safetensors")
    assert len(list((tmp_path / "unet").glob("*.safetensors"))) > 1
    ours, ref = read_sdxl(tmp_path), read_sdxl(src)
    for comp in ref:
        assert all(np.array_equal(ours[comp][k], ref[comp][k]) for k in ref[comp])


def test_image_encoder_folder_and_file():
    enc = read_image_encoder(FIXTURES / "tiny_sdxl" / "image_encoder")
    raw = SafetensorsFile(FIXTURES / "tiny_sdxl" / "image_encoder" / "model.safetensors")
    assert set(enc) == set(raw) and enc.config["hidden_size"] == 48
    with pytest.raises(LayoutError, match="width 48; pass its config.json"):
        read_image_encoder(raw.path)  # a bare file of an unknown width needs its config


# ---- errors -----------------------------------------------------------------------------------------------------
def _write(tmp_path: Path, shapes: dict[str, tuple[int, ...]], name: str = "x.safetensors") -> Path:
    save_safetensors({k: np.zeros(s, np.float16) for k, s in shapes.items()}, tmp_path / name)
    return tmp_path / name


@pytest.mark.parametrize(
    "keys, message",
    [
        ({"cond_stage_model.transformer.text_model.final_layer_norm.weight": (768,)}, "Stable Diffusion 1.x"),
        ({"cond_stage_model.model.ln_final.weight": (1024,)}, "Stable Diffusion 2.x"),
        ({"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768)}, "1.x UNet"),
        ({"double_blocks.0.img_attn.qkv.weight": (9, 3), "img_in.weight": (3, 64)}, "Flux"),
        ({"model.diffusion_model.double_blocks.0.img_mod.lin.weight": (3, 3)}, "Flux"),
        ({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": (3, 3)}, "Stable Diffusion 3"),
        ({"conditioner.embedders.0.model.positional_embedding": (77, 1280)}, "refiner"),
        ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 320)}, "LoRA"),
        ({"conv_in.weight": (320, 4, 3, 3), "down_blocks.0.resnets.0.conv1.weight": (3, 3)}, "lone diffusers UNet"),
        ({"foo.bar": (1,)}, "unknown layout"),
    ],
)
def test_wrong_family_single_files(tmp_path, keys, message):
    with pytest.raises(LayoutError, match=message):
        read_sdxl(_write(tmp_path, keys))


def test_sdxl_file_missing_a_component(tmp_path):
    src = SafetensorsFile(LAYOUTS / "sgm_micro.safetensors")
    shapes = {k: src.shape(k) for k in src if not k.startswith("first_stage_model.")}
    with pytest.raises(LayoutError, match=r"missing component vae: no first_stage_model\.\* keys"):
        read_sdxl(_write(tmp_path, shapes), configs=MICRO)


def test_diffusers_folder_missing_a_component(tmp_path):
    shutil.copytree(FIXTURES / "tiny_sdxl", tmp_path / "m")
    shutil.rmtree(tmp_path / "m" / "text_encoder_2")
    with pytest.raises(LayoutError, match="missing component text_encoder_2"):
        read_sdxl(tmp_path / "m")
    os.remove(tmp_path / "m" / "vae" / "diffusion_pytorch_model.safetensors")
    (tmp_path / "m" / "text_encoder_2").mkdir()
    with pytest.raises(LayoutError, match=r"vae: missing weights: none of diffusion_pytorch_model\.safetensors"):
        read_sdxl(tmp_path / "m")


def test_sd15_folder(tmp_path):
    (tmp_path / "unet").mkdir(parents=True)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(LayoutError, match="Stable Diffusion 1.x/2.x folder"):
        read_sdxl(tmp_path)


def test_missing_unexpected_and_misshaped_keys_are_listed(tmp_path):
    src = SafetensorsFile(LAYOUTS / "sgm_micro.safetensors")
    shapes = {k: src.shape(k) for k in src}
    del shapes["model.diffusion_model.out.2.bias"]
    shapes["model.diffusion_model.input_blocks.1.0.in_layers.0.weight"] = (7,)
    shapes["model.diffusion_model.input_blocks.1.0.mystery.weight"] = (1,)
    checkpoint = read_sdxl(_write(tmp_path, shapes), configs=MICRO)  # headers and key maps: no model yet
    with pytest.raises(LayoutError) as e:
        check_sdxl(checkpoint)  # the one check, against the models' own parameters
    msg = str(e.value)
    assert "missing keys (1): conv_out.bias" in msg
    assert "unexpected keys (1): model.diffusion_model.input_blocks.1.0.mystery.weight" in msg
    assert (
        "down_blocks.0.resnets.0.norm1.weight (from model.diffusion_model.input_blocks.1.0.in_layers.0.weight): "
        "file [7], model [8]" in msg
    )


def test_long_key_lists_are_cut_at_ten(tmp_path):
    src = SafetensorsFile(LAYOUTS / "sgm_micro.safetensors")
    shapes = {k: src.shape(k) for k in src if "transformer_blocks" not in k}
    with pytest.raises(LayoutError, match=r"missing keys \(\d{3}\): [^\n]*, \.\.\.") as e:
        check_sdxl(read_sdxl(_write(tmp_path, shapes), configs=MICRO))
    assert str(e.value).split("\n")[1].count(",") == 10


def test_truncated_single_file(tmp_path):
    raw = (LAYOUTS / "sgm_micro.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[: len(raw) - 1000])
    with pytest.raises(WeightFileError, match=r"cut\.safetensors: truncated"):
        read_sdxl(tmp_path / "cut.safetensors", configs=MICRO)


def test_missing_file(tmp_path):
    with pytest.raises(WeightFileError, match="file not found"):
        read_sdxl(tmp_path / "RealVisXL_V4.0.safetensors")


def test_ip_adapter_with_the_wrong_image_encoder():
    base, plus = Shapes(manifest("ip_adapter_sdxl.json")), Shapes(manifest("ip_adapter_plus_sdxl_vit_h.json"))
    with pytest.raises(LayoutError, match=r"width 1280 \(ViT-bigG/14 projection.*projection_dim is 1024"):
        map_ip_adapter(base, SDXL["unet"], VIT_H, Path("ip-adapter_sdxl.bin"))
    with pytest.raises(LayoutError, match="needs image features of width 1280.*hidden_size is 1664"):
        map_ip_adapter(plus, SDXL["unet"], BIGG, Path("ip-adapter-plus_sdxl_vit-h.bin"))


def test_ip_adapter_file_with_the_wrong_image_encoder():
    wrong = dict(json.loads((LAYOUTS / "configs" / "image_encoder" / "config.json").read_text()), projection_dim=6)
    with pytest.raises(LayoutError, match=r"ip_adapter_micro\.bin: this IP-Adapter needs image features of width 8"):
        read_ip_adapter(LAYOUTS / "ip_adapter_micro.bin", MICRO["unet"], wrong)


def test_sd15_ip_adapter_is_refused():
    sd15 = {"image_proj.proj.weight": (3072, 1024), "image_proj.proj.bias": (3072,), "image_proj.norm.weight": (768,)}
    sd15 |= {"image_proj.norm.bias": (768,), "ip_adapter.1.to_k_ip.weight": (320, 768)}
    with pytest.raises(LayoutError, match="Stable Diffusion 1.x"):
        map_ip_adapter(Shapes(sd15), SDXL["unet"], None, Path("ip-adapter_sd15.bin"))


def test_ip_adapter_for_another_unet_size():
    # The micro adapter against the SDXL UNet: its to_k_ip count and shapes do not fit, and the error says so.
    with pytest.raises(LayoutError, match="context 24"):
        read_ip_adapter(LAYOUTS / "ip_adapter_micro.safetensors")
    with pytest.raises(LayoutError, match="not an IP-Adapter"):
        read_ip_adapter(LAYOUTS / "sgm_micro.safetensors", MICRO["unet"])


def test_sgm_file_drives_our_unet_like_diffusers():
    """End to end: the micro sgm file through our readers into our MindSpore UNet gives the diffusers UNet's output
    (ip_adapter_unet_io.npz "noip.out": diffusers' conversion of the same file, fp32)."""
    ms = pytest.importorskip("mindspore")
    from mindone_story.pretrained import load_component

    weights = read_sdxl(LAYOUTS / "sgm_micro.safetensors", configs=MICRO)["unet"]
    unet, _ = load_component("unet", weights.config, weights, "sgm_micro", ms.float32)
    io = dict(np.load(LAYOUTS / "ip_adapter_unet_io.npz"))
    args = [ms.Tensor(io[k]) for k in ("sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids")]
    out = unet(*args).asnumpy()
    assert np.abs(out - io["noip.out"]).max() / np.abs(io["noip.out"]).max() < 1e-5
