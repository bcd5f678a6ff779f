"""Story-Adapter at story length N: per-panel time, peak RSS and CLIP image encodings per round (run by hand).

    python benchmarks/story_adapter_scale.py                      # N = 10, 50, 100 on the built-in tiny model
    python benchmarks/story_adapter_scale.py --panels 10 50 100 --mode graph --steps 2 --size 64 --json out.json

Each N runs in a fresh process (so peak RSS is that run's own): load the tiny model, make N reference images,
then one GRCA round: encode the N references once, project them to 4N tokens and every attn2 layer's K/V once,
and generate all N panels against them. Reported per N: the one-off reference preparation, the mean time per
panel, the number of images that went through the CLIP image encoder in the round (counted at the encoder call,
so it would show the original's N per panel, N^2 per round), and the process's peak RSS.

On a shared machine the load drifts between those processes, so the per-panel comparison across N is also
measured in one more process that holds the references of every N and times single panels in rotation
(10, 50, 100, 100, 50, 10, ...; ``--reps`` panels per N): the median of those is the column to compare.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def setup(mode: str):
    import mindspore as ms

    from mindone_story.pipelines.story_adapter import StoryAdapterPipeline
    from mindone_story.pretrained import TINY_IP_ADAPTER, load_ip_adapter_models, load_sdxl, tiny_model_dir

    ms.set_context(device_target="CPU")
    ms.runtime.launch_blocking()
    root = tiny_model_dir()
    models = load_sdxl(root)
    ip = load_ip_adapter_models(root / "ip_adapter" / TINY_IP_ADAPTER, root / "image_encoder", models.unet.config)
    return StoryAdapterPipeline(models, ip, mode=mode)


def story(n: int, steps: int, size: int):
    import numpy as np
    from PIL import Image

    from mindone_story.pipelines.story_adapter import StoryAdapterSettings

    rng = np.random.default_rng(0)
    refs = [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]
    prompts = tuple(f"panel {i}, a fox in a forest" for i in range(n))
    return refs, StoryAdapterSettings(prompts, rounds=1, steps=steps, height=size, width=size)


def worker(n: int, mode: str, steps: int, size: int) -> dict:
    pipe = setup(mode)
    encoded = [0]  # images through the CLIP encoder, counted at the call itself
    encode = pipe.references._encode

    def counting(pixels):
        encoded[0] += pixels.shape[0]
        return encode(pixels)

    pipe.references._encode = counting
    refs, settings = story(n, steps, size)
    noise = pipe.noise(settings)
    # warm-up outside the timings: compiles (graph mode) with a round of the same N, then the timed round
    pipe.panel(settings.model_prompts[0], noise, settings, pipe.reference(refs, 0.3))
    encoded[0] = 0
    start = time.perf_counter()
    reference = pipe.reference(refs, 0.3)
    prepare = time.perf_counter() - start
    times = []
    for prompt in settings.model_prompts:
        t = time.perf_counter()
        pipe.panel(prompt, noise, settings, reference)
        times.append(time.perf_counter() - t)
    return {
        "panels": n,
        "reference_tokens": 4 * n,
        "reference_prepare_s": round(prepare, 3),
        "panel_mean_s": round(statistics.mean(times), 4),
        "clip_encodings_per_round": encoded[0],
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def interleaved(ns: list[int], mode: str, steps: int, size: int, reps: int) -> dict[int, float]:
    """Median seconds per panel for each N, panels timed in rotation over N so load drift hits every N alike."""
    pipe = setup(mode)
    runs = {}
    for n in ns:
        refs, settings = story(n, steps, size)
        runs[n] = (settings, pipe.reference(refs, 0.3))
        pipe.panel(settings.model_prompts[0], pipe.noise(settings), settings, runs[n][1])  # compile this N
    times: dict[int, list[float]] = {n: [] for n in ns}
    for rep in range(reps):
        for n in ns if rep % 2 == 0 else ns[::-1]:  # alternate the order: no N always runs after the same one
            settings, reference = runs[n]
            t = time.perf_counter()
            pipe.panel(settings.model_prompts[rep % n], pipe.noise(settings), settings, reference)
            times[n].append(time.perf_counter() - t)
    return {n: round(statistics.median(t), 4) for n, t in times.items()}


def child(*args: str) -> str:
    cmd = [sys.executable, __file__, *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout.splitlines()[-1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--panels", type=int, nargs="+", default=[10, 50, 100])
    p.add_argument("--mode", default="graph", choices=["graph", "pynative"])
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--reps", type=int, default=10, help="panels per N in the interleaved timing")
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--interleaved", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    common = ["--mode", args.mode, "--steps", str(args.steps), "--size", str(args.size)]
    if args.worker is not None:
        print(json.dumps(worker(args.worker, args.mode, args.steps, args.size)))
        return 0
    if args.interleaved:
        print(json.dumps(interleaved(args.panels, args.mode, args.steps, args.size, args.reps)))
        return 0
    rows = []
    for n in args.panels:
        rows.append(json.loads(child("--worker", str(n), *common)))
        print(rows[-1], flush=True)
    rotation = json.loads(child("--interleaved", "--panels", *map(str, args.panels), "--reps", str(args.reps), *common))
    print(rotation, flush=True)
    base = rotation[str(args.panels[0])]
    for r in rows:
        r["panel_median_interleaved_s"] = rotation[str(r["panels"])]
    print(f"\ntiny model, {args.size}x{args.size}, {args.steps} DDIM steps, {args.mode} mode, one GRCA round\n")
    print(
        "| N panels | ref. tokens | CLIP encodings / round | reference prep (s) | s / panel, own run (mean) "
        f"| s / panel, rotation (median of {args.reps}) | vs N={args.panels[0]} | peak RSS (MB) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        t = r["panel_median_interleaved_s"]
        print(
            f"| {r['panels']} | {r['reference_tokens']} | {r['clip_encodings_per_round']} | "
            f"{r['reference_prepare_s']} | {r['panel_mean_s']} | {t} | {t / base - 1:+.1%} | {r['peak_rss_mb']} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
