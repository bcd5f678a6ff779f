"""SDXL text-to-image: text encoding, latents, classifier-free guidance, the scheduler loop and VAE decoding.

Only the networks run compiled (``mode="graph"``: each is wrapped once with ``ms.jit``, and input shapes are fixed
per run so each graph compiles once); tokenisation, the scheduler and guidance stay plain Python, as in diffusers'
StableDiffusionXLPipeline, whose numerics this follows step for step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import mindspore as ms
import numpy as np
from mindspore import Tensor
from PIL import Image

from .. import checks
from ..models.freeu import freeu_tensor
from ..modes import compiled
from ..pretrained import SDXLModels
from . import long_prompts
from .schedulers import make_scheduler

StepCallback = Callable[[int, int], None]  # (steps done, steps in all)


class StoryControl(Protocol):
    """Per-step story inputs of a UNet call (a tuple of tensors its attention processors read), and what to do
    with the call's side outputs once it has run."""

    def inputs(self, step: int) -> tuple: ...

    def collect(self, step: int) -> None: ...


@dataclass
class PromptEmbeds:
    """Text conditioning for a batch, the unconditional half first (diffusers' CFG order)."""

    context: Tensor  # [2B, 77 * chunks, C]: negative prompts, then prompts
    pooled: Tensor  # [2B, P]


class SDXLPipeline:
    def __init__(self, models: SDXLModels, mode: str = "graph"):
        self.models = models
        self.mode = mode
        self.dtype = models.unet.conv_in.weight.dtype  # compute dtype of the UNet (the VAE always runs in fp32)
        self.vae_scale = models.vae.config.downscale
        self._unet = compiled(models.unet.construct, mode)
        self._vae_decode = compiled(models.vae.decode, mode)
        self._text = [compiled(enc.construct, mode) for enc in (models.text_encoder, models.text_encoder_2)]

    # -- text ---------------------------------------------------------------------------------------------------
    def _token_ids(self, tokenizer, prompts: Sequence[str]) -> Tensor:
        ids = tokenizer(
            list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True
        ).input_ids
        return Tensor(np.asarray(ids, np.int32))

    def dropped_text(self, prompts: Sequence[str]) -> list[str]:
        """Per prompt, the text that CLIP's window (77 tokens with the start and end tokens) cuts off, from the first
        word cut whole or in part; '' where the prompt fits. One tokenizer answers for both encoders: SDXL's two
        tokenizers share one BPE vocabulary and differ only in the padding token."""
        tokenizer = self.models.tokenizer
        limit = tokenizer.model_max_length
        dropped = []
        for ids in tokenizer(list(prompts)).input_ids:
            start = limit - 1  # ids[1 : limit - 1] are encoded, then the end token
            if len(ids) <= limit:
                dropped.append("")
                continue
            tokens = tokenizer.convert_ids_to_tokens(ids)
            while start > 1 and not tokens[start - 1].endswith("</w>"):  # a word split by the cut counts as dropped
                start -= 1
            dropped.append(tokenizer.decode(ids[start:-1]))
        return dropped

    def text_chunks(self, prompts: Sequence[str]) -> int:
        """The 77-token chunks the longest of ``prompts`` needs in long-prompt mode (``long_prompts``)."""
        return long_prompts.chunk_count(self.models.tokenizer, prompts)

    def _encode(self, prompts: Sequence[str], chunks: int | None = None) -> tuple[Tensor, Tensor]:
        """hidden_states[-2] of both encoders concatenated, and the bigG encoder's projected pooled output. With
        ``chunks``, each prompt is encoded in that many 77-token chunks, compel's way (``long_prompts``); the pooled
        output stays the one of the 77-token truncation."""
        hidden = []
        pooled = None
        for tokenizer, encode in zip((self.models.tokenizer, self.models.tokenizer_2), self._text):
            if chunks is None:
                _, penultimate, pooled = encode(self._token_ids(tokenizer, prompts))
            else:
                _, penultimate, _ = encode(Tensor(long_prompts.chunked_ids(tokenizer, prompts, chunks)))
                penultimate = penultimate.reshape(len(prompts), -1, penultimate.shape[-1])  # chunks side by side
            hidden.append(penultimate)
        if chunks is not None:
            pooled = self._text[1](self._token_ids(self.models.tokenizer_2, prompts))[2]
        return ms.ops.concat(hidden, -1).astype(self.dtype), pooled.astype(self.dtype)

    def encode_prompts(
        self, prompts: Sequence[str], negative_prompts: Sequence[str] | None, chunks: int | None = None
    ) -> PromptEmbeds:
        """Without negative prompts the unconditional half is zeros, as SDXL's force_zeros_for_empty_prompt does.
        ``chunks``: None (CLIP's 77 tokens, the rest cut) or the number of 77-token chunks of every prompt."""
        if negative_prompts is None:
            context, pooled = self._encode(list(prompts), chunks)
            return PromptEmbeds(
                ms.ops.concat((ms.ops.zeros_like(context), context)), ms.ops.concat((ms.ops.zeros_like(pooled), pooled))
            )
        if len(prompts) != len(negative_prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(negative_prompts)} negative prompts")
        context, pooled = self._encode(list(negative_prompts) + list(prompts), chunks)
        return PromptEmbeds(context, pooled)

    # -- latents ------------------------------------------------------------------------------------------------
    def initial_noise(self, seed: int | Sequence[int], batch: int, height: int, width: int) -> np.ndarray:
        """Standard normal latents from a host-side generator (seeded by an int or a sequence of ints), so
        PyNative and graph mode see the same noise."""
        height, width = checks.image_size(height, width)
        shape = (batch, self.models.unet.config.in_channels, height // self.vae_scale, width // self.vae_scale)
        return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)

    def time_ids(self, batch: int, height: int, width: int) -> Tensor:
        # (original size, crop top-left, target size), the same for both CFG halves
        return Tensor(np.tile(np.array([[height, width, 0, 0, height, width]], np.float32), (2 * batch, 1)))

    # -- sampling -----------------------------------------------------------------------------------------------
    def denoise(
        self,
        noise: np.ndarray,
        embeds: PromptEmbeds | Callable[[int], PromptEmbeds],
        steps: int,
        guidance_scale: float,
        scheduler: str = "ddim",
        story: StoryControl | None = None,
        seed: int = 0,
        on_step: StepCallback | None = None,
        freeu: tuple[float, float, float, float] | None = None,
    ) -> Tensor:
        """Run the sampler from ``noise`` ([B, 4, h, w]); returns the final latents. ``on_step(done, total)`` is
        called after each step (front ends draw their progress from it). ``freeu``: None (off) or (s1, s2, b1, b2),
        as diffusers' ``unet.enable_freeu``. ``embeds`` may be a function of the step (PhotoMaker's
        delayed identity): each step's context is a graph input, so switching never recompiles."""
        sched = make_scheduler(scheduler, self.models.scheduler_config, steps)
        batch, _, h, w = noise.shape
        time_ids = self.time_ids(batch, h * self.vae_scale, w * self.vae_scale)
        latents = Tensor(noise) * float(sched.init_noise_sigma)
        generator = np.random.default_rng(seed + 1)  # ancestral samplers' noise, host-side
        freeu = freeu_tensor(freeu)
        for i, t in enumerate(sched.timesteps):
            model_in = sched.scale_model_input(ms.ops.concat((latents, latents)), t).astype(self.dtype)
            timestep = Tensor(np.array([float(t)], np.float32))
            extra = story.inputs(i) if story is not None else None
            step_embeds = embeds(i) if callable(embeds) else embeds
            pred = self._unet(model_in, timestep, step_embeds.context, step_embeds.pooled, time_ids, extra, freeu)
            if story is not None:
                story.collect(i)
            uncond, cond = ms.ops.split(pred.astype(ms.float32), batch, axis=0)
            guided = uncond + guidance_scale * (cond - uncond)
            latents = sched.step(guided, t, latents, **self._step_kwargs(sched, generator))[0]
            if on_step is not None:
                on_step(i + 1, len(sched.timesteps))
        return latents

    @staticmethod
    def _step_kwargs(sched, generator) -> dict:
        return {"generator": generator} if "generator" in sched.step.__code__.co_varnames else {}

    def decode_array(self, latents: Tensor) -> np.ndarray:
        """Decoded images as float [B, H, W, 3] in [0, 1] (diffusers' output_type="np"). One image at a time, so
        peak memory does not grow with the batch; the VAE runs in fp32 (the SDXL VAE overflows in fp16)."""
        scale = self.models.vae.config.scaling_factor
        out = [
            self._vae_decode((latents[i : i + 1] / scale).astype(ms.float32)).asnumpy() for i in range(latents.shape[0])
        ]
        return np.clip(np.concatenate(out) / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)

    def decode(self, latents: Tensor) -> list[Image.Image]:
        return [Image.fromarray((image * 255).round().astype(np.uint8)) for image in self.decode_array(latents)]

    def __call__(
        self,
        prompts: Sequence[str],
        negative_prompts: Sequence[str] | None = None,
        height: int = 1024,
        width: int = 1024,
        steps: int = 50,
        guidance_scale: float = 5.0,
        seed: int = 0,
        scheduler: str = "ddim",
        noise: np.ndarray | None = None,
        long_prompts: bool = False,
    ) -> list[Image.Image]:
        prompts = list(prompts)
        chunks = self.text_chunks(prompts + list(negative_prompts or [])) if long_prompts else None
        embeds = self.encode_prompts(prompts, negative_prompts, chunks)
        if noise is None:
            noise = self.initial_noise(seed, len(prompts), height, width)
        latents = self.denoise(noise, embeds, steps, guidance_scale, scheduler, seed=seed)
        return self.decode(latents)
