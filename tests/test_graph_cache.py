"""The on-disk cache of compiled graphs: its key changes with everything that shapes a graph and with nothing else,
a graph loaded from it computes what a compile computes, and a story run twice gives the same images."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mindspore as ms
import numpy as np
from conftest import TINY_SDXL
from mindspore import Tensor, nn, ops

from mindone_story import graph_cache

ROOT = Path(__file__).resolve().parents[1]


class Net(nn.Cell):
    def __init__(self, scale=1.0, n=3, keep_dims=False, offset=0.0):
        super().__init__()
        self.scale = scale
        self.offset = Tensor(np.full(n, offset, np.float32))  # a constant: its bytes are in the graph
        self.w = ms.Parameter(Tensor(np.ones(n, np.float32)), name="w")
        self.sum = ops.ReduceSum(keep_dims=keep_dims)
        self.dense = nn.Dense(n, n)

    def construct(self, x):
        return self.dense(x * self.scale + self.w + self.offset), self.sum(x)

    def other(self, x):
        return x * self.scale


class Holder(nn.Cell):
    """Holds a cell in a plain list, which MindSpore does not register as a sub-cell; construct still calls it."""

    def __init__(self, scale):
        super().__init__()
        self.held = [Net(scale=scale)]

    def construct(self, x):
        return self.held[0](x)


def x(n=3, dtype=np.float32):
    return Tensor(np.ones((1, n), dtype))


def test_the_key_names_everything_that_shapes_the_graph_and_nothing_else():
    base = graph_cache.key(Net().construct, (x(),))
    assert graph_cache.key(Net().construct, (x(),)) == base  # another cell built alike: no ids, no addresses
    values = Net()
    values.w.set_data(Tensor(np.full(3, 7.0, np.float32)))  # weights are read live, never cached
    assert graph_cache.key(values.construct, (Tensor(np.zeros((1, 3), np.float32)),)) == base
    trained = Net()
    trained.set_train(True)
    differ = {
        "a Python attribute": graph_cache.key(Net(scale=2.0).construct, (x(),)),
        "a constant tensor": graph_cache.key(Net(offset=1.0).construct, (x(),)),
        "a Primitive's attribute": graph_cache.key(Net(keep_dims=True).construct, (x(),)),
        "Parameter shapes": graph_cache.key(Net(n=4).construct, (x(),)),
        "the train flag": graph_cache.key(trained.construct, (x(),)),
        "the method": graph_cache.key(Net().other, (x(),)),
        "an input shape": graph_cache.key(Net().construct, (x(4),)),
        "an input dtype": graph_cache.key(Net().construct, (x(dtype=np.float16),)),
        "a mutable tuple": graph_cache.key(Net().construct, (ms.mutable((x(),)),)),
        "a plain tuple": graph_cache.key(Net().construct, ((x(),),)),
        "a constant input": graph_cache.key(Net().construct, (x(), 2.0)),
        "None": graph_cache.key(Net().construct, (x(), None)),
        "a cell outside the tree": graph_cache.key(Holder(1.0).construct, (x(),)),
        "its attribute": graph_cache.key(Holder(2.0).construct, (x(),)),
    }
    assert base not in differ.values()
    assert len(set(differ.values())) == len(differ), differ


CHILD = """
import json, sys
import numpy as np
import mindspore as ms
from mindspore import Tensor, nn
from mindone_story.modes import compiled

class Net(nn.Cell):
    def __init__(self, scale, w, n):
        super().__init__()
        self.scale = scale
        self.w = ms.Parameter(Tensor(np.full(n, w, np.float32)), name="w")

    def construct(self, x):
        return x * self.scale + self.w

scale, w, n = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
print(json.dumps(compiled(Net(scale, w, n).construct, "graph")(Tensor(np.ones(n, np.float32))).asnumpy().tolist()))
"""


def test_a_graph_loaded_from_the_cache_computes_what_a_compile_computes(tmp_path):
    """In fresh processes, as runs are: MindSpore's own cache would return the first scale's result for the second
    scale, and 3 values for an input of 4 (measured); ours compiles those anew and reuses only the same graph."""
    (tmp_path / "child.py").write_text(CHILD)  # MindSpore compiles only functions whose source is in a file
    cache = tmp_path / "graphs"
    env = {**os.environ, "PYTHONPATH": str(ROOT), graph_cache.ENV: str(cache)}

    def run(scale, w, n):
        done = subprocess.run(
            [sys.executable, str(tmp_path / "child.py"), str(scale), str(w), str(n)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
        files = {p: p.stat().st_mtime_ns for p in cache.rglob("*.mindir")}
        return json.loads(done.stdout.strip().splitlines()[-1]), files

    first, files = run(1, 1, 3)
    assert first == [2.0, 2.0, 2.0] and len(files) == 1
    assert run(1, 1, 3) == (first, files)  # loaded: no file written or rewritten
    assert run(1, 5, 3) == ([6.0, 6.0, 6.0], files)  # the same graph reads the new weights
    out, more = run(2, 1, 3)
    assert out == [3.0, 3.0, 3.0] and len(more) == 2
    out, more = run(1, 1, 4)
    assert out == [2.0] * 4 and len(more) == 3


def test_no_graph_of_the_pipelines_holds_state_the_key_cannot_see():
    """Every cell the pipelines compile, with both kinds of processors installed: each attribute is described by
    value (a helper object would be described by its type alone, and its state would escape the key)."""
    from test_photomaker import tiny_config

    from mindone_story.models import ip_adapter
    from mindone_story.models.photomaker import PhotoMakerIDEncoder
    from mindone_story.pretrained import TINY_IP_ADAPTER, load_ip_adapter_models, load_sdxl, tiny_model_dir
    from mindone_story.processors import consistent

    models = load_sdxl(TINY_SDXL)
    root = tiny_model_dir()
    ip = load_ip_adapter_models(root / "ip_adapter" / TINY_IP_ADAPTER, root / "image_encoder", models.unet.config)
    consistent.install(models.unet)
    ip_adapter.install(models.unet, ip.ip_adapter)
    cells = {
        "unet": models.unet,
        "vae": models.vae,
        "text_encoder": models.text_encoder,
        "text_encoder_2": models.text_encoder_2,
        "image_encoder": ip.image_encoder,
        "ip_adapter": ip.ip_adapter,
        "photomaker": PhotoMakerIDEncoder(tiny_config()),
    }
    opaque = {}

    def walk(where, d):
        if isinstance(d, list):
            if d[:1] == ["object"]:
                opaque.setdefault(where, set()).add(d[1])
            for v in d:
                walk(where, v)
        elif isinstance(d, dict):
            for v in d.values():
                walk(where, v)

    for name, cell in cells.items():
        walk(name, graph_cache.cell_tree(cell))
    assert not opaque, opaque


def test_a_story_run_twice_loads_its_graphs_and_gives_the_same_images(tmp_path):
    from test_story_diffusion import CHARACTERS, FAST, STORY

    (tmp_path / "story.txt").write_text(STORY)
    cache = tmp_path / "graphs"
    env = {**os.environ, "PYTHONPATH": str(ROOT), graph_cache.ENV: str(cache)}
    argv = [*FAST, "--general_prompt", CHARACTERS, "--story", str(tmp_path / "story.txt")]

    def run(out):
        cmd = [sys.executable, str(ROOT / "examples" / "story_diffusion" / "run.py"), *argv, "--output_dir", str(out)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr
        return {p: p.stat().st_mtime_ns for p in cache.rglob("*.mindir")}

    graphs = run(tmp_path / "a")
    assert len(graphs) >= 4  # text encoders, the id panels' and the later panels' UNet, the VAE
    assert run(tmp_path / "b") == graphs  # every graph loaded: none written again
    panels = sorted(p.name for p in (tmp_path / "a").glob("panel_*.png"))
    assert len(panels) == 6
    for name in panels:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_where_the_cache_lives_and_when_it_is_off(monkeypatch, tmp_path):
    monkeypatch.setenv("MINDONE_STORY_CACHE", str(tmp_path))
    monkeypatch.delenv(graph_cache.ENV, raising=False)
    assert graph_cache.directory() is None  # opt-in (see graph_cache.directory)
    monkeypatch.setenv(graph_cache.ENV, "0")
    assert graph_cache.directory() is None
    monkeypatch.setenv(graph_cache.ENV, "1")
    assert graph_cache.directory() == tmp_path / "graphs"
    monkeypatch.setenv(graph_cache.ENV, str(tmp_path / "elsewhere"))
    assert graph_cache.directory() == tmp_path / "elsewhere"


def test_a_cache_that_cannot_be_written_means_a_plain_compile(monkeypatch, tmp_path):
    from mindone_story.modes import compiled

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv(graph_cache.ENV, str(blocker / "graphs"))
    out = compiled(Net(scale=2.0).other, "graph")(x())
    assert np.array_equal(out.asnumpy(), np.full((1, 3), 2.0, np.float32))
    assert not ms.get_context("enable_compile_cache")
