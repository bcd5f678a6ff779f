"""One fused-attention call shaped like an SDXL sa64 read layer at 512 px (CFG batch 2, 10 heads, 1024 own tokens,
2432 gathered bank tokens, head size 64), compiled, with the gathered keys open, dropped (-1e9, a closed gate or
padding) or pushed down (-60, -84), against plain attention over the own tokens.

Before 2026-12-01 the kernel left a dropped key's probability at exp's floor over the row sum, a subnormal float,
and the product with V ran ~25x slower on dropped keys. Run it at two commits to compare:

    python benchmarks/masked_attention.py            # median of --runs calls per case, ms
"""

from __future__ import annotations

import argparse
import statistics
import time

import mindspore as ms
import numpy as np
from mindspore import Tensor

from mindone_story.layers import MathAttention, set_device


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=5)
    args = p.parse_args()
    set_device("CPU")
    ms.runtime.launch_blocking()
    attention = ms.jit(MathAttention().construct)
    rng = np.random.default_rng(0)
    b, h, own, d, gathered = 2, 10, 1024, 64, 2432
    q = Tensor(rng.standard_normal((b, h, own, d)).astype(np.float32))
    k = rng.standard_normal((b, h, gathered + own, d)).astype(np.float32)
    v = rng.standard_normal((b, h, gathered + own, d)).astype(np.float32)

    def masked(value: float) -> tuple:
        mask = np.zeros((b, 1, 1, gathered + own), np.float32)
        mask[..., :gathered] = value
        return q, Tensor(k), Tensor(v), Tensor(mask)

    cases = {
        "plain attention, own keys only": (q, Tensor(k[:, :, gathered:]), Tensor(v[:, :, gathered:])),
        "gathered keys open (mask 0)": masked(0.0),
        "gathered keys dropped (mask -1e9)": masked(-1e9),
        "gathered keys at -60": masked(-60.0),
        "gathered keys at -84": masked(-84.0),
    }
    print("| case | median ms |\n|---|---:|")
    for name, inputs in cases.items():
        attention(*inputs).asnumpy()  # compile
        times = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            attention(*inputs).asnumpy()
            times.append(time.perf_counter() - t0)
        print(f"| {name} | {statistics.median(times) * 1e3:.0f} |")


if __name__ == "__main__":
    main()
