"""Story text and comic pages: pure Python, no MindSpore."""

from .comic import LAYOUTS, add_caption, caption_box, load_font, make_pages
from .prompts import (
    DEFAULT_STYLE_NAME,
    NC_TAG,
    STYLE_NAMES,
    STYLES,
    Character,
    Panel,
    Story,
    apply_style,
    parse_characters,
    parse_panel,
    parse_story,
)

__all__ = [
    "DEFAULT_STYLE_NAME",
    "LAYOUTS",
    "NC_TAG",
    "STYLES",
    "STYLE_NAMES",
    "Character",
    "Panel",
    "Story",
    "add_caption",
    "apply_style",
    "caption_box",
    "load_font",
    "make_pages",
    "parse_characters",
    "parse_panel",
    "parse_story",
]
