"""Bytes of the boolean mask FlashAttentionScore receives per consistent-attention call, before (broadcast to
[B, H, Sq, Sk]) and after (the kernel's smallest accepted shape for a per-image key mask, [B, 1, Sq, Sk]).

Arithmetic from the shapes the library builds (processors/id_bank.py widths), for SDXL's two consistent-attention levels
(1/32 and 1/16 of the image: 1280 channels in 20 heads, 640 in 10), a write phase of id_length images with CFG
(B = 2 * id_length), no bank yet, sa32 = sa64 = 0.5. The mask is uint8, one byte per element.

    python benchmarks/ascend_mask_bytes.py [--id_length 4]
"""

import argparse

from mindone_story.processors.id_bank import sample_width

LEVELS = (("sa32", 32, 20), ("sa64", 16, 10))  # name, image / side, heads


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--id_length", type=int, default=4)
    n = p.parse_args().id_length
    print("| image | level | B | H | Sq | Sk | before [B,H,Sq,Sk] | after [B,1,Sq,Sk] |")
    print("|---|---|---|---|---|---|---|---|")
    for size in (768, 1024):
        for name, div, heads in LEVELS:
            sq = (size // div) ** 2
            sk = sq + (n - 1) * sample_width(sq, 0.5) + 1  # own tokens + the other id images' samples + 1 bank slot
            b = 2 * n
            before, after = b * heads * sq * sk, b * sq * sk
            print(
                f"| {size} | {name} | {b} | {heads} | {sq} | {sk} | {before / 2**20:,.1f} MiB | {after / 2**20:,.1f} MiB |"
            )


if __name__ == "__main__":
    main()
