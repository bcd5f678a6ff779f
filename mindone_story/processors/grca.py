"""Global reference cross-attention (Story-Adapter): every panel of round r attends to all panels of round r-1.

Story-Adapter (jwmao1/story-adapter, ``run.py`` and ``StoryAdapterXL``) regenerates the whole story for R rounds
(10 by default). In round r >= 1 each panel is generated with IP-Adapter's decoupled cross-attention over the
reference tokens of ALL N panels of the previous round: each reference image is resized to 256x256, CLIP-
preprocessed and encoded, projected to 4 tokens, and the N token groups are concatenated along the sequence
(4N tokens). The unconditional CFG half uses the projection of zero image embeddings (for the Resampler, the
hidden states of an all-zero image, as IP-Adapter-Plus does). The reference weight follows linspace(0.3, 0.5, R).

The original re-encodes all N references for every panel (N^2 image encodings per round) and projects them to K/V
again at every step. Here both are done once per round: ``ReferenceEncoder.control`` encodes the N references one
by one (counted in ``images_encoded``), projects them, computes each attn2 layer's K/V once, and returns a
``GlobalReference`` whose tensors every panel and step of the round reuse.
"""

from __future__ import annotations

from collections.abc import Sequence

import mindspore as ms
import numpy as np
from mindspore import Tensor, ops
from PIL import Image

from ..models.clip_preprocess import clip_preprocess
from ..modes import compiled

REFERENCE_SIZE = 256  # the original keeps each round's panels resized to 256x256 (PIL's default bicubic filter)
SCALE_FIRST, SCALE_LAST = 0.3, 0.5


def round_scales(rounds: int) -> list[float]:
    """The reference weight of rounds 1..R: np.linspace(0.3, 0.5, R), as the original."""
    return [float(s) for s in np.linspace(SCALE_FIRST, SCALE_LAST, rounds)]


def reference_pixels(images: Sequence[Image.Image], image_size: int) -> np.ndarray:
    """Reference images -> CLIP pixel values [N, 3, S, S]: resize to 256x256, then CLIPImageProcessor."""
    small = [image.convert("RGB").resize((REFERENCE_SIZE, REFERENCE_SIZE), Image.BICUBIC) for image in images]
    return clip_preprocess(small, image_size)


class GlobalReference:
    """A StoryControl for the UNet's decoupled cross-attention: the same ``(scale, keys, values)`` at every step."""

    def __init__(self, scale: float, keys: tuple, values: tuple):
        self.scale = scale
        # mutable: a new round's values (and a new scale) are graph inputs, never a recompile
        self._inputs = ms.mutable((Tensor(np.float32(scale)), tuple(keys), tuple(values)))

    def inputs(self, step: int) -> tuple:
        return self._inputs

    def collect(self, step: int) -> None:
        pass


class ReferenceEncoder:
    """Encodes a round's reference images and turns their tokens into per-layer reference K/V.

    Each reference is encoded alone (batch 1): its tokens are a function of its image only, not of which other
    panels share an encoder call, so ranks that made different panels encode their own and gather the tokens
    (``parallel``), and the gathered reference equals the one a single process builds, bit for bit."""

    def __init__(self, image_encoder, ip_adapter, mode: str = "graph"):
        self.ip_adapter = ip_adapter
        self.image_size = image_encoder.config.image_size
        self._encode = compiled(image_encoder.construct, mode)
        self._project = compiled(ip_adapter.project, mode)
        self._kv = compiled(ip_adapter.reference_kv, mode)
        self._uncond: np.ndarray | None = None
        self.images_encoded = 0  # reference images through the CLIP encoder, over the encoder's lifetime

    def _features(self, pixels: np.ndarray) -> Tensor:
        """CLIP features: the projected embedding (ImageProjModel) or the penultimate hidden states (Resampler)."""
        embeds, _, penultimate = self._encode(Tensor(pixels))
        return penultimate if self.ip_adapter.uses_hidden_states else embeds

    def panel_tokens(self, image: Image.Image) -> np.ndarray:
        """One reference's tokens [T, ctx]."""
        self.images_encoded += 1
        return self._project(self._features(reference_pixels([image], self.image_size))).asnumpy()[0]

    def unconditional_tokens(self) -> np.ndarray:
        """[T, ctx]: the tokens of zero image embeddings (ImageProjModel) or of an all-zero image (Resampler), the
        same for every reference, computed once per run."""
        if self._uncond is None:
            zero = np.zeros((1, 3, self.image_size, self.image_size), np.float32)
            features = self._features(zero)
            if not self.ip_adapter.uses_hidden_states:
                features = ops.zeros_like(features)
            self._uncond = self._project(features).asnumpy()[0]
        return self._uncond

    def tokens_of(self, panels: Sequence[np.ndarray]) -> Tensor:
        """[2, N*T, ctx]: the unconditional tokens, then the N references' tokens concatenated image by image."""
        if not len(panels):
            raise ValueError("no reference images")
        uncond = np.concatenate([self.unconditional_tokens()] * len(panels))
        return Tensor(np.stack([uncond, np.concatenate(panels)]))

    def tokens(self, images: Sequence[Image.Image]) -> Tensor:
        return self.tokens_of([self.panel_tokens(image) for image in images])

    def control(self, images: Sequence[Image.Image], scale: float) -> GlobalReference:
        """The round's UNet input: each attn2 layer's reference K/V, computed once for all panels and steps."""
        return self.control_from_tokens(self.tokens(images), scale)

    def control_from_tokens(self, tokens: Tensor, scale: float) -> GlobalReference:
        keys, values = self._kv(tokens)
        return GlobalReference(scale, keys, values)
