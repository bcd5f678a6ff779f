"""Convert community SDXL checkpoints into a folder our pipelines load directly (our names = diffusers names).

    python tools/convert_weights.py --input RealVisXL_V4.0.safetensors --output models/realvis \\
        [--ip_adapter ip-adapter_sdxl.bin] [--image_encoder sdxl_models/image_encoder] [--dtype fp16|bf16|fp32]

--input is an sgm single file (.safetensors / .ckpt) or a diffusers folder. Everything is read and checked before
anything is written (strict: a missing, unexpected or mis-shaped key, a wrong model family or an IP-Adapter that
does not fit its image encoder stops the run with exit status 2). The output is written tensor by tensor (one source
tensor in memory at a time) into a staging folder that is renamed to --output only when complete:

    unet/ vae/                    config.json + diffusion_pytorch_model.safetensors (or shards + index.json)
    text_encoder/ text_encoder_2/ config.json + model.safetensors
    scheduler/ model_index.json   (and tokenizer/, tokenizer_2/ when the input folder has them)
    image_encoder/                config.json + model.safetensors            (with --image_encoder)
    ip_adapter/                   config.json + model.safetensors: image_proj.* and ip_adapter.<i>.to_{k,v}_ip.weight

Float tensors are cast to --dtype (bf16 rounds to nearest even); a cast that overflows fp16 is an error.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mindone_story.errors import StoryError, main_guard  # noqa: E402
from mindone_story.models.load import check_state  # noqa: E402
from mindone_story.pretrained import build_component, build_ip_adapter, check_sdxl  # noqa: E402
from mindone_story.weights import (  # noqa: E402
    SDXL_MODEL_INDEX,
    LazyTensor,
    MappedWeights,
    read_image_encoder,
    read_ip_adapter,
    read_sdxl,
    save_sharded,
)
from mindone_story.weights.safetensors_io import f32_to_bf16_bits  # noqa: E402

_OUT_DTYPE = {"fp16": ("F16", np.float16), "fp32": ("F32", np.float32), "bf16": ("BF16", np.float32)}
_FLOAT = {"F16", "F32", "F64", "BF16"}
_WEIGHTS_NAME = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors"}


def parse_size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9}
    clean = text.strip().upper()
    try:
        size = float(clean[:-2]) * units[clean[-2:]] if clean[-2:] in units else float(clean)
    except ValueError:
        raise StoryError(f"max_shard_size must be a size such as 5GB or 500MB, got {text!r}") from None
    if not size >= 1:  # also refuses nan
        raise StoryError(f"max_shard_size must be at least one byte, got {text!r}")
    return int(size)


def lazy_cast(weights: MappedWeights, key: str, dtype: str) -> LazyTensor:
    """The tensor ``key`` cast to ``dtype`` when (and only when) the writer asks for it."""
    src_dtype = weights.dtype(key)
    if src_dtype not in _FLOAT:  # integer buffers keep their type (none remain after the known extras)
        return LazyTensor(weights.shape(key), src_dtype, lambda: weights[key])
    name, np_dtype = _OUT_DTYPE[dtype]

    def load() -> np.ndarray:
        a = weights[key]
        with np.errstate(over="ignore"):  # overflow is checked just below, with a clearer message
            out = a.astype(np_dtype, copy=False)
        if dtype == "fp16" and np.isinf(out).any() and not np.isinf(a).any():
            raise OverflowError(
                f"{weights.name}: {key} overflows fp16 (max |x| = {np.abs(a).max():.3g}); use bf16/fp32"
            )
        return f32_to_bf16_bits(out) if dtype == "bf16" else out

    return LazyTensor(weights.shape(key), name, load)


def write_tensors(owners: dict[str, MappedWeights], folder: Path, filename: str, config: dict | None, args) -> dict:
    """Write each key (read from its owning MappedWeights, cast lazily) into ``folder``; return the statistics."""
    t0 = time.perf_counter()
    folder.mkdir(parents=True)
    if config:
        (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    plan = {k: lazy_cast(owners[k], k, args.dtype) for k in sorted(owners)}
    files = save_sharded(plan, folder, filename, args.max_shard_bytes, metadata={"format": "pt"})
    return {
        "tensors": len(plan),
        "params": sum(int(np.prod(t.shape)) for t in plan.values()),
        "source dtype": "/".join(sorted({owners[k].dtype(k) for k in owners})),
        "bytes": sum(t.nbytes for t in plan.values()),
        "files": len([f for f in files if f.suffix == ".safetensors"]),
        "seconds": time.perf_counter() - t0,
    }


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return str(n)


def convert(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    out = Path(args.output)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass --overwrite to replace it)")
    configs = {}
    if args.configs:  # <dir>/<component>/config.json, e.g. for non-SDXL-sized test models
        configs = {p.parent.name: p for p in Path(args.configs).glob("*/config.json")}
        sched = Path(args.configs) / "scheduler" / "scheduler_config.json"
        if sched.is_file():
            configs["scheduler"] = sched
    # --configs fills in for files without their own config; a folder's own config.json wins.
    src, enc = Path(args.input), Path(args.image_encoder or "")
    own = {
        k: src / k / ("scheduler_config.json" if k == "scheduler" else "config.json")
        for k, v in SDXL_MODEL_INDEX.items()
        if isinstance(v, list)
    }
    sdxl_cfgs = {k: v for k, v in configs.items() if k in own and not own[k].is_file()}
    enc_cfg = None if (enc / "config.json").is_file() else configs.get("image_encoder")
    # Read and check everything first, against the models built without parameter memory: a mismatch must stop
    # the run before anything is written.
    checkpoint = read_sdxl(src, sdxl_cfgs, args.variant)
    models, _ = check_sdxl(checkpoint, str(src))
    parts: dict[str, MappedWeights] = dict(checkpoint)
    encoder = None
    if args.image_encoder:
        encoder = read_image_encoder(enc, enc_cfg)
        check_state(build_component("image_encoder", encoder.config), encoder, f"{enc} (image encoder)")
        parts["image_encoder"] = encoder
    ip = None
    if args.ip_adapter:
        ip = read_ip_adapter(args.ip_adapter, checkpoint["unet"].config, encoder.config if encoder else None)
        check_state(build_ip_adapter(ip.config, models["unet"]), ip, f"{args.ip_adapter} (IP-Adapter)")
    del models

    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    stats = {}
    try:
        for name, weights in parts.items():
            filename = _WEIGHTS_NAME.get(name, "model.safetensors")
            stats[name] = write_tensors(dict.fromkeys(weights, weights), staging / name, filename, weights.config, args)
        if ip:  # one file under IP-Adapter's own names, which are ours
            config = {"image_proj": ip.config, "source": Path(args.ip_adapter).name}
            stats["ip_adapter"] = write_tensors(
                dict.fromkeys(ip, ip), staging / "ip_adapter", "model.safetensors", config, args
            )
        (staging / "scheduler").mkdir()
        (staging / "scheduler" / "scheduler_config.json").write_text(
            json.dumps(checkpoint.configs["scheduler"], indent=2)
        )
        for extra in ("tokenizer", "tokenizer_2"):
            if (src / extra).is_dir():
                shutil.copytree(src / extra, staging / extra)
        index = (
            json.loads((src / "model_index.json").read_text())
            if (src / "model_index.json").is_file()
            else SDXL_MODEL_INDEX
        )
        (staging / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    print(f"input   {args.input} ({checkpoint.layout}, fingerprint {checkpoint.fingerprint})")
    print(f"output  {out} ({args.dtype})")
    print(f"{'component':<16}{'tensors':>9}{'parameters':>16}  {'source dtype':<13}{'written':>12}{'files':>7}{'s':>7}")
    for name, s in stats.items():
        print(f"{name:<16}{s['tensors']:>9}{s['params']:>16,}  {s['source dtype']:<13}{human(s['bytes']):>12}"
              f"{s['files']:>7}{s['seconds']:>7.1f}")  # fmt: skip
    total_t, total_p = sum(s["tensors"] for s in stats.values()), sum(s["params"] for s in stats.values())
    print(f"{'total':<16}{total_t:>9}{total_p:>16,}  {'':<13}{human(sum(s['bytes'] for s in stats.values())):>12}")
    ignored = [(k, why) for w in [*parts.values(), *([ip] if ip else [])] for k, why in w.ignored]
    print(f"ignored ({len(ignored)}):" + "".join(f"\n  {k}: {why}" for k, why in ignored))
    if not (src / "tokenizer").is_dir():
        print("note: a single file has no tokenizers; put tokenizer/ and tokenizer_2/ (CLIP BPE files) into the output")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--input", required=True, help="sgm single file (.safetensors/.ckpt) or diffusers folder")
    p.add_argument("--output", required=True, help="folder to write (must not exist or be empty)")
    p.add_argument("--ip_adapter", help="IP-Adapter .bin or .safetensors")
    p.add_argument("--image_encoder", help="CLIP image encoder folder or file (model.safetensors / pytorch_model.bin)")
    p.add_argument("--dtype", choices=sorted(_OUT_DTYPE), default="fp16")
    p.add_argument("--configs", help="folder with <component>/config.json (default: the input's own, or SDXL)")
    p.add_argument("--variant", help="diffusers weight variant to read, e.g. fp16 (default: full precision first)")
    p.add_argument("--max_shard_size", default="5GB", help="largest safetensors shard, e.g. 5GB, 500MB")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    args = p.parse_args(argv)

    def run() -> int:
        args.max_shard_bytes = parse_size(args.max_shard_size)
        try:
            return convert(args)
        except OverflowError as e:  # a value too large for fp16: the user's choice of --dtype
            raise StoryError(str(e)) from None

    return main_guard(run)  # bad input and bad files: "error: ..." and exit status 2


if __name__ == "__main__":
    sys.exit(main())
