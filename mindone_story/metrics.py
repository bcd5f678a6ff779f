"""Consistency you can measure: CLIP-T and CLIP-I for a finished story folder, as the papers report them.

- CLIP-T of a panel: ``100 * cos(E_image, E_text)``, E = the projected CLIP features (transformers'
  ``get_image_features`` / ``get_text_features``), for the user's prompt and for the styled model prompt.
- CLIP-I of two panels: ``cos(E_image_i, E_image_j)``; a character's consistency is its mean over the pairs of
  distinct panels that show it (``[NC]`` panels show none), ``all`` the mean over every pair of distinct panels.

The encoders are one CLIP model's two towers (``ClipPair``): SDXL's ``text_encoder_2`` with IP-Adapter's SDXL
``image_encoder`` (both OpenCLIP ViT-bigG/14), or a transformers ``CLIPModel`` folder. A pair whose projections
differ, or whose towers' widths belong to different CLIP families, is refused before any weight is read.
Prompts longer than the text tower's 77 positions are cut as CLIP's tokenizer cuts them, and ``metrics.json`` says so.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mindspore as ms
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .errors import RecordError, StoryError
from .models.clip_preprocess import clip_preprocess
from .modes import compiled
from .runs.files import save_png, write_json
from .runs.record import RECORD, RunRecord

METRICS, HEATMAP = "metrics.json", "metrics.png"
FORMAT, VERSION = "mindone-story metrics", 1
# (text tower width, image tower width) of the released CLIP families: a pair from two of them is refused
FAMILIES = {"ViT-B": (512, 768), "ViT-L": (768, 1024), "ViT-H": (1024, 1280), "ViT-bigG": (1280, 1664)}


@dataclass
class ClipPair:
    """One CLIP model's text and image towers (our CLIPTextModel with projection, CLIPVisionModelWithProjection)."""

    text_model: Any
    image_model: Any
    tokenizer: Any
    sources: dict[str, str]
    mode: str = "graph"
    _calls: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def image_size(self) -> int:
        return self.image_model.config.image_size

    @property
    def max_tokens(self) -> int:
        return self.text_model.config.max_position_embeddings

    def _call(self, name: str, cell):
        if name not in self._calls:  # batch 1 throughout: one compiled shape per tower
            self._calls[name] = compiled(cell.construct, self.mode)
        return self._calls[name]

    def tokens(self, prompts: list[str]) -> tuple[np.ndarray, list[int]]:
        """input_ids [N, 77] (padded and cut as CLIP's tokenizer does) and each prompt's full token count."""
        n = self.max_tokens
        ids = self.tokenizer(prompts, padding="max_length", max_length=n, truncation=True, return_tensors="np")
        counts = [len(self.tokenizer(p, verbose=False).input_ids) for p in prompts]
        return ids.input_ids.astype(np.int32), counts

    def text_features(self, input_ids: np.ndarray) -> np.ndarray:
        encode = self._call("text", self.text_model)
        return np.concatenate([encode(ms.Tensor(row[None]))[2].asnumpy() for row in input_ids]).astype(np.float32)

    def image_features(self, pixel_values: np.ndarray) -> np.ndarray:
        encode = self._call("image", self.image_model)
        dtype = self.image_model.visual_projection.weight.dtype
        out = [encode(ms.Tensor(p[None]).astype(dtype))[0].asnumpy() for p in pixel_values]
        return np.concatenate(out).astype(np.float32)

    def preprocess(self, images: list[Image.Image]) -> np.ndarray:
        return clip_preprocess(images, self.image_size)


# -- loading -------------------------------------------------------------------------------------------------------
def check_pair(text_cfg: dict[str, Any], vision_cfg: dict[str, Any], where: str) -> str:
    """The pair's family name (or "custom"); a StoryError when the towers cannot be one CLIP model."""
    tp, vp = text_cfg.get("projection_dim"), vision_cfg.get("projection_dim")
    if tp != vp:
        raise StoryError(
            f"{where}: the text encoder projects to {tp} and the image encoder to {vp}: not one CLIP model"
        )
    th, vh = text_cfg["hidden_size"], vision_cfg["hidden_size"]
    text_family = next((f for f, (t, _) in FAMILIES.items() if t == th), None)
    image_family = next((f for f, (_, v) in FAMILIES.items() if v == vh), None)
    if text_family and image_family and text_family != image_family:
        raise StoryError(
            f"{where}: a {text_family} text encoder with a {image_family} image encoder: not one CLIP model"
        )
    return text_family or image_family or "custom"


def _text_weights(path: Path):
    """text_encoder_2 of an SDXL folder or single file, as the SDXL readers map it, and its tokenizer folder."""
    from .pretrained import default_cache_dir
    from .weights import read_sdxl

    checkpoint = read_sdxl(path)
    root = Path(checkpoint.tokenizer_root)
    if not (root / "tokenizer_2" / "vocab.json").exists():
        from .tokenizers import sdxl_tokenizer_root

        root = sdxl_tokenizer_root(default_cache_dir())
    return checkpoint["text_encoder_2"], root / "tokenizer_2"


def _clip_model_weights(path: Path):
    """A transformers CLIPModel folder (one file with text_model.*, text_projection, vision_model.*,
    visual_projection): our names already, so the HF CLIP key map applies to each tower's keys."""
    from .weights import keymaps, read_image_encoder
    from .weights.layouts import find_weights, open_weights

    config_file = path / "config.json"
    if not config_file.is_file():
        raise StoryError(f"{path}: not a CLIPModel folder (no config.json)")
    config = json.loads(config_file.read_text())
    if "text_config" not in config or "vision_config" not in config:
        raise StoryError(f"{path}: config.json is not a CLIPModel's (no text_config and vision_config)")
    projection = config.get("projection_dim", 512)
    text_cfg = {**config["text_config"], "projection_dim": projection}
    text_cfg["architectures"] = ["CLIPTextModelWithProjection"]
    vision_cfg = {**config["vision_config"], "projection_dim": projection}
    source = open_weights(find_weights(path, "transformers"))
    keys = [k for k in source if k.startswith(("text_model.", "text_projection."))]
    text = keymaps.map_keys(source, keymaps.hf_clip_key, "text_model", keys)  # checked when loaded
    text.config = text_cfg
    return text, read_image_encoder(path, vision_cfg), path


def load_clip_pair(
    text_encoder: str | os.PathLike | None = None,
    image_encoder: str | os.PathLike | None = None,
    clip_model: str | os.PathLike | None = None,
    dtype: ms.Type | None = None,
    mode: str = "graph",
) -> ClipPair:
    """``clip_model`` (a CLIPModel folder), or ``text_encoder`` (an SDXL folder or file: its text_encoder_2 and
    tokenizer_2) with ``image_encoder`` (a CLIPVisionModelWithProjection folder or file). Default dtype fp32."""
    from .pretrained import _tokenizer, load_component
    from .weights import read_image_encoder

    if clip_model is not None:
        if text_encoder is not None or image_encoder is not None:
            raise StoryError("give a CLIPModel folder or a text and image encoder, not both")
        path = Path(clip_model)
        if not path.is_dir():
            raise StoryError(f"CLIP model folder not found: {path}")
        text, image, tokenizer_dir = _clip_model_weights(path)
        sources = {"clip_model": str(path)}
    else:
        if text_encoder is None or image_encoder is None:
            raise StoryError("CLIP scores need a text encoder and an image encoder of one CLIP model")
        for what, p in (("text encoder", text_encoder), ("image encoder", image_encoder)):
            if not Path(p).exists():
                raise StoryError(f"{what} not found: {p}")
        image = read_image_encoder(image_encoder)
        text, tokenizer_dir = _text_weights(Path(text_encoder))
        sources = {"text_encoder": f"{text_encoder} (text_encoder_2)", "image_encoder": str(image_encoder)}
    where = " + ".join(sources.values())
    if "CLIPTextModelWithProjection" not in text.config.get("architectures", []):
        raise StoryError(f"{where}: the text encoder has no projection; CLIP scores need the projected features")
    sources["family"] = check_pair(text.config, image.config, where)
    dtype = dtype or ms.float32
    text_model, _ = load_component("text_encoder_2", text.config, text, sources.get("text_encoder", "text"), dtype)
    image_model, _ = load_component("image_encoder", image.config, image, sources.get("image_encoder", "image"), dtype)
    return ClipPair(text_model, image_model, _tokenizer(tokenizer_dir), sources, mode)


# -- scores --------------------------------------------------------------------------------------------------------
def _unit(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def clip_t(image_features: np.ndarray, text_features: np.ndarray) -> np.ndarray:
    """100 * cos(image i, text i), per row."""
    return 100 * (_unit(image_features) * _unit(text_features)).sum(-1)


def clip_i(image_features: np.ndarray) -> np.ndarray:
    """cos(image i, image j), the full matrix (ones on the diagonal)."""
    v = _unit(image_features)
    return v @ v.T


def pair_mean(matrix: np.ndarray, panels: list[int]) -> float | None:
    """Mean of matrix[i, j] over distinct panels i < j of ``panels``; None with fewer than two."""
    pairs = [matrix[i, j] for k, i in enumerate(panels) for j in panels[k + 1 :]]
    return float(np.mean(pairs)) if pairs else None


def _plain_prompts(record: RunRecord, panels: list[Any]) -> list[Any]:
    """Each StoryDiffusion panel as the story parser gives it from the recorded line and characters: its prompt
    before the style template and the characters it shows ([NC] panels none)."""
    from .story.prompts import Character, parse_panel

    described = record.require("story", "characters", dict)
    characters = tuple(Character(name, description) for name, description in described.items())
    try:
        return [parse_panel(p["text"], characters, i) for i, p in enumerate(panels)]
    except (KeyError, TypeError, ValueError) as e:
        raise RecordError(f"{record.where}: field 'story.panels' is not a story's ({e}); it was edited?") from None


def _read_panel(folder: Path, name: str, record: RunRecord) -> Image.Image:
    path = folder / name
    if name not in record.files or not path.is_file():
        raise StoryError(f"{path} is missing: the story in {folder} is incomplete")
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except (OSError, SyntaxError) as e:
        raise StoryError(f"{path} is not a whole PNG ({e}): the story in {folder} is incomplete") from None


def _score(
    pair: ClipPair, images: list[Image.Image], texts: dict[str, list[str]], characters: dict[str, list[int]]
) -> dict[str, Any]:
    """CLIP-T per panel and text kind, their means, and CLIP-I (matrix, all pairs, per character)."""
    feats = pair.image_features(pair.preprocess(images))
    matrix = clip_i(feats)
    out: dict[str, Any] = {"clip_t": {}, "clip_t_mean": {}, "truncated": []}
    for kind, prompts in texts.items():
        ids, counts = pair.tokens(prompts)
        scores = clip_t(feats, pair.text_features(ids))
        out["clip_t"][kind] = [round(float(s), 4) for s in scores]
        out["clip_t_mean"][kind] = round(float(scores.mean()), 4)
        out["truncated"] += [
            {"panel": i, "prompt": kind, "tokens": c} for i, c in enumerate(counts) if c > ids.shape[1]
        ]
    every = list(range(len(images)))
    out["clip_i"] = {
        "matrix": [[round(float(x), 6) for x in row] for row in matrix],
        "all": pair_mean(matrix, every),
        "characters": {name: {"panels": p, "mean": pair_mean(matrix, p)} for name, p in characters.items()},
    }
    return out


def evaluate(folder: str | os.PathLike, pair: ClipPair) -> dict[str, Any]:
    """Score the finished story in ``folder``; writes ``metrics.json`` and the heat map ``metrics.png`` there."""
    folder = Path(folder)
    if not (folder / RECORD).is_file():
        raise StoryError(f"{folder} is not a story folder: it has no {RECORD}")
    record = RunRecord.read(folder)
    if record.progress.get("done") is not True:
        raise StoryError(f"the run in {folder} is not finished: resume it, then measure it")
    result: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "method": record.method,
        "encoders": pair.sources,
        "max_tokens": pair.max_tokens,
        "definitions": {
            "clip_t": "100 * cos(image features, text features) per panel; plain = the prompt before the style "
            "template (StoryDiffusion: character tags replaced by their descriptions, no caption), styled = the "
            "prompt the model saw; prompts over max_tokens are cut as CLIP's tokenizer cuts them (see truncated)",
            "clip_i": "cos(image features i, image features j); per character the mean over pairs of distinct "
            "panels showing it ([NC] panels excluded); all = the mean over every pair of distinct panels",
        },
        "heatmap": HEATMAP,
    }
    if record.method == "StoryDiffusion":
        panels = record.require("story", "panels", list)
        images = [_read_panel(folder, f"panel_{i:03d}.png", record) for i in range(len(panels))]
        plain = _plain_prompts(record, panels)
        texts = {"plain": [p.prompt for p in plain], "styled": [p["prompt"] for p in panels]}
        names = sorted({c for p in plain for c in p.characters})
        characters = {c: [i for i, p in enumerate(plain) if c in p.characters] for c in names}
        result |= _score(pair, images, texts, characters)
        maps = [heatmap(np.array(result["clip_i"]["matrix"]), "CLIP-I", _notes(result))]
    else:
        prompts = record.require("settings", "prompts", list)
        texts = {"plain": prompts, "styled": record.require("story", "model_prompts", list)}
        rounds = []
        for r in range(record.require("settings", "rounds", int) + 1):
            images = [_read_panel(folder, f"round_{r:02d}/panel_{i:03d}.png", record) for i in range(len(prompts))]
            rounds.append({"round": r, **_score(pair, images, texts, {})})
        result["truncated"] = rounds[0]["truncated"]
        result["rounds"] = [{k: v for k, v in r.items() if k != "truncated"} for r in rounds]
        maps = [heatmap(np.array(r["clip_i"]["matrix"]), f"round {r['round']}", _notes(r)) for r in rounds]
    write_json(result, folder / METRICS)
    save_png(side_by_side(maps), folder / HEATMAP)
    return result


def _notes(scores: dict[str, Any]) -> list[str]:
    t = scores["clip_t_mean"]
    lines = [f"CLIP-T {t['plain']:.2f} (styled {t['styled']:.2f})"]
    if scores["clip_i"]["all"] is not None:
        lines.append(f"CLIP-I all pairs {scores['clip_i']['all']:.3f}")
    for name, c in scores["clip_i"]["characters"].items():
        lines.append(f"{name}: {c['mean']:.3f}" if c["mean"] is not None else f"{name}: one panel")
    return lines


# -- the heat map --------------------------------------------------------------------------------------------------
CELL, MARGIN, PAD, LINE = 40, 36, 8, 14
_COLORS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], np.float64)


def _color(value: float, low: float) -> tuple[int, int, int]:
    """A viridis-like ramp from ``low`` (dark) to 1 (yellow)."""
    t = np.clip((value - low) / max(1.0 - low, 1e-6), 0, 1) * (len(_COLORS) - 1)
    i = min(int(t), len(_COLORS) - 2)
    return tuple(int(round(c)) for c in _COLORS[i] + (t - i) * (_COLORS[i + 1] - _COLORS[i]))


def heatmap_size(n: int, notes: int) -> tuple[int, int]:
    return MARGIN + n * CELL + PAD, MARGIN + n * CELL + PAD + LINE * (notes + 1)


def heatmap(matrix: np.ndarray, title: str, notes: list[str]) -> Image.Image:
    """The CLIP-I matrix as coloured cells with their values, panel numbers on both axes, the notes below."""
    n = len(matrix)
    width, height = heatmap_size(n, len(notes))
    width = max(width, MARGIN + 7 * max(map(len, [title, *notes])))  # room for the notes' text
    image = Image.new("RGB", (width, height), "white")
    draw, font = ImageDraw.Draw(image), ImageFont.load_default()
    low = float(min(matrix.min(), 0.5))
    draw.text((PAD, PAD), title, fill="black", font=font)
    for i in range(n):
        draw.text((MARGIN + i * CELL + CELL // 3, MARGIN - LINE), str(i), fill="black", font=font)
        draw.text((PAD, MARGIN + i * CELL + CELL // 3), str(i), fill="black", font=font)
        for j in range(n):
            x, y = MARGIN + j * CELL, MARGIN + i * CELL
            color = _color(float(matrix[i, j]), low)
            draw.rectangle([x, y, x + CELL - 1, y + CELL - 1], fill=color)
            ink = "black" if sum(color) > 380 else "white"
            draw.text((x + 4, y + CELL // 3), f"{matrix[i, j]:.2f}", fill=ink, font=font)
    for k, line in enumerate(notes):
        draw.text((PAD, MARGIN + n * CELL + PAD + LINE * k), line, fill="black", font=font)
    return image


def side_by_side(images: list[Image.Image]) -> Image.Image:
    out = Image.new("RGB", (sum(i.width for i in images), max(i.height for i in images)), "white")
    x = 0
    for image in images:
        out.paste(image, (x, 0))
        x += image.width
    return out


def markdown_table(result: dict[str, Any]) -> str:
    """The scores of ``evaluate`` as a small Markdown table (the demo shows it after a run)."""
    if "rounds" in result:
        rows = ["| round | CLIP-T | CLIP-T (styled) | CLIP-I, all pairs |", "|---|---|---|---|"]
        for r in result["rounds"]:
            t, i = r["clip_t_mean"], r["clip_i"]["all"]
            rows.append(f"| {r['round']} | {t['plain']:.2f} | {t['styled']:.2f} | {'-' if i is None else f'{i:.3f}'} |")
        return "\n".join(rows)
    rows = ["| panel | CLIP-T | CLIP-T (styled) |", "|---|---|---|"]
    rows += [
        f"| {i} | {a:.2f} | {b:.2f} |"
        for i, (a, b) in enumerate(zip(result["clip_t"]["plain"], result["clip_t"]["styled"]))
    ]
    rows.append(f"| mean | {result['clip_t_mean']['plain']:.2f} | {result['clip_t_mean']['styled']:.2f} |")
    consistency = [f"all pairs {result['clip_i']['all']:.3f}"] if result["clip_i"]["all"] is not None else []
    consistency += [f"{n} {c['mean']:.3f}" for n, c in result["clip_i"]["characters"].items() if c["mean"] is not None]
    return "\n".join(rows) + ("\n\nCLIP-I: " + ", ".join(consistency) if consistency else "")
