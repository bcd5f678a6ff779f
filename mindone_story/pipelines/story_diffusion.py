"""StoryDiffusion on SDXL: id panels in write batches, then the other panels reading the id bank.

Order of work, as the released app: for each character (in character-box order) its id panels run as one batch (or,
with ``window``, as consecutive batches of ``window`` panels, each also attending to the previous batch), writing
the character's id bank; then the remaining panels run in batches of ``read_batch``, each attending to the banks of
the characters it names. ``[NC]`` panels attend to nothing extra. Every panel's initial noise comes from its own seed
``(seed, panel index)``, so a panel's image does not depend on batching or order.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

from .. import checks
from ..errors import StoryError
from ..models.freeu import APP_FREEU, freeu_factors
from ..models.unet import up_level_tokens
from ..pretrained import SDXLModels
from ..processors.consistent import install
from ..processors.id_bank import Draws, IdBank, Phase, bank_bytes
from ..story.prompts import STYLE_NAMES, Story, apply_style
from .schedulers import SCHEDULERS
from .sdxl import SDXLPipeline, StepCallback

# The negative prompt of mindone's StoryDiffusion run.py; the style's negative is prepended to it.
DEFAULT_NEGATIVE = (
    "naked, deformed, bad anatomy, disfigured, poorly drawn face, mutation, extra limb, ugly, disgusting, "
    "poorly drawn hands, missing limb, floating limbs, disconnected limbs, blurry, watermarks, oversaturated, "
    "distorted hands, amputation"
)

# The negative prompt of every example of the released app (gradio_app_sdxl_specific_id_low_vram.py; its text box
# starts empty), for the "app" preset.
APP_NEGATIVE = (
    "bad anatomy, bad hands, missing fingers, extra fingers, three hands, three legs, bad arms, missing legs, "
    "missing arms, poorly drawn face, bad face, fused face, cloned face, three crus, fused feet, fused thigh, "
    "extra crus, ugly fingers, horn, cartoon, cg, 3d, unreal, animate, amputation, disconnected limbs"
)
# Named defaults for the front ends: mindone's run.py (ours), and the released app's sliders and examples.
# ``typesetting`` is the page layout's; the rest are StoryDiffusionSettings fields.
PRESETS: dict[str, dict] = {
    "mindone": {"steps": 50, "seed": 3407, "negative_prompt": DEFAULT_NEGATIVE, "typesetting": "Four Pannel"},
    "app": {"steps": 35, "seed": 0, "negative_prompt": APP_NEGATIVE, "typesetting": "Classic Comic Style"},
}


@dataclass(frozen=True)
class StoryDiffusionSettings:
    """Everything that decides StoryDiffusion's images, checked when made (zero is a value, numbers are finite)."""

    height: int = 768
    width: int = 768
    steps: int = 50
    guidance_scale: float = 5.0
    seed: int = 3407
    sa32: float = 0.5
    sa64: float = 0.5
    style_name: str = "Comic book"
    negative_prompt: str = DEFAULT_NEGATIVE
    scheduler: str = "ddim"
    window: int | None = None  # id panels per write batch (None: all id panels of a character at once)
    read_batch: int = 1  # later panels per batch
    freeu: tuple[float, float, float, float] | None = APP_FREEU  # (s1, s2, b1, b2) or None; the app's by default
    long_prompts: bool = False  # prompts past 77 tokens in 77-token chunks (compel's way) instead of cut

    def __post_init__(self):
        object.__setattr__(self, "freeu", freeu_factors(self.freeu))  # 'off', 's1,s2,b1,b2' or four numbers
        height, width = checks.image_size(self.height, self.width)
        values = {
            "height": height,
            "width": width,
            "steps": checks.whole("steps", self.steps, 1, 1000),
            "guidance_scale": checks.number("guidance_scale", self.guidance_scale, 0.0),
            "seed": checks.seed(self.seed),
            "sa32": checks.number("sa32", self.sa32, 0.0, 1.0),
            "sa64": checks.number("sa64", self.sa64, 0.0, 1.0),
            "style_name": checks.one_of("style", self.style_name, STYLE_NAMES),
            "scheduler": checks.one_of("scheduler", self.scheduler, sorted(SCHEDULERS)),
            "window": None if self.window is None else checks.whole("window", self.window, 1),
            "read_batch": checks.whole("read_batch", self.read_batch, 1),
        }
        if not isinstance(self.long_prompts, bool):
            raise StoryError(f"long_prompts must be true or false, got {self.long_prompts!r}")
        if not isinstance(self.negative_prompt, str):
            raise StoryError(f"negative_prompt must be text, got {self.negative_prompt!r}")
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def to_dict(self) -> dict:
        return {**asdict(self), "freeu": None if self.freeu is None else list(self.freeu)}  # as JSON reads it back


PanelCallback = Callable[[int, Image.Image], None]


@dataclass(frozen=True)
class Replay:
    """What pins a story's randomness beyond its settings, so a later run can redraw panels of an earlier one
    byte for byte: a kept character's id panels (their noise seeds and the draw seed of each id tile, as recorded),
    and a continued story's parts (read batches never span the start of a part, so earlier batches keep their
    composition). Empty, every panel's noise seed is ``(seed, panel)`` and phases are numbered in order."""

    noise_seeds: Mapping[int, Sequence[int]] = field(default_factory=dict)  # panel -> noise seed
    id_phase_seeds: Mapping[str, Sequence[int]] = field(default_factory=dict)  # character -> seed of each id tile
    parts: Sequence[int] = ()  # panel indices where later parts of a continued story begin
    text_chunks: int | None = None  # long_prompts: the chunk count to pad to (default: the story's own)

    def noise_seed(self, seed: int, panel: int) -> list[int]:
        return list(self.noise_seeds.get(panel, (seed, panel)))


class StoryDiffusionPipeline:
    def __init__(self, models: SDXLModels, mode: str = "graph", photomaker=None):
        """``photomaker``: a PhotoMaker id encoder (pipelines/photomaker.py ``load_photomaker``) for stories with
        reference photos; its LoRA must already be fused into ``models`` (``load_sdxl(..., loras=[(file, 1.0)])``),
        so the story processors go on the LoRA-fused up-block attn1 layers, as the app does."""
        self.sdxl = SDXLPipeline(models, mode=mode)
        self.unet = models.unet
        self.processors = install(models.unet)
        self.bank = IdBank(self.sdxl.dtype)
        self.photomaker = None
        if photomaker is not None:
            from .photomaker import PhotoMakerConditioning

            self.photomaker = PhotoMakerConditioning(self.sdxl, photomaker, mode)

    def level_tokens(self, height: int, width: int) -> list[int]:
        """Tokens per image at the two consistent-attention resolutions: 1/32 and 1/16 of the image for SDXL."""
        return up_level_tokens(self.unet, height // self.sdxl.vae_scale, width // self.sdxl.vae_scale)

    def prompts(self, story: Story, settings: StoryDiffusionSettings) -> tuple[list[str], list[str]]:
        styled = [apply_style(settings.style_name, p.prompt, settings.negative_prompt) for p in story.panels]
        return [p for p, _ in styled], [n for _, n in styled]

    def text_chunks(self, story: Story, settings: StoryDiffusionSettings) -> int | None:
        """With ``long_prompts``, the 77-token chunks of every prompt of the run (its longest prompt's count, so
        every batch has one shape); None without."""
        if not settings.long_prompts:
            return None
        positive, negative = self.prompts(story, settings)
        return self.sdxl.text_chunks(positive + negative)

    def truncation(self, story: Story, settings: StoryDiffusionSettings) -> dict[int, dict[str, str]]:
        """The panels whose styled prompt or negative prompt passes CLIP's 77 tokens: {panel: {"prompt": dropped
        text, "negative_prompt": dropped text}}, each key only where something is dropped (nothing with
        ``long_prompts``)."""
        cut: dict[int, dict[str, str]] = {}
        if settings.long_prompts:
            return cut
        for key, texts in zip(("prompt", "negative_prompt"), self.prompts(story, settings)):
            for i, text in enumerate(self.sdxl.dropped_text(texts)):
                if text:
                    cut.setdefault(i, {})[key] = text
        return cut

    def _run(
        self,
        story: Story,
        settings: StoryDiffusionSettings,
        indices: Sequence[int],
        write_as: str | None,
        reads: list[list[str]],
        phase_seed: int,
        on_step,
        replay: Replay,
        photos=None,
        **phase_args,
    ) -> list[Image.Image]:
        tokens = self.level_tokens(settings.height, settings.width)
        draws = Draws.sample(
            np.random.default_rng([settings.seed, phase_seed]),
            settings.steps,
            len(indices),
            tokens,
            [settings.sa32, settings.sa64],
            len(self.processors),
        )
        phase = Phase(
            self.processors, tokens, [settings.sa32, settings.sa64], draws, self.bank, write_as, reads, **phase_args
        )
        positive, negative = self.prompts(story, settings)
        if photos is None:
            embeds = self.sdxl.encode_prompts(
                [positive[i] for i in indices], [negative[i] for i in indices], replay.text_chunks
            )
        else:  # (RefPhotos, per panel its character's photo embeddings or None)
            ref, id_embeds = photos
            embeds = self.photomaker.embeds(
                [positive[i] for i in indices],
                [negative[i] for i in indices],
                [id_embeds[i] for i in indices],
                ref.start_merge_step(settings.steps),
            )
        h, w = settings.height, settings.width
        noise = np.concatenate([self.sdxl.initial_noise(replay.noise_seed(settings.seed, i), 1, h, w) for i in indices])
        latents = self.sdxl.denoise(
            noise,
            embeds,
            settings.steps,
            settings.guidance_scale,
            settings.scheduler,
            story=phase,
            seed=settings.seed + phase_seed,
            on_step=on_step,
            freeu=settings.freeu,
        )
        return self.sdxl.decode(latents)

    def read_batches(
        self, story: Story, settings: StoryDiffusionSettings, replay: Replay = Replay()
    ) -> list[list[int]]:
        """The later panels in their batches, in the order they run; each batch's draws follow from its place."""
        return read_batches(list(story.other_indices), settings.read_batch, replay.parts)

    def bank_size(self, story: Story, settings: StoryDiffusionSettings) -> int:
        """The expected bytes of the story's id bank: every id image's sampled tokens, per step and layer."""
        images = sum(len(v) for v in story.id_panels.values())
        tokens = self.level_tokens(settings.height, settings.width)
        rates = [settings.sa32, settings.sa64]
        return bank_bytes(self.processors, tokens, rates, images, settings.steps, self.sdxl.dtype)

    def check(
        self, story: Story, settings: StoryDiffusionSettings, photos=None, bank: str = "auto", bank_dir=None
    ) -> tuple[list[str | None], str]:
        """Refuse, before any work, a story whose largest batch or whose id bank cannot fit in the host's memory
        (CPU), or in ``bank_dir``'s disk, or reference photos (``RefPhotos``) it cannot use. Returns per panel the
        character whose photos it uses, and where the id bank goes (``checks.bank_place``)."""
        from ..layers import holds_scores

        uses: list[str | None] = [None] * len(story.panels)
        if photos is not None:
            if self.photomaker is None:
                raise StoryError("reference photos need a PhotoMaker id encoder; none was loaded")
            if settings.long_prompts:  # the fused class-token positions are those of one 77-token encoding
                raise StoryError("reference photos take prompts of one 77-token encoding: turn long_prompts off")
            from .photomaker import check_photos

            uses = check_photos(story, settings.style_name, photos)
            counts = [0 if c is None else len(photos.photos[c]) for c in uses]
            self.photomaker.check(self.prompts(story, settings)[0], counts)

        ids = [len(v) for v in story.id_panels.values()] + [0]
        batch = max(settings.window or max(ids), settings.read_batch if story.other_indices else 0, 1)
        unet, vae = self.unet.config, self.sdxl.models.vae.config
        scores = holds_scores(self.sdxl.dtype)
        checks.fits(unet, vae, settings.height, settings.width, batch, scores_in_memory=scores)
        activations, _ = checks.least_memory(unet, vae, settings.height, settings.width, batch, scores)
        return uses, checks.bank_place(self.bank_size(story, settings), activations, bank, bank_dir)

    def __call__(
        self,
        story: Story,
        settings: StoryDiffusionSettings,
        on_panel: PanelCallback | None = None,
        on_step: StepCallback | None = None,
        skip: Sequence[int] = (),
        bank: str = "auto",
        bank_dir: str | Path | None = None,
        photos=None,
        replay: Replay = Replay(),
    ) -> dict[int, Image.Image]:
        """Generate every panel; ``on_panel(index, image)`` is called as soon as each panel is decoded.

        ``skip``: panels already made (a resumed run). Id panels always run, because later panels read the banks
        they write; a batch of later panels runs unless all its panels are skipped. Batches keep their composition
        and their draws, so a resumed run gives the same images as an uninterrupted one.

        ``photos``: the characters' reference photos (``RefPhotos``), each character's encoded once here.
        ``bank``: where the id bank is kept, ``auto`` (memory if it fits, else disk), ``memory`` or ``disk``;
        ``bank_dir``: the folder for a bank on disk (default: a new temporary folder), deleted afterwards.
        ``replay``: seeds and shapes carried over from an earlier run (a kept character, a continued story); its
        ``text_chunks`` is kept (padding chunks change the images), so a story needing more is refused."""
        uses, place = self.check(story, settings, photos, bank, bank_dir)
        chunks = self.text_chunks(story, settings)
        if chunks is not None and replay.text_chunks is not None:
            if chunks > replay.text_chunks:
                raise StoryError(
                    f"a prompt of this story needs {chunks} chunks of 75 tokens; the characters or story it continues "
                    f"were made with {replay.text_chunks}"
                )
            chunks = replay.text_chunks
        replay = replace(replay, text_chunks=chunks)
        if photos is not None:  # each character's photos encoded once
            encoded = {n: self.photomaker.encode_photos(p) for n, p in photos.photos.items()}
            photos = (photos, [None if c is None else encoded[c] for c in uses])
        if place == "disk" and bank_dir is None:
            bank_dir = tempfile.mkdtemp(prefix="mindone-story-bank-")
        self.bank = IdBank(self.sdxl.dtype, bank_dir if place == "disk" else None)
        try:
            return self._story(story, settings, on_panel, on_step, set(skip), photos, replay)
        finally:  # the bank is gigabytes at full size: never kept past the call
            self.bank.close()
            self.bank = IdBank(self.sdxl.dtype)

    def _story(self, story, settings, on_panel, on_step, skip, photos, replay) -> dict[int, Image.Image]:
        images: dict[int, Image.Image] = {}

        def done(indices, batch_images):
            for i, image in zip(indices, batch_images):
                images[i] = image
                if on_panel is not None:
                    on_panel(i, image)

        tiles = id_tiles(story.id_panels, settings.window, replay)
        for name, tile, seed, first in tiles:
            window = settings.window or len(tile)
            # with a window, the first tile gets the same (empty, masked) room for banked images as the later ones,
            # so every full tile runs one compiled graph: peak memory does not grow with the number of id images
            room = window if settings.window else None
            reads = [[] if first else [name] for _ in tile]  # later windows also see the previous one
            batch = self._run(
                story,
                settings,
                tile,
                name,
                reads,
                seed,
                on_step,
                replay,
                photos=photos,
                recent=window,
                bank_images=room,
            )
            done(tile, batch)
        phase_seed = len(tiles)
        others = list(story.other_indices)
        # every read batch gets room for the most banked images any panel reads: one compiled graph for all
        most = max([sum(len(story.id_panels[c]) for c in story.panels[i].characters) for i in others] + [0])
        for batch_ids in self.read_batches(story, settings, replay):
            reads = [list(story.panels[i].characters) for i in batch_ids]
            if not skip.issuperset(batch_ids):
                batch = self._run(
                    story,
                    settings,
                    batch_ids,
                    None,
                    reads,
                    phase_seed,
                    on_step,
                    replay,
                    photos=photos,
                    bank_images=most,
                )
                done(batch_ids, batch)
            phase_seed += 1
        return images


def id_tiles(
    id_panels: Mapping[str, Sequence[int]], window: int | None, replay: Replay = Replay()
) -> list[tuple[str, list[int], int, bool]]:
    """Every id phase in order: (character, its panels, draw seed, first tile of the character). Phases are
    numbered from 0 in character-box order; a kept character's tiles keep their recorded seeds."""
    tiles, phase = [], 0
    for name, ids in id_panels.items():
        size = window or len(ids)
        kept = replay.id_phase_seeds.get(name)
        for k, start in enumerate(range(0, len(ids), size)):
            tiles.append((name, list(ids[start : start + size]), phase if kept is None else int(kept[k]), start == 0))
            phase += 1
    return tiles


def read_batches(others: Sequence[int], size: int, parts: Sequence[int] = ()) -> list[list[int]]:
    """The later panels in batches of ``size``, in story order, a new batch at the start of every part."""

    def part(i: int) -> int:
        return sum(i >= start for start in parts)

    batches: list[list[int]] = []
    for i in others:
        if batches and len(batches[-1]) < size and part(batches[-1][0]) == part(i):
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches
