"""Story parsing against StoryDiffusion's own outputs (strings worked out from its gradio_utils functions)."""

import pytest

from mindone_story.story.prompts import (
    STYLE_NAMES,
    Character,
    Panel,
    apply_style,
    parse_characters,
    parse_story,
)

# The first example of StoryDiffusion's low-VRAM app (id_length 2).
CAST = "[Bob] A man, wearing a black suit\n[Alice]a woman, wearing a white shirt"
STORY = """[Bob] at home, read new paper #at home, The newspaper says there is a treasure house in the forest.
[Bob] on the road, near the forest
[Alice] is make a call at home # [Bob] invited [Alice] to join him on an adventure.
[NC]A tiger appeared in the forest, at night
[NC] The car on the road, near the forest #They drives to the forest in search of treasure.
[Bob] very frightened, open mouth, in the forest, at night
[Alice] very frightened, open mouth, in the forest, at night
[Bob]  and [Alice] running very fast, in the forest, at night
[NC] A house in the forest, at night #Suddenly, They discovers the treasure house!
[Bob]  and [Alice]  in the house filled with  treasure, laughing, at night #He is overjoyed inside the house."""

BOB = " A man, wearing a black suit "
ALICE = "a woman, wearing a white shirt "


def test_characters_keep_raw_description_and_cut_hash():
    cast = parse_characters("[Bob] A man #note\n\n  [Alice]a woman\n[Carol] a girl, red hat")
    assert cast == (
        Character("Bob", " A man "),
        Character("Alice", "a woman"),
        Character("Carol", " a girl, red hat"),
    )
    assert cast[0].tag == "[Bob]"


def test_original_example_prompts_captions_and_id_panels():
    story = parse_story(CAST, STORY, id_length=2)
    assert story.prompts == [
        BOB + " at home, read new paper ",
        BOB + " on the road, near the forest",
        ALICE + " is make a call at home ",
        "A tiger appeared in the forest, at night",
        " The car on the road, near the forest ",
        BOB + " very frightened, open mouth, in the forest, at night",
        ALICE + " very frightened, open mouth, in the forest, at night",
        BOB + "  and " + ALICE + " running very fast, in the forest, at night",
        " A house in the forest, at night ",
        BOB + "  and " + ALICE + "  in the house filled with  treasure, laughing, at night ",
    ]
    assert story.captions == [
        "at home, The newspaper says there is a treasure house in the forest.",
        "[Bob] on the road, near the forest",  # no '#': the line itself, as the original
        "[Bob] invited [Alice] to join him on an adventure.",
        "A tiger appeared in the forest, at night",
        "They drives to the forest in search of treasure.",
        "[Bob] very frightened, open mouth, in the forest, at night",
        "[Alice] very frightened, open mouth, in the forest, at night",
        "[Bob]  and [Alice] running very fast, in the forest, at night",
        "Suddenly, They discovers the treasure house!",
        "He is overjoyed inside the house.",
    ]
    assert story.id_panels == {"Bob": (0, 1), "Alice": (2, 6)}
    assert story.id_indices == (0, 1, 2, 6)
    assert story.other_indices == (3, 4, 5, 7, 8, 9)
    assert [p.is_nc for p in story.panels] == [False] * 3 + [True, True] + [False] * 3 + [True, False]
    assert story.panels[9].characters == ("Bob", "Alice")
    assert story.panels[3].characters == ()


def test_three_characters_in_character_box_order():
    cast = "[Bob] a man\n[Alice] a woman\n[Rex] a dog"
    story = parse_story(cast, "[Rex] barks\n[Alice] waves\n[Bob] runs\n[Rex] and [Bob] play #Playtime\n[Rex] sleeps", 1)
    assert story.id_panels == {"Bob": (2,), "Alice": (1,), "Rex": (0,)}
    assert story.id_indices == (2, 1, 0)
    assert story.other_indices == (3, 4)
    assert story.panels[3] == Panel(
        prompt=" a dog  and  a man  play ",
        caption="Playtime",
        characters=("Bob", "Rex"),
        is_nc=False,
        text="[Rex] and [Bob] play #Playtime",
    )


def test_untagged_panel_and_blank_lines():
    story = parse_story("[Bob] a man", "\n[Bob] wakes up\n\n   \nthe sun rises # Morning\n", 1)
    assert [p.prompt for p in story.panels] == [" a man  wakes up", "the sun rises "]
    assert story.panels[1].characters == () and not story.panels[1].is_nc
    assert story.captions == ["[Bob] wakes up", "Morning"]


def test_caption_and_prompt_split_at_the_last_hash():
    story = parse_story("[Bob] a man", "[Bob] scores #1 goal # What a shot", 1)
    assert story.panels[0].prompt == " a man  scores #1 goal "
    assert story.panels[0].caption == "What a shot"


def test_too_few_id_panels_message():
    with pytest.raises(ValueError) as err:
        parse_story(CAST, STORY, id_length=3)
    assert str(err.value) == (
        "character [Alice] needs 3 id panels (panels naming [Alice] alone) but the story has 2 (panels: 2, 6). "
        "Panels 7, 9 name [Alice] with other characters; [NC] and multi-character panels cannot be id panels. "
        "Add panels with [Alice] alone or lower id_length."
    )


def test_character_never_used_alone():
    with pytest.raises(ValueError, match=r"^character \[Alice\] needs 1 id panels .* has 0 \(panels: none\)"):
        parse_story(CAST, "[Bob] walks\n[NC] rain", 1)


def test_undefined_character_message():
    with pytest.raises(ValueError) as err:
        parse_story(CAST, "[Bob] walks\n[Carol] sings", 1)
    assert str(err.value) == (
        "panel 1 ('[Carol] sings') names [Carol], which the character box does not define (defined: [Alice], [Bob])"
    )


def test_nc_panel_naming_a_character_message():
    with pytest.raises(ValueError) as err:
        parse_story(CAST, "[Bob] walks\n[NC] [Bob] hides", 1)
    assert str(err.value) == "panel 1 ('[NC] [Bob] hides') is marked [NC] but names [Bob]"


@pytest.mark.parametrize("story", ["", "\n  \n\t\n"])
def test_empty_story_message(story):
    with pytest.raises(ValueError) as err:
        parse_story(CAST, story, 1)
    assert str(err.value) == "the story is empty: write one panel per line"


@pytest.mark.parametrize(
    "cast, message",
    [
        ("[Bob] a\n[Bob] b", "duplicate character description: [Bob]"),
        ("[Bob] a\nAlice a woman", "character line 2 must start with [Name] and a description, got 'Alice a woman'"),
        ("[NC] nobody", "[NC] is reserved for panels without characters and cannot name a character"),
        ("[Bob]   ", "character [Bob] has no description"),
    ],
)
def test_character_box_errors(cast, message):
    with pytest.raises(ValueError) as err:
        parse_characters(cast)
    assert str(err.value) == message


@pytest.mark.parametrize("id_length", [0, -1, 1.5, True])
def test_bad_id_length(id_length):
    with pytest.raises(ValueError, match="id_length must be a positive integer"):
        parse_story(CAST, STORY, id_length)


def test_style_names_in_original_order():
    assert STYLE_NAMES == (
        "(No style)",
        "Japanese Anime",
        "Digital/Oil Painting",
        "Pixar/Disney Character",
        "Photographic",
        "Comic book",
        "Line art",
        "Black and White Film Noir",
        "Isometric Rooms",
    )


def test_apply_style_comic_book():
    positive, negative = apply_style("Comic book", "a cat", "ugly hands")
    assert positive == "comic a cat . graphic illustration, comic art, graphic novel art, vibrant, highly detailed"
    assert negative == (
        "photograph, deformed, glitch, noisy, realistic, stock photo, lowres, bad anatomy, bad hands, text, error, "
        "missing fingers, extra digit, fewer digits, cropped, worst quality, low quality, normal quality, "
        "jpeg artifacts, signature, watermark, username, blurry ugly hands"
    )


def test_apply_style_japanese_anime_and_no_style():
    positive, negative = apply_style("Japanese Anime", "a cat")
    assert positive == (
        "anime artwork illustrating a cat. created by japanese anime studio. highly emotional. best quality, "
        "high resolution, (Anime Style, Manga Style:1.3), Low detail, sketch, concept art, line art, webtoon, "
        "manhua, hand drawn, defined lines, simple shades, minimalistic, High contrast, Linear compositions, "
        "Scalable artwork, Digital art, High Contrast Shadows"
    )
    assert negative == (
        "lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits, cropped, "
        "worst quality, low quality, normal quality, jpeg artifacts, signature, watermark, username, blurry "
    )
    assert apply_style("(No style)", " a cat ", "blurry") == (" a cat ", " blurry")


def test_apply_style_film_noir_negative():
    positive, negative = apply_style("Black and White Film Noir", "a street")
    assert positive.startswith("a street . (b&w, Monochromatic, Film Photography:1.3), film noir,")
    assert negative.startswith("anime, photorealistic, 35mm film, deformed, glitch, blurry, noisy, off-center,")
    assert negative.endswith(
        "oil, acrylic, lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, "
        "fewer digits, cropped, worst quality, low quality, normal quality, jpeg artifacts, "
        "signature, watermark, username, blurry "
    )


def test_unknown_style_lists_valid_styles():
    with pytest.raises(ValueError) as err:
        apply_style("Watercolor", "a cat")
    message = str(err.value)
    assert message.startswith("unknown style 'Watercolor'; valid styles are: '(No style)', 'Japanese Anime', ")
    assert all(repr(name) in message for name in STYLE_NAMES)
