"""Checkpoints by name from a hub of our own on 127.0.0.1 (tests/fake_hub.py): the CLIs download, load and run; only
the files the loaders read are fetched; a second run asks nothing; a cut-short download resumes to the same bytes;
the failures are one-line messages naming the repository, the file and the remedy. No other host is reachable:
every other request goes to a closed proxy port."""

from __future__ import annotations

import errno
import json
import sys
import time
from pathlib import Path

import pytest
from fake_hub import FakeHub, tiny_repositories
from huggingface_hub import file_download

from mindone_story import hub
from mindone_story.hub import HubError, HubReference, parse_reference, resolve, select_files
from mindone_story.pretrained import load_ip_adapter_models, tiny_model_dir
from mindone_story.weights import read_sdxl

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "story_diffusion"))
import run as story_cli  # noqa: E402
import run_story_adapter  # noqa: E402

REALVIS = "SG161222/RealVisXL_V4.0"
ADAPTER = "h94/IP-Adapter"
FAST = ["--sampling_steps", "1", "--height", "64", "--width", "64", "--id_length", "1", "--mode", "pynative"]


@pytest.fixture(scope="module")
def repos(tmp_path_factory):
    return tiny_repositories(tiny_model_dir(), tmp_path_factory.mktemp("fp16"))


@pytest.fixture
def fake(repos, monkeypatch):
    """The fake hub as HF_ENDPOINT, downloads on (conftest turns them off for every other test), proxies closed."""
    from huggingface_hub.utils import reset_sessions

    with FakeHub(repos, gated={"gated/tiny": "secret"}) as server:
        fake_env(monkeypatch, server)
        reset_sessions()
        yield server
    reset_sessions()


def fake_env(monkeypatch, server: FakeHub) -> None:
    from huggingface_hub import constants

    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    for proxy in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.setenv(proxy, "http://127.0.0.1:9")  # the discard port: nothing listens
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def pipeline_files(repos, fp16: bool = False) -> set[str]:
    """What an SDXL pipeline download must fetch: configs, tokenizers, scheduler and one weight file each."""
    plain = {n for n in repos[REALVIS] if n.startswith(("tokenizer/", "tokenizer_2/", "scheduler/"))}
    plain |= {"model_index.json"} | {f"{c}/config.json" for c in ("unet", "vae", "text_encoder", "text_encoder_2")}
    v = ".fp16" if fp16 else ""
    weights = {f"{c}/diffusion_pytorch_model{v}.safetensors" for c in ("unet", "vae")}
    weights |= {f"{c}/model{v}.safetensors" for c in ("text_encoder", "text_encoder_2")}
    return {f"{REALVIS}/{n}" for n in plain | weights}


def test_cli_by_name_downloads_loads_runs_and_second_run_asks_nothing(fake, repos, tmp_path):
    story = tmp_path / "story.txt"
    story.write_text("wakes up\nhas breakfast\n")
    argv = ["--sd_model_name", "RealVision", "--cache_dir", str(tmp_path / "cache"), "--story", str(story), *FAST]
    assert story_cli.main([*argv, "--output_dir", str(tmp_path / "a")]) == 0
    assert fake.files_requested() == pipeline_files(repos)  # no .bin, fp16, flax, onnx, root single file
    assert len(list((tmp_path / "a").glob("panel_*.png"))) == 2
    assert (tmp_path / "cache" / "models--SG161222--RealVisXL_V4.0" / "refs" / "main").read_text() == fake.sha[REALVIS]
    fake.log.clear()
    assert story_cli.main([*argv, "--output_dir", str(tmp_path / "b")]) == 0
    assert fake.log == []  # from the cache, without a single request
    assert (tmp_path / "a" / "panel_001.png").read_bytes() == (tmp_path / "b" / "panel_001.png").read_bytes()


def test_cli_local_files_only_with_an_empty_cache_fails_clearly(fake, tmp_path, capsys):
    argv = ["--sd_model_name", "RealVision", "--cache_dir", str(tmp_path / "empty"), "--local_files_only", *FAST]
    assert story_cli.main([*argv, "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"error: {REALVIS}: not (completely) in the cache {tmp_path / 'empty'}" in err
    assert "local files only" in err and fake.log == [] and not (tmp_path / "out").exists()


def test_story_adapter_cli_takes_hub_references(fake, repos, tmp_path, capsys):
    argv = [
        "--base_model_path", REALVIS,
        "--image_encoder_path", f"{ADAPTER}/sdxl_models/image_encoder",
        "--ip_ckpt", f"{ADAPTER}/sdxl_models/ip-adapter_sdxl.safetensors",
        "--cache_dir", str(tmp_path / "cache"), "--output_dir", str(tmp_path / "out"),
        "--story", "a fox wakes up", "a fox runs", "--rounds", "1", "--steps", "1", "--height", "64", "--width", "64",
        "--seed", "1", "--mode", "pynative", "--no_progress",
    ]  # fmt: skip
    assert run_story_adapter.main(argv) == 0, capsys.readouterr().err
    adapter = {f"{ADAPTER}/sdxl_models/{n}" for n in ("image_encoder/config.json", "image_encoder/model.safetensors")}
    adapter.add(f"{ADAPTER}/sdxl_models/ip-adapter_sdxl.safetensors")
    assert fake.files_requested() == pipeline_files(repos) | adapter
    record = json.loads((tmp_path / "out" / "story.json").read_text())
    assert record["models"]["ip_ckpt"] == f"{ADAPTER}/sdxl_models/ip-adapter_sdxl.safetensors"  # resumable by ref
    assert len(list((tmp_path / "out" / "round_01").glob("panel_*.png"))) == 2


def test_demo_downloads_the_chosen_model_with_progress_in_the_page(fake, repos, tmp_path):
    from app_server import serve_app
    from gradio_client import Client

    fake.slow[f"{REALVIS}/unet/diffusion_pytorch_model.safetensors"] = 3.0  # long enough to see the bar
    with serve_app(tmp_path, "--cache_dir", str(tmp_path / "cache"), "--mode", "pynative") as url:
        client = Client(url, verbose=False, download_files=str(tmp_path / "downloads"))
        form = {"model_name": "RealVision", "model_path": "", "characters": "[Bob] a man", "style": "Comic book"}
        form |= {"story_text": "[Bob] wakes up\n[Bob] runs\n", "id_length": 1, "sa32": 0.5, "sa64": 0.5, "steps": 1}
        form |= {"guidance": 5.0, "height": 64, "width": 64, "seed": 1, "typesetting": "Four Pannel", "font_size": 8}
        job, seen = client.submit(**form, api_name="/story_diffusion"), set()
        while not job.done():
            seen |= {u.desc for u in job.status().progress_data or [] if u.desc}
            time.sleep(0.05)
        gallery = job.result()[0]
    assert len(gallery) == 2 and fake.files_requested() == pipeline_files(repos)
    assert any(d.startswith("Fetching") for d in seen), seen  # huggingface_hub's bar ("Fetching 18 files") in the page


def test_fp16_run_fetches_the_fp16_variant_and_the_loader_reads_it(fake, repos, tmp_path):
    folder = resolve(REALVIS, tmp_path, fp16=True)
    assert fake.files_requested() == pipeline_files(repos, fp16=True)
    assert sorted(f.name for f in read_sdxl(folder).files) == [
        "diffusion_pytorch_model.fp16.safetensors",
        "diffusion_pytorch_model.fp16.safetensors",
        "model.fp16.safetensors",
        "model.fp16.safetensors",
    ]
    encoder = resolve(f"{ADAPTER}/sdxl_models/image_encoder", tmp_path)
    ip = resolve(f"{ADAPTER}/sdxl_models/ip-adapter_sdxl.safetensors", tmp_path)
    load_ip_adapter_models(ip, encoder, read_sdxl(folder).configs["unet"])  # a real, strict load
    fake.log.clear()
    assert resolve(f"{ADAPTER}/sdxl_models/image_encoder", tmp_path) == encoder and fake.log == []


def test_a_cut_short_download_resumes_to_identical_bytes(fake, repos, tmp_path):
    name = "unet/diffusion_pytorch_model.safetensors"
    data = repos[REALVIS][name]
    fake.cut[f"{REALVIS}/{name}"] = len(data) // 2
    with pytest.raises(HubError) as err:
        resolve(REALVIS, tmp_path)
    assert f"{REALVIS}: the download was cut short" in str(err.value) and name in str(err.value)
    assert "run again to resume" in str(err.value)
    blobs = tmp_path / "models--SG161222--RealVisXL_V4.0" / "blobs"
    (partial,) = [p.stat().st_size for p in blobs.glob("*.incomplete")]  # whole 10 MB chunks of what was sent
    assert 0 < partial <= len(data) // 2
    with pytest.raises(HubError, match="not \\(completely\\) in the cache"):  # the partial file is not taken as done
        resolve(REALVIS, tmp_path, local_files_only=True)
    fake.log.clear()
    folder = resolve(REALVIS, tmp_path)
    assert (folder / name).read_bytes() == data
    gets = [r for m, p, r in fake.log if m == "GET" and p.endswith(name)]
    assert gets == [f"bytes={partial}-"]  # resumed where it stopped, not restarted
    assert fake.files_requested() == {f"{REALVIS}/{name}"}  # the finished files were not fetched again
    assert not list(blobs.glob("*.incomplete"))


@pytest.mark.parametrize(
    "reference, message",
    [
        ("nobody/nothing", "nobody/nothing: no such repository on {url} (for a private one set HF_TOKEN)"),
        (f"{REALVIS}/unet/nope.safetensors", f"{REALVIS}: no file or folder unet/nope.safetensors in it"),
        (f"{REALVIS}@v9", f"{REALVIS}: no revision 'v9' on {{url}}"),
        ("gated/tiny", "gated/tiny is gated: accept its conditions at {url}/gated/tiny and set HF_TOKEN"),
    ],
)
def test_hub_errors_name_the_repository_the_file_and_the_remedy(fake, tmp_path, reference, message):
    with pytest.raises(HubError) as err:
        resolve(reference, tmp_path)
    assert message.format(url=fake.url) in str(err.value) and "\n" not in str(err.value)


def test_gated_repository_with_its_token(fake, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "secret")
    assert (resolve("gated/tiny", tmp_path) / "unet" / "config.json").is_file()


def test_no_network_offline_and_full_disk(fake, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubError, match="downloads are off \\(HF_HUB_OFFLINE is set\\)"):
        resolve(REALVIS, tmp_path)
    assert fake.log == []
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(hub, "_free_bytes", lambda folder: 1000)
    with pytest.raises(HubError, match=f"{REALVIS}: no space left in {tmp_path} .* free some space"):
        resolve(REALVIS, tmp_path)
    monkeypatch.undo()  # the real free space, and the fixture's environment back
    fake_env(monkeypatch, fake)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(file_download, "http_get", disk_full)  # the disk fills up while writing
    with pytest.raises(HubError, match=f"{REALVIS}: no space left in {tmp_path} .* free some space"):
        resolve(REALVIS, tmp_path)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(HubError, match="the download from http://127.0.0.1:9 failed \\(ConnectionError\\)"):
        resolve(REALVIS, tmp_path)


def test_reference_syntax_a_local_path_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse_reference("h94/IP-Adapter@v2/sdxl_models/image_encoder") == HubReference(
        "h94/IP-Adapter", "v2", "sdxl_models/image_encoder"
    )
    assert parse_reference(REALVIS) == HubReference(REALVIS)
    (tmp_path / "SG161222" / "RealVisXL_V4.0").mkdir(parents=True)
    assert parse_reference(REALVIS) is None  # it exists here: a local folder
    for local in ("/models/x", "./a/b", "~/a/b", "plainname", "a/b/", "a--b/c"):
        assert parse_reference(local) is None, local
    with pytest.raises(HubError, match="plainname does not exist"):
        resolve("plainname", tmp_path)


def test_select_files_on_a_real_sdxl_listing():
    # stabilityai/stable-diffusion-xl-base-1.0's layout, with a sharded fp16 UNet added
    listing = ["model_index.json", "sd_xl_base_1.0.safetensors", "vae_1_0/diffusion_pytorch_model.safetensors"]
    listing += ["scheduler/scheduler_config.json", "tokenizer/vocab.json", "tokenizer/merges.txt"]
    listing += ["unet/config.json", "unet/diffusion_pytorch_model.safetensors", "unet/model.onnx"]
    listing += ["unet/diffusion_pytorch_model.safetensors.index.fp16.json", "unet/openvino_model.xml"]
    listing += [f"unet/diffusion_pytorch_model.fp16-0000{i}-of-00002.safetensors" for i in (1, 2)]
    listing += ["text_encoder/config.json", "text_encoder/model.safetensors", "text_encoder/model.fp16.safetensors"]
    listing += ["text_encoder/flax_model.msgpack", "text_encoder/pytorch_model.bin", "text_encoder/openvino_model.bin"]
    listing += ["vae/config.json", "vae/diffusion_pytorch_model.bin"]  # no safetensors: the .bin is the weights
    common = ["model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json"]
    common += ["tokenizer/merges.txt", "tokenizer/vocab.json", "unet/config.json"]
    common += ["vae/config.json", "vae/diffusion_pytorch_model.bin"]
    assert select_files(listing) == sorted(
        common + ["text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors"]
    )
    fp16 = ["text_encoder/model.fp16.safetensors", "unet/diffusion_pytorch_model.safetensors.index.fp16.json"]
    fp16 += [f"unet/diffusion_pytorch_model.fp16-0000{i}-of-00002.safetensors" for i in (1, 2)]
    assert select_files(listing, fp16=True) == sorted(common + fp16)
    assert select_files(listing, "text_encoder") == ["text_encoder/config.json", "text_encoder/model.safetensors"]
    assert select_files(listing, "unet/model.onnx") == ["unet/model.onnx"]  # a file named is a file fetched
