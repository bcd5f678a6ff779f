"""Is a UNet step slower in a process that also holds a bigger compiled graph? The same SDXL UNet step (CFG batch 2)
timed ``--runs`` times, then a batch-8 graph (StoryDiffusion's id batch of 4) compiled and run twice, then the batch-2
step timed again; one process, deterministic random weights, ``ms.jit`` as the pipelines. Prints each call's wall
and process CPU seconds and minor page faults, and the RSS.

    python benchmarks/second_graph.py --latent 64 --runs 5
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

from common import GB, random_unet, rss_bytes, unet_inputs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=["tiny", "sdxl"], default="sdxl")
    p.add_argument("--latent", type=int, default=64)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--big_batch", type=int, default=8)
    args = p.parse_args()

    import mindspore as ms

    unet, config = random_unet(args.config, "second-graph-benchmark")

    def inputs(batch, seed):
        return unet_inputs(config, args.latent, batch, seed)

    step = ms.jit(unet.construct)
    small, big = inputs(2, 1), inputs(args.big_batch, 0)

    def call(x, label):
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        c0, t0 = time.process_time(), time.perf_counter()
        step(*x).asnumpy()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        print(f"{label}: wall {wall:.2f} s, cpu {cpu:.2f} s, minor faults {faults}, RSS {rss_bytes() / GB:.2f} GB")
        return wall

    call(small, "batch 2, first (compile)")
    before = [call(small, "batch 2, before") for _ in range(args.runs)]
    call(big, f"batch {args.big_batch}, first (compile)")
    call(big, f"batch {args.big_batch}")
    after = [call(small, "batch 2, after") for _ in range(args.runs)]
    b, a = statistics.median(before), statistics.median(after)
    print(
        f"\nbatch 2 median before {b:.2f} s (min {min(before):.2f}), after {a:.2f} s (min {min(after):.2f}): "
        f"after / before {a / b:.2f} (min/min {min(after) / min(before):.2f})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
