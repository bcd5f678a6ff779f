"""The size of StoryDiffusion's id bank at SDXL size, and whether a story fits beside the model in a given memory.

The bank holds, per id image, step (after the first) and up-block self-attention layer, the sampled tokens of both
CFG halves: ``bank_bytes`` in ``processors/id_bank.py``, the one formula that the memory check uses and that
``tests/test_id_bank.py`` checks against a real bank. This script evaluates it on the full SDXL UNet (built lazily:
no parameter memory), next to the layout before issue 18 (fp32, step 0 banked too), the model's own parameter bytes
and the activation lower bound of one call (``checks.least_memory``, for this machine's attention), and says where the
``auto`` placement would put the bank on a machine with ``--memory_gb`` available.

    python benchmarks/id_bank.py                          # 4 id images, 50 steps, sa32 = sa64 = 0.5, 24 GB
    python benchmarks/id_bank.py --ids 6 --steps 35 --memory_gb 64
"""

from __future__ import annotations

import argparse
import json

import mindspore as ms

from mindone_story import checks
from mindone_story.config import preset_dir
from mindone_story.layers import holds_scores
from mindone_story.models.unet import up_level_tokens
from mindone_story.pretrained import build_component
from mindone_story.processors.consistent import install
from mindone_story.processors.id_bank import bank_bytes

GB = 1024**3


def params_bytes(model, itemsize: int) -> int:
    total = 0
    for p in model.get_parameters():
        n = 1
        for d in p.shape:
            n *= d
        total += n * itemsize
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ids", type=int, default=4, help="id images (all characters together)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--rate", type=float, default=0.5, help="sa32 = sa64")
    ap.add_argument("--memory_gb", type=float, default=24.0, help="the machine's memory, for the placement column")
    args = ap.parse_args()

    configs = {n: json.loads((preset_dir("sdxl") / n / "config.json").read_text()) for n in ("unet", "vae")}
    configs |= {
        n: json.loads((preset_dir("sdxl") / n / "config.json").read_text()) for n in ("text_encoder", "text_encoder_2")
    }
    unet = build_component("unet", configs["unet"])
    processors = install(unet)
    models = {n: build_component(n, c) for n, c in configs.items() if n != "unet"}
    fp32_model = params_bytes(unet, 4) + sum(params_bytes(m, 4) for m in models.values())
    fp16_model = params_bytes(unet, 2) + sum(params_bytes(m, 2 if n != "vae" else 4) for n, m in models.items())
    print(
        f"SDXL: {len(processors)} consistent-attention layers; parameters {fp32_model / GB:.1f} GB in fp32, "
        f"{fp16_model / GB:.1f} GB in fp16 (VAE in fp32); {args.ids} id images, {args.steps} steps, rate {args.rate}"
    )
    print()
    print(
        "| size | bank before (fp32, all steps) | bank fp32 | bank fp16/bf16 | activations (lower bound, batch ids) | "
        f"fp32 total in memory | auto on {args.memory_gb:g} GB |"
    )
    print("|---|---|---|---|---|---|---|")
    unet_cfg = unet.config
    vae_cfg = models["vae"].config if hasattr(models["vae"], "config") else None
    for px in (512, 768, 1024):
        tokens = up_level_tokens(unet, px // 8, px // 8)
        rates = [args.rate, args.rate]
        old = bank_bytes(processors, tokens, rates, args.ids, args.steps + 1, ms.float32)  # step 0 banked too
        fp32 = bank_bytes(processors, tokens, rates, args.ids, args.steps, ms.float32)
        half = bank_bytes(processors, tokens, rates, args.ids, args.steps, ms.float16)
        act, _ = checks.least_memory(unet_cfg, vae_cfg, px, px, args.ids, holds_scores(ms.float32))
        total = fp32_model + fp32 + act
        have = args.memory_gb * GB - fp32_model
        place = "memory" if fp32 + act <= 0.9 * have else "disk"
        print(
            f"| {px} | {old / GB:.2f} GB | {fp32 / GB:.2f} GB | {half / GB:.2f} GB | {act / GB:.2f} GB | "
            f"{total / GB:.1f} GB | {place} |"
        )


if __name__ == "__main__":
    main()
