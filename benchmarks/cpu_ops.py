"""Single CPU ops at SDXL UNet sizes (CFG batch 2): our layers in graph mode against PyTorch, side by side.

    python benchmarks/cpu_ops.py            # prints a markdown table: ms per call, and the ratio

Each op is compiled alone with ``ms.jit`` and timed as the median of ``--runs`` calls (after one warm-up), PyTorch
under ``inference_mode`` with ``--threads`` threads, in the same process and on the same inputs. This is where the
UNet's remaining gap to PyTorch comes from (see README, Performance).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def median_ms(fn, runs: int) -> float:
    fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    import mindspore as ms
    import torch
    from mindspore import Tensor, ops

    from mindone_story import layers

    ms.set_context(device_target="CPU")
    ms.runtime.launch_blocking()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)

    def filled(cell):
        for param in cell.get_parameters():
            param.set_data(Tensor((0.02 * rng.standard_normal(param.shape)).astype(np.float32)))
        return cell

    rows = []

    def compare(name, ms_fn, torch_fn, *arrays):
        ms_args = [Tensor(a) for a in arrays]
        torch_args = [torch.tensor(a) for a in arrays]
        compiled = ms.jit(ms_fn)
        a = median_ms(lambda: compiled(*ms_args).asnumpy(), args.runs)
        with torch.inference_mode():
            b = median_ms(lambda: torch_fn(*torch_args), args.runs)
        rows.append((name, a, b))
        print(f"| {name} | {a:.1f} | {b:.1f} | {a / b:.2f} |", flush=True)

    print("| op (fp32, batch 2) | MindSpore ms | PyTorch ms | ratio |\n|---|---:|---:|---:|")
    for c, side in ((320, 64), (640, 32), (1280, 16)):
        x = rng.standard_normal((2, c, side, side)).astype(np.float32)
        tokens = rng.standard_normal((2, side * side, c)).astype(np.float32)
        conv = filled(layers.Conv2d(c, c, 3, padding=1))
        w = torch.tensor(conv.weight.asnumpy())
        compare(f"conv 3x3 {c}@{side}", conv.construct, lambda t, w=w: torch.conv2d(t, w, padding=1), x)
        gn = filled(layers.GroupNorm(32, c))
        gw, gb = torch.tensor(gn.weight.asnumpy()), torch.tensor(gn.bias.asnumpy())
        compare(
            f"GroupNorm {c}@{side}",
            gn.construct,
            lambda t, gw=gw, gb=gb: torch.nn.functional.group_norm(t, 32, gw, gb),
            x,
        )
        ln = filled(layers.LayerNorm(c))
        lnw, lnb = torch.tensor(ln.weight.asnumpy()), torch.tensor(ln.bias.asnumpy())
        compare(
            f"LayerNorm {c}x{side * side}",
            ln.construct,
            lambda t, c=c, lnw=lnw, lnb=lnb: torch.nn.functional.layer_norm(t, (c,), lnw, lnb),
            tokens,
        )
        lin = filled(layers.Linear(c, c))
        lw, lb = torch.tensor(lin.weight.asnumpy()), torch.tensor(lin.bias.asnumpy())
        compare(
            f"Linear {c}x{side * side}",
            lin.construct,
            lambda t, lw=lw, lb=lb: torch.nn.functional.linear(t, lw, lb),
            tokens,
        )
        compare(f"GELU {c}x{side * side}", layers.GELU().construct, torch.nn.functional.gelu, tokens)
        compare(f"SiLU {c}@{side}", ops.silu, torch.nn.functional.silu, x)

        def to_tokens(t, c=c):
            return t.transpose(0, 2, 3, 1).reshape(2, -1, c)

        compare(
            f"NCHW->tokens {c}@{side}",
            to_tokens,
            lambda t, c=c: t.permute(0, 2, 3, 1).reshape(2, -1, c).contiguous(),
            x,
        )
    for m, k, n in ((8192, 2880, 320), (320, 2880, 8192), (2048, 2048, 2048)):
        a = rng.standard_normal((m, k)).astype(np.float32)
        b = rng.standard_normal((k, n)).astype(np.float32)
        compare(f"MatMul {m}x{k}x{n}", ops.matmul, torch.matmul, a, b)


if __name__ == "__main__":
    main()
