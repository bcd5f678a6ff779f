"""Page geometry of the three layouts and the caption box (sizes as StoryDiffusion's get_comic gives them)."""

import numpy as np
import pytest
from PIL import Image

from mindone_story.story import comic
from mindone_story.story.comic import (
    BORDER,
    LAYOUTS,
    add_caption,
    caption_box,
    classic_groups,
    load_font,
    make_pages,
    wrap_text,
)

W, H = 64, 48  # panel size; a bordered cell is 84 x 68


def panels(n, size=(W, H)):
    return [Image.new("RGB", size, (20 * i % 256, 200 - 10 * i, 90)) for i in range(n)]


def test_no_typesetting_returns_the_panels():
    images = panels(5)
    assert make_pages(images, "No typesetting", ["a"] * 5) == images
    assert make_pages(images, "No typesetting (default)") == images


@pytest.mark.parametrize("n, pages", [(4, 1), (5, 2), (8, 2), (9, 3)])
def test_four_panel_page_sizes(n, pages):
    out = make_pages(panels(n), "Four Pannel")
    assert [p.size for p in out] == [(2 * (W + 20), 2 * (H + 20))] * pages


def test_four_panel_places_cells_in_reading_order_and_pads():
    images = panels(5)
    first, second = make_pages(images, "Four Pannel")
    cw, ch = W + 20, H + 20
    for k in range(4):
        x, y = (k % 2) * cw + BORDER + W // 2, (k // 2) * ch + BORDER + H // 2
        assert first.getpixel((x, y)) == images[k].getpixel((0, 0))
    assert second.getpixel((BORDER + 1, BORDER + 1)) == images[4].getpixel((0, 0))
    assert second.getpixel((0, 0)) == (255, 255, 255)  # the border
    pad = np.asarray(second.crop((cw, 0, 2 * cw, ch)))
    assert (pad == 255).all(axis=2).mean() > 0.9 and pad.min() < 100  # white with "To be continued" in dark ink


@pytest.mark.parametrize(
    "n, groups", [(1, [4]), (4, [4]), (5, [4, 4]), (8, [4, 4]), (9, [4, 6]), (11, [4, 6, 4]), (15, [4, 6, 4, 4])]
)
def test_classic_groups(n, groups):
    assert classic_groups(n) == groups


@pytest.mark.parametrize(
    "n, size",
    [
        (3, (2 * 84 + 42, 68)),  # one row of 4: two cells and a stacked pair
        (8, (210, 2 * 68)),
        (9, (210, 68 + int(210 * 68 / 252))),  # the row of 6 (2 * 84 + 2 * 42 wide) shrinks to the row of 4
        (11, (210, 68 + 56 + 68)),
    ],
)
def test_classic_page_size(n, size):
    pages = make_pages(panels(n), "Classic Comic Style", seed=1)
    assert len(pages) == 1 and pages[0].size == size


def test_classic_cells_full_and_halved():
    images = panels(4)
    page = np.asarray(make_pages(images, "Classic Comic Style", seed=7)[0]).astype(int)
    areas = [np.all(page == np.asarray(im.getpixel((0, 0))), axis=2).sum() / (W * H) for im in images]
    full = [i for i, a in enumerate(areas) if a == 1.0]
    halved = [i for i, a in enumerate(areas) if 0.15 < a < 0.26]
    assert len(full) == 2 and len(halved) == 2 and halved[1] == halved[0] + 1  # a stacked pair is two neighbours


def test_classic_is_seeded():
    images = panels(10)
    a = [np.asarray(make_pages(images, "Classic Comic Style", seed=s)[0]) for s in (0, 0, 1, 2, 3)]
    assert np.array_equal(a[0], a[1])
    assert any(not np.array_equal(a[0], other) for other in a[2:])


def test_caption_changes_pixels_only_inside_its_box():
    image = Image.new("RGB", (256, 192), (90, 120, 60))
    text = "Bob reads the newspaper at home and finds a treasure map"
    out = add_caption(image, text, font_size=18)
    left, top, right, bottom = caption_box(image.size, text, font_size=18)
    before, after = np.asarray(image).astype(int), np.asarray(out).astype(int)
    changed = np.any(before != after, axis=2)
    assert changed[top:bottom, left:right].all()  # the translucent box covers its whole region
    changed[top:bottom, left:right] = False
    assert not changed.any()
    # centred, at the bottom, inside the white border, and wrapped onto more than one line
    assert abs((left + right) / 2 - 128) <= 1
    assert right - left <= 256 - 2 * BORDER and 192 - 25 < bottom <= 192 - 15
    assert bottom - top > 2 * load_font(18).size


def test_caption_box_grows_with_font_size_and_text():
    small = caption_box((256, 192), "a short line", 12)
    large = caption_box((256, 192), "a short line", 24)
    long = caption_box((256, 192), "a short line " * 6, 12)
    assert large[3] - large[1] > small[3] - small[1]
    assert large[2] - large[0] > small[2] - small[0]
    assert long[3] - long[1] > small[3] - small[1]


@pytest.mark.parametrize("text", ["", "   \n "])
def test_blank_caption_changes_nothing(text):
    image = Image.new("RGB", (64, 64), (1, 2, 3))
    assert caption_box(image.size, text) is None
    assert np.array_equal(np.asarray(add_caption(image, text)), np.asarray(image))


def test_wrap_text_fits_and_keeps_words():
    font = load_font(16)
    text = "the quick brown fox jumps over the lazy dog extraordinarily"
    lines = wrap_text(text, font, 90)
    assert " ".join(lines).split() == text.split()
    assert len(lines) > 2
    assert all(font.getlength(line) <= 90 or " " not in line for line in lines)


def test_bundled_font_and_license():
    assert comic.FONT_PATH.is_file() and comic.FONT_PATH.parent.name == "fonts"
    assert "Bitstream" in (comic.FONT_PATH.parent / "DejaVuSans-LICENSE.txt").read_text()
    assert load_font(20).path == str(comic.FONT_PATH) and load_font(20).size == 20


def test_layout_errors():
    with pytest.raises(ValueError) as err:
        make_pages(panels(2), "Manga")
    assert str(err.value) == (
        "unknown layout 'Manga'; valid layouts are: 'No typesetting', 'Four Pannel', 'Classic Comic Style'"
    )
    assert LAYOUTS == ("No typesetting", "Four Pannel", "Classic Comic Style")
    with pytest.raises(ValueError, match=r"^got 1 captions for 2 panels$"):
        make_pages(panels(2), "Four Pannel", ["a"])
    with pytest.raises(ValueError, match=r"^all panels must have the same size"):
        make_pages(panels(1) + panels(1, (32, 32)), "Four Pannel")
    with pytest.raises(ValueError, match=r"^no panels to lay out$"):
        make_pages([], "Four Pannel")
    with pytest.raises(ValueError, match=r"^font size must be a positive integer, got 0$"):
        make_pages(panels(1), "Four Pannel", font_size=0)
