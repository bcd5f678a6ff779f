"""Story text: the character box, one panel per line, captions, id panels and style templates.

The grammar and the exact strings follow StoryDiffusion's low-VRAM Gradio app (`character_to_dict`,
`process_original_prompt`, `get_ref_character`, `apply_style`), so a story yields the same model prompts
as the original, whitespace included:

* character box: one ``[Name] description`` per line; a ``#`` in a description cuts off what follows it;
* story: one panel per line; ``[Name]`` is replaced by ``description + " "``; ``[NC]`` marks a panel with
  no character (generated without consistent attention); text after the last ``#`` is the page caption
  and is not sent to the model; without ``#`` the whole line (``[NC]`` removed) is the caption;
* id panels: per character, the first ``id_length`` panels that name that character alone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import StoryError

NC_TAG = "[NC]"
_TAG = re.compile(r"\[([^\[\]\n]*)\]")

# --- style templates: utils/style_template.py of StoryDiffusion, verbatim --------------------------------------
_NEG_COMMON = (
    "lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits, cropped, "
    "worst quality, low quality, normal quality, jpeg artifacts, signature, watermark, username, blurry"
)
_NEG_NOT_PAINTED = (
    "anime, photorealistic, 35mm film, deformed, glitch, blurry, noisy, off-center, deformed, cross-eyed, "
    "closed eyes, bad anatomy, ugly, disfigured, mutated, realism, realistic, impressionism, expressionism, "
    "oil, acrylic, " + _NEG_COMMON
)

# name -> (positive template with "{prompt}", negative prompt); the order is the original's dropdown order.
STYLES: dict[str, tuple[str, str]] = {
    "(No style)": ("{prompt}", ""),
    "Japanese Anime": (
        "anime artwork illustrating {prompt}. created by japanese anime studio. highly emotional. best quality, "
        "high resolution, (Anime Style, Manga Style:1.3), Low detail, sketch, concept art, line art, webtoon, "
        "manhua, hand drawn, defined lines, simple shades, minimalistic, High contrast, Linear compositions, "
        "Scalable artwork, Digital art, High Contrast Shadows",
        _NEG_COMMON,
    ),
    "Digital/Oil Painting": (
        "{prompt} . (Extremely Detailed Oil Painting:1.2), glow effects, godrays, Hand drawn, render, 8k, "
        "octane render, cinema 4d, blender, dark, atmospheric 4k ultra detailed, cinematic sensual, Sharp focus, "
        "humorous illustration, big depth of field",
        "anime, cartoon, graphic, text, painting, crayon, graphite, abstract, glitch, deformed, mutated, ugly, "
        "disfigured, " + _NEG_COMMON,
    ),
    "Pixar/Disney Character": (
        "Create a Disney Pixar 3D style illustration on {prompt} . The scene is vibrant, motivational, "
        "filled with vivid colors and a sense of wonder.",
        "lowres, bad anatomy, bad hands, text, bad eyes, bad arms, bad legs, error, missing fingers, extra digit, "
        "fewer digits, cropped, worst quality, low quality, normal quality, jpeg artifacts, signature, watermark, "
        "blurry, grayscale, noisy, sloppy, messy, grainy, highly detailed, ultra textured, photo",
    ),
    "Photographic": (
        "cinematic photo {prompt} . Hyperrealistic, Hyperdetailed, detailed skin, matte skin, soft lighting, "
        "realistic, best quality, ultra realistic, 8k, golden ratio, Intricate, High Detail, film photography, "
        "soft focus",
        "drawing, painting, crayon, sketch, graphite, impressionist, noisy, blurry, soft, deformed, ugly, "
        + _NEG_COMMON,
    ),
    "Comic book": (
        "comic {prompt} . graphic illustration, comic art, graphic novel art, vibrant, highly detailed",
        "photograph, deformed, glitch, noisy, realistic, stock photo, " + _NEG_COMMON,
    ),
    "Line art": (
        "line art drawing {prompt} . professional, sleek, modern, minimalist, graphic, line art, vector graphics",
        _NEG_NOT_PAINTED,
    ),
    "Black and White Film Noir": (
        "{prompt} . (b&w, Monochromatic, Film Photography:1.3), film noir, analog style, soft lighting, "
        "subsurface scattering, realistic, heavy shadow, masterpiece, best quality, ultra realistic, 8k",
        _NEG_NOT_PAINTED,
    ),
    "Isometric Rooms": (
        "Tiny cute isometric {prompt} . in a cutaway box, soft smooth lighting, soft colors, 100mm lens, "
        "3d blender render",
        _NEG_NOT_PAINTED,
    ),
}
STYLE_NAMES: tuple[str, ...] = tuple(STYLES)
DEFAULT_STYLE_NAME = "Japanese Anime"  # the original app's default


# Story-Adapter's prompt wrappers (its run.py), verbatim; one applier, _fill, serves both tables.
ADAPTER_STYLES: dict[str, str] = {
    "comic": "best quality, high quality, comic {prompt} . graphic illustration, comic art, graphic novel art, "
    "vibrant, highly detailed",
    "film": "best quality, high quality, cinematic film still, {prompt} . shallow depth of field, vignette, highly "
    "detailed, high budget, bokeh, cinemascope, moody, epic, gorgeous, film grain, grainy",
    "realistic": "best quality, high quality, {prompt}",
}


def _fill(template: str, prompt: str) -> str:
    return template.replace("{prompt}", prompt)  # verbatim, as both originals: prompts may hold braces


def styled(prompt: str, style: str) -> str:
    """Story-Adapter's styled prompt (its negative prompt is one fixed string)."""
    if style not in ADAPTER_STYLES:
        raise ValueError(f"unknown style {style!r}; choose one of {sorted(ADAPTER_STYLES)}")
    return _fill(ADAPTER_STYLES[style], prompt)


def apply_style(style_name: str, prompt: str, negative: str = "") -> tuple[str, str]:
    """Return (styled prompt, styled negative) exactly as the original: the negative is ``style_neg + " " + negative``.

    Call it once per panel with the user's own negative; the original re-applied the style to its already styled
    negative once per character, which piled up copies of the style's negative (not reproduced).
    """
    if style_name not in STYLES:
        valid = ", ".join(repr(name) for name in STYLE_NAMES)
        raise ValueError(f"unknown style {style_name!r}; valid styles are: {valid}")
    positive, style_negative = STYLES[style_name]
    return _fill(positive, prompt), style_negative + " " + negative


# --- data types ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Character:
    name: str  # without brackets
    description: str  # the text after "]", kept raw (the original keeps its leading space)

    @property
    def tag(self) -> str:
        return f"[{self.name}]"


@dataclass(frozen=True)
class Panel:
    prompt: str  # what the model sees before the style template: tags replaced, caption and [NC] removed
    caption: str  # what the page shows
    characters: tuple[str, ...]  # names, in character-box order (the order of the id banks in attention)
    is_nc: bool  # marked [NC]: no character, no consistent attention
    text: str = ""  # the story line as written


@dataclass(frozen=True)
class Story:
    characters: tuple[Character, ...]
    panels: tuple[Panel, ...]
    id_length: int
    id_panels: dict[str, tuple[int, ...]]  # character name -> indices of its id panels

    @property
    def id_indices(self) -> tuple[int, ...]:
        """All id panels, character by character: generated first, in batches, writing each character's bank."""
        return tuple(i for name in self.id_panels for i in self.id_panels[name])

    @property
    def other_indices(self) -> tuple[int, ...]:
        """The remaining panels in story order: generated one by one, reading the banks of their characters."""
        ids = set(self.id_indices)
        return tuple(i for i in range(len(self.panels)) if i not in ids)

    @property
    def prompts(self) -> list[str]:
        return [panel.prompt for panel in self.panels]

    @property
    def captions(self) -> list[str]:
        return [panel.caption for panel in self.panels]


# --- parsing ---------------------------------------------------------------------------------------------------
def _before_last_hash(text: str) -> str:
    return text.rpartition("#")[0] if "#" in text else text


def parse_characters(text: str) -> tuple[Character, ...]:
    """Parse the character box: one ``[Name] description`` per non-blank line, any number of characters."""
    characters: list[Character] = []
    seen: set[str] = set()
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        match = re.fullmatch(r"\s*\[([^\[\]\n]+)\](.*)", line)
        if match is None:
            raise ValueError(f"character line {number} must start with [Name] and a description, got {line!r}")
        name, description = match.group(1), _before_last_hash(match.group(2))
        if f"[{name}]" == NC_TAG:
            raise ValueError("[NC] is reserved for panels without characters and cannot name a character")
        if name in seen:
            raise ValueError(f"duplicate character description: [{name}]")
        if not description.strip():
            raise ValueError(f"character [{name}] has no description")
        seen.add(name)
        characters.append(Character(name, description))
    return tuple(characters)


def parse_panel(line: str, characters: tuple[Character, ...], index: int = 0) -> Panel:
    """Parse one story line; `index` only labels error messages."""
    without_nc = line.replace(NC_TAG, "")
    is_nc = without_nc != line
    text = _before_last_hash(without_nc)
    caption = (without_nc.rpartition("#")[2] if "#" in without_nc else without_nc).strip()
    defined = {c.tag for c in characters}
    undefined = [f"[{t}]" for t in _TAG.findall(text) if f"[{t}]" not in defined]
    if undefined:
        known = ", ".join(sorted(defined)) or "none"
        raise ValueError(
            f"panel {index} ({line.strip()!r}) names {undefined[0]}, which the character box "
            f"does not define (defined: {known})"
        )
    named = tuple(c for c in characters if c.tag in text)
    if is_nc and named:
        raise ValueError(
            f"panel {index} ({line.strip()!r}) is marked [NC] but names " + ", ".join(c.tag for c in named)
        )
    prompt = text
    for c in named:  # character-box order and description + " ", as the original
        prompt = prompt.replace(c.tag, c.description + " ")
    return Panel(prompt, caption, tuple(c.name for c in named), is_nc, line)


def _id_panels(
    characters: tuple[Character, ...], panels: tuple[Panel, ...], id_length: int
) -> dict[str, tuple[int, ...]]:
    id_panels: dict[str, tuple[int, ...]] = {}
    for c in characters:
        alone = [i for i, p in enumerate(panels) if p.characters == (c.name,)]
        if len(alone) < id_length:
            shared = [i for i, p in enumerate(panels) if c.name in p.characters and len(p.characters) > 1]
            found = ", ".join(map(str, alone)) or "none"
            hint = f" Panels {', '.join(map(str, shared))} name {c.tag} with other characters;" if shared else ""
            raise ValueError(
                f"character {c.tag} needs {id_length} id panels (panels naming {c.tag} alone) but the story has "
                f"{len(alone)} (panels: {found}).{hint} [NC] and multi-character panels cannot be id panels. "
                f"Add panels with {c.tag} alone or lower id_length."
            )
        id_panels[c.name] = tuple(alone[:id_length])
    return id_panels


def parse_story(characters: str, story: str, id_length: int) -> Story:
    """Parse a character box and a story (one panel per non-blank line) and pick each character's id panels."""
    if isinstance(id_length, bool) or not isinstance(id_length, int) or id_length < 1:
        raise ValueError(f"id_length must be a positive integer, got {id_length!r}")
    cast = parse_characters(characters)
    lines = [line for line in story.splitlines() if line.strip()]
    if not lines:
        raise ValueError("the story is empty: write one panel per line")
    panels = tuple(parse_panel(line, cast, i) for i, line in enumerate(lines))
    return Story(cast, panels, id_length, _id_panels(cast, panels, id_length))


# --- front-end input ----------------------------------------------------------------------------------------------
# mindone's run.py story: six actions and two more, for the one character of a plain description
DEFAULT_ACTIONS = (
    "wake up in the bed",
    "have breakfast",
    "is on the road, go to the company",
    "work in the company",
    "running in the playground",
    "reading book in the home",
    "siting on the sofa",
    "on the bed, at night",
)
_HERO = "Hero"  # the one character of a plain description; never named in messages


def as_hero(line: str) -> str:
    """A story line for a plain description: an untagged panel is about its one character."""
    return line if "[" in line else f"[{_HERO}],{line.split('#')[0]} #{line.rpartition('#')[2]}"


def story_from_text(general_prompt: str, story_text: str | None, id_length: int) -> Story:
    """A story from a front end's two texts: a character box (``[Name] description`` lines) with a story of one
    panel per line, or, as mindone's run.py, one plain description of the character of every untagged panel
    (with no story text: mindone's eight default actions)."""
    if not (general_prompt or "").strip():
        raise StoryError("the character description is empty")
    if "[" in general_prompt:
        if story_text is None:
            raise StoryError("a character box ('[Name] description' lines) needs a story naming the characters")
        try:
            return parse_story(general_prompt, story_text, id_length)
        except ValueError as e:
            raise StoryError(str(e)) from None
    if story_text is None:
        story_text = "\n".join(f"[{_HERO}],{action} #{action}" for action in DEFAULT_ACTIONS)
    else:  # a plain description: every panel without a tag is about the one character
        lines = [line for line in story_text.splitlines() if line.strip()]
        for i, line in enumerate(lines):
            tags = [t for t in _TAG.findall(line) if f"[{t}]" != NC_TAG]
            if tags:
                raise StoryError(
                    f"panel {i} names [{tags[0]}], but the character is given as one plain description: define "
                    "characters with '[Name] description' lines, or tag panels only with [NC]"
                )
        alone = sum(NC_TAG not in line for line in lines)
        if lines and alone < id_length:
            raise StoryError(
                f"the character needs {id_length} id panels (panels without a [tag]) but the story has {alone}: "
                "add panels or lower id_length"
            )
        story_text = "\n".join(as_hero(line) for line in lines)
    try:
        return parse_story(f"[{_HERO}] {general_prompt}", story_text, id_length)
    except ValueError as e:
        raise StoryError(str(e)) from None


def read_story_file(path: str) -> str:
    """The text of a story file: a clear error for a folder, a missing file or text that is not UTF-8."""
    p = Path(path)
    if p.is_dir():
        raise StoryError(f"the story file {p} is a folder; give a text file with one panel per line")
    if not p.is_file():
        raise StoryError(f"the story file {p} does not exist")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise StoryError(f"the story file {p} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
