"""mindone-story: consistent story visualisation on SDXL in MindSpore (Ascend NPUs and CPUs).

    import mindone_story as ms_story

    models = ms_story.load_sdxl(ms_story.resolve_model("tiny", None, "./cache_dir"))   # or a folder, file, hub id
    pipe = ms_story.StoryDiffusionPipeline(models)
    story = ms_story.story_from_text("[Bob] a man in a black suit", "[Bob] wakes up\\n[Bob] has breakfast", 1)
    run = ms_story.run_story(pipe, story, ms_story.StoryDiffusionSettings(height=128, width=128, steps=4), "out")

The names below load lazily, so ``import mindone_story`` (and the small modules such as ``errors`` and
``checks``) does not import MindSpore.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> (module, attribute)
_EXPORTS = {
    # loading
    "resolve_model": ("models_registry", "resolve_model"),
    "load_sdxl": ("pretrained", "load_sdxl"),
    "load_ip_adapter_models": ("pretrained", "load_ip_adapter_models"),
    "tiny_model_dir": ("pretrained", "tiny_model_dir"),
    "set_device": ("layers", "set_device"),
    # the three pipelines and their settings
    "SDXLPipeline": ("pipelines.sdxl", "SDXLPipeline"),
    "StoryDiffusionPipeline": ("pipelines.story_diffusion", "StoryDiffusionPipeline"),
    "StoryDiffusionSettings": ("pipelines.story_diffusion", "StoryDiffusionSettings"),
    "StoryAdapterPipeline": ("pipelines.story_adapter", "StoryAdapterPipeline"),
    "StoryAdapterSettings": ("pipelines.story_adapter", "StoryAdapterSettings"),
    # story text and pages
    "story_from_text": ("story.prompts", "story_from_text"),
    "parse_story": ("story.prompts", "parse_story"),
    "Story": ("story.prompts", "Story"),
    "STYLE_NAMES": ("story.prompts", "STYLE_NAMES"),
    "make_pages": ("story.comic", "make_pages"),
    "PageLayout": ("runs.story_diffusion", "PageLayout"),
    # runs on disk (resumable) and the record
    "run_story": ("runs.story_diffusion", "run_story"),
    "generate_story": ("runs.story_adapter", "generate_story"),
    "RunRecord": ("runs.record", "RunRecord"),
    # errors
    "StoryError": ("errors", "StoryError"),
    "RecordError": ("errors", "RecordError"),
    "OutputFolderError": ("errors", "OutputFolderError"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mindone_story' has no attribute {name!r}")
    module, attribute = _EXPORTS[name]
    value = getattr(importlib.import_module(f".{module}", __name__), attribute)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
