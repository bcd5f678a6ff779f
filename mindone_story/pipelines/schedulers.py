"""Samplers: mindone.diffusers' schedulers, which run on CPU as they are (plain MindSpore tensor math, called from
Python between compiled UNet steps)."""

from __future__ import annotations

from typing import Any

from mindone.diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
)

SCHEDULERS = {
    "ddim": DDIMScheduler,  # StoryDiffusion and Story-Adapter sample with DDIM
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,
}


def make_scheduler(name: str, config: dict[str, Any], steps: int):
    """A fresh scheduler built from a model's scheduler_config.json, with its timesteps set."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {sorted(SCHEDULERS)}")
    if steps < 1:
        raise ValueError(f"the number of sampling steps must be at least 1, got {steps}")
    scheduler = SCHEDULERS[name].from_config(config)
    scheduler.set_timesteps(steps)
    return scheduler
