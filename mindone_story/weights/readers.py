"""The public readers under the name some callers import; they live in ``layouts.py`` (stable import:
``from mindone_story.weights import read_sdxl``)."""

from .layouts import (
    SDXLCheckpoint,
    map_ip_adapter,
    map_single_file,
    open_weights,
    preset_configs,
    read_image_encoder,
    read_ip_adapter,
    read_sdxl,
)

__all__ = [
    "SDXLCheckpoint",
    "map_ip_adapter",
    "map_single_file",
    "open_weights",
    "preset_configs",
    "read_image_encoder",
    "read_ip_adapter",
    "read_sdxl",
]
