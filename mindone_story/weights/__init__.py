"""Weight reading and key layouts: numpy only, no torch or mindspore import.

- ``safetensors_io``: lazy safetensors reading (``SafetensorsFile``, ``ShardedSafetensors``), atomic and sharded writing.
- ``torch_bin``: ``TorchBinFile``, a reader for torch zip checkpoints through an allow-list unpickler.
- ``shapes``: our parameter names and shapes from a config.json.
- ``keymaps``: one key map per layout (sgm UNet / VAE / OpenCLIP, diffusers, HF CLIP, IP-Adapter) and the strict plan.
- ``layouts``: layout and family detection and the public readers ``read_sdxl``, ``read_ip_adapter``,
  ``read_image_encoder``, ``open_weights``.
- ``lora``: one key table per LoRA layout (kohya, peft, older diffusers, attention processor), ``read_lora`` (strict)
  and ``fuse`` (the deltas added as each weight is read).
"""

from .keymaps import LayoutError, MappedWeights
from .layouts import SDXLCheckpoint, open_weights, preset_configs, read_image_encoder, read_ip_adapter, read_sdxl
from .safetensors_io import (
    LazyTensor,
    SafetensorsFile,
    ShardedSafetensors,
    WeightFileError,
    save_safetensors,
    save_sharded,
)
from .torch_bin import TorchBinFile, UnsafePickleError

__all__ = [
    "LayoutError",
    "LazyTensor",
    "MappedWeights",
    "SDXLCheckpoint",
    "SafetensorsFile",
    "ShardedSafetensors",
    "TorchBinFile",
    "UnsafePickleError",
    "WeightFileError",
    "open_weights",
    "preset_configs",
    "read_image_encoder",
    "read_ip_adapter",
    "read_sdxl",
    "save_safetensors",
    "save_sharded",
]
