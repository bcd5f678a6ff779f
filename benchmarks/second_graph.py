"""Is a UNet step slower in a process that also holds a bigger compiled graph? The same SDXL UNet step (CFG batch 2)
timed ``--runs`` times, then a batch-8 graph (StoryDiffusion's id batch of 4) compiled and run twice, then the batch-2
step timed again; one process, deterministic random weights, ``ms.jit`` as the pipelines. Prints each call's wall
and process CPU seconds and minor page faults, and the RSS.

    python benchmarks/second_graph.py --latent 64 --runs 5
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import numpy as np
from common import GB, ROOT, LazyRandomWeights, rss_bytes


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=["tiny", "sdxl"], default="sdxl")
    p.add_argument("--latent", type=int, default=64)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--big_batch", type=int, default=8)
    args = p.parse_args()

    import mindspore as ms
    from mindspore import Tensor

    from mindone_story.layers import set_device

    set_device("CPU")
    ms.runtime.launch_blocking()  # as examples/story_diffusion/run.py
    from mindone_story.models.load import load_state, parameter_shapes
    from mindone_story.pretrained import build_component

    config = json.loads((ROOT / "mindone_story" / "presets" / args.config / "unet" / "config.json").read_text())
    unet = build_component("unet", config)
    unet.set_train(False)
    load_state(unet, LazyRandomWeights(parameter_shapes(unet), "second-graph-benchmark"), "random weights")
    add = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
    size = float(8 * args.latent)

    def inputs(batch, seed):
        rng = np.random.default_rng(seed)
        return (
            Tensor(rng.standard_normal((batch, config["in_channels"], args.latent, args.latent)).astype(np.float32)),
            Tensor(np.array([500.0], np.float32)),
            Tensor(rng.standard_normal((batch, 77, config["cross_attention_dim"])).astype(np.float32)),
            Tensor(rng.standard_normal((batch, add)).astype(np.float32)),
            Tensor(np.tile(np.array([[size, size, 0, 0, size, size]], np.float32), (batch, 1))),
        )

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
