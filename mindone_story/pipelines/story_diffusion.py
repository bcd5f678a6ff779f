"""StoryDiffusion on SDXL: id panels in write batches, then the other panels reading the id bank.

Order of work, as the released app: for each character (in character-box order) its id panels run as one batch (or,
with ``window``, as consecutive batches of ``window`` panels, each also attending to the previous batch), writing
the character's id bank; then the remaining panels run in batches of ``read_batch``, each attending to the banks of
the characters it names. ``[NC]`` panels attend to nothing extra. Every panel's initial noise comes from its own seed
``(seed, panel index)``, so a panel's image does not depend on batching or order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ..models.freeu import APP_FREEU, freeu_factors
from ..pretrained import SDXLModels
from ..story.consistent import install
from ..story.id_bank import Draws, IdBank, Phase
from ..story.prompts import Story, apply_style
from .sdxl import SDXLPipeline

# The negative prompt of mindone's StoryDiffusion run.py; the style's negative is prepended to it.
DEFAULT_NEGATIVE = (
    "naked, deformed, bad anatomy, disfigured, poorly drawn face, mutation, extra limb, ugly, disgusting, "
    "poorly drawn hands, missing limb, floating limbs, disconnected limbs, blurry, watermarks, oversaturated, "
    "distorted hands, amputation"
)


@dataclass(frozen=True)
class StorySettings:
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

    def __post_init__(self):
        object.__setattr__(self, "freeu", freeu_factors(self.freeu))  # 'off', 's1,s2,b1,b2' or four numbers

    def check(self) -> None:
        for name in ("sa32", "sa64"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {getattr(self, name)}")
        if self.window is not None and self.window < 1:
            raise ValueError(f"window must be at least 1, got {self.window}")
        if self.read_batch < 1:
            raise ValueError(f"read_batch must be at least 1, got {self.read_batch}")

    def to_dict(self) -> dict:
        return asdict(self)


PanelCallback = Callable[[int, Image.Image], None]


class StoryDiffusionPipeline:
    def __init__(self, models: SDXLModels, mode: str = "graph"):
        self.sdxl = SDXLPipeline(models, mode=mode)
        self.unet = models.unet
        self.processors = install(models.unet)
        self.bank = IdBank()

    def level_tokens(self, height: int, width: int) -> list[int]:
        """Tokens per image at the two consistent-attention resolutions: 1/32 and 1/16 of the image for SDXL."""
        latent_h, latent_w = height // self.sdxl.vae_scale, width // self.sdxl.vae_scale
        levels = len(self.unet.config.block_out_channels)
        blocks = [b for b, block in enumerate(self.unet.up_blocks) if block.attentions is not None]
        return [(latent_h >> (levels - 1 - b)) * (latent_w >> (levels - 1 - b)) for b in blocks]

    def panel_noise(self, seed: int, index: int, height: int, width: int) -> np.ndarray:
        return self.sdxl.initial_noise([seed, index], 1, height, width)

    def prompts(self, story: Story, settings: StorySettings) -> tuple[list[str], list[str]]:
        styled = [apply_style(settings.style_name, p.prompt, settings.negative_prompt) for p in story.panels]
        return [p for p, _ in styled], [n for _, n in styled]

    def truncation(self, story: Story, settings: StorySettings) -> dict[int, dict[str, str]]:
        """The panels whose styled prompt or negative prompt passes CLIP's 77 tokens: {panel: {"prompt": dropped
        text, "negative_prompt": dropped text}}, each key only where something is dropped."""
        cut: dict[int, dict[str, str]] = {}
        for key, texts in zip(("prompt", "negative_prompt"), self.prompts(story, settings)):
            for i, text in enumerate(self.sdxl.dropped_text(texts)):
                if text:
                    cut.setdefault(i, {})[key] = text
        return cut

    def _run(
        self,
        story: Story,
        settings: StorySettings,
        indices: Sequence[int],
        write_as: str | None,
        reads: list[list[str]],
        phase_seed: int,
        progress,
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
        embeds = self.sdxl.encode_prompts([positive[i] for i in indices], [negative[i] for i in indices])
        noise = np.concatenate([self.panel_noise(settings.seed, i, settings.height, settings.width) for i in indices])
        latents = self.sdxl.denoise(
            noise,
            embeds,
            settings.steps,
            settings.guidance_scale,
            settings.scheduler,
            story=phase,
            seed=settings.seed + phase_seed,
            progress=progress,
            freeu=settings.freeu,
        )
        return self.sdxl.decode(latents)

    def __call__(
        self, story: Story, settings: StorySettings, on_panel: PanelCallback | None = None, progress: bool = True
    ) -> dict[int, Image.Image]:
        """Generate every panel; ``on_panel(index, image)`` is called as soon as each panel is decoded."""
        settings.check()
        self.sdxl.check_size(settings.height, settings.width)
        self.bank = IdBank()
        images: dict[int, Image.Image] = {}

        def done(indices, batch_images):
            for i, image in zip(indices, batch_images):
                images[i] = image
                if on_panel is not None:
                    on_panel(i, image)
                bar.update(1)

        bar = tqdm(total=len(story.panels), desc="panels", disable=not progress)
        phase_seed = 0
        for name, ids in story.id_panels.items():
            window = settings.window or len(ids)
            # with a window, the first tile gets the same (empty, masked) room for banked images as the later ones,
            # so every full tile runs one compiled graph: peak memory does not grow with the number of id images
            room = window if settings.window else None
            for start in range(0, len(ids), window):
                tile = list(ids[start : start + window])
                reads = [[name] if start else [] for _ in tile]  # later windows also see the previous one
                batch = self._run(
                    story, settings, tile, name, reads, phase_seed, progress, recent=window, bank_images=room
                )
                done(tile, batch)
                phase_seed += 1
        others = list(story.other_indices)
        # every read batch gets room for the most banked images any panel reads: one compiled graph for all
        most = max([sum(len(story.id_panels[c]) for c in story.panels[i].characters) for i in others] + [0])
        for start in range(0, len(others), settings.read_batch):
            batch_ids = others[start : start + settings.read_batch]
            reads = [list(story.panels[i].characters) for i in batch_ids]
            done(batch_ids, self._run(story, settings, batch_ids, None, reads, phase_seed, progress, bank_images=most))
            phase_seed += 1
        bar.close()
        return images
