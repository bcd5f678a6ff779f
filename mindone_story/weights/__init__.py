"""Weight reading and key layouts: numpy only, no torch or mindspore import.

- ``safetensors_io``: ``LazyWeights``, the one lazy source (name -> ``LazyTensor`` with shape, dtype and load; read
  as name -> np.ndarray); lazy safetensors reading (``SafetensorsFile``, ``ShardedSafetensors``), atomic and sharded
  writing.
- ``torch_bin``: ``TorchBinFile``, a reader for torch zip checkpoints through an allow-list unpickler.
- ``keymaps``: one key map per layout (sgm UNet / VAE / OpenCLIP, diffusers, HF CLIP, IP-Adapter), ``map_keys`` and
  the one strict ``check`` against a model's own parameter shapes (``models.load.parameter_shapes``).
- ``layouts``: layout and family detection and the public readers ``read_sdxl``, ``read_ip_adapter``,
  ``read_image_encoder``, ``open_weights``.
- ``lora``: one key table per LoRA layout (kohya, peft, older diffusers, attention processor), ``read_lora`` (strict)
  and ``fuse`` (the deltas added as each weight is read).
"""

from .keymaps import LayoutError, MappedWeights, check, map_keys
from .layouts import (
    SDXL_MODEL_INDEX,
    SDXLCheckpoint,
    open_weights,
    preset_configs,
    read_image_encoder,
    read_ip_adapter,
    read_sdxl,
)
from .safetensors_io import (
    LazyTensor,
    LazyWeights,
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
    "LazyWeights",
    "MappedWeights",
    "SDXLCheckpoint",
    "SDXL_MODEL_INDEX",
    "SafetensorsFile",
    "ShardedSafetensors",
    "TorchBinFile",
    "UnsafePickleError",
    "WeightFileError",
    "check",
    "map_keys",
    "open_weights",
    "preset_configs",
    "read_image_encoder",
    "read_ip_adapter",
    "read_sdxl",
    "save_safetensors",
    "save_sharded",
]
