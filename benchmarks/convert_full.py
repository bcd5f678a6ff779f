"""Convert a full-size SDXL single file and measure time and peak memory.

    python benchmarks/convert_full.py [--workdir /tmp/convert_full] [--dtype fp16|bf16|fp32] [--keep] [--reuse]

1. Builds a random-weight fp16 single file with every key and shape of the real sgm layout
   (tests/fixtures/manifests/sgm_sdxl_single_file.json, plus the optional position_ids; about 6.9 GB), tensor by tensor.
2. Runs tools/convert_weights.py on it in a fresh interpreter that reports its RSS after the imports (the baseline)
   and its peak RSS (VmHWM) at the end. The claim to check: peak - baseline stays far below the file size
   (the issue's bound is 2 GB).
3. Deletes the big files unless --keep.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mindone_story.weights import LazyTensor, save_safetensors  # noqa: E402

MANIFEST = ROOT / "tests" / "fixtures" / "manifests" / "sgm_sdxl_single_file.json"

# Runs in the child: import, record the baseline, convert, record the peak.
CHILD = """
import sys, runpy, resource
sys.argv = ["convert_weights.py", *{args!r}]
def vm(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
mod = runpy.run_path({tool!r}, run_name="convert_weights")
base = vm("VmRSS:")
rc = mod["main"](sys.argv[1:])
print(f"BENCH baseline_rss={{base}} peak_rss={{vm('VmHWM:')}} rc={{rc}}", flush=True)
"""


def build(path: Path) -> tuple[int, int]:
    doc = json.loads(MANIFEST.read_text())
    shapes = {**doc["tensors"], **doc.get("optional_tensors", {})}
    rng = np.random.default_rng(0)

    def make(key: str, shape: list[int]):
        if key.endswith("position_ids"):
            return LazyTensor(tuple(shape), "I64", lambda: np.arange(math.prod(shape), dtype=np.int64).reshape(shape))
        scale = 1 / math.sqrt(math.prod(shape[1:])) if len(shape) > 1 else 0.1
        return LazyTensor(
            tuple(shape), "F16", lambda: (rng.standard_normal(shape, np.float32) * scale).astype(np.float16)
        )

    tensors = {k: make(k, s) for k, s in sorted(shapes.items())}
    save_safetensors(tensors, path, {"format": "pt"})
    return len(tensors), sum(math.prod(s) for s in shapes.values())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", default="/tmp/convert_full")
    p.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    p.add_argument("--keep", action="store_true", help="keep the built and converted files")
    p.add_argument("--reuse", action="store_true", help="reuse the single file kept by an earlier --keep run")
    args = p.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    single, out = work / "sdxl_random_fp16.safetensors", work / "converted"
    try:
        t0 = time.perf_counter()
        if args.reuse and single.is_file():  # a file kept by an earlier --keep run
            print(f"reusing {single}")
        else:
            n, params = build(single)
            print(f"built {single}: {n} tensors, {params:,} parameters in {time.perf_counter() - t0:.0f} s")
        size = single.stat().st_size
        shutil.rmtree(out, ignore_errors=True)
        conv = ["--input", str(single), "--output", str(out), "--dtype", args.dtype]
        t0 = time.perf_counter()
        child = subprocess.run(
            [sys.executable, "-c", CHILD.format(args=conv, tool=str(ROOT / "tools" / "convert_weights.py"))],
            capture_output=True,
            text=True,
        )
        seconds = time.perf_counter() - t0
        print(child.stdout, child.stderr, sep="", end="")
        line = next(ln for ln in child.stdout.splitlines() if ln.startswith("BENCH"))
        vals = dict(kv.split("=") for kv in line.split()[1:])
        base, peak = int(vals["baseline_rss"]), int(vals["peak_rss"])
        written = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        print(
            f"\nconvert {size / 1e9:.2f} GB -> {written / 1e9:.2f} GB ({args.dtype}): {seconds:.1f} s wall "
            f"({size / 1e9 / seconds:.2f} GB/s); RSS after imports {base / 2**20:.0f} MiB, "
            f"peak {peak / 2**20:.0f} MiB, peak - baseline {(peak - base) / 2**20:.0f} MiB; exit code {vals['rc']}"
        )
    finally:
        if not args.keep:
            single.unlink(missing_ok=True)
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
