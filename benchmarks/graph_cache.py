"""The on-disk graph cache (``mindone_story.graph_cache``): one UNet step's first call, in fresh processes, with the
cache off, cold (empty: compile and save) and warm (load), and the later calls of each.

Each case runs in its own child, ``--rounds`` times, in the order off, cold, warm and then cold, warm, off (the cold
case starts from an empty directory each round). This machine's step times jump by up to 60 % for single calls:
read the later calls' list in the JSON, not only the median. The UNet has deterministic random weights (``benchmarks/common.LazyRandomWeights``) and
runs through ``mindone_story.modes.compiled``, as the pipelines call it; batch 2 (CFG), one step. Reports per case
the median first call (compile or load, and the step), the later calls (``--calls``: the step alone), the child's peak
RSS, and
whether the outputs of all cases are equal (they must be: bit for bit).

    python benchmarks/graph_cache.py --config tiny --latent 32 --rounds 3
    python benchmarks/graph_cache.py --config sdxl --latent 64 --rounds 1
"""

from __future__ import annotations

import argparse
import datetime
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import GB, ROOT, child_env, cpu_model, random_unet, source_revision, unet_inputs

CASES = ("off", "cold", "warm")


def child(args) -> dict:
    from mindone_story.modes import compiled

    unet, config = random_unet(args.config, "graph-cache-benchmark")
    inputs = unet_inputs(config, args.latent, 2, 0)
    step = compiled(unet.construct, "graph")
    times = []
    for _ in range(args.calls):
        t0 = time.perf_counter()
        out = step(*inputs).asnumpy()
        times.append(time.perf_counter() - t0)
    np.save(args.output, out)
    return {
        "first_s": times[0],
        "later_s": statistics.median(times[1:]),
        "later_min_s": min(times[1:]),
        "later_all_s": times[1:],
        "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=["tiny", "sdxl"], default="tiny")
    p.add_argument("--latent", type=int, default=32)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--calls", type=int, default=3, help="calls per child: the first compiles or loads, the rest step")
    p.add_argument(
        "--out", default=None, help="JSON result (default benchmarks/results/graph_cache_<config>_<latent>.json)"
    )
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--output", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return 0

    work = Path(tempfile.mkdtemp(prefix="graph_cache_"))
    runs = {c: [] for c in CASES}
    for r in range(args.rounds):
        shutil.rmtree(work / "graphs", ignore_errors=True)
        # the cold case fills the cache the warm one reads; the plain case goes first, then last, round by round
        for case in CASES if r % 2 == 0 else ("cold", "warm", "off"):
            env = child_env()
            env["MINDONE_STORY_GRAPH_CACHE"] = "0" if case == "off" else str(work / "graphs")
            out = work / f"{case}{r}.npy"
            cmd = [sys.executable, __file__, "--child", "--config", args.config, "--latent", str(args.latent)]
            cmd += ["--calls", str(args.calls)]
            done = subprocess.run([*cmd, "--output", str(out)], env=env, capture_output=True, text=True)
            if done.returncode != 0:
                print(done.stderr[-3000:])
                return 1
            runs[case].append(json.loads(done.stdout.strip().splitlines()[-1]))
            got = runs[case][-1]
            print(f"round {r + 1} {case}: first {got['first_s']:.2f} s, later {got['later_all_s']}", flush=True)
    first = np.load(work / "off0.npy")
    equal = all(np.array_equal(np.load(f), first) for f in work.glob("*.npy"))
    med = {
        c: {k: statistics.median(x[k] for x in runs[c]) for k in ("first_s", "later_s", "later_min_s", "maxrss")}
        for c in CASES
    }
    res = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "source": source_revision(),
        "config": args.config,
        "latent": args.latent,
        "rounds": args.rounds,
        "outputs_equal": equal,
        "median": med,
        "runs": runs,
    }
    dest = Path(args.out or ROOT / "benchmarks" / "results" / f"graph_cache_{args.config}_{args.latent}.json")
    dest.write_text(json.dumps(res, indent=2))
    print(
        f"\n{res['date']}, {cpu_model()}, source {res['source']}; {args.config} UNet, latent {args.latent}, batch 2\n"
    )
    print(
        "| cache | first call s | later calls s (median, min) | first / off | later / off (median, min) | peak RSS GB |"
    )
    print("|---|---|---|---|---|---|")
    for c in CASES:
        m = med[c]
        print(
            f"| {c} | {m['first_s']:.2f} | {m['later_s']:.3g}, {m['later_min_s']:.3g} | "
            f"{m['first_s'] / med['off']['first_s']:.2f} | {m['later_s'] / med['off']['later_s']:.2f}, "
            f"{m['later_min_s'] / med['off']['later_min_s']:.2f} | {m['maxrss'] / GB:.2f} |"
        )
    print(f"\noutputs of all cases bit-equal: {equal}\nJSON: {dest}")
    shutil.rmtree(work, ignore_errors=True)
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())
