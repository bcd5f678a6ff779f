"""Peak memory of StoryDiffusionPipeline runs: write batches with and without the sliding window, short and long stories.

Every configuration runs in a fresh child process (graph mode, as the CLI). The child loads the model, records its RSS
(the baseline), runs the whole story, and reports ``ru_maxrss`` (``resource.getrusage(RUSAGE_SELF)``) minus the
baseline. It also reports the peak of each part of the run separately: before each phase (a write batch, a later
write window, or a batch of read panels) it reads ``ru_maxrss`` and resets the kernel's high-water mark
(``/proc/self/clear_refs`` = 5), so ``ru_maxrss`` at the next boundary is that part's own peak; the overall peak is
the largest of them (what ``ru_maxrss`` would say without the resets).

The id bank (sampled hidden states per character, step and layer) grows with id images x steps by design; it is
bounded by id_length per character, not by the story's length. Its size, ``IdBank.nbytes()``, is reported beside
the RSS. Graph compilation: every UNet call is timed with its input signature; compile time is the sum over
signatures of the first call minus the median of the later calls with that signature (likewise for the text
encoders and the VAE decoder), and ``graphs`` counts the UNet signatures.

    python benchmarks/story_memory.py                       # all configurations, tiny model, 256x256, 3 steps
    python benchmarks/story_memory.py --model small --only write
    python benchmarks/story_memory.py --only read --reads 10 50 --read_batch 2

Models: ``tiny`` is the built-in tiny SDXL (``tiny_model_dir()`` through ``load_sdxl``); ``small`` is the tiny
folder with the UNet replaced by ``benchmarks/small_unet.json`` (wider attention: 2x the tiny channels, 64-dim heads)
and deterministic random weights (``random_weights``), written once under the cache directory and loaded by
``load_sdxl`` as well. A watchdog in the parent kills a child above ``--max_rss_gb``.
Prints markdown tables and writes JSON (``--out``, default benchmarks/results/story_memory_<model>.json).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import GB, ROOT, child_env, mem_available_bytes, rss_bytes, source_revision, wait_for_memory

MB = 1024**2
SMALL_CONFIG = Path(__file__).resolve().parent / "small_unet.json"
CHARACTER = "[Hero] a man with a black suit"


def maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def story_text(ids: int, reads: int) -> str:
    lines = [f"[Hero] stands in scene {k}" for k in range(ids)]
    lines += [f"[Hero] walks through place {k} #panel {k}" for k in range(reads)]
    return "\n".join(lines)


# -- the small model -----------------------------------------------------------------------------------------------
def small_model_dir(cache: Path) -> Path:
    """The tiny folder with the UNet of benchmarks/small_unet.json and random weights (built once)."""
    from mindone_story.models.load import parameter_shapes
    from mindone_story.pretrained import build_component, random_weights, tiny_model_dir
    from mindone_story.weights.safetensors_io import save_safetensors

    config = json.loads(SMALL_CONFIG.read_text())
    target = cache / "small-sdxl"
    stamp = target / "small_unet.json"
    if stamp.exists() and json.loads(stamp.read_text()) == config:
        return target
    tiny = tiny_model_dir()
    staging = Path(tempfile.mkdtemp(prefix=".small-", dir=cache))
    for item in tiny.iterdir():
        if item.name != "unet":
            (shutil.copytree if item.is_dir() else shutil.copy)(item, staging / item.name)
    (staging / "unet").mkdir()
    (staging / "unet" / "config.json").write_text(json.dumps(config, indent=2))
    shapes = parameter_shapes(build_component("unet", config))
    save_safetensors(
        random_weights(shapes, "story-memory-small:unet"), staging / "unet" / "diffusion_pytorch_model.safetensors"
    )
    (staging / "small_unet.json").write_text(json.dumps(config))
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)
    return target


# -- the child -----------------------------------------------------------------------------------------------------
class Segments:
    """Peak RSS per part of the run: ``close(label)`` reads ru_maxrss (the peak since the last reset) and resets
    the high-water mark, so each part gets its own peak."""

    def __init__(self):
        self.peaks: dict[str, int] = {}
        self.can_reset = True

    def close(self, label: str) -> None:
        peak = maxrss()
        self.peaks[label] = max(self.peaks.get(label, 0), peak)
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.can_reset = False


class Timed:
    """Wraps a compiled network: records (input signature, seconds) per call."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    @staticmethod
    def signature(x):
        if isinstance(x, (tuple, list)):
            return tuple(Timed.signature(a) for a in x)
        return tuple(x.shape) if hasattr(x, "shape") else x

    def __call__(self, *args):
        t0 = time.perf_counter()
        out = self.fn(*args)
        (out[0] if isinstance(out, tuple) else out).asnumpy()  # wait for the result
        self.calls.append((self.signature(args), time.perf_counter() - t0))
        return out

    def compile_seconds(self) -> tuple[float, int]:
        by_sig: dict = {}
        for sig, s in self.calls:
            by_sig.setdefault(sig, []).append(s)
        total = 0.0
        for times in by_sig.values():
            steady = statistics.median(times[1:]) if len(times) > 1 else 0.0
            total += times[0] - steady
        return total, len(by_sig)


def child_main(args) -> dict:
    import mindspore as ms

    from mindone_story.layers import set_device

    set_device("CPU")
    ms.runtime.launch_blocking()  # as examples/story_diffusion/run.py
    from mindone_story.pipelines.story_diffusion import StoryDiffusionPipeline, StoryDiffusionSettings
    from mindone_story.pretrained import load_sdxl
    from mindone_story.story.prompts import parse_story

    rss_import = rss_bytes()
    t0 = time.perf_counter()
    models = load_sdxl(args.model_dir)
    pipe = StoryDiffusionPipeline(models, mode="graph")
    load_s = time.perf_counter() - t0
    baseline = rss_bytes()
    seg = Segments()
    seg.close("load")

    sdxl = pipe.sdxl
    sdxl._unet = unet = Timed(sdxl._unet)
    sdxl._vae_decode = vae = Timed(sdxl._vae_decode)
    sdxl._text = text = [Timed(f) for f in sdxl._text]
    phases = []
    run = pipe._run

    def labelled(story, settings, indices, write_as, reads, *rest, **kw):
        kind = "read" if write_as is None else ("window" if any(reads) else "write")
        t0 = time.perf_counter()
        out = run(story, settings, indices, write_as, reads, *rest, **kw)
        phases.append(
            {
                "kind": kind,
                "images": len(indices),
                "seconds": time.perf_counter() - t0,
                "bank_bytes": pipe.bank.nbytes(),
            }
        )
        seg.close(kind)
        return out

    pipe._run = labelled
    story = parse_story(CHARACTER, story_text(args.ids, args.reads), args.ids)
    settings = StoryDiffusionSettings(
        height=args.size, width=args.size, steps=args.steps, seed=3407, window=args.window, read_batch=args.read_batch
    )
    t0 = time.perf_counter()
    images = pipe(story, settings)
    run_s = time.perf_counter() - t0
    assert len(images) == args.ids + args.reads
    unet_compile, graphs = unet.compile_seconds()
    other_compile = vae.compile_seconds()[0] + sum(t.compile_seconds()[0] for t in text)
    peak = max(seg.peaks.values())
    run_peak = max(v for k, v in seg.peaks.items() if k != "load")
    return {
        "rss_after_import": rss_import,
        "baseline_rss": baseline,
        "load_s": load_s,
        "peaks": seg.peaks,
        "reset_ok": seg.can_reset,
        "maxrss": peak,
        "run_maxrss": run_peak,
        "peak_over_baseline": run_peak - baseline,
        "bank_bytes": pipe.bank.nbytes(),
        "run_s": run_s,
        "unet_compile_s": unet_compile,
        "unet_graphs": graphs,
        "other_compile_s": other_compile,
        "unet_calls": len(unet.calls),
        "unet_steady_s": statistics.median([s for _, s in unet.calls[1:]]) if len(unet.calls) > 1 else None,
        "phases": phases,
    }


# -- the parent ----------------------------------------------------------------------------------------------------
def run_child(args, model_dir: Path, case: dict, workdir: Path, name: str) -> dict:
    out = workdir / f"{name}.json"
    if not wait_for_memory(args.wait_free_gb, args.wait_s):
        return {**case, "error": f"MemAvailable stayed below {args.wait_free_gb} GB"}
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        "--model_dir",
        str(model_dir),
        "--result",
        str(out),
        "--ids",
        str(case["ids"]),
        "--reads",
        str(case["reads"]),
        "--read_batch",
        str(case["read_batch"]),
        "--size",
        str(args.size),
        "--steps",
        str(args.steps),
    ]
    cmd += ["--window", str(case["window"] or 0)]  # 0: no window
    env = child_env(args.isa)
    with open(workdir / f"{name}.log", "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        killed, peak = None, 0
        while proc.poll() is None:
            rss = rss_bytes(proc.pid)
            peak = max(peak, rss)
            if rss > args.max_rss_gb * GB or mem_available_bytes() < args.min_avail_gb * GB:
                killed = f"killed at {rss / GB:.1f} GB"
                os.killpg(proc.pid, signal.SIGKILL)  # the child's own session: only what we started
                break
            time.sleep(0.25)
        proc.wait()
    if killed or proc.returncode or not out.exists():
        return {**case, "error": killed or f"exit {proc.returncode}, see {workdir / (name + '.log')}"}
    return {**case, **json.loads(out.read_text()), "sampled_peak": peak}


def cases(args) -> list[dict]:
    todo = []
    if "write" in args.only:
        for window in (None, args.window):
            for ids in args.ids:
                todo.append({"group": "write", "ids": ids, "window": window, "reads": 0, "read_batch": 1})
    if "read" in args.only:
        for reads in args.reads:
            todo.append(
                {"group": "read", "ids": args.read_ids, "window": None, "reads": reads, "read_batch": args.read_batch}
            )
    return todo


def fmt_mb(x) -> str:
    return f"{x / MB:.0f}" if isinstance(x, (int, float)) else "–"


def tables(res: dict) -> str:
    out = [
        f"\n### story memory: model {res['model']}, {res['size']}x{res['size']}, {res['steps']} steps, graph mode "
        f"({res['date']}, {res['machine']}; source {res['source']}, ONEDNN_MAX_CPU_ISA {res['onednn_max_cpu_isa']})\n"
    ]
    rows = res["results"]
    write = [r for r in rows if r["group"] == "write"]
    if write:
        out += [
            "| id images | window | peak − baseline MB | baseline MB | write MB | window MB | id bank MB | "
            "UNet graphs | compile s | run s |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in write:
            if "error" in r:
                out.append(f"| {r['ids']} | {r['window'] or '–'} | {r['error']} | | | | | | | |")
                continue
            p = r["peaks"]
            out.append(
                f"| {r['ids']} | {r['window'] or 'none'} | **{fmt_mb(r['peak_over_baseline'])}** | "
                f"{fmt_mb(r['baseline_rss'])} | {fmt_mb(p.get('write', 0) - r['baseline_rss'])} | "
                f"{fmt_mb(p['window'] - r['baseline_rss']) if 'window' in p else '–'} | "
                f"{r['bank_bytes'] / MB:.1f} | {r['unet_graphs']} | "
                f"{r['unet_compile_s'] + r['other_compile_s']:.0f} | {r['run_s']:.0f} |"
            )
        for window in {r["window"] for r in write}:
            vals = [r["peak_over_baseline"] for r in write if r["window"] == window and "error" not in r]
            if len(vals) > 1:
                out.append(
                    f"\nwindow {window or 'none'}: peak − baseline spread (max/min − 1) "
                    f"{max(vals) / min(vals) - 1:.1%} across {[r['ids'] for r in write if r['window'] == window]}"
                )
    read = [r for r in rows if r["group"] == "read"]
    if read:
        out += [
            "",
            "| read panels | read_batch | id images | peak − baseline MB | read-phase peak − baseline MB | "
            "id bank MB | UNet graphs | compile s | run s |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in read:
            if "error" in r:
                out.append(f"| {r['reads']} | {r['read_batch']} | {r['ids']} | {r['error']} | | | | | |")
                continue
            out.append(
                f"| {r['reads']} | {r['read_batch']} | {r['ids']} | **{fmt_mb(r['peak_over_baseline'])}** | "
                f"{fmt_mb(r['peaks']['read'] - r['baseline_rss'])} | {r['bank_bytes'] / MB:.1f} | "
                f"{r['unet_graphs']} | {r['unet_compile_s'] + r['other_compile_s']:.0f} | {r['run_s']:.0f} |"
            )
    return "\n".join(out)


def parent_main(args) -> int:
    from mindone_story.pretrained import default_cache_dir, tiny_model_dir

    if args.model == "tiny":
        model_dir = tiny_model_dir()
    else:
        cache = default_cache_dir()
        cache.mkdir(parents=True, exist_ok=True)
        model_dir = small_model_dir(cache)
    workdir = Path(tempfile.mkdtemp(prefix="story_memory_"))
    results = []
    for k, case in enumerate(cases(args)):
        rounds = [run_child(args, model_dir, case, workdir, f"case{k}_r{r}") for r in range(args.repeat)]
        good = [r for r in rounds if "error" not in r]
        if not good:
            results.append(rounds[-1])
        else:  # the median repeat by peak (peaks barely vary; repeats guard against a disturbed run)
            good.sort(key=lambda r: r["peak_over_baseline"])
            chosen = dict(good[len(good) // 2])
            chosen["repeats_peak_over_baseline"] = [r["peak_over_baseline"] for r in good]
            results.append(chosen)
        r = results[-1]
        print(
            f"  {case}: "
            + (
                r.get("error")
                or f"peak-baseline {fmt_mb(r['peak_over_baseline'])} MB, "
                f"bank {r['bank_bytes'] / MB:.1f} MB, run {r['run_s']:.0f} s"
            ),
            flush=True,
        )
    res = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": f"{os.cpu_count()} vCPU, Python {platform.python_version()}",
        "model": args.model,
        "size": args.size,
        "steps": args.steps,
        "results": results,
        "source": source_revision(),
        "onednn_max_cpu_isa": args.isa,
    }
    dest = Path(args.out or ROOT / "benchmarks" / "results" / f"story_memory_{args.model}.json")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(res, indent=2))
    print(tables(res))
    print(f"\nJSON: {dest}\nlogs: {workdir}")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["tiny", "small"], default="tiny")
    p.add_argument("--size", type=int, default=256, help="image side")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--only", nargs="+", choices=["write", "read"], default=["write", "read"])
    p.add_argument("--ids", type=int, nargs="+", default=[4, 8, 16], help="id images in the write cases")
    p.add_argument("--window", type=int, default=4)
    p.add_argument("--reads", type=int, nargs="+", default=[10, 50], help="read panels in the read cases")
    p.add_argument("--read_ids", type=int, default=4, help="id images before the read panels")
    p.add_argument("--read_batch", type=int, default=2)
    p.add_argument("--repeat", type=int, default=1, help="fresh children per configuration (median reported)")
    p.add_argument("--max_rss_gb", type=float, default=12.0)
    p.add_argument("--min_avail_gb", type=float, default=1.5)
    p.add_argument("--wait_free_gb", type=float, default=0.0, help="before each child, wait for this MemAvailable")
    p.add_argument("--wait_s", type=float, default=3600.0)
    p.add_argument("--isa", default="default", help="ONEDNN_MAX_CPU_ISA for the children, or 'default' (see child_env)")
    p.add_argument("--out", default=None)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model_dir", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.window = args.window if args.window else None
        args.ids, args.reads = args.ids[0], args.reads[0]
        Path(args.result).write_text(json.dumps(child_main(args)))
        return 0
    sys.path.insert(0, str(ROOT))
    return parent_main(args)


if __name__ == "__main__":
    sys.exit(main())
