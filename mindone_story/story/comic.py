"""Comic pages: StoryDiffusion's three typesetting layouts and its captions, in plain PIL.

Geometry follows `get_comic` in StoryDiffusion's utils/utils.py. Every panel (W x H) gets a 10 px white
border, so a cell is w x h = (W + 20) x (H + 20); then

* "No typesetting": the panels as they are, no captions;
* "Four Pannel": pages of 2 x 2 cells, (2w, 2h) each; the last page is filled with "to be continued" cells;
* "Classic Comic Style": one page. Panels go in groups of 4 (stories of at most 8 panels) or alternately 4 and 6,
  the last group filled with pad cells. A group is one row of shuffled units: a full cell, or two cells stacked
  and halved to (w // 2, h); 4 = [1, 1, 2] and 6 = [1, 1, 2, 2]. The rows are stacked, each resized to the width
  of the narrowest row keeping its aspect ratio.

A caption is word-wrapped, centred at the bottom of its cell, black on a white box of opacity 200/255.
The original drops the captions of the stacked cells; here they are drawn before halving, so none is lost.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

LAYOUTS = ("No typesetting", "Four Pannel", "Classic Comic Style")
_LAYOUT_ALIASES = {"No typesetting (default)": "No typesetting"}  # the original app's label
FONT_PATH = Path(__file__).resolve().parent.parent / "assets" / "fonts" / "DejaVuSans.ttf"
DEFAULT_FONT_SIZE = 45  # the size the original app uses
BORDER = 10  # white border around each panel, as the original's add_white_border
BOX_PAD = 5  # caption box around the text, as the original
BOTTOM = 20  # from the lowest text ink to the bottom of the cell, as the original
BOX_FILL = (255, 255, 255, 200)
TEXT_FILL = (0, 0, 0)
PAD_TEXT = "To be continued"

Box = tuple[int, int, int, int]


@lru_cache(maxsize=16)
def load_font(size: int = DEFAULT_FONT_SIZE) -> ImageFont.FreeTypeFont:
    """The bundled DejaVu Sans at `size` px."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"font size must be a positive integer, got {size!r}")
    return ImageFont.truetype(str(FONT_PATH), size)


def wrap_text(text: str, font: ImageFont.FreeTypeFont, max_width: int) -> list[str]:
    """Greedy word wrap: add words to a line while it fits; a word wider than `max_width` gets a line of its own."""
    lines: list[str] = []
    for word in text.split():
        candidate = f"{lines[-1]} {word}" if lines else word
        if lines and font.getlength(candidate) <= max_width:
            lines[-1] = candidate
        else:
            lines.append(word)
    return lines


def _caption_layout(
    size: tuple[int, int], text: str, font: ImageFont.FreeTypeFont
) -> tuple[Box | None, list[tuple[tuple[int, int], str]]]:
    """Place the lines (baseline anchors, bottom line first) and return them with the box, or (None, [])."""
    width, height = size
    lines = wrap_text(text, font, width - 2 * (BORDER + BOX_PAD))
    if not lines:
        return None, []
    ascent, descent = font.getmetrics()
    stride = ascent + descent + font.size // 5  # the original steps a line's height plus 20 px at size 45
    baseline = height - BOTTOM - descent
    draw = ImageDraw.Draw(Image.new("L", (1, 1)))
    placed, boxes = [], []
    for i, line in enumerate(reversed(lines)):
        xy = ((width - round(font.getlength(line))) // 2, baseline - i * stride)
        placed.append((xy, line))
        boxes.append(draw.textbbox(xy, line, font=font, anchor="ls"))
    left = max(0, min(b[0] for b in boxes) - BOX_PAD)
    top = max(0, min(b[1] for b in boxes) - BOX_PAD)
    right = min(width, max(b[2] for b in boxes) + BOX_PAD)
    bottom = min(height, max(b[3] for b in boxes) + BOX_PAD)
    return (int(left), int(top), int(right), int(bottom)), placed


def caption_box(size: tuple[int, int], text: str, font_size: int = DEFAULT_FONT_SIZE) -> Box | None:
    """The region (left, top, right, bottom; right and bottom exclusive) a caption changes, or None if blank."""
    return _caption_layout(size, text, load_font(font_size))[0]


def add_caption(image: Image.Image, text: str, font_size: int = DEFAULT_FONT_SIZE) -> Image.Image:
    """Return a copy of `image` with `text` on a translucent box at the bottom; pixels outside the box are kept."""
    font = load_font(font_size)
    box, placed = _caption_layout(image.size, text, font)
    image = image.convert("RGB")
    if box is None:
        return image
    overlay = Image.new("RGBA", image.size, (0, 0, 0, 0))
    ImageDraw.Draw(overlay).rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=BOX_FILL)
    out = Image.alpha_composite(image.convert("RGBA"), overlay)
    draw = ImageDraw.Draw(out)
    for xy, line in placed:
        draw.text(xy, line, font=font, fill=TEXT_FILL, anchor="ls")
    return out.convert("RGB")


def add_border(image: Image.Image, width: int = BORDER) -> Image.Image:
    out = Image.new("RGB", (image.width + 2 * width, image.height + 2 * width), "white")
    out.paste(image.convert("RGB"), (width, width))
    return out


def pad_cell(size: tuple[int, int]) -> Image.Image:
    """A white filler cell saying "To be continued" (the original ships a picture of the same words)."""
    cell = Image.new("RGB", size, "white")
    font = load_font(max(1, size[0] // 12))
    ImageDraw.Draw(cell).text((size[0] // 2, size[1] // 2), PAD_TEXT, font=font, fill=(40, 40, 40), anchor="mm")
    return cell


def hconcat(images: Sequence[Image.Image]) -> Image.Image:
    out = Image.new("RGB", (sum(im.width for im in images), max(im.height for im in images)))
    x = 0
    for im in images:
        out.paste(im, (x, 0))
        x += im.width
    return out


def vconcat_fit(images: Sequence[Image.Image]) -> Image.Image:
    """Stack vertically after resizing each image to the narrowest width, keeping aspect ratio (truncating)."""
    width = min(im.width for im in images)
    fitted = [
        im if im.width == width else im.resize((width, int(width * im.height / im.width)), Image.LANCZOS)
        for im in images
    ]
    out = Image.new("RGB", (width, sum(im.height for im in fitted)))
    y = 0
    for im in fitted:
        out.paste(im, (0, y))
        y += im.height
    return out


def stack_halved(top: Image.Image, bottom: Image.Image) -> Image.Image:
    """Two cells stacked and scaled by 1/2: a (w // 2, h) column, as the original's concat_images_vertically_and_scale."""
    both = Image.new("RGB", (top.width, top.height + bottom.height))
    both.paste(top, (0, 0))
    both.paste(bottom, (0, top.height))
    return both.resize((both.width // 2, both.height // 2), Image.LANCZOS)


def classic_groups(n: int) -> list[int]:
    """Cells per row of the classic page (the original's distribute_images2): 4s up to 8 panels, else 4, 6, 4, ...

    A tail shorter than 4 becomes a group of 4 even where a 6 was due; the last group is filled with pads.
    """
    sizes = (4,) if n <= 8 else (4, 6)
    groups: list[int] = []
    remaining = n
    while remaining > 0:
        size = sizes[len(groups) % len(sizes)] if remaining >= min(sizes) else min(sizes)
        groups.append(size)
        remaining -= size
    return groups


def four_panel_pages(cells: Sequence[Image.Image], pad: Image.Image) -> list[Image.Image]:
    cells = list(cells) + [pad] * (-len(cells) % 4)
    pages = []
    for i in range(0, len(cells), 4):
        w, h = cells[i].size
        page = Image.new("RGB", (2 * w, 2 * h))
        for k, cell in enumerate(cells[i : i + 4]):
            page.paste(cell, ((k % 2) * w, (k // 2) * h))
        pages.append(page)
    return pages


def classic_page(cells: Sequence[Image.Image], pad: Image.Image, rng: random.Random) -> Image.Image:
    groups = classic_groups(len(cells))
    cells = list(cells) + [pad] * (sum(groups) - len(cells))
    rows, i = [], 0
    for size in groups:
        units = [1, 1, 2] if size == 4 else [1, 1, 2, 2]
        rng.shuffle(units)  # the original shuffles with the global `random`; a seeded Random keeps pages reproducible
        parts = []
        for unit in units:
            parts.append(cells[i] if unit == 1 else stack_halved(cells[i], cells[i + 1]))
            i += unit
        rows.append(hconcat(parts))
    return vconcat_fit(rows)


def make_pages(
    images: Sequence[Image.Image],
    layout: str = "Classic Comic Style",
    captions: Sequence[str] | None = None,
    font_size: int = DEFAULT_FONT_SIZE,
    seed: int = 0,
) -> list[Image.Image]:
    """Lay panels out in pages. `captions` has one entry per panel ("" for none); `seed` drives the classic shuffle."""
    layout = _LAYOUT_ALIASES.get(layout, layout)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; valid layouts are: {', '.join(repr(x) for x in LAYOUTS)}")
    images = list(images)
    if not images:
        raise ValueError("no panels to lay out")
    if len({im.size for im in images}) > 1:
        raise ValueError(f"all panels must have the same size, got {sorted({im.size for im in images})}")
    if captions is not None and len(captions) != len(images):
        raise ValueError(f"got {len(captions)} captions for {len(images)} panels")
    load_font(font_size)  # validate early
    if layout == "No typesetting":
        return images
    captions = list(captions) if captions is not None else [""] * len(images)
    # Captioned after the border, as the original; stacked cells keep their (halved) captions.
    cells = [add_caption(add_border(im), text, font_size) for im, text in zip(images, captions)]
    pad = pad_cell(cells[0].size)
    if layout == "Four Pannel":
        return four_panel_pages(cells, pad)
    return [classic_page(cells, pad, random.Random(seed))]
