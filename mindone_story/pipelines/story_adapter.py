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
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from mindspore import Tensor
from PIL import Image
from tqdm.auto import tqdm

from ..models.freeu import freeu_factors
from ..models.ip_adapter import install
from ..pretrained import IPAdapterModels, SDXLModels
from ..story.grca import REFERENCE_SIZE, GlobalReference, ReferenceEncoder, round_scales
from ..story.output import RECORD, png_bytes, write_atomic
from .sdxl import PromptEmbeds, SDXLPipeline

# "{prompt}" is replaced verbatim (prompts may hold braces); the strings are the original's.
STYLES: dict[str, str] = {
    "comic": "best quality, high quality, comic {prompt} . graphic illustration, comic art, graphic novel art, "
    "vibrant, highly detailed",
    "film": "best quality, high quality, cinematic film still, {prompt} . shallow depth of field, vignette, highly "
    "detailed, high budget, bokeh, cinemascope, moody, epic, gorgeous, film grain, grainy",
    "realistic": "best quality, high quality, {prompt}",
}
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


def styled(prompt: str, style: str) -> str:
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; choose one of {sorted(STYLES)}")
    return STYLES[style].replace("{prompt}", prompt)


@dataclass(frozen=True)
class StorySettings:
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

    def __post_init__(self):
        object.__setattr__(self, "prompts", tuple(self.prompts))
        object.__setattr__(self, "freeu", freeu_factors(self.freeu))
        if not self.prompts or not any(p.strip() for p in self.prompts):
            raise ValueError("the story is empty: give at least one panel prompt")
        blank = [i for i, p in enumerate(self.prompts) if not p.strip()]
        if blank:
            raise ValueError(f"panel prompts {blank[:10]} are empty")
        styled("", self.style)
        if self.rounds < 0 or self.steps < 1:
            raise ValueError(f"rounds must be >= 0 and steps >= 1, got {self.rounds} and {self.steps}")
        for name, value in (("height", self.height), ("width", self.width)):
            if value <= 0 or value % 32:
                raise ValueError(f"{name} must be a positive multiple of 32, got {value}")

    @property
    def model_prompts(self) -> list[str]:
        return [styled(p, self.style) for p in self.prompts]

    @property
    def scales(self) -> list[float]:
        """The reference weight of round r is scales[r - 1]; round 0 has none."""
        return round_scales(self.rounds)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "prompts": list(self.prompts)}


class StoryAdapterPipeline:
    """SDXL with decoupled cross-attention on every attn2 layer, and the per-round reference encoder."""

    def __init__(self, models: SDXLModels, ip: IPAdapterModels, mode: str = "graph"):
        self.sdxl = SDXLPipeline(dataclasses.replace(models, scheduler_config=dict(DDIM_CONFIG)), mode=mode)
        install(models.unet, ip.ip_adapter)
        self.references = ReferenceEncoder(ip.image_encoder, ip.ip_adapter, mode)
        self.mode = mode
        self.fingerprints = {"base_model": models.fingerprint, "ip_adapter_and_image_encoder": ip.fingerprint}
        self._embeds: dict[str, PromptEmbeds] = {}

    def embeds(self, prompt: str, settings: StorySettings) -> PromptEmbeds:
        """The (negative, prompt) conditioning, encoded once per run: every round reuses it, the text being the
        same. The cache holds only the prompts of ``settings``, so a long-lived pipeline (the demo) stays small."""
        if prompt not in self._embeds:
            keep = set(settings.model_prompts)
            self._embeds = {p: e for p, e in self._embeds.items() if p in keep}
            self._embeds[prompt] = self.sdxl.encode_prompts([prompt], [NEGATIVE_PROMPT])
        return self._embeds[prompt]

    def noise(self, settings: StorySettings) -> np.ndarray:
        """The one initial noise of a run: every panel of every round starts from it."""
        return self.sdxl.initial_noise(settings.seed, 1, settings.height, settings.width)

    def latents(
        self, prompt: str, noise: np.ndarray, settings: StorySettings, reference: GlobalReference | None = None
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
            progress=False,
            freeu=settings.freeu,
        )

    def panel(
        self, prompt: str, noise: np.ndarray, settings: StorySettings, reference: GlobalReference | None = None
    ) -> Image.Image:
        return self.sdxl.decode(self.latents(prompt, noise, settings, reference))[0]

    def reference(self, images: Sequence[Image.Image], scale: float) -> GlobalReference:
        return self.references.control(images, scale)


# -- the output folder ----------------------------------------------------------------------------------------------
def panel_path(round_index: int, panel: int) -> str:
    return f"round_{round_index:02d}/panel_{panel:03d}.png"


@dataclass
class StoryRecord:
    """story.json: what was asked, with which models, and how far the run got."""

    settings: StorySettings
    models: dict[str, Any]
    mode: str = "graph"
    progress: dict[str, Any] = field(default_factory=lambda: {"round": 0, "panels": 0, "done": False})
    log: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> str:
        s = self.settings
        record = {
            "method": "Story-Adapter",
            **s.to_dict(),
            "model_prompts": s.model_prompts,
            "negative_prompt": NEGATIVE_PROMPT,
            "scales": s.scales,
            "scheduler": {"name": "ddim", **DDIM_CONFIG},
            "reference_size": REFERENCE_SIZE,
            "mode": self.mode,
            "models": self.models,
            "progress": self.progress,
            "panels": self.finished_panels(),
            "log": self.log,
        }
        return json.dumps(record, indent=2, ensure_ascii=False)

    def finished_panels(self) -> list[list[str]]:
        """The files written so far, per round."""
        n, current = len(self.settings.prompts), self.progress["round"]
        return [
            [panel_path(r, i) for i in range(n if r < current else self.progress["panels"])] for r in range(current + 1)
        ]

    @classmethod
    def read(cls, folder: Path) -> StoryRecord:
        path = folder / RECORD
        if not path.is_file():
            raise FileNotFoundError(f"nothing to resume: {path} does not exist")
        raw = json.loads(path.read_text(encoding="utf-8"))
        names = {f.name for f in dataclasses.fields(StorySettings)}
        settings = StorySettings(**{k: v for k, v in raw.items() if k in names})
        return cls(settings, raw["models"], raw.get("mode", "graph"), raw["progress"], raw.get("log", []))

    def save(self, folder: Path) -> None:
        write_atomic(folder / RECORD, self.to_json().encode("utf-8"))


def check_resumable(record: StoryRecord, settings: StorySettings, fingerprints: dict[str, str]) -> None:
    """A resumed run must make the same images: same settings, same model files."""
    old, new = record.settings.to_dict(), settings.to_dict()
    diffs = [f"{k}: recorded {old[k]!r}, given {new[k]!r}" for k in old if old[k] != new[k]]
    diffs += [
        f"{k} fingerprint: recorded {record.models.get(k)!r}, now {v!r}"
        for k, v in fingerprints.items()
        if record.models.get(k) != v
    ]
    if diffs:
        raise ValueError("cannot resume: the run was made with other settings or models:\n  " + "\n  ".join(diffs))


def generate_story(
    pipe: StoryAdapterPipeline,
    settings: StorySettings,
    output_dir: str | os.PathLike,
    models: dict[str, Any] | None = None,
    resume: bool = False,
    progress: bool = True,
) -> StoryRecord:
    """Run (or resume) a whole story into ``output_dir``; returns the final record.

    ``models`` (paths and the like) is stored in story.json beside the pipeline's fingerprints.
    """
    out = Path(output_dir)
    if resume:
        record = StoryRecord.read(out)
        check_resumable(record, settings, pipe.fingerprints)
        if record.progress["done"]:
            return record
        record.mode = pipe.mode
    else:
        if (out / RECORD).exists():
            raise FileExistsError(f"{out / RECORD} exists: pass resume=True (--resume) or choose another output folder")
        paths = {k: str(v) if isinstance(v, os.PathLike) else v for k, v in (models or {}).items()}
        record = StoryRecord(settings, {**paths, **pipe.fingerprints}, pipe.mode)
        out.mkdir(parents=True, exist_ok=True)
        record.save(out)

    n, prompts, noise = len(settings.prompts), settings.model_prompts, pipe.noise(settings)
    start = record.progress["round"]
    rounds = tqdm(
        range(start, settings.rounds + 1), desc="rounds", initial=start, total=settings.rounds + 1, disable=not progress
    )
    for r in rounds:
        began, encoded = time.time(), pipe.references.images_encoded
        reference = None
        if r > 0:  # all panels of the previous round, from their lossless files
            images = [Image.open(out / panel_path(r - 1, i)) for i in range(n)]
            reference = pipe.reference(images, settings.scales[r - 1])
        (out / f"round_{r:02d}").mkdir(exist_ok=True)
        first = record.progress["panels"]
        for i in tqdm(
            range(first, n), desc=f"round {r:02d}", initial=first, total=n, leave=False, disable=not progress
        ):
            write_atomic(out / panel_path(r, i), png_bytes(pipe.panel(prompts[i], noise, settings, reference)))
            record.progress = {"round": r, "panels": i + 1, "done": False}
            record.save(out)
        record.log.append(
            {
                "round": r,
                "scale": settings.scales[r - 1] if r else 0.0,
                "panels_made": n - first,
                "reference_encodings": pipe.references.images_encoded - encoded,
                "seconds": round(time.time() - began, 3),
            }
        )
        last = r == settings.rounds
        record.progress = {"round": r if last else r + 1, "panels": n if last else 0, "done": last}
        record.save(out)
    return record
