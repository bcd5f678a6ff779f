"""CLIP image preprocessing as transformers' CLIPImageProcessor does it for IP-Adapter's image encoders: resize the
shortest side (bicubic, PIL), centre crop, scale to [0, 1], normalise with CLIP's mean and std. Plain numpy + PIL."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


def resize_shortest_side(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    new_size = (size, new_long) if width <= height else (new_long, size)
    return image.resize(new_size, resample=Image.BICUBIC)


def center_crop(pixels: np.ndarray, size: int) -> np.ndarray:
    """Crop an HWC array to size×size around the centre (rounding the offsets down, as transformers does)."""
    height, width = pixels.shape[:2]
    if height < size or width < size:
        raise ValueError(f"image of {width}x{height} is smaller than the crop size {size}")
    top, left = (height - size) // 2, (width - size) // 2
    return pixels[top : top + size, left : left + size]


def clip_preprocess(images: Sequence[Image.Image], size: int = 224) -> np.ndarray:
    """PIL images -> float32 pixel values [N, 3, size, size]."""
    if not images:
        raise ValueError("no images to preprocess")
    out = []
    for image in images:
        pixels = np.asarray(resize_shortest_side(image.convert("RGB"), size))
        pixels = (center_crop(pixels, size).astype(np.float64) / 255.0).astype(np.float32)
        out.append(((pixels - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1))
    return np.stack(out).astype(np.float32)
