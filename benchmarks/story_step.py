"""One UNet step with StoryDiffusion's consistent self-attention against a plain UNet step, same weights, same batch.

Every consistent step is step 1 with sa32 = sa64 = 0.5 and every gate open. ``write``: a write phase of ``--n`` id
images (CFG batch 2n, default 8): each image's up-block attn1 layers attend to their own tokens plus the sampled
tokens of the other n-1 images, and the sampled hidden states leave through the capture Parameters. ``window``: the
same with the previous window's n banked images in the pool as well (every later write window of
``StoryDiffusionPipeline(window=n)``). ``read``: ``--read_batch`` later panels (CFG batch 2x, default 1 panel) naming
one character whose bank a write phase of the n id images filled (its steps 0 and 1, run first), through the
pipeline's read phase (``Phase(write_as=None, bank_images=n)``); ``read_closed`` is the same compiled read graph with
every gate closed (gates tensor all zeros: step 0, and the layers whose gate draw fails), which must equal the plain
step. The plain steps (``plain`` at batch 2n for write/window, ``plain_read`` at the read batch) are the same UNet
object (processors installed) called with ``story=None``, ordinary self-attention, through the same ``ms.jit``.

All run in one child process, interleaved call by call (plain, consistent, ..., the order alternating every run),
so all see the same background load on a shared machine; the table reports medians over ``--runs`` timed runs per
round and over ``--rounds`` child processes. Times of the host-side work of a step are reported separately:
``inputs`` is ``Phase.inputs(step)`` (index lists, masks, bank arrays, tensor conversion) and ``collect`` is
``Phase.collect(step)`` (capture Parameters to numpy, into an id bank; nothing in read mode). ``step total`` =
inputs + UNet + collect.

Weights are deterministic random (``mindone_story.pretrained.random_weights``, one tensor at a time). The parent
holds no framework; a watchdog thread kills the child above ``--max_rss_gb`` (default 16) or when the machine's
MemAvailable falls below ``--min_avail_gb``, and the result says "killed at N GB".

    python benchmarks/story_step.py --config tiny --latent 32 --runs 15 --rounds 3
    python benchmarks/story_step.py --config mid --latent 48 --runs 5 --rounds 2
    python benchmarks/story_step.py --config sdxl --latent 32 --runs 3 --rounds 1
    python benchmarks/story_step.py --config sdxl --latent 64 --variants read --runs 4 --max_rss_gb 21 --min_avail_gb 1

Configs: ``tiny`` (the built-in tiny preset), ``mid`` (SDXL's layout, 36 consistent layers, 5/10/20 heads, with the
channels halved: 160/320/640, about 0.68 B parameters), ``sdxl`` (the SDXL preset), or a path to a UNet config.json.
Prints a markdown table and writes JSON (``--out``, default benchmarks/results/story_step_<config>_<latent>.json;
variant sets other than the default write,window add ``_<variants>``, a read batch other than 1 ``_rb<k>``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from common import (
    GB,
    ROOT,
    LazyRandomWeights,
    child_env,
    cpu_model,
    mem_available_bytes,
    memory_pressure,
    rss_bytes,
    source_revision,
    tree_rss_bytes,
    wait_for_memory,
)

SEED_TEXT = "story-step-benchmark"
VARIANTS = ("write", "window", "read")
DEFAULT_VARIANTS = ("write", "window")
# each timed consistent call -> the plain step (story=None) it is compared with, at the same batch
BASELINE = {"write": "plain", "window": "plain", "read": "plain_read", "read_closed": "plain_read"}


# -- configs and small helpers -------------------------------------------------------------------------------------
def unet_config(name: str) -> dict:
    if name in ("tiny", "sdxl", "mid"):
        preset = "sdxl" if name == "mid" else name
        config = json.loads((ROOT / "mindone_story" / "presets" / preset / "unet" / "config.json").read_text())
        if name == "mid":
            config["block_out_channels"] = [160, 320, 640]
        return config
    return json.loads(Path(name).read_text())


def rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


# -- the child -------------------------------------------------------------------------------------------------------
def child_main(args) -> dict:
    import mindspore as ms
    from mindspore import Tensor

    from mindone_story.layers import set_device

    set_device("CPU")
    ms.runtime.launch_blocking()  # as examples/story_diffusion/run.py
    from mindone_story.models.load import load_state, parameter_shapes
    from mindone_story.models.unet import up_level_tokens
    from mindone_story.pretrained import build_component
    from mindone_story.processors.consistent import install
    from mindone_story.processors.id_bank import Draws, IdBank, Phase

    report = {"versions": {"mindspore": ms.__version__}, "rss_after_import": rss_bytes()}
    config = json.loads(Path(args.config_file).read_text())
    unet = build_component("unet", config)
    unet.set_train(False)
    shapes = parameter_shapes(unet)
    t0 = time.perf_counter()
    load_state(unet, LazyRandomWeights(shapes, SEED_TEXT), "random weights")
    report["load_s"] = time.perf_counter() - t0
    report["params"] = int(sum(int(np.prod(s)) for s in shapes.values()))
    processors = install(unet)
    report["consistent_layers"] = len(processors)
    report["rss_after_load"] = rss_bytes()

    n, latent = args.n, args.latent
    add_dim = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
    size = float(latent * 8)

    def unet_inputs(batch, rng):
        return (
            Tensor(rng.standard_normal((batch, config["in_channels"], latent, latent)).astype(np.float32)),
            Tensor(np.array([500.0], np.float32)),
            Tensor(rng.standard_normal((batch, 77, config["cross_attention_dim"])).astype(np.float32)),
            Tensor(rng.standard_normal((batch, add_dim)).astype(np.float32)),
            Tensor(np.tile(np.array([[size, size, 0, 0, size, size]], np.float32), (batch, 1))),
        )

    variants = [v for v in VARIANTS if v in args.variants]
    plains = (["plain"] if {"write", "window"} & set(variants) else []) + (["plain_read"] if "read" in variants else [])
    inputs = {"plain": unet_inputs(2 * n, np.random.default_rng(0))}
    if "read" in variants:
        inputs["plain_read"] = unet_inputs(2 * args.read_batch, np.random.default_rng(1))
    tokens = up_level_tokens(unet, latent, latent)
    rates = [args.sa, args.sa]
    report["level_tokens"] = tokens
    step_fn = ms.jit(unet.construct)

    def draws(seed, images):
        d = Draws.sample(np.random.default_rng(seed), 2, images, tokens, rates, len(processors))
        d.gates[:] = 1.0  # every gate open at step 1 (step 0 is always plain, as the original)
        return d

    def closed(story):  # every gate shut: the same compiled graph, which must then be plain attention
        return ms.mutable((Tensor(np.zeros(len(processors), np.float32)),) + tuple(story[1:]))

    bank = IdBank()
    phases = {}

    def new_phase(name, seed, images, write_as, reads, **kw):
        phases[name] = Phase(processors, tokens, rates, draws(seed, images), bank, write_as, reads, **kw)

    new_phase("write", 1, n, "A", [[] for _ in range(n)])
    first = {}
    if {"window", "read"} & set(variants):
        # the id images' write phase: its two steps fill the bank at step 1 (the first call compiles the write graph)
        for step in (0, 1):
            t0 = time.perf_counter()
            step_fn(*inputs["plain"], phases["write"].inputs(step)).asnumpy()
            first.setdefault("write", time.perf_counter() - t0)
            phases["write"].collect(step)
    if "window" in variants:  # a later write window: the previous window's n banked images in the pool as well
        new_phase("window", 2, n, "A", [["A"] for _ in range(n)], recent=n)
    if "read" in variants:  # later panels naming the character, as StoryDiffusionPipeline's read batches
        new_phase("read", 3, args.read_batch, None, [["A"] for _ in range(args.read_batch)], bank_images=n)
    report["gather_width"] = {k: p.gather_width for k, p in phases.items()}
    report["bank_bytes_per_step"] = bank.nbytes() or None  # the n id images' bank at one step (step 1)

    # timed consistent calls: name -> (phase, gates closed), each against the plain step at its batch
    timed = {v: (v, False) for v in variants}
    if "read" in variants:
        timed["read_closed"] = ("read", True)

    cpu = [0.0]  # process CPU seconds of the last call (both threads; less sensitive to other processes' load)

    def call(story, batch="plain"):
        c0, t0 = time.process_time(), time.perf_counter()
        out = step_fn(*inputs[batch], story).asnumpy()
        cpu[0] = time.process_time() - c0
        return time.perf_counter() - t0, out

    def consistent(name):
        phase_name, shut = timed[name]
        phase = phases[phase_name]
        phase.use_captures()  # the phases share the processors: each sizes their capture Parameters for its calls
        t0 = time.perf_counter()
        story = phase.inputs(1)
        story = closed(story) if shut else story
        t_in = time.perf_counter() - t0
        t_unet, out = call(story, BASELINE[name])
        phase.bank = IdBank()  # collect into a scratch bank: the timed calls all see the bank filled above
        t0 = time.perf_counter()
        phase.collect(1)
        t_collect = time.perf_counter() - t0
        phase.bank = bank
        return t_in, t_unet, t_collect, out

    # first calls: graph compilation (each plain batch and each phase's graph; read_closed reuses read's)
    plain_out, outs = {}, {}
    for name in plains:
        first[name], plain_out[name] = call(None, name)
    for name in timed:
        t_in, t_unet, t_collect, outs[name] = consistent(name)
        first.setdefault(name, t_unet)
    # checks: consistent attention changes the output; with every gate closed it equals the plain step
    checks = {f"{name}_vs_{BASELINE[name]}_rel_diff": rel_diff(outs[name], plain_out[BASELINE[name]]) for name in timed}
    if "plain" in plains:
        phases["write"].use_captures()
        checks["gates_closed_vs_plain_rel_diff"] = rel_diff(
            call(closed(phases["write"].inputs(1)))[1], plain_out["plain"]
        )
    report["checks"] = checks
    for _ in range(args.warmup - 1):
        for name in plains:
            call(None, name)
        for name in timed:
            consistent(name)

    kinds = ("inputs", "unet", "unet_cpu", "collect", "total")
    times = {**{k: [] for p in plains for k in (p, f"{p}_cpu")}, **{f"{v}_{k}": [] for v in timed for k in kinds}}
    for r in range(args.runs):
        order = [*plains, *timed]
        if r % 2:
            order = order[::-1]
        for name in order:
            if name in plains:
                times[name].append(call(None, name)[0])
                times[f"{name}_cpu"].append(cpu[0])
                continue
            t_in, t_unet, t_collect, _ = consistent(name)
            times[f"{name}_inputs"].append(t_in)
            times[f"{name}_unet"].append(t_unet)
            times[f"{name}_unet_cpu"].append(cpu[0])
            times[f"{name}_collect"].append(t_collect)
            times[f"{name}_total"].append(t_in + t_unet + t_collect)
    report["times"] = times
    report["first_call_s"] = first
    report["maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    report["rss_end"] = rss_bytes()
    return report


# -- the parent ------------------------------------------------------------------------------------------------------
class Watched:
    """A child process with a watchdog thread on its RSS (with descendants) and the machine's MemAvailable."""

    def __init__(self, cmd, env, log_path, max_rss, min_avail):
        self.log = open(log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.max_rss, self.min_avail = max_rss, min_avail
        self.peak, self.killed = 0, None
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self):
        while self.proc.poll() is None:
            rss = tree_rss_bytes(self.proc.pid)
            self.peak = max(self.peak, rss)
            reason = memory_pressure(rss, self.max_rss, self.min_avail)
            if reason:
                self.killed = f"killed at {rss / GB:.1f} GB ({reason})"
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)  # the child's own session: only what we started
                except ProcessLookupError:
                    pass
                return
            time.sleep(0.5)

    def wait(self) -> int:
        rc = self.proc.wait()
        self._thread.join(timeout=2)
        self.log.close()
        return rc


def med(xs):
    return statistics.median(xs) if xs else None


def summarize(args, config, rounds: list[dict], peaks: list[int], failures: list[str]) -> dict:
    res = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {
            "cpu": cpu_model(),
            "vcpus": os.cpu_count(),
            "python": platform.python_version(),
            "loadavg_start": args.loadavg_start,
            "loadavg_end": os.getloadavg(),
        },
        "config": args.config,
        "block_out_channels": config["block_out_channels"],
        "latent": args.latent,
        "image": args.latent * 8,
        "n": args.n,
        "cfg_batch": 2 * args.n,
        "variants": args.variants,
        "read_batch": args.read_batch if "read" in args.variants else None,
        "sa32": args.sa,
        "sa64": args.sa,
        "runs": args.runs,
        "warmup": args.warmup,
        "rounds": len(rounds),
        "failures": failures,
        "source": source_revision(),
        "onednn_max_cpu_isa": args.isa,
    }
    if not rounds:
        return res
    last = rounds[-1]
    for key in ("versions", "params", "consistent_layers", "level_tokens", "gather_width", "bank_bytes_per_step"):
        res[key] = last.get(key)
    res["rss_after_load_gb"] = last["rss_after_load"] / GB
    res["peak_rss_gb"] = max(r["maxrss"] for r in rounds) / GB
    res["peak_rss_sampled_gb"] = max(peaks) / GB if peaks else None
    res["checks"] = last["checks"]
    times = {k: [x for r in rounds for x in r["times"][k]] for k in last["times"]}
    m = res["median_s"] = {k: med(v) for k, v in times.items()}
    res["round_medians_s"] = {k: [med(r["times"][k]) for r in rounds] for k in last["times"]}
    res["first_call_s"] = {k: med([r["first_call_s"][k] for r in rounds]) for k in last["first_call_s"]}
    res["compile_s"] = {  # first call minus a timed call of the same graph (write alone fills the bank: not timed)
        k: t - (m[k] if k in m else m[f"{k}_unet"])
        for k, t in res["first_call_s"].items()
        if k in m or f"{k}_unet" in m
    }
    res["ratios"] = {}
    for v, plain in BASELINE.items():
        if f"{v}_unet" not in times:
            continue
        res["ratios"][v] = {
            "against": plain,
            "unet": m[f"{v}_unet"] / m[plain],
            "total": m[f"{v}_total"] / m[plain],
            "unet_cpu": m[f"{v}_unet_cpu"] / m[f"{plain}_cpu"],
            "unet_per_round": [
                a / b for a, b in zip(res["round_medians_s"][f"{v}_unet"], res["round_medians_s"][plain])
            ],
            "added_ms": 1e3 * (m[f"{v}_unet"] - m[plain]),
        }
    res["step_s"] = times
    return res


def markdown(res: dict) -> str:
    read = f", read batch {res['read_batch']} (CFG batch {2 * res['read_batch']})" if res["read_batch"] else ""
    head = (
        f"\n### config {res['config']} {res['block_out_channels']}, latent {res['latent']} "
        f"({res['image']}x{res['image']}), write batch n={res['n']} (CFG batch {res['cfg_batch']}){read}, "
        f"sa32=sa64={res['sa32']}, step 1, all gates open (read_closed: all closed)\n\n"
        f"{res['date']}, {res['machine']['vcpus']} vCPU {res['machine']['cpu']}, load average "
        f"{res['machine']['loadavg_start'][0]:.1f} -> {res['machine']['loadavg_end'][0]:.1f}; "
        f"{res['runs']} runs x {res['rounds']} rounds; source {res['source']}, ONEDNN_MAX_CPU_ISA "
        f"{res['onednn_max_cpu_isa']}\n"
    )
    if "median_s" not in res:
        return head + "\nno result: " + "; ".join(res["failures"])
    m, compile_s = res["median_s"], res["compile_s"]
    rows = [
        "| step | median s | UNet / plain (wall) | per round | UNet / plain (CPU time) | step total / plain | "
        "added ms | inputs ms | collect ms | compile s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for plain in ("plain", "plain_read"):
        if plain in m:
            rows.append(f"| {plain} | {m[plain]:.4g} | 1 | | 1 | | | | | {compile_s[plain]:.1f} |")
    for v, r in res["ratios"].items():
        rows.append(
            f"| {v} / {r['against']} | {m[f'{v}_unet']:.4g} | **{r['unet']:.2f}** | "
            f"{', '.join(f'{x:.2f}' for x in r['unet_per_round'])} | {r['unet_cpu']:.2f} | {r['total']:.2f} | "
            f"{r['added_ms']:.0f} | {1e3 * m[f'{v}_inputs']:.1f} | {1e3 * m[f'{v}_collect']:.1f} | "
            f"{compile_s[v]:.1f} |"
        )
    gw = res["gather_width"]
    tail = [
        f"\nparams {res['params'] / 1e6:.1f} M, {res['consistent_layers']} consistent layers, tokens per image at the "
        f"two levels {res['level_tokens']}, gathered keys per image {gw}; RSS after load "
        f"{res['rss_after_load_gb']:.2f} GB, peak {res['peak_rss_gb']:.2f} GB",
        "checks (max rel diff): " + ", ".join(f"{k} {v:.2e}" for k, v in res["checks"].items()),
    ]
    if res["failures"]:
        tail.append("failures: " + "; ".join(res["failures"]))
    return head + "\n" + "\n".join(rows) + "\n" + "\n".join(tail)


def parent_main(args) -> int:
    config = unet_config(args.config)
    args.loadavg_start = os.getloadavg()
    print(
        f"# story step: config {args.config}, latent {args.latent}, n {args.n}; MemAvailable "
        f"{mem_available_bytes() / GB:.1f} GB, cap {args.max_rss_gb} GB; load {args.loadavg_start}",
        flush=True,
    )
    workdir = Path(tempfile.mkdtemp(prefix="story_step_"))
    config_file = workdir / "config.json"
    config_file.write_text(json.dumps(config))
    env = child_env(args.isa)
    rounds, peaks, failures = [], [], []
    for r in range(args.rounds):
        out = workdir / f"round{r}.json"
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--child",
            "--config_file",
            str(config_file),
            "--result",
            str(out),
            "--latent",
            str(args.latent),
            "--n",
            str(args.n),
            "--read_batch",
            str(args.read_batch),
            "--sa",
            str(args.sa),
            "--runs",
            str(args.runs),
            "--warmup",
            str(args.warmup),
            "--variants",
            *args.variants,
        ]
        if not wait_for_memory(args.wait_free_gb, args.wait_s):
            failures.append(f"round {r}: MemAvailable stayed below {args.wait_free_gb} GB")
            break
        child = Watched(cmd, env, workdir / f"log{r}.txt", int(args.max_rss_gb * GB), int(args.min_avail_gb * GB))
        rc = child.wait()
        peaks.append(child.peak)
        if child.killed or rc != 0 or not out.exists():
            failures.append(child.killed or f"round {r}: child exited with {rc}, see {workdir}/log{r}.txt")
            print(f"## round {r + 1}: {failures[-1]}", flush=True)
            break
        rounds.append(json.loads(out.read_text()))
        t = rounds[-1]["times"]
        unet = {k[: -len("_unet")]: v for k, v in t.items() if k.endswith("_unet")}
        steps = {k: t[k] for k in ("plain", "plain_read") if k in t} | unet
        print(f"## round {r + 1}: " + ", ".join(f"{k} {med(v):.3f} s" for k, v in steps.items()), flush=True)
    res = summarize(args, config, rounds, peaks, failures)
    name = f"story_step_{Path(args.config).stem}_{args.latent}"
    if tuple(args.variants) != DEFAULT_VARIANTS:  # other variant sets never overwrite the default's results
        name += "_" + "_".join(args.variants)
    if "read" in args.variants and args.read_batch != 1:
        name += f"_rb{args.read_batch}"
    dest = Path(args.out or ROOT / "benchmarks" / "results" / f"{name}.json")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(res, indent=2))
    print(markdown(res))
    print(f"\nJSON: {dest}\nlogs: {workdir}")
    return 0 if rounds else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny", help="tiny, mid, sdxl or a UNet config.json path")
    p.add_argument("--latent", type=int, default=32, help="latent side (image side / 8)")
    p.add_argument("--n", type=int, default=4, help="id images in the write batch (CFG batch 2n)")
    p.add_argument("--sa", type=float, default=0.5, help="sa32 = sa64")
    p.add_argument("--runs", type=int, default=10, help="timed runs per round (each: plain + every variant)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs first (the first compiles)")
    p.add_argument("--rounds", type=int, default=1, help="fresh child processes")
    p.add_argument("--read_batch", type=int, default=1, help="later panels per read call (CFG batch 2x)")
    p.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=VARIANTS)
    p.add_argument("--max_rss_gb", type=float, default=16.0)
    p.add_argument("--min_avail_gb", type=float, default=1.5)
    p.add_argument("--wait_free_gb", type=float, default=0.0, help="before each child, wait for this MemAvailable")
    p.add_argument("--wait_s", type=float, default=3600.0)
    p.add_argument("--isa", default="default", help="ONEDNN_MAX_CPU_ISA for the children, or 'default' (see child_env)")
    p.add_argument("--out", default=None)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--config_file", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        Path(args.result).write_text(json.dumps(child_main(args)))
        return 0
    if args.warmup < 1:
        p.error("--warmup must be at least 1 (the first call compiles)")
    if args.read_batch < 1:
        p.error("--read_batch must be at least 1")
    args.variants = [v for v in VARIANTS if v in args.variants]  # one order: one results name per set
    return parent_main(args)


if __name__ == "__main__":
    sys.exit(main())
