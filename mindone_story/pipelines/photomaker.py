"""Reference photos of the characters: PhotoMaker v1 conditioning, as StoryDiffusion's "Using Ref Images" mode runs
it (HVision-NKU/StoryDiffusion ``utils/pipeline.py``, ``gradio_app_sdxl_specific_id_low_vram.py``).

Text. The trigger word ``img`` is added to both tokenizers as a special token. In a prompt, the token before it is
the class word ("a man img, ..."): the trigger is removed, the class token repeated once per id photo, and those
positions (the class-token mask) get the fused embedding ``fuse(prompt token, photo embedding)``; the pooled
embedding is the second encoder's on those expanded ids. The prompt without the trigger (encoded, the trigger
removed, decoded, encoded again, as the original does for every panel) is the other conditioning: steps
``i <= start_merge_step`` (``min(int(style_strength_ratio / 100 * steps), 30)``, the original's ``<=``) and every
``[NC]`` panel use it, later steps use the fused one. Both are computed before sampling; the UNet gets the one of
its step as its context input, so the compiled graph never sees the switch as Python state.

Differences from the original, all additions: any number of characters, several photos each (the original takes one
per character from its upload), each character's photos encoded once per story rather than once per panel, and a
panel naming no photo character takes the text-only prompt at every step (the original fails there). A panel that
names two characters with photos is refused, as in the original (PhotoMaker fuses one identity per prompt).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import mindspore as ms
import numpy as np
from mindspore import Tensor
from PIL import Image, ImageOps, UnidentifiedImageError

from .. import checks
from ..errors import StoryError
from ..models.clip_preprocess import clip_preprocess
from ..models.photomaker import PhotoMakerConfig, PhotoMakerIDEncoder
from ..modes import compiled
from ..story.prompts import Story, apply_style
from .sdxl import PromptEmbeds, SDXLPipeline

TRIGGER = "img"
PHOTOMAKER_V1 = "TencentARC/PhotoMaker/photomaker-v1.bin"  # the file the app downloads
MAX_MERGE_STEP = 30  # the app's cap on start_merge_step
DEFAULT_STYLE_STRENGTH = 20.0  # the app's "Style strength of Ref Image (%)" default


class RefPhotoError(StoryError):
    """Reference photos that cannot be used with this story; the message names the character, panel or file."""


# -- the photos ---------------------------------------------------------------------------------------------------
def open_photo(path: str | os.PathLike) -> Image.Image:
    """An RGB photo, upright by its EXIF orientation (diffusers' load_image, which the app uses)."""
    path = Path(path)
    if not path.is_file():
        raise RefPhotoError(f"reference photo not found: {path}")
    try:
        with Image.open(path) as image:
            image.load()
            return ImageOps.exif_transpose(image).convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise RefPhotoError(f"reference photo {path} is not an image PIL can read ({e})") from None


@dataclass(frozen=True)
class RefPhotos:
    """The id photos of each character (name -> photos) and the style strength of the reference (percent)."""

    photos: Mapping[str, tuple[Image.Image, ...]]
    paths: Mapping[str, tuple[str, ...]]  # what is recorded; names for in-memory photos
    style_strength_ratio: float = DEFAULT_STYLE_STRENGTH

    def __post_init__(self):
        ratio = checks.number("style_strength_ratio", self.style_strength_ratio, 0.0, 100.0)
        object.__setattr__(self, "style_strength_ratio", ratio)
        for name, photos in self.photos.items():
            if not photos:
                raise RefPhotoError(f"character [{name}] is given no reference photos")

    @classmethod
    def from_paths(
        cls, paths: Mapping[str, Sequence[str | os.PathLike]], style_strength_ratio: float = DEFAULT_STYLE_STRENGTH
    ) -> RefPhotos:
        photos = {name: tuple(open_photo(p) for p in files) for name, files in paths.items()}
        return cls(photos, {n: tuple(map(str, files)) for n, files in paths.items()}, style_strength_ratio)

    def start_merge_step(self, steps: int) -> int:
        return min(int(self.style_strength_ratio / 100 * steps), MAX_MERGE_STEP)

    def to_record(self) -> dict:
        digests = {
            n: [hashlib.sha256(p.tobytes()).hexdigest()[:16] for p in photos] for n, photos in self.photos.items()
        }
        return {
            "ref_images": {n: list(p) for n, p in self.paths.items()},
            "ref_image_digests": digests,  # of the decoded pixels: a resumed run must see the same photos
            "style_strength_ratio": self.style_strength_ratio,
        }


# -- the trigger word -----------------------------------------------------------------------------------------------
class TriggerText:
    """Both tokenizers with the trigger word added (copies: the model's own tokenizers stay as they are)."""

    def __init__(self, tokenizer, tokenizer_2):
        self.tokenizers = [copy.deepcopy(t) for t in (tokenizer, tokenizer_2)]
        for t in self.tokenizers:
            t.add_tokens([TRIGGER], special_tokens=True)
        self.ids = [t.convert_tokens_to_ids(TRIGGER) for t in self.tokenizers]

    def text_only(self, prompt: str) -> str:
        """The prompt with its trigger word removed, through the first tokenizer's encode and decode."""
        tokens = self.tokenizers[0].encode(prompt, add_special_tokens=False)
        if self.ids[0] in tokens:
            tokens.remove(self.ids[0])
        return self.tokenizers[0].decode(tokens)

    def expand(self, prompt: str, n: int) -> tuple[list[list[int]], int]:
        """Per tokenizer the ids with the trigger removed and the class token repeated ``n`` times, cut or padded to
        the window; and the first class-token position (the same for both: SDXL's tokenizers share a vocabulary)."""
        out, starts = [], set()
        for tokenizer, trigger in zip(self.tokenizers, self.ids):
            ids = tokenizer.encode(prompt)
            at = ids.index(trigger) - 1  # the class word's position once the trigger is gone
            clean = [t for t in ids if t != trigger]
            clean = clean[:at] + [clean[at]] * n + clean[at + 1 :]
            limit = tokenizer.model_max_length
            if at + n > limit:
                raise RefPhotoError(
                    f"the class word before {TRIGGER!r} falls past CLIP's {limit} tokens with {n} photos: {prompt!r}"
                )
            out.append(clean[:limit] + [tokenizer.pad_token_id] * (limit - len(clean)))
            starts.add(at)
        if len(starts) != 1:
            raise AssertionError("the two tokenizers place the class word differently")
        return out, starts.pop()


def check_photos(story: Story, style_name: str, photos: RefPhotos) -> list[str | None]:
    """Refuse, before any model is loaded, photos this story cannot use; return per panel the character whose
    photos it uses (None: the text-only prompt at every step). The trigger is counted as text: the tokenizers
    split an added special token out of the raw text wherever it occurs, so this count is theirs."""
    names = [c.name for c in story.characters]
    unknown = [n for n in photos.photos if n not in names]
    if unknown:
        defined = ", ".join(f"[{n}]" for n in names) or "none"
        raise RefPhotoError(
            f"reference photos for [{unknown[0]}], which the story does not define (characters: {defined})"
        )
    for c in story.characters:
        found = c.description.count(TRIGGER)
        if c.name in photos.photos and found == 0:
            raise RefPhotoError(
                f"character {c.tag} has reference photos but no trigger word {TRIGGER!r} after its class word "
                f"(write e.g. 'a man {TRIGGER}, wearing ...'): {c.description.strip()!r}"
            )
        if found > 1:
            raise RefPhotoError(f"character {c.tag} has {found} trigger words {TRIGGER!r}; PhotoMaker takes one")
        if found and c.name not in photos.photos:
            raise RefPhotoError(f"character {c.tag} has the trigger word {TRIGGER!r} but no reference photos")
    uses: list[str | None] = []
    for i, panel in enumerate(story.panels):
        with_photos = [n for n in panel.characters if n in photos.photos]
        if len(with_photos) > 1:
            raise RefPhotoError(
                f"panel {i} names {len(with_photos)} characters with reference photos ("
                + ", ".join(f"[{n}]" for n in with_photos)
                + "); PhotoMaker fuses one identity per prompt"
            )
        prompt = apply_style(style_name, panel.prompt)[0]
        want, found = (0 if panel.is_nc else len(with_photos)), prompt.count(TRIGGER)
        if found != want:
            raise RefPhotoError(
                f"panel {i} has {found} trigger words {TRIGGER!r} where its characters' descriptions give {want}: "
                f"{panel.text!r}"
            )
        if want and not re.search(r"\w", prompt[: prompt.index(TRIGGER)]):
            raise RefPhotoError(f"panel {i}: the trigger word {TRIGGER!r} must follow a class word: {prompt!r}")
        uses.append(with_photos[0] if want else None)
    return uses


# -- the conditioning ---------------------------------------------------------------------------------------------
class PhotoMakerConditioning:
    """The id encoder and the trigger-word text of one pipeline; ``encode_photos`` once per character, ``embeds``
    once per batch."""

    def __init__(self, sdxl: SDXLPipeline, encoder: PhotoMakerIDEncoder, mode: str = "graph"):
        cfg, unet = encoder.config, sdxl.models.unet.config
        if cfg.context_dim != unet.cross_attention_dim:
            raise RefPhotoError(
                f"the PhotoMaker id encoder gives {cfg.context_dim}-wide tokens but the UNet's text context is "
                f"{unet.cross_attention_dim} wide: it was made for another model"
            )
        self.sdxl, self.encoder = sdxl, encoder
        self.text = TriggerText(sdxl.models.tokenizer, sdxl.models.tokenizer_2)
        self._id_embeds = compiled(encoder.id_embeds, mode)
        self._fuse = compiled(encoder.fuse, mode)

    def check(self, prompts: Sequence[str], counts: Sequence[int]) -> None:
        """Each prompt with photos (count > 0) keeps its class word inside CLIP's window once expanded."""
        for prompt, n in zip(prompts, counts):
            if n:
                self.text.expand(prompt, n)

    def encode_photos(self, photos: Sequence[Image.Image]) -> Tensor:
        """[N, context] photo embeddings, one photo per call (one compiled shape for any number of photos)."""
        size = self.encoder.config.vision.image_size
        dtype = self.encoder.visual_projection.weight.dtype
        pixels = clip_preprocess(list(photos), size)
        return ms.ops.concat([self._id_embeds(Tensor(p[None]).astype(dtype)) for p in pixels])

    def _with_photos(self, prompt: str, id_embeds: Tensor) -> tuple[Tensor, Tensor]:
        """The fused context [1, 77, C] and the pooled embedding of the trigger prompt."""
        n = id_embeds.shape[0]
        ids, start = self.text.expand(prompt, n)
        hidden, pooled = [], None
        for encode, row in zip(self.sdxl._text, ids):
            _, penultimate, pooled = encode(Tensor(np.asarray([row], np.int32)))
            hidden.append(penultimate)
        context = ms.ops.concat(hidden, -1).astype(self.sdxl.dtype)
        tokens, width = context.shape[1], context.shape[2]
        placed = np.zeros((1, tokens, width), np.float32)
        placed[0, start : start + n] = id_embeds.astype(ms.float32).asnumpy()
        mask = np.zeros((1, tokens, 1), np.float32)
        mask[0, start : start + n] = 1.0
        return self._fuse(context, Tensor(placed), Tensor(mask)), pooled.astype(self.sdxl.dtype)

    def embeds(
        self, prompts: Sequence[str], negatives: Sequence[str], id_embeds: Sequence[Tensor | None], merge_step: int
    ) -> Callable[[int], PromptEmbeds]:
        """Per step the batch's conditioning: text-only while ``step <= merge_step``, then each prompt with photos
        fused (rows without photos stay text-only)."""
        text_only = self.sdxl.encode_prompts([self.text.text_only(p) for p in prompts], list(negatives))
        b = len(prompts)
        context, pooled = list(ms.ops.split(text_only.context, 1)), list(ms.ops.split(text_only.pooled, 1))
        for i, (prompt, ids) in enumerate(zip(prompts, id_embeds)):
            if ids is not None:
                context[b + i], pooled[b + i] = self._with_photos(prompt, ids)
        merged = PromptEmbeds(ms.ops.concat(context), ms.ops.concat(pooled))
        return lambda step: text_only if step <= merge_step else merged


# -- the checkpoint -----------------------------------------------------------------------------------------------
def load_photomaker(path: str | os.PathLike, dtype: ms.Type | None = None, config=None) -> PhotoMakerIDEncoder:
    """The id encoder of a PhotoMaker v1 file (its LoRA is fused with the SDXL weights: pass the same file to
    ``load_sdxl(..., loras=[(path, 1.0)])``, as the app's ``fuse_lora()``), checked strictly against the model
    before any tensor is read."""
    from ..layers import compute_dtype
    from ..pretrained import load_component
    from ..weights.photomaker import read_photomaker

    weights = read_photomaker(path, config)
    source = f"{path} (PhotoMaker id_encoder)"
    return load_component("photomaker", weights.config.to_dict(), weights, source, compute_dtype(dtype))[0]


TINY_PHOTOMAKER = "photomaker-tiny.safetensors"
TINY_LORA_RANK = 4


def tiny_photomaker_weights(model_dir: str | os.PathLike) -> tuple[dict[str, np.ndarray], PhotoMakerConfig]:
    """A PhotoMaker v1 for the tiny SDXL in ``model_dir``, in the real key layout with deterministic random weights:
    the tiny image encoder's tower (projection to the first text encoder's width), visual_projection_2 to the
    rest of the context, the fuse module, and a rank-4 LoRA on every UNet attention projection."""
    from ..pretrained import TINY_VERSION, model_shapes, random_weights
    from ..weights.lora import lora_modules
    from ..weights.photomaker import ID_PREFIX, LORA_PREFIX

    folder = Path(model_dir)
    unet = json.loads((folder / "unet" / "config.json").read_text())
    vision = json.loads((folder / "image_encoder" / "config.json").read_text())
    cfg = PhotoMakerConfig.from_dict({"vision": vision, "context_dim": unet["cross_attention_dim"]})
    models = model_shapes({"photomaker": cfg.to_dict(), "unet": unet})  # the models' own names and shapes
    shapes = {ID_PREFIX + k: v for k, v in models["photomaker"].items()}
    for module, shape in lora_modules(models["unet"]).items():
        m = re.fullmatch(r"(.+\.attn[12])\.(to_q|to_k|to_v|to_out)(\.0)?", module)
        if m:
            out, inp = shape
            key = f"{LORA_PREFIX}unet.{m.group(1)}.processor.{m.group(2)}_lora"
            shapes[f"{key}.down.weight"], shapes[f"{key}.up.weight"] = (TINY_LORA_RANK, inp), (out, TINY_LORA_RANK)
    return random_weights(shapes, f"tiny-v{TINY_VERSION}:photomaker"), cfg


def tiny_photomaker_file(cache_dir: str | os.PathLike | None = None) -> Path:
    """The tiny model's PhotoMaker file (safetensors, its config in the metadata), written once beside the model."""
    from ..pretrained import tiny_model_dir
    from ..weights.photomaker import CONFIG_KEY
    from ..weights.safetensors_io import save_safetensors

    folder = tiny_model_dir(cache_dir)
    target = folder / "photomaker" / TINY_PHOTOMAKER
    if not target.exists():
        target.parent.mkdir(exist_ok=True)
        weights, cfg = tiny_photomaker_weights(folder)
        save_safetensors(weights, target, {CONFIG_KEY: json.dumps(cfg.to_dict())})  # atomic
    return target
