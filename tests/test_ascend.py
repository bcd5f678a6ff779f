"""The Ascend path, checked on CPU: device defaults, the Ascend-only calls against the installed MindSpore's
signatures, the emulated backend's kernel contracts, and whole tiny runs of both methods in fp16 on the emulated
Ascend backend against CPU fp32, in PyNative and graph mode.

Tolerances: one layer in fp16 (fp32 accumulation) against fp32, relative error max|a - b| / max|b| < 5e-3; whole
runs (final latents of every panel) < 1.5e-2, mindone's fp16 threshold. Measured figures are in the README.
"""

from __future__ import annotations

import inspect
import json
import math

import mindspore as ms
import numpy as np
import pytest
from conftest import rel_err
from mindspore import Tensor
from PIL import Image

from mindone_story import check, emulated_ascend, layers

MODES = ["pynative", "graph"]
LAYER_TOL = 5e-3
RUN_TOL = check.TOLERANCE  # 1.5e-2


@pytest.fixture
def device():
    """``device(name)`` switches the backend for cells built afterwards; the previous one comes back after."""
    before = layers._backend

    def choose(name: str, attention: str | None = None):
        return layers.set_device(name, attention)

    yield choose
    layers._backend = before
    ms.set_context(device_target="CPU")


def _run(fn, mode):
    return ms.jit(fn) if mode == "graph" else fn


# -- 5. the Ascend-only calls exist in the installed MindSpore and take the keywords the library passes ------------
@pytest.mark.parametrize("name", sorted(layers.ASCEND_CALLS))
def test_ascend_calls_match_the_installed_mindspore(name):
    """The cells call each Ascend-only function with keywords only, and under the emulation those keywords must be
    parameters of the emulated function (keyword-only: any other call fails in the whole-run tests below). So the
    keywords the library passes are the emulated signature's, and each must exist in MindSpore's signature."""
    real = inspect.signature(layers.ASCEND_CALLS[name]).parameters
    emulated = inspect.signature(getattr(emulated_ascend, name)).parameters
    assert all(p.kind == p.KEYWORD_ONLY for p in emulated.values())
    missing = [k for k in emulated if k not in real]
    assert not missing, f"{name}: MindSpore {ms.__version__} has no parameter(s) {missing}"
    for k, p in emulated.items():  # defaults the emulation relies on are MindSpore's own
        if p.default is not p.empty:
            assert real[k].default == p.default, f"{name}: default of {k} is {real[k].default}, not {p.default}"


# -- 1. dtypes that fit the device -----------------------------------------------------------------------------------
def test_default_dtype_is_fp16_on_ascend_and_fp32_on_cpu(monkeypatch):
    monkeypatch.setattr(layers, "_backend", layers.Backend("Ascend", "flash"))
    assert layers.compute_dtype() == ms.float16  # fails if the default on Ascend is ever fp32 again
    monkeypatch.setattr(layers, "_backend", layers.Backend("Ascend-emulated", "flash"))
    assert layers.compute_dtype() == ms.float16
    monkeypatch.setattr(layers, "_backend", layers.Backend("CPU", "math"))
    assert layers.compute_dtype() == ms.float32


def test_loaders_take_the_device_default(device):
    from mindone_story.pretrained import TINY_IP_ADAPTER, load_ip_adapter_models, load_sdxl, tiny_model_dir

    device("Ascend-emulated")
    root = tiny_model_dir()
    models = load_sdxl(root)
    ip = load_ip_adapter_models(root / "ip_adapter" / TINY_IP_ADAPTER, root / "image_encoder", models.unet.config)
    dtypes = {
        "unet": models.unet.conv_in.weight.dtype,
        "text_encoder": models.text_encoder.text_model.final_layer_norm.weight.dtype,
        "text_encoder_2": models.text_encoder_2.text_model.final_layer_norm.weight.dtype,
        "image_encoder": next(iter(ip.image_encoder.get_parameters())).dtype,
        "ip_adapter": next(iter(ip.ip_adapter.get_parameters())).dtype,
        "vae": models.vae.decoder.conv_in.weight.dtype,
    }
    assert dtypes == {**dict.fromkeys(dtypes, ms.float16), "vae": ms.float32}


@pytest.mark.parametrize(
    "name,attention,dtype,message",
    [
        ("CPU", None, ms.bfloat16, "bf16 has no MindSpore CPU kernels: on CPU use fp32"),
        ("Ascend-emulated", "flash", ms.float32, "takes fp16 or bf16, not fp32: on Ascend-emulated use fp16"),
    ],
)
def test_a_dtype_the_device_cannot_run_is_a_clear_error(device, name, attention, dtype, message):
    from mindone_story.pretrained import load_sdxl, tiny_model_dir

    device(name, attention)
    with pytest.raises(layers.DeviceDtypeError, match=message):
        load_sdxl(tiny_model_dir(), dtype)


def test_fp32_runs_on_the_emulated_ascend_with_the_math_attention(device):
    device("Ascend-emulated", "math")
    assert layers.compute_dtype(ms.float32) == ms.float32
    with pytest.raises(ValueError, match="FlashAttentionScore runs only on Ascend"):
        device("CPU", "flash")


# -- 3. each emulated kernel: fp16 against fp32 CPU, and its contract ----------------------------------------------
def _pair(device, make, *inputs, dtype=ms.float16):
    """The same cell (same weights) on CPU fp32 and on the emulated Ascend in ``dtype``."""
    device("CPU")
    ref = make()
    device("Ascend-emulated")
    emu = make()
    rng = np.random.default_rng(0)
    for p, q in zip(ref.get_parameters(), emu.get_parameters()):
        value = (rng.standard_normal(p.shape) * (0.3 if p.ndim > 1 else 1.0)).astype(np.float32)
        p.set_data(Tensor(value))
        q.set_dtype(dtype)
        q.set_data(Tensor(value).astype(dtype))
    return ref, emu, [Tensor(x) for x in inputs], [Tensor(x).astype(dtype) for x in inputs]


def _cells():
    g = np.random.default_rng(1)
    x4 = g.standard_normal((2, 8, 10, 12)).astype(np.float32)
    tokens = g.standard_normal((2, 7, 32)).astype(np.float32)
    return {
        "linear": (lambda: layers.Linear(32, 16), [tokens]),
        "conv2d": (lambda: layers.Conv2d(8, 6, 3, padding=1), [x4]),
        "conv2d+pad": (lambda: layers.Conv2d(8, 6, 3, stride=2, padding=(0, 1, 0, 1)), [x4]),  # the VAE's
        "group_norm": (lambda: layers.GroupNorm(4, 8, eps=1e-6, silu=True), [x4]),
        "layer_norm": (lambda: layers.LayerNorm(32), [tokens]),
    }


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(_cells()))
def test_emulated_layers_match_cpu_fp32(device, mode, name):
    make, inputs = _cells()[name]
    ref, emu, ref_in, emu_in = _pair(device, make, *inputs)
    assert emu.impl.__name__ == "_ascend" and ref.impl.__name__ != "_ascend"
    out = _run(emu.construct, mode)(*emu_in)
    assert out.dtype == ms.float16
    assert rel_err(out.astype(ms.float32).asnumpy(), ref(*ref_in).asnumpy()) < LAYER_TOL


# MindSpore 2.10's CPU kernels lack bf16 for SiLU, GELU, Sigmoid, Gather, Tile, BatchMatMul, Softmax, Less, Cos/Sin,
# Exp, ReduceMean, Square, Rsqrt, BiasAdd and Clamp (probed in PyNative), so no whole bf16 run goes past the first
# embedding on CPU; the emulated Ascend-only calls compute in fp32 and take bf16.
@pytest.mark.parametrize("name", ["linear", "conv2d", "conv2d+pad", "layer_norm"])
def test_emulated_kernels_take_bf16(device, name):
    make, inputs = _cells()[name]
    ref, emu, ref_in, emu_in = _pair(device, make, *inputs, dtype=ms.bfloat16)
    out = emu(*emu_in)
    assert out.dtype == ms.bfloat16
    assert rel_err(out.astype(ms.float32).asnumpy(), ref(*ref_in).asnumpy()) < 3e-2  # bf16 keeps 8 mantissa bits


def _consistent_mask(batch, keys, drop_every=3):
    """Our additive mask as consistent attention builds it: [B, 1, 1, Sk], NEG on dropped keys."""
    valid = np.zeros((batch, 1, 1, keys), np.float32)
    valid[:, :, :, ::drop_every] = -1e9
    valid[1, :, :, 1::2] = -1e9  # rows differ per image
    return valid


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("mask", ["none", "consistent", "causal"])
def test_emulated_flash_attention_matches_the_math_path(device, mode, mask):
    """FlashAttentionScore (mask converted to the kernel's boolean 1 = drop, at its smallest shape) against the math
    path in fp32; the kernel would silently compute garbage if 1 meant keep, so this also pins the mask meaning."""
    g = np.random.default_rng(2)
    b, h, s, d = 2, 2, 6, 16
    q, k, v = (g.standard_normal((b, h, s, d)).astype(np.float32) for _ in range(3))
    m = {"none": None, "consistent": _consistent_mask(b, s), "causal": np.triu(np.full((s, s), -1e9, np.float32), 1)}
    mask = m[mask]
    device("Ascend-emulated")
    flash = layers.attention_kernel()
    assert isinstance(flash, layers.FlashAttention)
    args = [Tensor(a).astype(ms.float16) for a in (q, k, v)] + ([] if mask is None else [Tensor(mask)])
    out = _run(flash.construct, mode)(*args).astype(ms.float32).asnumpy()
    ref = layers.MathAttention()(*[Tensor(a) for a in (q, k, v)], None if mask is None else Tensor(mask)).asnumpy()
    assert rel_err(out, ref) < LAYER_TOL
    if mask is not None:  # the mask matters
        assert rel_err(layers.MathAttention()(*[Tensor(a) for a in (q, k, v)]).asnumpy(), ref) > 0.05


def test_flash_attention_passes_the_smallest_mask(device, monkeypatch):
    """[B, 1, 1, Sk] additive -> [B, 1, Sq, Sk] boolean, never [B, H, Sq, Sk]; a 2-D mask stays [Sq, Sk]."""
    seen, kernel = [], emulated_ascend.flash_attention_score

    def spy(**kw):
        seen.append((kw["attn_mask"].shape, kw["attn_mask"].dtype))
        return kernel(**kw)

    monkeypatch.setattr(emulated_ascend, "flash_attention_score", spy)
    device("Ascend-emulated")
    flash = layers.attention_kernel()
    q = Tensor(np.ones((2, 4, 6, 16), np.float16))
    k = Tensor(np.ones((2, 4, 9, 16), np.float16))
    flash(q, k, k, Tensor(_consistent_mask(2, 9)))
    flash(q, q, q, Tensor(np.zeros((6, 6), np.float32)))
    assert seen == [((2, 1, 6, 9), ms.uint8), ((6, 6), ms.uint8)]


def test_flash_falls_back_where_the_kernel_cannot_run(device):
    """fp32 (the VAE) and head sizes that are not multiples of 16 (CLIP ViT-bigG's 104, the tiny text encoder's 8)
    take the math path: the emulated kernel would refuse them."""
    device("Ascend-emulated")
    flash = layers.attention_kernel()
    for shape, dtype in (((1, 1, 4, 64), ms.float32), ((1, 2, 4, 8), ms.float16), ((1, 2, 4, 104), ms.float16)):
        x = Tensor(np.ones(shape, np.float32)).astype(dtype)
        assert flash(x, x, x).shape == shape


def _fa(**changes):
    q = Tensor(np.ones((2, 2, 4, 16), np.float16))
    kw = dict(query=q, key=q, value=q, head_num=2, attn_mask=None, scalar_value=0.25, input_layout="BNSD")
    return lambda: emulated_ascend.flash_attention_score(**{**kw, **changes})


VIOLATIONS = {
    "fa fp32": (_fa(query=Tensor(np.ones((2, 2, 4, 16), np.float32))), "flash_attention_score: query", "float16"),
    "fa head size": (
        _fa(**dict.fromkeys(("query", "key", "value"), Tensor(np.ones((2, 2, 4, 8), np.float16)))),
        "flash_attention_score: query",
        "multiple of 16",
    ),
    "fa head_num": (_fa(head_num=4), "head_num", "number of query heads"),
    "fa layout": (_fa(input_layout="BSH"), "input_layout", "BNSD"),
    "fa mask dtype": (_fa(attn_mask=Tensor(np.zeros((4, 4), np.float16))), "attn_mask", "bool or uint8"),
    "fa mask shape": (_fa(attn_mask=Tensor(np.zeros((2, 2, 1, 4), np.uint8))), "attn_mask", "(B, 1, S1, S2)"),
    "fa keep_prob": (_fa(keep_prob=0.0), "keep_prob", "in (0, 1]"),
    "fa sparse_mode": (_fa(sparse_mode=2), "sparse_mode", "0 or 1"),
    "fa band": (_fa(pre_tokens=2), "pre_tokens/next_tokens", "band covering"),
    "linear dtype": (
        lambda: emulated_ascend.linear(
            input=Tensor(np.ones((2, 3), np.float16)), weight=Tensor(np.ones((4, 3), np.float32)), bias=None
        ),
        "linear: weight",
        "the dtype of input",
    ),
    "conv2d padding": (
        lambda: emulated_ascend.conv2d(
            input=Tensor(np.ones((1, 2, 5, 5), np.float16)),
            weight=Tensor(np.ones((3, 2, 3, 3), np.float16)),
            bias=None,
            stride=2,
            padding=(0, 1, 0, 1),
        ),
        "conv2d: padding",
        "an int >= 0",
    ),
    "pad mode": (
        lambda: emulated_ascend.pad(input=Tensor(np.ones((1, 1, 2, 2))), pad=(0, 1), mode="reflect", value=None),
        "pad: mode",
        "constant",
    ),
    "group_norm groups": (
        lambda: emulated_ascend.group_norm(
            input=Tensor(np.ones((1, 6, 2, 2), np.float16)),
            num_groups=4,
            weight=Tensor(np.ones(6, np.float16)),
            bias=Tensor(np.ones(6, np.float16)),
            eps=1e-5,
        ),
        "group_norm: num_groups",
        "divisor of C",
    ),
    "layer_norm shape": (
        lambda: emulated_ascend.layer_norm(
            input=Tensor(np.ones((2, 8), np.float16)),
            normalized_shape=(8,),
            weight=Tensor(np.ones(6, np.float16)),
            bias=Tensor(np.ones(6, np.float16)),
            eps=1e-5,
        ),
        "layer_norm: weight",
        "shape normalized_shape",
    ),
}


@pytest.mark.parametrize("case", list(VIOLATIONS))
def test_a_violated_contract_names_op_argument_and_contract(case):
    call, where, contract = VIOLATIONS[case]
    with pytest.raises(ValueError, match=f"{where}.*{contract}".replace("(", r"\(").replace(")", r"\)")):
        call()


def test_contracts_are_checked_in_graph_mode(device):
    """Under ms.jit the checks fold at compile time: a fp16 input into fp32 weights fails the compile, naming it."""
    device("Ascend-emulated")
    lin = layers.Linear(3, 4)  # weights stay fp32
    with pytest.raises(
        ValueError, match="linear: weight violates the Ascend kernel's contract \\(the dtype of input\\)"
    ):
        ms.jit(lin.construct)(Tensor(np.ones((2, 3), np.float16)))


# -- 4. whole runs: fp16 on the emulated Ascend against fp32 on CPU ------------------------------------------------
def _calls(monkeypatch, mode) -> set[str]:
    """Record which emulated Ascend-only calls run (PyNative calls them every time; graph mode cannot parse the
    recording wrapper, so it records nothing there)."""
    called = set()
    if mode == "graph":
        return called
    for name in layers.ASCEND_CALLS:
        fn = getattr(emulated_ascend, name)

        def spy(_fn=fn, _name=name, **kw):
            called.add(_name)
            return _fn(**kw)

        monkeypatch.setattr(emulated_ascend, name, spy)
    return called


@pytest.fixture(scope="module")
def story_reference():
    return check.tiny_story_latents("pynative")  # CPU fp32 (graph and PyNative agree to 1e-6 on CPU)


def test_story_diffusion_fp16_on_emulated_ascend_matches_cpu_fp32_pynative(device, monkeypatch, capsys):
    """The check command Ascend users run first, here on the emulated backend: write phases (window 1, so the later
    window reads the bank), a read phase with both characters, consistent attention through FlashAttentionScore
    with the converted mask, fp16 from no dtype flag; its fp32 CPU reference runs in a child process."""
    called = _calls(monkeypatch, "pynative")
    assert check.main(["--device", "Ascend-emulated", "--mode", "pynative"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    print(line)
    assert line.startswith("PASS: tiny story on Ascend-emulated (Float16, flash attention, pynative)")
    assert called == set(layers.ASCEND_CALLS) - {"pad"}  # the decoder has no downsampling: pad is the encoder's


def test_story_diffusion_fp16_on_emulated_ascend_matches_cpu_fp32_graph(device, story_reference):
    device("Ascend-emulated")
    ours = check.tiny_story_latents("graph")
    assert len(ours) == len(story_reference) == 5  # two windows per character, then the read
    errors = check.rel_errors(ours, story_reference)
    print(f"story diffusion graph: fp16 emulated vs fp32 CPU, rel err per phase {np.round(errors, 5).tolist()}")
    assert max(errors) < RUN_TOL


def _story_adapter(mode, plus, folder):
    from mindone_story.pipelines.story_adapter import StoryAdapterPipeline, StoryAdapterSettings
    from mindone_story.pretrained import TINY_IP_ADAPTER, load_ip_adapter_models, load_sdxl, tiny_model_dir
    from mindone_story.runs.story_adapter import generate_story
    from mindone_story.weights import save_safetensors

    root = tiny_model_dir()
    ckpt = root / "ip_adapter" / TINY_IP_ADAPTER
    if plus:
        from mindone_story.pretrained import tiny_ip_adapter_weights

        ckpt = folder / "ip-adapter-plus_tiny.safetensors"
        save_safetensors(tiny_ip_adapter_weights(root, plus=True), ckpt)
    models = load_sdxl(root)
    ip = load_ip_adapter_models(ckpt, root / "image_encoder", models.unet.config)
    pipe = StoryAdapterPipeline(models, ip, mode=mode)
    latents = check.record_latents(pipe)
    prompts = ("a cat on a roof", "a dog in a park")[: ADAPTER_PANELS[plus]]
    settings = StoryAdapterSettings(prompts, rounds=2, steps=2, height=64, width=64, seed=7)
    generate_story(pipe, settings, folder / "run")
    return latents, json.loads((folder / "run" / "story.json").read_text())


# Emulated PyNative costs ~4x CPU PyNative per UNet call (each emulated call adds its fp32 casts), and a graph costs
# its compile: to keep the suite short, each IP-Adapter kind runs in one mode, so both kinds and both modes are
# covered (the StoryDiffusion runs above cover both modes with one model, and gave identical figures in both).
ADAPTER_CASES = [(False, "graph"), (True, "pynative")]
ADAPTER_PANELS = {False: 2, True: 1}  # panels per round: the compiled run pays per compile, PyNative per panel


@pytest.fixture(scope="module")
def adapter_reference(tmp_path_factory):
    return {plus: _story_adapter("pynative", plus, tmp_path_factory.mktemp("ref"))[0] for plus, _ in ADAPTER_CASES}


@pytest.mark.parametrize("plus,mode", ADAPTER_CASES, ids=["ip_adapter-graph", "ip_adapter_plus-pynative"])
def test_story_adapter_fp16_on_emulated_ascend_matches_cpu_fp32(
    device, monkeypatch, adapter_reference, tmp_path, mode, plus
):
    """Round 0 and two GRCA rounds: the reference images go through the image encoder (and, with ``plus``, the
    Resampler's attention) and the reference K/V path of every attn2 layer, all in fp16 on the emulated kernels."""
    called = _calls(monkeypatch, mode)
    device("Ascend-emulated")
    ours, record = _story_adapter(mode, plus, tmp_path)
    panels = ADAPTER_PANELS[plus]
    assert record["progress"]["done"] and len(ours) == 3 * panels
    errors = [rel_err(a, b) for a, b in zip(ours, adapter_reference[plus])]
    kind = "plus" if plus else "base"
    print(f"story adapter {kind} {mode}: fp16 emulated vs fp32 CPU, rel err per panel {np.round(errors, 5).tolist()}")
    assert max(errors) < RUN_TOL
    assert rel_err(ours[-1], ours[panels - 1]) > 1e-3  # GRCA rounds change the panel: the references reach the UNet
    if mode == "pynative":
        assert {"linear", "conv2d", "group_norm", "layer_norm", "flash_attention_score"} <= called


def test_vae_encoder_pads_asymmetrically_on_emulated_ascend(device):
    """The VAE encoder's stride-2 downsampling: (0, 1, 0, 1) through ``mint`` pad, then conv2d, against CPU fp32."""
    from mindone_story.pretrained import load_sdxl, tiny_model_dir

    image = np.asarray(Image.new("RGB", (64, 64), (90, 140, 200)), np.float32).transpose(2, 0, 1)[None] / 127.5 - 1
    image = image + 0.1 * np.random.default_rng(3).standard_normal(image.shape).astype(np.float32)
    out = {}
    for name in ("CPU", "Ascend-emulated"):
        device(name)
        vae = load_sdxl(tiny_model_dir()).vae
        out[name] = vae.encoder(Tensor(image)).asnumpy()
    assert math.isfinite(out["CPU"].sum())
    assert rel_err(out["Ascend-emulated"], out["CPU"]) < 1e-5  # the VAE is fp32 on both


# -- 7. the default run.py on the emulated Ascend runs in fp16 -----------------------------------------------------
def _story_cli():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "story_diffusion"))
    import run

    return run


def test_default_run_py_on_emulated_ascend_runs_in_fp16(device, monkeypatch, tmp_path):
    from mindone_story.pipelines import story_diffusion

    run = _story_cli()
    built = []

    class Spy(story_diffusion.StoryDiffusionPipeline):
        def __init__(self, models, mode, **kwargs):
            built.append((models.unet.conv_in.weight.dtype, models.vae.decoder.conv_in.weight.dtype))
            super().__init__(models, mode, **kwargs)

    monkeypatch.setattr(story_diffusion, "StoryDiffusionPipeline", Spy)  # run.py imports it when it runs
    (tmp_path / "story.txt").write_text("wakes up #morning\n")
    argv = ["--sd_model_name", "tiny", "--device", "Ascend-emulated", "--mode", "pynative", "--height", "64"]
    argv += ["--width", "64", "--sampling_steps", "1", "--id_length", "1", "--story", str(tmp_path / "story.txt")]
    assert run.main(argv + ["--output_dir", str(tmp_path / "out")]) == 0
    assert built == [(ms.float16, ms.float32)]
    assert layers.backend() == layers.Backend("Ascend-emulated", "flash")


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--device", "CPU", "--dtype", "bf16"], "bf16 has no MindSpore CPU kernels: on CPU use fp32"),
        (["--device", "Ascend-emulated", "--dtype", "fp32"], "FlashAttentionScore takes fp16 or bf16, not fp32"),
    ],
)
def test_run_py_refuses_a_dtype_the_device_cannot_run(device, capsys, tmp_path, flags, message):
    assert _story_cli().main(flags + ["--sd_model_name", "tiny", "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
