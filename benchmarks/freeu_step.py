"""FreeU's cost per UNet step: the tiny UNet (tests/fixtures/tiny_sdxl weights), CFG batch 2, graph mode on CPU,
with and without FreeU in the same process, steps alternating (off, on, off, on, ...) so both see the same load.

    python benchmarks/freeu_step.py --latent 96 --runs 30

Prints the median step time of each and their ratio. The latent is square; at 96 (768 px for SDXL) the FreeU'd
up blocks see 24x24 and 48x48, as in SDXL at 768 px.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import mindspore as ms
import numpy as np
from common import ROOT
from mindspore import Tensor

from mindone_story.models.freeu import APP_FREEU, freeu_tensor
from mindone_story.pretrained import load_component
from mindone_story.weights.safetensors_io import SafetensorsFile


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--latent", type=int, default=96)
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args()
    ms.set_context(device_target="CPU")
    folder = ROOT / "tests" / "fixtures" / "tiny_sdxl" / "unet"
    weights = next(folder.glob("*.safetensors"))
    unet, _ = load_component("unet", json.loads((folder / "config.json").read_text()), SafetensorsFile(weights), "")
    cfg = unet.config
    rng = np.random.default_rng(0)
    size = float(args.latent * 8)
    inputs = [
        Tensor(rng.standard_normal((2, cfg.in_channels, args.latent, args.latent)).astype(np.float32)),
        Tensor(np.array([500.0], np.float32)),
        Tensor(rng.standard_normal((2, 77, cfg.cross_attention_dim)).astype(np.float32)),
        Tensor(rng.standard_normal((2, cfg.projection_class_embeddings_input_dim - 6 * 8)).astype(np.float32)),
        Tensor(np.tile(np.array([size, size, 0, 0, size, size], np.float32), (2, 1))),
    ]
    step = ms.jit(unet.construct)
    variants = {"off": None, "on": freeu_tensor(APP_FREEU)}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for i in range(args.warmup + args.runs):
        for name, freeu in variants.items():
            start = time.perf_counter()
            step(*inputs, None, freeu).asnumpy()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - start)
    off, on = (statistics.median(times[k]) * 1e3 for k in ("off", "on"))
    print(f"tiny UNet, CFG batch 2, latent {args.latent}, graph mode, {args.runs} steps each (medians)")
    print(f"FreeU off {off:.1f} ms, on {on:.1f} ms, ratio {on / off:.3f}")


if __name__ == "__main__":
    main()
