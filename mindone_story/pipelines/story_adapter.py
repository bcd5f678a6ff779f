"""Story-Adapter on SDXL: round 0 from text alone, then R rounds that regenerate every panel with global reference
cross-attention over all panels of the previous round, written to disk panel by panel so a run can be resumed.

Defaults follow the original (UCSC-VLAA/story-adapter ``run.py`` and ``StoryAdapterXL.generate``): DDIM with its
explicit config and 50 steps, 1024x1024, the 'comic' / 'film' / 'realistic' prompt wrappers, one negative prompt,
one seed for every panel and round, 10 rounds with reference weights linspace(0.3, 0.5, 10). Its guidance is 5.0:
``generate`` takes ``guidance_scale=7.5`` but never passes it on, so diffusers' default 5.0 applies.

Output folder: ``round_00/panel_000.png``, ... and ``story.json`` (prompts, seed, settings, model fingerprints,
progress). Every file is written to a temporary name and renamed into place, and story.json is updated after each
panel, so a killed run resumes at its first unrecorded panel and loses nothing it recorded. Round r's references
are read back from round r-1's PNG files (lossless), so a resumed run gives the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from mindspore import Tensor
from PIL import Image

from .. import checks
from ..errors import StoryError
from ..models.freeu import freeu_factors
from ..models.ip_adapter import install
from ..pretrained import IPAdapterModels, SDXLModels
from ..processors.grca import GlobalReference, ReferenceEncoder, round_scales
from ..story.prompts import ADAPTER_STYLES, styled
from .sdxl import PromptEmbeds, SDXLPipeline

NEGATIVE_PROMPT = "monochrome, lowres, bad anatomy, worst quality, low quality"
# run.py's DDIMScheduler(...) arguments; everything else is the scheduler's default ("leading" spacing, eta 0)
DDIM_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}


@dataclass(frozen=True)
class StoryAdapterSettings:
    """Everything that decides the images (the run is reproducible from these and the model files)."""

    prompts: tuple[str, ...]
    style: str = "comic"
    seed: int = 0
    rounds: int = 10
    steps: int = 50
    height: int = 1024
    width: int = 1024
    guidance_scale: float = 5.0
    freeu: tuple[float, float, float, float] | None = None  # (s1, s2, b1, b2); the original has no FreeU
    long_prompts: bool = False  # prompts past 77 tokens in 77-token chunks (compel's way) instead of cut

    def __post_init__(self):
        if isinstance(self.prompts, str) or not all(isinstance(p, str) for p in self.prompts):
            raise StoryError("prompts must be a list of panel prompts (text)")
        object.__setattr__(self, "prompts", tuple(self.prompts))
        object.__setattr__(self, "freeu", freeu_factors(self.freeu))
        if not self.prompts or not any(p.strip() for p in self.prompts):
            raise StoryError("the story is empty: give at least one panel prompt")
        blank = [i for i, p in enumerate(self.prompts) if not p.strip()]
        if blank:
            raise StoryError(f"panel prompts {blank[:10]} are empty")
        if not isinstance(self.long_prompts, bool):
            raise StoryError(f"long_prompts must be true or false, got {self.long_prompts!r}")
        height, width = checks.image_size(self.height, self.width)
        values = {
            "style": checks.one_of("style", self.style, sorted(ADAPTER_STYLES)),
            "seed": checks.seed(self.seed),
            "rounds": checks.whole("rounds", self.rounds, 0, 1000),
            "steps": checks.whole("steps", self.steps, 1, 1000),
            "height": height,
            "width": width,
            "guidance_scale": checks.number("guidance_scale", self.guidance_scale, 0.0),
        }
        for name, value in values.items():
            object.__setattr__(self, name, value)

    @property
    def model_prompts(self) -> list[str]:
        return [styled(p, self.style) for p in self.prompts]

    @property
    def scales(self) -> list[float]:
        """The reference weight of round r is scales[r - 1]; round 0 has none."""
        return round_scales(self.rounds)

    def to_dict(self) -> dict[str, Any]:
        freeu = None if self.freeu is None else list(self.freeu)
        return {**dataclasses.asdict(self), "prompts": list(self.prompts), "freeu": freeu}  # as JSON reads it back


class StoryAdapterPipeline:
    """SDXL with decoupled cross-attention on every attn2 layer, and the per-round reference encoder."""

    def __init__(self, models: SDXLModels, ip: IPAdapterModels, mode: str = "graph"):
        self.sdxl = SDXLPipeline(dataclasses.replace(models, scheduler_config=dict(DDIM_CONFIG)), mode=mode)
        install(models.unet, ip.ip_adapter)
        self.references = ReferenceEncoder(ip.image_encoder, ip.ip_adapter, mode)
        self.mode = mode
        self.fingerprints = {"base_model": models.fingerprint, "ip_adapter_and_image_encoder": ip.fingerprint}
        self._embeds: dict[str, PromptEmbeds] = {}
        self._chunks: int | None = None  # the text chunk count the cached embeddings were made with

    def embeds(self, prompt: str, settings: StoryAdapterSettings) -> PromptEmbeds:
        """The (negative, prompt) conditioning, encoded once per run: every round reuses it, the text being the
        same. The cache holds only the prompts of ``settings``, so a long-lived pipeline (the demo) stays small.
        With ``long_prompts`` every prompt gets the chunk count of the run's longest (one UNet shape per run)."""
        chunks = self.sdxl.text_chunks(settings.model_prompts + [NEGATIVE_PROMPT]) if settings.long_prompts else None
        if chunks != self._chunks:  # another text shape: nothing cached fits
            self._embeds, self._chunks = {}, chunks
        if prompt not in self._embeds:
            keep = set(settings.model_prompts)
            self._embeds = {p: e for p, e in self._embeds.items() if p in keep}
            self._embeds[prompt] = self.sdxl.encode_prompts([prompt], [NEGATIVE_PROMPT], chunks)
        return self._embeds[prompt]

    def truncation(self, settings: StoryAdapterSettings) -> dict[int, dict[str, str]]:
        """As ``StoryDiffusionPipeline.truncation``: {panel: {"prompt" / "negative_prompt": the text CLIP's 77 tokens
        drop}}, only where something is dropped (nothing with ``long_prompts``)."""
        if settings.long_prompts:
            return {}
        negative = self.sdxl.dropped_text([NEGATIVE_PROMPT])[0]
        cut = {}
        for i, text in enumerate(self.sdxl.dropped_text(settings.model_prompts)):
            parts = {}
            if text:
                parts["prompt"] = text
            if negative:
                parts["negative_prompt"] = negative
            if parts:
                cut[i] = parts
        return cut

    def noise(self, settings: StoryAdapterSettings) -> np.ndarray:
        """The one initial noise of a run: every panel of every round starts from it."""
        return self.sdxl.initial_noise(settings.seed, 1, settings.height, settings.width)

    def latents(
        self, prompt: str, noise: np.ndarray, settings: StoryAdapterSettings, reference: GlobalReference | None = None
    ) -> Tensor:
        """One panel (the styled prompt), text only (``reference=None``, round 0) or with the round's references."""
        embeds = self.embeds(prompt, settings)
        return self.sdxl.denoise(
            noise,
            embeds,
            settings.steps,
            settings.guidance_scale,
            "ddim",
            story=reference,
            seed=settings.seed,
            freeu=settings.freeu,
        )

    def panel(
        self, prompt: str, noise: np.ndarray, settings: StoryAdapterSettings, reference: GlobalReference | None = None
    ) -> Image.Image:
        return self.sdxl.decode(self.latents(prompt, noise, settings, reference))[0]

    def reference(self, images: Sequence[Image.Image], scale: float) -> GlobalReference:
        return self.references.control(images, scale)

    def __call__(self, settings: StoryAdapterSettings, on_panel=None) -> list[list[Image.Image]]:
        """Every round of the story in memory, no files: ``[round][panel]`` for rounds 0..R. The same images as the
        on-disk runner (``runs.story_adapter.generate_story``), whose PNGs are lossless; ``on_panel(round, panel,
        rounds, panels)`` is called after each panel."""
        noise, prompts = self.noise(settings), settings.model_prompts
        rounds: list[list[Image.Image]] = []
        for r in range(settings.rounds + 1):
            reference = self.reference(rounds[-1], settings.scales[r - 1]) if r else None
            rounds.append([])
            for i, prompt in enumerate(prompts):
                rounds[-1].append(self.panel(prompt, noise, settings, reference))
                if on_panel is not None:
                    on_panel(r, i, settings.rounds, len(prompts))
        return rounds
