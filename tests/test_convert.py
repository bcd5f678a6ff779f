"""tools/convert_weights.py: the converted folder holds diffusers' own conversion of the fixture files, in the
requested dtype, loads back through our readers (and through diffusers / transformers when installed), and every
mismatch exits non-zero before anything is written."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mindone_story.models.ip_adapter import attn2_layers
from mindone_story.pretrained import build_component, model_shapes
from mindone_story.weights import SafetensorsFile, read_ip_adapter, read_sdxl, save_safetensors
from mindone_story.weights.safetensors_io import bf16_bits_to_f32, f32_to_bf16_bits

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
LAYOUTS = FIXTURES / "layouts"
CONFIGS = LAYOUTS / "configs"
TOOL = ROOT / "tools" / "convert_weights.py"

_spec = importlib.util.spec_from_file_location("convert_weights", TOOL)
convert_weights = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(convert_weights)


def run(*args: str | Path) -> int:
    return convert_weights.main([str(a) for a in args])


@pytest.fixture(scope="module")
def image_encoder(tmp_path_factory) -> Path:
    """A micro image encoder file matching configs/image_encoder (what the micro IP-Adapters expect)."""
    folder = tmp_path_factory.mktemp("enc")
    rng = np.random.default_rng(0)
    shapes = model_shapes({"image_encoder": json.loads((CONFIGS / "image_encoder" / "config.json").read_text())})
    shapes = shapes["image_encoder"]
    save_safetensors(
        {k: rng.standard_normal(s).astype(np.float16) for k, s in shapes.items()}, folder / "model.safetensors"
    )
    shutil.copy(CONFIGS / "image_encoder" / "config.json", folder)
    return folder


def expected(component: str) -> dict[str, np.ndarray]:
    f = SafetensorsFile(LAYOUTS / "sgm_micro_expected.safetensors")
    return {k.split("/", 1)[1]: f[k] for k in f if k.startswith(f"{component}/")}


@pytest.mark.parametrize("dtype", ["fp16", "fp32", "bf16"])
def test_sgm_file_with_ip_adapter(tmp_path, capsys, image_encoder, dtype):
    out = tmp_path / "out"
    rc = run("--input", LAYOUTS / "sgm_micro.safetensors", "--configs", CONFIGS, "--output", out, "--dtype", dtype,
             "--ip_adapter", LAYOUTS / "ip_adapter_plus_micro.bin", "--image_encoder", image_encoder)  # fmt: skip
    assert rc == 0
    cast = {
        "fp16": lambda a: a,
        "fp32": lambda a: a.astype(np.float32),
        "bf16": lambda a: bf16_bits_to_f32(f32_to_bf16_bits(a.astype(np.float32))),
    }[dtype]
    stored = {"fp16": "F16", "fp32": "F32", "bf16": "BF16"}[dtype]
    back = read_sdxl(out)  # the converted folder reads through our own loader, configs included
    for comp in ("unet", "vae", "text_encoder", "text_encoder_2"):
        want = expected(comp)
        assert set(back[comp]) == set(want) and back[comp].config == json.loads(
            (CONFIGS / comp / "config.json").read_text()
        )
        assert all(back[comp].dtype(k) == stored and np.array_equal(back[comp][k], cast(v)) for k, v in want.items())
    ip = read_ip_adapter(out / "ip_adapter", back["unet"].config, out / "image_encoder" / "config.json")
    ref = SafetensorsFile(LAYOUTS / "ip_adapter_expected.safetensors")  # diffusers' placement: <attn2>.to_k_ip ...
    modules = [m for m, _ in attn2_layers(build_component("unet", back["unet"].config))]
    placed = {k: f"plus/{modules[int(k.split('.')[1]) // 2]}.{k.split('.', 2)[2]}" for k in ip if k.startswith("ip_")}
    assert all(np.array_equal(ip[k], cast(ref[r])) for k, r in placed.items())
    assert sorted(placed.values()) == sorted(k for k in ref if k.startswith("plus/"))
    assert json.loads((out / "ip_adapter" / "config.json").read_text())["image_proj"]["kind"] == "resampler"
    printed = capsys.readouterr().out
    assert "denoiser.sigmas: sgm sampler sigma table" in printed and "logit_scale: CLIP contrastive" in printed
    assert f"output  {out} ({dtype})" in printed and "unet                  620         516,628  F16" in printed


@pytest.mark.slow  # importing diffusers takes about 10 s
def test_output_loads_in_diffusers_and_transformers(tmp_path):
    pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "out"
    assert run("--input", LAYOUTS / "sgm_micro.safetensors", "--configs", CONFIGS, "--output", out) == 0
    unet = diffusers.UNet2DConditionModel.from_pretrained(out / "unet")
    vae = diffusers.AutoencoderKL.from_pretrained(out / "vae")
    te2 = transformers.CLIPTextModelWithProjection.from_pretrained(out / "text_encoder_2")
    for model, comp in ((unet, "unet"), (vae, "vae"), (te2, "text_encoder_2")):
        state = model.state_dict()
        want = expected(comp)
        assert all(np.array_equal(state[k].numpy(), v.astype(np.float32)) for k, v in want.items()), comp


def test_sharded_output(tmp_path):
    out = tmp_path / "out"
    args = ("--input", LAYOUTS / "sgm_micro.safetensors", "--configs", CONFIGS, "--output", out)
    assert run(*args, "--max_shard_size", "200KB") == 0
    index = json.loads((out / "unet" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    back = read_sdxl(out)
    assert all(np.array_equal(back["unet"][k], v) for k, v in expected("unet").items())


def test_diffusers_folder_keeps_tokenizers_and_index(tmp_path):
    out = tmp_path / "out"
    assert (
        run(
            "--input",
            FIXTURES / "tiny_sdxl",
            "--output",
            out,
            "--image_encoder",
            FIXTURES / "tiny_sdxl" / "image_encoder",
        )
        == 0
    )
    assert (out / "tokenizer" / "vocab.json").is_file() and (out / "tokenizer_2" / "merges.txt").is_file()
    assert json.loads((out / "model_index.json").read_text()) == json.loads(
        (FIXTURES / "tiny_sdxl" / "model_index.json").read_text()
    )
    src, back = read_sdxl(FIXTURES / "tiny_sdxl"), read_sdxl(out)
    assert all(np.array_equal(back["unet"][k], src["unet"][k]) for k in src["unet"])


# ---- every mismatch exits non-zero and writes nothing -----------------------------------------------------------
def test_wrong_image_encoder_for_the_ip_adapter(tmp_path, capsys):
    out = tmp_path / "out"
    rc = run("--input", LAYOUTS / "sgm_micro.safetensors", "--configs", CONFIGS, "--output", out,
             "--ip_adapter", LAYOUTS / "ip_adapter_micro.bin", "--image_encoder", FIXTURES / "tiny_sdxl" / "image_encoder")  # fmt: skip
    assert rc == 2 and not out.exists() and list(tmp_path.iterdir()) == []
    assert "needs image features of width 8" in capsys.readouterr().err


def test_wrong_family_and_truncated_files(tmp_path, capsys):
    sd15 = tmp_path / "sd15.safetensors"
    save_safetensors(
        {"cond_stage_model.transformer.text_model.final_layer_norm.weight": np.ones(768, np.float16)}, sd15
    )
    assert run("--input", sd15, "--output", tmp_path / "a") == 2
    assert "Stable Diffusion 1.x" in capsys.readouterr().err
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes((LAYOUTS / "sgm_micro.safetensors").read_bytes()[:-4096])
    assert run("--input", cut, "--configs", CONFIGS, "--output", tmp_path / "b") == 2
    assert "truncated" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_fp16_overflow_is_an_error(tmp_path, capsys):
    folder = tmp_path / "in"
    shutil.copytree(FIXTURES / "tiny_sdxl", folder)
    f = folder / "vae" / "diffusion_pytorch_model.safetensors"
    state = {k: v.astype(np.float32) for k, v in SafetensorsFile(f).items()}
    state["decoder.conv_out.bias"][0] = 1e6
    save_safetensors(state, f)
    assert run("--input", folder, "--output", tmp_path / "out", "--dtype", "fp16") == 2
    assert "vae: decoder.conv_out.bias overflows fp16" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))
    assert run("--input", folder, "--output", tmp_path / "out", "--dtype", "bf16") == 0


def test_existing_output_needs_overwrite(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ("--input", LAYOUTS / "sgm_micro.safetensors", "--configs", CONFIGS, "--output", out)
    assert run(*args) == 2 and (out / "keep.txt").exists()
    assert "--overwrite" in capsys.readouterr().err
    assert run(*args, "--overwrite") == 0 and not (out / "keep.txt").exists()


def test_command_line_exit_codes(tmp_path):
    ok = subprocess.run([sys.executable, TOOL, "--input", LAYOUTS / "sgm_micro.safetensors", "--configs", CONFIGS,
                         "--output", tmp_path / "ok"], capture_output=True, text=True)  # fmt: skip
    assert ok.returncode == 0 and "ignored (3):" in ok.stdout
    bad = subprocess.run([sys.executable, TOOL, "--input", LAYOUTS / "sgm_micro.safetensors", "--output",
                          tmp_path / "bad"], capture_output=True, text=True)  # fmt: skip
    assert bad.returncode == 2 and "error: " in bad.stderr and "shape mismatches" in bad.stderr
