"""One SDXL UNet step (CFG batch 2), or one VAE decode (``--component vae``): ours in MindSpore (graph mode, or
PyNative with ``--ms_mode pynative``) against diffusers' PyTorch UNet2DConditionModel / AutoencoderKL.

Both frameworks get the same random weights (``mindone_story.pretrained.random_weights``: every tensor seeded by its
own name, so each child regenerates bit-identical arrays tensor by tensor instead of holding a second 10 GB copy; the
children report a CRC32 over all weight bytes and the parent checks they agree) and the same inputs, on the same CPU.

Each framework runs in its own subprocess, so peak RSS (``ru_maxrss`` inside the child) is that framework's alone. The
parent holds no framework and runs a watchdog thread per child that reads the child's RSS (with its descendants) from
/proc every 0.5 s and kills the child above ``--max_rss_gb`` (or when the machine's MemAvailable falls below
``--min_avail_gb``); the result then says "killed at N GB" instead of the benchmark crashing the machine.

Schedules: ``lockstep`` keeps both children alive and alternates single steps (torch, ms, torch, ms, ...), so both see
the same background load; ``sequential`` runs one child after the other (needed when two copies of the weights do not
fit in memory). ``auto`` picks lockstep when both fit. ``--rounds`` repeats the whole measurement (alternating which
framework goes first); the reported medians are over all timed steps of all rounds.

    python benchmarks/unet_step.py --config tiny --latent 32 --runs 20 --warmup 3 --rounds 3
    python benchmarks/unet_step.py --config sdxl --latent 64 --runs 3 --warmup 1

    python benchmarks/unet_step.py --config sdxl --latent 128 --runs 2 --warmup 1 --schedule sequential --max_rss_gb 21
    python benchmarks/unet_step.py --config sdxl --component vae --latent 128 --runs 3 --warmup 1

Distance to the machine's limit: the torch child counts one call's FLOPs with ``torch.utils.flop_counter`` on a
meta-device copy of the model (matmuls, convolutions, attention; nothing computed), and each child times an fp32
[4096, 4096] product in its own framework (best of 3) before the first step. The table gives each framework's
achieved GFLOP/s (FLOPs / median time) and its share of the better probe.

Prints a markdown table and writes a JSON file (``--out``, default
benchmarks/results/{unet_step,vae_decode}_<config>_<latent>[_pynative].json).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import select
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
    cpu_model,
    mem_available_bytes,
    memory_pressure,
    rss_bytes,
    tree_rss_bytes,
)

FRAMEWORKS = ("torch", "mindspore")
WHAT = {"unet": "UNet step (CFG batch 2)", "vae": "VAE decode (one image)"}
FILE = {"unet": "unet_step", "vae": "vae_decode"}
INPUTS = {  # the positional inputs of our cells' construct, in order
    "unet": ("sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"),
    "vae": ("latent",),
}
SEED_TEXT = "unet-step-benchmark"


# -- shared helpers ------------------------------------------------------------------------------------------------
def preset_config(name: str, component: str = "unet") -> dict:
    path = ROOT / "mindone_story" / "presets" / name / component / "config.json"
    return json.loads(path.read_text())


def make_inputs(config: dict, latent: int, component: str = "unet", seed: int = 0) -> dict[str, np.ndarray]:
    """UNet: CFG batch 2: latents, one timestep [1], text states [2, 77, cross], pooled embeds and SDXL time ids.
    VAE: one latent [1, C, latent, latent] (the pipelines decode one image at a time)."""
    rng = np.random.default_rng(seed)
    if component == "vae":
        return {"latent": rng.standard_normal((1, config["latent_channels"], latent, latent)).astype(np.float32)}
    add_dim = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
    size = float(latent * 8)
    return {
        "sample": rng.standard_normal((2, config["in_channels"], latent, latent)).astype(np.float32),
        "timestep": np.array([500.0], np.float32),
        "encoder_hidden_states": rng.standard_normal((2, 77, config["cross_attention_dim"])).astype(np.float32),
        "text_embeds": rng.standard_normal((2, add_dim)).astype(np.float32),
        "time_ids": np.tile(np.array([size, size, 0.0, 0.0, size, size], np.float32), (2, 1)),
    }


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    """max|ours - ref| / max|ref|, the parity measure of the tests."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


# -- the child: one framework ---------------------------------------------------------------------------------------
PROBE_N = 4096  # the matmul probe: [n, n] @ [n, n] in fp32, 2 n^3 FLOP


def torch_model(component: str, config: dict):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    cls = AutoencoderKL if component == "vae" else UNet2DConditionModel
    return cls.from_config(config).eval()


def torch_call(component: str, model, inputs: dict):
    """The measured call on torch tensors: a UNet step or a VAE decode."""
    if component == "vae":
        return model.decode(inputs["latent"], return_dict=False)[0]
    added = {"text_embeds": inputs["text_embeds"], "time_ids": inputs["time_ids"]}
    args = [inputs[k] for k in ("sample", "timestep", "encoder_hidden_states")]
    return model(*args, added_cond_kwargs=added, return_dict=False)[0]


def count_flops(component: str, config: dict, inputs: dict[str, np.ndarray]) -> int:
    """FLOPs of one call by torch's FlopCounterMode on the meta device (shapes only, nothing computed): matmuls,
    convolutions and attention, which is what the matmul probe compares with."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = torch_model(component, config)
        meta = {k: torch.empty(v.shape, dtype=torch.float32) for k, v in inputs.items()}
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        torch_call(component, model, meta)
    return int(counter.get_total_flops())


def matmul_probe(framework: str, reps: int = 3) -> float:
    """The best of ``reps`` fp32 [n, n] @ [n, n] products in this framework, in GFLOP/s: the machine's usable peak."""
    a = np.random.default_rng(0).standard_normal((PROBE_N, PROBE_N)).astype(np.float32)
    if framework == "torch":
        import torch

        x = torch.from_numpy(a)
        run = lambda: torch.mm(x, x)  # noqa: E731
    else:  # the library's Linear: the fused SGEMM kernel the UNet's projections and convolutions run on
        import mindspore as ms

        from mindone_story.layers import Linear

        linear = Linear(PROBE_N, PROBE_N, bias=False)
        linear.weight.set_data(ms.Tensor(a))
        x = ms.Tensor(a)
        run = lambda: linear(x).asnumpy()  # noqa: E731
    run()
    best = min(_seconds(run) for _ in range(reps))
    return 2 * PROBE_N**3 / best / 1e9


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class Child:
    def __init__(
        self, framework: str, component: str, config: dict, inputs: dict[str, np.ndarray], threads: int, ms_mode: str
    ):
        self.framework = framework
        self.component = component
        self.report = {"framework": framework}
        self.report["rss_start"] = rss_bytes()
        if framework == "torch":
            self._setup_torch(config, inputs, threads)
        else:
            self._setup_mindspore(config, inputs, ms_mode)

    def _setup_torch(self, config, inputs, threads):
        import torch

        torch.set_num_threads(threads)
        self.report["versions"] = {"torch": torch.__version__, "diffusers": __import__("diffusers").__version__}
        self.report["rss_after_import"] = rss_bytes()
        with torch.device("meta"):  # no allocation: the weights come from the numpy arrays below
            unet = torch_model(self.component, config)
        shapes = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
        self.weights = LazyRandomWeights(shapes, SEED_TEXT)
        t0 = time.perf_counter()
        state = {k: torch.from_numpy(self.weights[k]) for k in shapes}
        unet.load_state_dict(state, strict=True, assign=True)
        del state
        self.report["load_s"] = time.perf_counter() - t0
        self.report["params"] = int(sum(p.numel() for p in unet.parameters()))
        self.report["rss_after_load"] = rss_bytes()
        tensors = {k: torch.from_numpy(v) for k, v in inputs.items()}

        def step():
            with torch.inference_mode():
                return torch_call(self.component, unet, tensors).numpy()

        self.step = step

    def _setup_mindspore(self, config, inputs, ms_mode):
        import mindspore as ms

        from mindone_story.layers import set_device

        set_device("CPU")
        ms.runtime.launch_blocking()
        from mindone_story.models.load import load_state, parameter_shapes
        from mindone_story.pretrained import build_component

        self.report["versions"] = {"mindspore": ms.__version__}
        self.report["rss_after_import"] = rss_bytes()
        unet = build_component(self.component, config)
        unet.set_train(False)
        shapes = parameter_shapes(unet)
        self.weights = LazyRandomWeights(shapes, SEED_TEXT)
        t0 = time.perf_counter()
        load_state(unet, self.weights, "random weights")
        self.report["load_s"] = time.perf_counter() - t0
        self.report["params"] = int(sum(int(np.prod(s)) for s in shapes.values()))
        self.report["rss_after_load"] = rss_bytes()
        args = [ms.Tensor(inputs[k]) for k in INPUTS[self.component]]
        # graph: the whole UNet (or VAE decoder) as one ms.jit graph, as the pipelines run it; pynative: op by op,
        # launch_blocking
        compiled = ms.jit(unet.construct) if ms_mode == "graph" else unet
        self.report["ms_mode"] = ms_mode

        def step():
            return compiled(*args).asnumpy()

        self.step = step

    def timed_step(self) -> tuple[float, float, float]:
        """Wall seconds of one step, process CPU seconds during it, and CPU seconds used while idle before it
        (threads spinning between steps would steal cores from the other framework in lockstep)."""
        c0 = time.process_time()
        idle_cpu = c0 - getattr(self, "_cpu_end", c0)
        t0 = time.perf_counter()
        self.output = self.step()
        wall = time.perf_counter() - t0
        self._cpu_end = time.process_time()
        return wall, self._cpu_end - c0, idle_cpu


def child_main(args) -> None:
    """Commands on stdin (one per line), one JSON line per command on the result fd."""
    out = os.fdopen(args.result_fd, "w", buffering=1)

    def send(obj):
        out.write(json.dumps(obj) + "\n")

    if args.ms_setup:  # candidate layer formulations, applied before the model is built
        import importlib.util

        spec = importlib.util.spec_from_file_location("ms_setup", args.ms_setup)
        module = importlib.util.module_from_spec(spec)
        sys.modules["ms_setup"] = module  # graph compilation looks functions' globals up by module name
        spec.loader.exec_module(module)
    inputs = dict(np.load(args.inputs))
    config = json.loads(Path(args.config_file).read_text())
    child = Child(args.child, args.component, config, inputs, args.threads, args.ms_mode)
    child.report["weights_crc32"] = child.weights.checksum()
    if args.child == "torch":
        child.report["flops"] = count_flops(args.component, config, inputs)
    child.report["matmul_gflops"] = matmul_probe(args.child)
    child.report["rss_ready"] = rss_bytes()
    child.report["maxrss_ready"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    send({"event": "ready", **child.report})
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "step":
            wall, cpu, idle_cpu = child.timed_step()
            send({"event": "step", "seconds": wall, "cpu_seconds": cpu, "idle_cpu_seconds": idle_cpu})
        elif cmd == "finish":
            np.save(args.output, child.output)
            send(
                {
                    "event": "finish",
                    "rss_end": rss_bytes(),
                    "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                }
            )
            break


# -- the parent: scheduling, watchdog, report --------------------------------------------------------------------------
class Killed(RuntimeError):
    pass


class Runner:
    """One child process with a watchdog thread."""

    def __init__(self, framework: str, args, workdir: Path, config_file: Path, inputs_file: Path):
        self.framework = framework
        self.max_rss = int(args.max_rss_gb * GB)
        self.min_avail = int(args.min_avail_gb * GB)
        self.output_file = workdir / f"out_{framework}.npy"
        read_fd, write_fd = os.pipe()
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--child",
            framework,
            "--config_file",
            str(config_file),
            "--inputs",
            str(inputs_file),
            "--output",
            str(self.output_file),
            "--result_fd",
            str(write_fd),
            "--threads",
            str(args.threads),
            "--ms_mode",
            args.ms_mode,
            "--component",
            args.component,
        ]
        env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
        env.update(dict(kv.split("=", 1) for kv in (args.ms_env if framework == "mindspore" else args.torch_env)))
        if framework == "mindspore":
            if args.ms_setup:
                cmd += ["--ms_setup", str(Path(args.ms_setup).resolve())]
        self.timeout = args.timeout_s
        self.log = open(workdir / f"log_{framework}.txt", "ab")
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            pass_fds=(write_fd,),
            start_new_session=True,
            env=env,
            text=True,
        )
        os.close(write_fd)
        self.results = os.fdopen(read_fd, "r")
        self.peak_sampled = 0
        self.t0 = time.time()
        self.timeline = []  # (seconds since start, GB) every 5 s
        self.killed = None  # (reason, rss) once the watchdog has fired
        self.phase = "setup"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.is_set() and self.proc.poll() is None:
            rss = tree_rss_bytes(self.proc.pid)
            self.peak_sampled = max(self.peak_sampled, rss)
            now = time.time() - self.t0
            if not self.timeline or now - self.timeline[-1][0] >= 5:
                self.timeline.append((round(now, 1), round(rss / GB, 2), self.phase))
            reason = memory_pressure(rss, self.max_rss, self.min_avail)
            if reason:
                self.killed = (reason, rss)
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)  # the child's own session: only what we started
                except ProcessLookupError:
                    pass
                return
            time.sleep(0.5)

    def receive(self, expected: str) -> dict:
        ready, _, _ = select.select([self.results], [], [], self.timeout)
        if not ready and self.proc.poll() is None:
            self.killed = (f"no answer within --timeout_s {self.timeout:.0f} s", tree_rss_bytes(self.proc.pid))
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            raise Killed(
                f"killed after {self.timeout:.0f} s without an answer during {self.phase} "
                f"(RSS {self.killed[1] / GB:.1f} GB)"
            )
        line = self.results.readline()
        if not line:
            self.proc.wait()
            if self.killed:
                raise Killed(f"killed at {self.killed[1] / GB:.1f} GB ({self.killed[0]}) during {self.phase}")
            raise RuntimeError(
                f"{self.framework} child exited with code {self.proc.returncode} during {self.phase}; "
                f"see {self.log.name}"
            )
        msg = json.loads(line)
        assert msg["event"] == expected, msg
        return msg

    def command(self, cmd: str, expected: str) -> dict:
        try:
            self.proc.stdin.write(cmd + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        return self.receive(expected)

    def close(self, kill: bool = False) -> None:
        self._stop.set()
        if kill and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


def run_framework_phases(runners: dict[str, Runner], state: dict[str, dict], order: list[str], args) -> None:
    """Setup, warm-up, timed steps and finish for the given runners; lockstep when several are alive."""

    def guarded(fw, fn):
        if state[fw].get("killed") or state[fw].get("error"):
            return
        try:
            fn()
        except Killed as e:
            state[fw]["killed"] = str(e)
            print(f"  {fw}: {e}", flush=True)
        except Exception as e:  # noqa: BLE001 - report and go on with the other framework
            state[fw]["error"] = str(e)
            print(f"  {fw}: ERROR {e}", flush=True)

    def ready(fw):
        msg = runners[fw].receive("ready")
        state[fw].setdefault("setup", []).append(msg)
        print(f"  {fw}: ready (load {msg['load_s']:.1f} s, RSS {msg['rss_ready'] / GB:.2f} GB)", flush=True)

    def warm(fw):
        runners[fw].phase = "warm-up (first call / graph compile)"
        for i in range(args.warmup):
            sec = runners[fw].command("step", "step")["seconds"]
            state[fw].setdefault("warmup_s", []).append(sec)
            if i == 0:
                state[fw].setdefault("first_call_s", []).append(sec)
            print(f"  {fw}: warm-up {i + 1}/{args.warmup}: {sec:.3f} s", flush=True)

    def step(fw, i):
        runners[fw].phase = "timed steps"
        msg = runners[fw].command("step", "step")
        sec = msg["seconds"]
        state[fw].setdefault("step_s", []).append(sec)
        state[fw].setdefault("cpu_s", []).append(msg["cpu_seconds"])
        state[fw].setdefault("idle_cpu_s", []).append(msg["idle_cpu_seconds"])
        state[fw].setdefault("round_steps", [[]])[-1].append(sec)
        print(
            f"  {fw}: step {i + 1}/{args.runs}: {sec:.3f} s (CPU {msg['cpu_seconds']:.3f} s, "
            f"idle CPU before {msg['idle_cpu_seconds']:.3f} s)",
            flush=True,
        )

    def finish(fw):
        runners[fw].phase = "finish"
        msg = runners[fw].command("finish", "finish")
        state[fw].setdefault("finish", []).append(msg)
        state[fw]["output_file"] = str(runners[fw].output_file)

    for fw in order:
        state[fw].setdefault("round_steps", []).append([])
        guarded(fw, lambda fw=fw: ready(fw))
    for fw in order:
        guarded(fw, lambda fw=fw: warm(fw))
    for i in range(args.runs):
        for fw in order:
            guarded(fw, lambda fw=fw, i=i: step(fw, i))
    for fw in order:
        guarded(fw, lambda fw=fw: finish(fw))


def parent_main(args) -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup in `finally` blocks
    config = preset_config(args.config, args.component)
    latent = args.latent or (32 if args.config == "tiny" else 64)
    frameworks = list(FRAMEWORKS) if args.framework == "both" else [args.framework]
    inputs = make_inputs(config, latent, args.component)
    avail = mem_available_bytes()
    print(
        f"# {WHAT[args.component]} benchmark: config {args.config}, latent {latent} ({latent * 8}x{latent * 8}), "
        f"frameworks {frameworks}; MemAvailable {avail / GB:.1f} GB, cap {args.max_rss_gb} GB per child",
        flush=True,
    )
    if args.min_free_gb:
        deadline = time.time() + args.wait_for_memory_s
        while mem_available_bytes() < args.min_free_gb * GB:
            if time.time() > deadline:
                print(
                    f"only {mem_available_bytes() / GB:.1f} GB available (< {args.min_free_gb} GB): not running",
                    flush=True,
                )
                return 2
            print(f"  waiting: {mem_available_bytes() / GB:.1f} GB available < {args.min_free_gb} GB", flush=True)
            time.sleep(30)

    # both children alive at once only if two copies of the weights fit comfortably
    weight_bytes = 4 * approx_params(args.component, config)
    schedule = args.schedule
    if schedule == "auto":
        schedule = (
            "lockstep"
            if len(frameworks) > 1 and 3 * weight_bytes + 4 * GB < avail and weight_bytes < GB
            else "sequential"
        )
    print(f"  schedule {schedule} ({weight_bytes / GB:.2f} GB of fp32 weights per framework)", flush=True)

    workdir = Path(tempfile.mkdtemp(prefix="unet_step_"))
    config_file = workdir / "config.json"
    config_file.write_text(json.dumps(config))
    inputs_file = workdir / "inputs.npz"
    np.savez(inputs_file, **inputs)

    state = {fw: {} for fw in frameworks}
    peaks = {fw: [] for fw in frameworks}
    for r in range(args.rounds):
        order = frameworks if r % 2 == 0 else frameworks[::-1]
        print(f"## round {r + 1}/{args.rounds}: {' then '.join(order)}", flush=True)
        groups = [order] if schedule == "lockstep" else [[fw] for fw in order]
        for group in groups:
            runners, ok = {}, False
            try:
                for fw in group:
                    if state[fw].get("killed") or state[fw].get("error"):
                        continue
                    runners[fw] = Runner(fw, args, workdir, config_file, inputs_file)
                alive = [fw for fw in group if fw in runners]
                run_framework_phases(runners, state, alive, args)
                ok = True
            finally:  # on Ctrl-C / SIGTERM the children (in their own sessions) are killed, not left running
                for fw, runner in runners.items():
                    runner.close(kill=not ok)
                    peaks[fw].append(runner.peak_sampled)
                    state[fw].setdefault("rss_timeline", []).append(runner.timeline)

    result = summarize(args, config, latent, schedule, state, peaks, inputs)
    result["workdir"] = str(workdir)
    suffix = "" if args.ms_mode == "graph" else f"_{args.ms_mode}"
    out = Path(
        args.out or ROOT / "benchmarks" / "results" / f"{FILE[args.component]}_{args.config}_{latent}{suffix}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(markdown_table(result))
    print(f"\nJSON: {out}\nlogs: {workdir}/log_*.txt")
    return 0


def approx_params(component: str, config: dict) -> int:
    """Parameter count estimate without a framework: 2.57 B for the SDXL UNet, 84 M for its VAE, scaled by
    channels^2 otherwise."""
    ch = config["block_out_channels"][-1]
    if component == "vae":
        return int(83.65e6 * (ch / 512) ** 2)
    depth = sum(config["transformer_layers_per_block"])
    return int(2.567e9 * (ch / 1280) ** 2 * (depth + 4) / (13 + 4))


def summarize(args, config, latent, schedule, state, peaks, inputs) -> dict:
    res = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {
            "cpu": cpu_model(),
            "vcpus": os.cpu_count(),
            "mem_total_gb": round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / GB, 1),
            "python": platform.python_version(),
        },
        "component": args.component,
        "config": args.config,
        "latent": latent,
        "image": latent * 8,
        "batch": 2 if args.component == "unet" else 1,
        "runs": args.runs,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "schedule": schedule,
        "threads": args.threads,
        "ms_mode": args.ms_mode,
        "max_rss_gb": args.max_rss_gb,
        "ms_env": args.ms_env,
        "torch_env": args.torch_env,
        "ms_setup": args.ms_setup,
        "frameworks": {},
    }
    for fw, st in state.items():
        r = {}
        if st.get("setup"):
            s = st["setup"][-1]
            r.update(
                versions=s["versions"],
                params=s["params"],
                weights_crc32=s["weights_crc32"],
                matmul_gflops=s["matmul_gflops"],
                load_s=s["load_s"],
                rss_after_import_gb=s["rss_after_import"] / GB,
                rss_after_load_gb=s["rss_after_load"] / GB,
            )
        if st.get("step_s"):
            r["median_s"] = statistics.median(st["step_s"])
            r["min_s"] = min(st["step_s"])
            r["step_s"] = st["step_s"]
            r["median_cpu_s"] = statistics.median(st["cpu_s"])
            r["median_idle_cpu_s"] = statistics.median(st["idle_cpu_s"])
            r["round_medians_s"] = [statistics.median(x) for x in st.get("round_steps", []) if x]
        if st.get("first_call_s"):
            r["first_call_s"] = st["first_call_s"]
            if r.get("median_s") is not None:
                r["compile_s"] = statistics.median(st["first_call_s"]) - r["median_s"]
        if st.get("finish"):
            r["peak_rss_gb"] = max(f["maxrss"] for f in st["finish"]) / GB
            if "rss_after_load_gb" in r:
                r["peak_over_loaded_gb"] = r["peak_rss_gb"] - r["rss_after_load_gb"]
        if peaks.get(fw):
            r["peak_rss_sampled_gb"] = max(peaks[fw]) / GB
        r["rss_timeline_gb"] = st.get("rss_timeline", [])
        for key in ("killed", "error"):
            if st.get(key):
                r[key] = st[key]
        res["frameworks"][fw] = r
    t, m = res["frameworks"].get("torch", {}), res["frameworks"].get("mindspore", {})
    flops = (state.get("torch", {}).get("setup") or [{}])[-1].get("flops")
    probes = [r["matmul_gflops"] for r in res["frameworks"].values() if r.get("matmul_gflops")]
    if flops:  # achieved rate against the best matmul probe of the run: the distance to the machine's limit
        res["gflop_per_call"] = flops / 1e9
        res["matmul_peak_gflops"] = max(probes)
        for r in res["frameworks"].values():
            if r.get("median_s"):
                r["gflops"] = flops / 1e9 / r["median_s"]
                r["of_peak"] = r["gflops"] / res["matmul_peak_gflops"]
    if t.get("median_s") and m.get("median_s"):
        res["ratio_ms_over_torch"] = m["median_s"] / t["median_s"]
        rounds = [a / b for a, b in zip(m.get("round_medians_s", []), t.get("round_medians_s", []))]
        res["round_ratios"] = rounds
        if rounds:
            res["ratio_median_of_rounds"] = statistics.median(rounds)
    if t.get("weights_crc32") and m.get("weights_crc32"):
        res["same_weights"] = t["weights_crc32"] == m["weights_crc32"]
    files = {fw: state[fw].get("output_file") for fw in state}
    if files.get("torch") and files.get("mindspore"):
        a, b = np.load(files["mindspore"]), np.load(files["torch"])
        res["max_rel_err"] = rel_err(a, b)
        res["max_abs_err"] = float(np.abs(a.astype(np.float64) - b).max())
        res["output_abs_max"] = float(np.abs(b).max())
    return res


def markdown_table(res: dict) -> str:
    def f(v, fmt):
        return fmt.format(v) if isinstance(v, (int, float)) else "–"

    head = (
        f"\n### {WHAT[res.get('component', 'unet')]}, config {res['config']}, latent {res['latent']} "
        f"({res['image']}x{res['image']}) "
        f"({res['date']}, {res['machine']['vcpus']} vCPU {res['machine']['cpu']}, schedule {res['schedule']}, "
        f"{res['runs']} runs x {res['rounds']} rounds, MindSpore {res.get('ms_mode', 'graph')}"
        + (f"; MindSpore env {' '.join(res['ms_env'])}" if res.get("ms_env") else "")
        + (f"; MindSpore setup {Path(res['ms_setup']).name}" if res.get("ms_setup") else "")
        + (f"; PyTorch env {' '.join(res['torch_env'])}" if res.get("torch_env") else "")
        + ")\n"
    )
    rows = [
        "| framework | median s/step | min s/step | median CPU s/step | compile s (first call − median) | "
        "RSS after load GB | peak RSS GB (ru_maxrss) | peak − loaded GB | GFLOP/s | of matmul peak | "
        "matmul probe GFLOP/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for fw, r in res["frameworks"].items():
        if r.get("killed") or r.get("error"):
            note = r.get("killed") or r.get("error")
            rows.append(
                f"| {fw} | {note} | | | | {f(r.get('rss_after_load_gb'), '{:.2f}')} | "
                f"sampled {f(r.get('peak_rss_sampled_gb'), '{:.1f}')} | |"
            )
            continue
        rows.append(
            f"| {fw} | {f(r.get('median_s'), '{:.4g}')} | {f(r.get('min_s'), '{:.4g}')} | {f(r.get('median_cpu_s'), '{:.4g}')} | "
            f"{f(r.get('compile_s'), '{:.1f}') if fw == 'mindspore' else '–'} | {f(r.get('rss_after_load_gb'), '{:.2f}')} | "
            f"{f(r.get('peak_rss_gb'), '{:.2f}')} | {f(r.get('peak_over_loaded_gb'), '{:.2f}')} | "
            f"{f(r.get('gflops'), '{:.1f}')} | {f(r.get('of_peak'), '{:.0%}')} | {f(r.get('matmul_gflops'), '{:.1f}')} |"
        )
    tail = []
    if "gflop_per_call" in res:
        tail.append(
            f"{res['gflop_per_call']:.1f} GFLOP per call (torch's FlopCounterMode); matmul peak "
            f"{res['matmul_peak_gflops']:.1f} GFLOP/s (best fp32 {PROBE_N}x{PROBE_N} product of either framework)"
        )
    if "ratio_ms_over_torch" in res:
        tail.append(
            f"MindSpore / PyTorch time ratio: {res['ratio_ms_over_torch']:.2f} "
            f"(per round: {', '.join(f'{x:.2f}' for x in res['round_ratios'])})"
        )
    if "max_rel_err" in res:
        tail.append(
            f"max relative error (max|ms − torch| / max|torch|): {res['max_rel_err']:.2e} "
            f"(max abs {res['max_abs_err']:.2e}, output max {res['output_abs_max']:.3g}); same weights: "
            f"{res.get('same_weights')}"
        )
    return head + "\n".join(rows) + ("\n\n" + "\n".join(tail) if tail else "")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=["tiny", "sdxl"], default="tiny")
    p.add_argument("--component", choices=list(WHAT), default="unet", help="a UNet step or a VAE decode")
    p.add_argument("--latent", type=int, default=None, help="latent side (default 32 for tiny, 64 for sdxl)")
    p.add_argument("--runs", type=int, default=10, help="timed steps per framework per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (the first one compiles the graph)")
    p.add_argument("--rounds", type=int, default=1, help="repeat everything, alternating which framework goes first")
    p.add_argument("--framework", choices=["both", *FRAMEWORKS], default="both")
    p.add_argument("--ms_mode", choices=["graph", "pynative"], default="graph", help="how the MindSpore UNet runs")
    p.add_argument("--schedule", choices=["auto", "lockstep", "sequential"], default="auto")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--max_rss_gb", type=float, default=16.0, help="watchdog: kill a child whose RSS exceeds this")
    p.add_argument("--min_avail_gb", type=float, default=1.0, help="watchdog: kill a child if MemAvailable drops below")
    p.add_argument(
        "--min_free_gb",
        type=float,
        default=None,
        help="wait before starting until MemAvailable reaches this (default 18 for sdxl, 0 for tiny)",
    )
    p.add_argument("--wait_for_memory_s", type=float, default=1800)
    p.add_argument(
        "--timeout_s", type=float, default=3600, help="kill a child that does not answer a step in this time"
    )
    p.add_argument(
        "--ms_env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment variable for the MindSpore child only, e.g. ONEDNN_MAX_CPU_ISA=AVX2 (repeatable)",
    )
    p.add_argument(
        "--torch_env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment variable for the PyTorch child only, e.g. OMP_WAIT_POLICY=PASSIVE (repeatable)",
    )
    p.add_argument(
        "--ms_setup",
        default=None,
        metavar="PY_FILE",
        help="Python file run in the MindSpore child before the model is built (to measure a candidate "
        "layer formulation without editing the library)",
    )
    p.add_argument("--out", default=None, help="JSON result path")
    # child-side arguments (internal)
    p.add_argument("--child", choices=FRAMEWORKS, help=argparse.SUPPRESS)
    p.add_argument("--config_file", help=argparse.SUPPRESS)
    p.add_argument("--inputs", help=argparse.SUPPRESS)
    p.add_argument("--output", help=argparse.SUPPRESS)
    p.add_argument("--result_fd", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child_main(args)
        return 0
    if args.warmup < 1:
        p.error("--warmup must be at least 1 (the first call compiles)")
    if args.min_free_gb is None:
        args.min_free_gb = 18.0 if args.config == "sdxl" and args.component == "unet" else 0.0
    return parent_main(args)


if __name__ == "__main__":
    sys.exit(main())
