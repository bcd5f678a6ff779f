"""LoRA files fused at load against diffusers' load_lora_weights + fuse_lora, per layout, in PyNative and graph mode;
the scale rules; and each bad LoRA as a one-line error listing its keys.

References: tests/fixtures/lora/ from make_lora_fixtures.py (the tiny SDXL of tests/fixtures/tiny_sdxl, the UNet
inputs and token ids of tiny_sdxl_io.npz). Tolerance: relative error max|ours - ref| / max|ref| <= 1e-4.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
from conftest import FIXTURES, TINY_SDXL, rel_err
from mindspore import Tensor

from mindone_story.pretrained import load_sdxl, model_shapes
from mindone_story.weights.layouts import preset_configs
from mindone_story.weights.lora import LoRAError, Names, read_lora
from mindone_story.weights.safetensors_io import WeightFileError, save_safetensors

TOL = 1e-4
LORA = FIXTURES / "lora"
CASES = {  # as make_lora_fixtures.CASES
    "kohya_sgm": [("kohya_sgm", 0.9)],
    "kohya_diffusers": [("kohya_diffusers", 0.8)],
    "peft": [("peft", 1.0)],
    "peft_bare": [("peft_bare", 0.6)],
    "attn_processor": [("attn_processor", 1.0)],
    "diffusers_legacy": [("diffusers_legacy", 1.2)],
    "multi": [("kohya_sgm", 0.7), ("peft", -0.5)],
}
UNET_ARGS = ("sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids")
TEXT = {"te": "text_encoder", "te2": "text_encoder_2"}
CONFIGS = preset_configs("tiny")
SHAPES = model_shapes(CONFIGS, ("unet", "text_encoder", "text_encoder_2"))  # the models' own names and shapes
Q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"  # [64, 64] in the tiny UNet
K2 = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"  # [64, 96]: context 96


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(LORA / "lora_io.npz"))


def _run(fn, mode: str):
    return ms.jit(fn) if mode == "graph" else fn


def _loras(case: str) -> list[tuple[Path, float]]:
    return [(LORA / f"{name}.safetensors", scale) for name, scale in CASES[case]]


# Every layout in PyNative; graph mode on the kohya sgm file (UNet LoCon convs, both text encoders) and on two LoRAs
# fused together: the fused weights are plain tensors whatever the layout, so compiling each again would add nothing.
RUNS = [(case, "pynative") for case in CASES] + [("kohya_sgm", "graph"), ("multi", "graph")]


@pytest.mark.parametrize("case,mode", RUNS)
def test_fused_models_match_diffusers(io, ref, case, mode):
    models = load_sdxl(TINY_SDXL, loras=_loras(case))
    out = _run(models.unet.construct, mode)(*[Tensor(io[f"unet.{k}"]) for k in UNET_ARGS]).asnumpy()
    assert rel_err(out, ref[f"{case}.unet.out"]) < TOL
    assert rel_err(io["unet.out"], ref[f"{case}.unet.out"]) > 0.05  # the LoRA matters: the test can fail
    for key, comp in TEXT.items():
        if f"{case}.{key}.pooled" not in ref:
            continue
        last, penultimate, pooled = _run(getattr(models, comp).construct, mode)(
            Tensor(io[f"{key}.input_ids"].astype(np.int32))
        )
        assert rel_err(last.asnumpy(), ref[f"{case}.{key}.last_hidden_state"]) < TOL
        assert rel_err(penultimate.asnumpy(), ref[f"{case}.{key}.penultimate"]) < TOL
        assert rel_err(pooled.asnumpy(), ref[f"{case}.{key}.pooled"]) < TOL


def test_scale_rules():
    """kohya alpha / rank (Linear 2/4, LoCon 1/2); peft lora_alpha / r from its metadata (8/4); no alpha stored:
    1.0 (diffusers' rule, lora_alpha = the component's most common rank)."""

    def scales(name):
        lora = read_lora(LORA / f"{name}.safetensors", CONFIGS, SHAPES)
        return {c: {round(m.scale, 6) for m in ms_.values()} for c, ms_ in lora.modules.items() if ms_}, lora

    got, lora = scales("kohya_sgm")
    assert got == {"unet": {0.5}, "text_encoder": {0.5}, "text_encoder_2": {0.5}} and lora.layouts == ["kohya"]
    conv = lora.modules["unet"]["down_blocks.0.resnets.0.conv1.weight"]
    assert (conv.rank, conv.down) == (2, "lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight")
    assert scales("kohya_diffusers")[0] == {"unet": {0.75}, "text_encoder": {0.75}}
    assert scales("peft")[0] == {"unet": {2.0}, "text_encoder": {2.0}, "text_encoder_2": {2.0}}
    assert scales("peft_bare")[0] == {"unet": {1.0}, "text_encoder": {1.0}, "text_encoder_2": {1.0}}
    got, lora = scales("attn_processor")
    assert got == {"unet": {1.0}} and lora.layouts == ["attn_processor"] and len(lora) == 136
    got, lora = scales("diffusers_legacy")
    assert got == {"unet": {1.0}, "text_encoder_2": {1.0}} and lora.layouts == ["diffusers_legacy"] and len(lora) == 74


def test_kohya_names_of_the_real_sdxl():
    """sd-scripts' SDXL key names (sgm blocks) and the diffusers-named ones resolve onto the SDXL UNet and encoders."""
    sdxl = preset_configs("sdxl")
    names = Names.of(sdxl, model_shapes(sdxl, ("unet", "text_encoder", "text_encoder_2")))
    unet = {
        "input_blocks_4_1_transformer_blocks_0_attn1_to_k": "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k",
        "input_blocks_7_1_transformer_blocks_3_attn2_to_out_0": "down_blocks.2.attentions.0.transformer_blocks.3.attn2.to_out.0",
        "middle_block_1_transformer_blocks_9_ff_net_0_proj": "mid_block.attentions.0.transformer_blocks.9.ff.net.0.proj",
        "output_blocks_5_1_proj_out": "up_blocks.1.attentions.2.proj_out",
        "input_blocks_1_0_in_layers_2": "down_blocks.0.resnets.0.conv1",
        "input_blocks_1_0_emb_layers_1": "down_blocks.0.resnets.0.time_emb_proj",
        "input_blocks_4_0_skip_connection": "down_blocks.1.resnets.0.conv_shortcut",
        "input_blocks_3_0_op": "down_blocks.0.downsamplers.0.conv",
        "output_blocks_2_2_conv": "up_blocks.0.upsamplers.0.conv",
        "output_blocks_8_0_out_layers_3": "up_blocks.2.resnets.2.conv2",
        "middle_block_2_in_layers_2": "mid_block.resnets.1.conv1",
        "label_emb_0_0": "add_embedding.linear_1",
        "out_2": "conv_out",
        "up_blocks_0_attentions_1_transformer_blocks_2_attn1_to_v": "up_blocks.0.attentions.1.transformer_blocks.2.attn1.to_v",
    }
    assert {k: names.kohya["unet"].get(k) for k in unet} == unet
    assert len(names.kohya["unet"]) == 2 * len(names.modules["unet"])  # every module under both spellings
    te2 = names.kohya["text_encoder_2"]["text_model_encoder_layers_31_mlp_fc2"]
    assert te2 == "text_model.encoder.layers.31.mlp.fc2"


def test_fingerprint_and_record_cover_the_loras():
    base = load_sdxl(TINY_SDXL)
    one = load_sdxl(TINY_SDXL, loras=_loras("peft"))
    other_scale = load_sdxl(TINY_SDXL, loras=[(LORA / "peft.safetensors", 0.5)])
    assert len({base.fingerprint, one.fingerprint, other_scale.fingerprint}) == 3
    assert base.loras == [] and one.loras[0]["scale"] == 1.0 and one.loras[0]["layouts"] == ["peft"]
    assert one.loras[0]["path"].endswith("peft.safetensors") and len(one.loras[0]["fingerprint"]) == 16


def test_fusing_reads_one_tensor_at_a_time():
    """fuse() reads nothing; reading a fused weight reads that base tensor and its own LoRA pair, and nothing else."""
    from mindone_story.weights.layouts import read_sdxl
    from mindone_story.weights.lora import fuse

    class Counting(dict):
        def __init__(self, source):
            super().__init__()
            self.source, self.reads = source, []

        def __getitem__(self, key):
            self.reads.append(key)
            return self.source[key]

        def shape(self, key):
            return self.source.shape(key)

        def dtype(self, key):
            return self.source.dtype(key)

        def __iter__(self):
            return iter(self.source)

    checkpoint = read_sdxl(TINY_SDXL)
    lora = read_lora(LORA / "peft.safetensors", checkpoint.configs, SHAPES)
    lora._source = Counting(lora._source)
    base = Counting(checkpoint["unet"])
    fused = fuse({**checkpoint, "unet": base}, [(lora, 0.5)])
    assert base.reads == [] and lora._source.reads == []
    name = Q + ".weight"
    module = lora.modules["unet"][name]
    value = fused["unet"][name]
    assert base.reads == [name] and lora._source.reads == [module.up, module.down]
    expected = checkpoint["unet"][name] + 0.5 * module.scale * (
        np.asarray(lora._source.source[module.up], np.float32)
        @ np.asarray(lora._source.source[module.down], np.float32)
    )
    assert rel_err(value, expected) < 1e-6
    fused["unet"]["conv_in.weight"]  # a layer the LoRA leaves alone: read as it is
    assert lora._source.reads == [module.up, module.down]


# -- bad LoRA files --------------------------------------------------------------------------------------------------


def _file(tmp_path, tensors: dict[str, tuple[int, ...]]) -> Path:
    path = tmp_path / "lora.safetensors"
    save_safetensors({k: np.zeros(s, np.float16) for k, s in tensors.items()}, path)
    return path


def _kohya(module: str, down: tuple[int, ...], up: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    name = "lora_unet_" + module.replace(".", "_")
    return {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": ()}


BAD = {
    "unknown layer": (
        {**_kohya(Q, (4, 64), (64, 4)), **_kohya("down_blocks.7.attentions.0.proj_in", (4, 64), (64, 4))},
        "keys that fit no layer of the SDXL model (3): lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight",
    ),
    "wrong rank": (
        _kohya(Q, (4, 64), (64, 3)),
        "shape mismatches (1): lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight: "
        "up [64, 3] does not give [64, 4]",
    ),
    "wrong input": (
        {"unet." + Q + ".lora_A.weight": (4, 32), "unet." + Q + ".lora_B.weight": (64, 4)},
        f"down [4, 32] does not take the input [64] of unet.{Q}.weight [64, 64]",
    ),
    "missing half": ({"unet." + Q + ".lora_A.weight": (4, 64)}, "LoRA pairs with a missing half (1)"),
    "sd15 unet": (
        _kohya(K2, (4, 768), (64, 4)),
        "(made for Stable Diffusion 1.x; this UNet's cross-attention context is 96)",
    ),
    "sd15 text encoder": (
        {"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": (4, 768)},
        "a LoRA for Stable Diffusion 1.x / 2.x (one text encoder; SDXL's are lora_te1_ and lora_te2_): keys (1)",
    ),
    "loha": ({"lora_unet_" + Q.replace(".", "_") + ".hada_w1_a": (64, 4)}, "LyCORIS LoHa / LoKr"),
    "full model": ({"conv_in.weight": (32, 4, 3, 3)}, "keys that fit no layer of the SDXL model (1): conv_in.weight"),
}


@pytest.mark.parametrize("what", list(BAD))
def test_bad_lora_is_a_one_line_error(tmp_path, what):
    tensors, message = BAD[what]
    with pytest.raises(LoRAError) as err:
        read_lora(_file(tmp_path, tensors), CONFIGS, SHAPES)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_bad_lora_fails_before_any_weight_loads(tmp_path, monkeypatch):
    import mindone_story.pretrained as P

    loaded = []
    monkeypatch.setattr(P, "load_component", lambda *a, **k: loaded.append(a[0]))
    path = _file(tmp_path, _kohya(Q, (4, 64), (64, 3)))
    with pytest.raises(LoRAError, match="shape mismatches"):
        load_sdxl(TINY_SDXL, loras=[(LORA / "peft.safetensors", 1.0), (path, 1.0)])
    with pytest.raises(WeightFileError, match="LoRA file not found"):
        load_sdxl(TINY_SDXL, loras=[(tmp_path / "none.safetensors", 1.0)])
    assert loaded == []


# -- the CLI -------------------------------------------------------------------------------------------------------
def test_cli_lora_flag_is_recorded(tmp_path, capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "story_diffusion"))
    import frontend
    import run as story_cli

    assert frontend.check_loras([frontend.lora_arg(f"{LORA / 'peft.safetensors'}:0.5")]) == [
        (str(LORA / "peft.safetensors"), 0.5)
    ]
    assert frontend.lora_arg("C:/x.safetensors") == ("C:/x.safetensors", "1.0")
    story = tmp_path / "story.txt"
    story.write_text("wakes up\nhas breakfast\n")
    argv = ["--sd_model_name", "tiny", "--height", "64", "--width", "64", "--sampling_steps", "1", "--id_length", "1"]
    argv += ["--story", str(story), "--mode", "pynative", "--output_dir", str(tmp_path / "out")]
    argv += ["--lora", f"{LORA / 'kohya_sgm.safetensors'}:0.5", "--lora", str(LORA / "peft.safetensors")]
    assert story_cli.main(argv) == 0
    record = json.loads((tmp_path / "out" / "story.json").read_text())
    assert [(Path(r["path"]).name, r["scale"]) for r in record["models"]["loras"]] == [
        ("kohya_sgm.safetensors", 0.5),
        ("peft.safetensors", 1.0),
    ]
    capsys.readouterr()
    assert story_cli.main(argv[:-1] + [str(tmp_path / "missing.safetensors"), "--overwrite"]) == 2
    assert "error: LoRA file not found" in capsys.readouterr().err
    assert story_cli.main(argv[:-1] + [f"{LORA / 'peft.safetensors'}:nan", "--overwrite"]) == 2
    assert "must be a finite number" in capsys.readouterr().err
