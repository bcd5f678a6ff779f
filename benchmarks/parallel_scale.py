"""Story-Adapter under msrun: each rank's work and the bytes each round moves, then, on paper, the 100-panel
10-round story on 1 and 8 devices from the measured cost of one image (run by hand).

    python benchmarks/parallel_scale.py                     # tiny model, 2 ranks, 4 panels, 2 rounds, 64x64
    python benchmarks/parallel_scale.py --panels 6 --rounds 2 --json benchmarks/results/parallel_scale_tiny.json

First one process runs the story and gives the cost of one image (the median of its panels after round 0,
compiles done) and of one reference encoding. Then ``msrun --worker_num=R`` runs the same story; every rank counts
its own exchanges (``parallel.World.gather``): the panel waves (PNG bytes), the reference-token waves and the
small control waves (the state rank 0 shares, digests, empty waves at the end of a phase). AllGather gives every
rank every payload, so the bytes a rank receives are R times what the busiest rank sends, per wave.

The projection: a round of N panels on D devices takes ceil(N / D) images per rank plus the rank's share of the
reference encodings, plus the round's exchange at ``--link_gbps``; rounds run one after another (a round needs the
previous one's references). Image bytes are scaled from the tiny model's PNGs to ``--png_mb`` (a 1024x1024 SDXL
PNG) and token bytes to ``--token_kb`` per panel (SDXL IP-Adapter: 4 tokens x 2048 fp16 = 16 KB; Plus: 64 KB).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def pipeline(mode: str):
    import mindspore as ms

    from mindone_story.pipelines.story_adapter import StoryAdapterPipeline
    from mindone_story.pretrained import TINY_IP_ADAPTER, load_ip_adapter_models, load_sdxl, tiny_model_dir

    ms.runtime.launch_blocking()
    root = tiny_model_dir()
    models = load_sdxl(root)
    ip = load_ip_adapter_models(root / "ip_adapter" / TINY_IP_ADAPTER, root / "image_encoder", models.unet.config)
    return StoryAdapterPipeline(models, ip, mode=mode)


def settings(args):
    from mindone_story.pipelines.story_adapter import StoryAdapterSettings

    prompts = tuple(f"panel {i}, a fox in a forest" for i in range(args.panels))
    return StoryAdapterSettings(
        prompts, rounds=args.rounds, steps=args.steps, height=args.size, width=args.size, seed=1
    )


def kind(obj) -> str:
    """What a wave carries: ('result', (index, png)) a panel, ('result', {index: tokens}) reference tokens."""
    tag, value = obj if isinstance(obj, tuple) and len(obj) == 2 else (None, None)
    if tag == "result" and isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], bytes):
        return "panel"
    if tag == "result" and isinstance(value, dict):
        return "tokens"
    return "control"


def worker(args) -> None:
    """One rank of the msrun job: the story, with every exchange counted."""
    from mindone_story import parallel
    from mindone_story.runs.story_adapter import generate_story

    class Counting(parallel.World):
        def gather(self, obj):
            sent, received = self.bytes_sent, self.bytes_received
            began = time.perf_counter()
            out = super().gather(obj)
            waits.append(time.perf_counter() - began)
            kinds = {kind(o) for o in out}  # a wave is what it carries (AllGather pads every rank to the longest)
            wave = "panel" if "panel" in kinds else "tokens" if "tokens" in kinds else "control"
            made = len(obj[1][1]) if kind(obj) == "panel" else 0
            log.append((wave, self.bytes_sent - sent, self.bytes_received - received, made))
            return out

    log, waits = [], []
    world = parallel.start(explicit=True)
    world = Counting(rank=world.rank, size=world.size, local_rank=world.local_rank)
    pipe = pipeline(args.mode)
    began = time.perf_counter()
    generate_story(pipe, settings(args), Path(args.out) / "story", world=world)
    stats = {
        "rank": world.rank,
        "seconds": time.perf_counter() - began,
        "seconds_in_exchanges": sum(waits),  # includes waiting for slower ranks
        "waves": {k: sum(1 for e in log if e[0] == k) for k in ("panel", "tokens", "control")},
        "panels_made": sum(1 for e in log if e[3]),
        "references_encoded": pipe.references.images_encoded,
        "png_bytes_made": sum(e[3] for e in log),
        "sent": {k: sum(e[1] for e in log if e[0] == k) for k in ("panel", "tokens", "control")},
        "received": {k: sum(e[2] for e in log if e[0] == k) for k in ("panel", "tokens", "control")},
    }
    (Path(args.out) / f"rank_{world.rank}.json").write_text(json.dumps(stats))


def single(args) -> dict:
    """The per-image and per-encoding cost in one process (after compiles)."""
    import numpy as np
    from PIL import Image

    pipe = pipeline(args.mode)
    s = settings(args)
    noise, prompts = pipe.noise(s), s.model_prompts
    image = pipe.panel(prompts[0], noise, s)  # compiles the text-only graph
    reference = pipe.reference([image] * args.panels, s.scales[0])
    times = []
    for i in range(args.panels + 1):
        t = time.perf_counter()
        pipe.panel(prompts[i % args.panels], noise, s, reference)
        times.append(time.perf_counter() - t)
    encode = []
    rng = np.random.default_rng(0)
    for _ in range(5):
        picture = Image.fromarray(rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8))
        t = time.perf_counter()
        pipe.references.panel_tokens(picture)
        encode.append(time.perf_counter() - t)
    return {"seconds_per_image": statistics.median(times[1:]), "seconds_per_encoding": statistics.median(encode[1:])}


def projection(per_image: float, per_encoding: float, png_mb: float, token_kb: float, gbps: float) -> list[dict]:
    """The 100-panel, 10-round story (1,100 images, 10 x 100 encodings) on 1 and 8 devices."""
    panels, rounds, rows = 100, 10, []
    for devices in (1, 8):
        share = math.ceil(panels / devices)
        # per round every rank receives every panel's PNG and (rounds 0..9) every panel's tokens
        moved = 0.0 if devices == 1 else panels * (png_mb * 1e6 + token_kb * 1e3)
        exchange = moved * 8 / (gbps * 1e9)
        seconds = (rounds + 1) * (share * per_image + exchange) + rounds * share * per_encoding
        rows.append(
            {
                "devices": devices,
                "images_per_rank_per_round": share,
                "bytes_per_round": moved,
                "exchange_seconds_per_round": exchange,
                "seconds": seconds,
            }
        )
    rows[1]["speed_up"] = rows[0]["seconds"] / rows[1]["seconds"]
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--panels", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--mode", default="graph")
    p.add_argument("--seconds_per_image", type=float, default=None, help="project with this (an NPU's figure)")
    p.add_argument("--png_mb", type=float, default=1.6, help="bytes of one panel's PNG at full size, MB")
    p.add_argument("--token_kb", type=float, default=16.0, help="reference tokens of one panel, KB")
    p.add_argument("--link_gbps", type=float, default=100.0, help="the slowest link between ranks, Gbit/s")
    p.add_argument("--json", default=None)
    p.add_argument("--stats_dir", default=None, help=argparse.SUPPRESS)  # set for the ranks msrun starts
    args = p.parse_args()
    if args.stats_dir or "MS_ROLE" in os.environ:
        args.out = args.stats_dir
        return worker(args)

    cost = single(args)
    with tempfile.TemporaryDirectory() as out, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        cmd = [
            "msrun",
            f"--worker_num={args.ranks}",
            f"--local_worker_num={args.ranks}",
            f"--master_port={port}",
            "--join=True",
            f"--log_dir={Path(out) / 'logs'}",
            __file__,
            "--stats_dir",
            out,
        ]
        cmd += [f"--{k}={getattr(args, k)}" for k in ("panels", "rounds", "steps", "size", "mode")]
        env = {
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "PYTHONPATH": str(ROOT),
        }
        subprocess.run(cmd, env=env, check=True, timeout=1800, stdout=subprocess.DEVNULL, cwd=out)
        ranks = [json.loads((Path(out) / f"rank_{r}.json").read_text()) for r in range(args.ranks)]
    per_image = args.seconds_per_image or cost["seconds_per_image"]
    png_mb = args.png_mb
    result = {
        "story": {"panels": args.panels, "rounds": args.rounds, "steps": args.steps, "size": args.size},
        "one_process": cost,
        "ranks": ranks,
        "per_round_bytes_received_per_rank": {
            "panels": ranks[0]["received"]["panel"] / (args.rounds + 1),
            "tokens": ranks[0]["received"]["tokens"] / max(args.rounds, 1),
            "control": ranks[0]["received"]["control"] / (args.rounds + 1),
        },
        "projection": projection(per_image, cost["seconds_per_encoding"], png_mb, args.token_kb, args.link_gbps),
        # SDXL at 512 px on this CPU, from the README's measured UNet step and VAE decode (50 x 21.38 s + 24.4 s);
        # an encoding on paper: ViT-bigG/14, 1.84 G parameters x 257 tokens x 2 = 0.95 TFLOP at 63 GFLOP/s = 15 s
        "projection_sdxl_cpu_512": projection(50 * 21.38 + 24.4, 15.0, png_mb, args.token_kb, args.link_gbps),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
