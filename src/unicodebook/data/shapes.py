"""The "shapes world": a tiny procedural image/text dataset with an exact judge.

World
-----
A scene is 1-3 objects on a plain white background (:data:`BACKGROUND`). The
image is split into a 3x3 grid; each object sits centred in its own cell (at
most one object per cell, so objects never overlap). Every object has

* a **shape** from :data:`SHAPES` (``circle`` = disc, ``square`` = axis-aligned,
  ``triangle`` = upward isoceles triangle whose base equals its height),
* a **colour** from :data:`COLOURS` (six saturated palette colours, pairwise far
  apart and far from white),
* a **size** from :data:`SIZES`; the extent (width = height) of the object is
  ``SIZE_FRACTIONS[size]`` of the cell side, snapped to an odd number of pixels
  so shapes are symmetric (5/7/9 px at 32 px, 9/13/17 px at 64 px; neighbouring
  large objects are always >= 2 px apart),
* a **position** from :data:`POSITIONS` (the grid cell, named as it reads in a
  caption: ``"top left"``, ``"center"``, ...).

Images are rendered at any square size (32-64 px, default 32) without
anti-aliasing: every pixel is either the background or exactly one palette
colour, so :func:`judge` can segment ground-truth renders exactly. The judge is
also robust to blur and noise (as produced by a neural decoder): pixels are
projected onto the white-to-colour segments (a soft coverage ``alpha``), and
shape and size come from a least-squares fit of each component's coverage map
against the rendered shapes at a few blur levels.

Text
----
* :func:`caption` -- "a small red circle at the top left and a large blue
  square in the center",
* :func:`t2i_prompt` -- "draw a small red circle at the top left",
* :func:`qa_pairs` -- one unambiguous question per type in :data:`QA_TYPES`
  (colour, shape, count, position, existence) with one-or-two-word answers;
* a description turn (:data:`DESCRIBE`, type ``"caption"``) whose answer is the caption:
  every object's attributes at its place, the dense grounding the short answers lack.

All text uses the closed vocabulary :data:`VOCAB_WORDS` (plus the single
punctuation mark ``"?"`` ending each question, :data:`PUNCTUATION`).

Held-out combinations
---------------------
:data:`HELD_OUT` holds three (colour, shape) pairs, one per shape with distinct
colours. **No train text-to-image target contains a held-out pair**: train's
``t2i.jsonl`` lists only the 1-2 object scenes without one. Every train scene may
hold one (colour and shape uniform over all 18 pairs), so the visual tokenizer and
the LLM's understanding tasks (questions, in-context decompression) see what a
yellow square looks like alone, in pairs and in threes, while the text-to-image
task never asks for one: drawing a held-out pair from text tests composition. The val
and test splits contain both kinds; about half of their
text-to-image records (1-2 object scenes) deliberately contain a held-out pair and
are flagged ``"held_out": true``.

Version 2 changed only the train split: in version 1 a held-out pair appeared only
among three objects, and a model read a lone yellow square as the circle the seen
pairs suggest (docs/results.md). The val and test splits are byte-identical in both
versions.

Dataset layout (see :func:`write_dataset`)::

    out/meta.json
    out/{train,val,test}/images/000000.png ...
    out/{split}/scenes.jsonl     {"image", "scene"}
    out/{split}/captions.jsonl   {"image", "caption"}
    out/{split}/t2i.jsonl        {"image", "caption", "held_out"}   (1-2 object scenes)
    out/{split}/instruct.json    LLaVA conversations: the QA turns and one description turn
                                 at a random place ("type" on human turns, INSTRUCT_TYPES)
"""

from __future__ import annotations

import io
import itertools
import json
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, Union

import numpy as np
from PIL import Image

__all__ = [
    "BACKGROUND",
    "COLOURS",
    "SHAPES",
    "SIZES",
    "SIZE_FRACTIONS",
    "POSITIONS",
    "HELD_OUT",
    "DEFAULT_SIZE",
    "QA_TYPES",
    "INSTRUCT_TYPES",
    "DESCRIBE",
    "DESCRIBE_TYPE",
    "VOCAB_WORDS",
    "PUNCTUATION",
    "SPLITS",
    "Obj",
    "Scene",
    "sample_scene",
    "object_extent",
    "render",
    "render_array",
    "caption",
    "t2i_prompt",
    "qa_pairs",
    "parse_objects",
    "judgeable",
    "vocab_words",
    "write_dataset",
    "judge",
    "score",
    "matches_prompt",
]

# --------------------------------------------------------------------------- world constants

BACKGROUND: tuple[int, int, int] = (255, 255, 255)

#: Palette. Minimum pairwise RGB distance is 81 (yellow/orange); every colour is
#: >= 239 away from white and the white->colour directions are >= 16 degrees apart.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (210, 30, 40),
    "green": (30, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 0),
    "purple": (150, 50, 190),
    "orange": (250, 130, 0),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: tuple[str, ...] = ("small", "medium", "large")
#: Object extent as a fraction of the cell side (before snapping to odd pixels).
SIZE_FRACTIONS: dict[str, float] = {"small": 0.42, "medium": 0.58, "large": 0.81}
#: Grid cells in row-major order; index = 3 * row + col.
POSITIONS: tuple[str, ...] = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)
#: The image side in px of the shapes world the tiny preset reads: its 3×3 object grid falls on
#: whole 4-px code cells (a 9×9 code grid).
DEFAULT_SIZE = 36
#: (colour, shape) pairs never drawn by a train text-to-image target (train images may hold them).
HELD_OUT: tuple[tuple[str, str], ...] = (("red", "triangle"), ("blue", "circle"), ("yellow", "square"))
QA_TYPES: tuple[str, ...] = ("colour", "shape", "count", "position", "existence")
#: The human turn of the description turn; its answer is :func:`caption`.
DESCRIBE = "describe the image"
#: The ``type`` of the description turn's human turn.
DESCRIBE_TYPE = "caption"
#: The ``type`` of an instruct human turn: a question type, or :data:`DESCRIBE_TYPE`.
INSTRUCT_TYPES: tuple[str, ...] = (*QA_TYPES, DESCRIBE_TYPE)
SPLITS: tuple[str, ...] = ("train", "val", "test")
MAX_OBJECTS = 3
MAX_T2I_OBJECTS = 2

_PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles"}
_NUMBER_WORDS = ("zero", "one", "two", "three")
_PREPOSITION = {
    "top left": "at the",
    "top": "at the",
    "top right": "at the",
    "left": "on the",
    "center": "in the",
    "right": "on the",
    "bottom left": "at the",
    "bottom": "at the",
    "bottom right": "at the",
}

PUNCTUATION: tuple[str, ...] = ("?",)


def vocab_words() -> tuple[str, ...]:
    """Every word any caption, prompt, question or answer of this world can use (sorted)."""
    words: set[str] = set()
    words.update(COLOURS, SHAPES, SIZES, _PLURAL.values(), _NUMBER_WORDS)
    for pos in POSITIONS:
        words.update(pos.split())
    for prep in _PREPOSITION.values():
        words.update(prep.split())
    words.update(
        "a an and draw what colour shape is the object how many objects are there where yes no describe image".split()
    )
    return tuple(sorted(words))


VOCAB_WORDS: tuple[str, ...] = vocab_words()

# --------------------------------------------------------------------------- scene types


@dataclass(frozen=True)
class Obj:
    """One object of a scene."""

    shape: str
    colour: str
    size: str
    position: str

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}")
        if self.colour not in COLOURS:
            raise ValueError(f"unknown colour {self.colour!r}")
        if self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}")
        if self.position not in POSITIONS:
            raise ValueError(f"unknown position {self.position!r}")

    @property
    def cell(self) -> int:
        """Grid cell index 0..8 (row-major)."""
        return POSITIONS.index(self.position)

    @property
    def held_out(self) -> bool:
        """Whether (colour, shape) is a held-out pair."""
        return (self.colour, self.shape) in HELD_OUT

    def phrase(self) -> str:
        """'a small red circle at the top left'."""
        return f"a {self.size} {self.colour} {self.shape} {_PREPOSITION[self.position]} {self.position}"

    def to_dict(self) -> dict[str, str]:
        return {"shape": self.shape, "colour": self.colour, "size": self.size, "position": self.position}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Obj:
        return cls(shape=d["shape"], colour=d["colour"], size=d["size"], position=d["position"])


@dataclass(frozen=True)
class Scene:
    """1-3 objects in distinct cells, stored sorted by cell index."""

    objects: tuple[Obj, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        objs = tuple(sorted(self.objects, key=lambda o: o.cell))
        cells = [o.cell for o in objs]
        if len(set(cells)) != len(cells):
            raise ValueError("two objects share a grid cell")
        object.__setattr__(self, "objects", objs)

    def __len__(self) -> int:
        return len(self.objects)

    @property
    def held_out(self) -> bool:
        """True if any object has a held-out (colour, shape) pair."""
        return any(o.held_out for o in self.objects)

    def to_dict(self) -> dict[str, Any]:
        return {"objects": [o.to_dict() for o in self.objects]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Scene:
        return cls(objects=tuple(Obj.from_dict(o) for o in d["objects"]))


def read_scenes(folder: Path | str) -> dict[str, Scene]:
    """A split's ground-truth scenes (its ``scenes.jsonl``) by image path as written there
    (``images/000000.png``); empty when the folder has none. Unreadable lines are left out."""
    path = Path(folder) / "scenes.jsonl"
    out: dict[str, Scene] = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
                out[row["image"]] = Scene.from_dict(row["scene"])
            except (ValueError, KeyError, TypeError):
                continue
    return out


# --------------------------------------------------------------------------- sampling

Rng = Union[random.Random, np.random.Generator]


def _randbelow(rng: Rng, n: int) -> int:
    if isinstance(rng, np.random.Generator):
        return int(rng.integers(n))
    return rng.randrange(n)


def _choice(rng: Rng, seq: Sequence[Any]) -> Any:
    return seq[_randbelow(rng, len(seq))]


def _sample_k(rng: Rng, seq: Sequence[Any], k: int) -> list[Any]:
    pool = list(seq)
    out = []
    for _ in range(k):
        out.append(pool.pop(_randbelow(rng, len(pool))))
    return out


_ALL_PAIRS: tuple[tuple[str, str], ...] = tuple(itertools.product(COLOURS, SHAPES))
_SEEN_PAIRS: tuple[tuple[str, str], ...] = tuple(p for p in _ALL_PAIRS if p not in HELD_OUT)


def sample_scene(
    rng: Rng,
    n_objects: int | None = None,
    *,
    max_objects: int = MAX_OBJECTS,
    held_out: Literal["any", "exclude", "require"] = "any",
) -> Scene:
    """Sample a random scene.

    Args:
        rng: a ``random.Random`` or ``np.random.Generator``.
        n_objects: number of objects; uniform over ``1..max_objects`` when None.
        max_objects: upper bound when ``n_objects`` is None (at most 9).
        held_out: ``"any"`` -- colour/shape uniform over all 18 pairs;
            ``"exclude"`` -- no object has a held-out pair;
            ``"require"`` -- at least one object (a random one) has a held-out pair,
            the others are uniform over all pairs.
    """
    if n_objects is None:
        n_objects = 1 + _randbelow(rng, max_objects)
    if not 1 <= n_objects <= len(POSITIONS):
        raise ValueError(f"n_objects must be in 1..9, got {n_objects}")
    cells = _sample_k(rng, range(len(POSITIONS)), n_objects)
    forced = _randbelow(rng, n_objects) if held_out == "require" else -1
    objs = []
    for i, cell in enumerate(cells):
        if i == forced:
            pairs: Sequence[tuple[str, str]] = HELD_OUT
        elif held_out == "exclude":
            pairs = _SEEN_PAIRS
        else:
            pairs = _ALL_PAIRS
        colour, shape = _choice(rng, pairs)
        objs.append(Obj(shape=shape, colour=colour, size=_choice(rng, SIZES), position=POSITIONS[cell]))
    return Scene(tuple(objs))


# --------------------------------------------------------------------------- rendering


def object_extent(size: str, image_size: int) -> int:
    """Pixel extent (odd, >= 3) of an object of ``size`` in an image of side ``image_size``."""
    target = SIZE_FRACTIONS[size] * image_size / 3.0
    return max(3, 2 * int(round((target - 1.0) / 2.0)) + 1)


@lru_cache(maxsize=None)
def _shape_mask(shape: str, n: int) -> np.ndarray:
    """Binary (n, n) mask of a shape, sampled at pixel centres (no anti-aliasing)."""
    c = np.arange(n) + 0.5
    u, v = np.meshgrid(c, c)  # u = x (columns), v = y (rows)
    h = n / 2.0
    if shape == "square":
        m = np.ones((n, n), dtype=bool)
    elif shape == "circle":
        m = (u - h) ** 2 + (v - h) ** 2 <= h * h + 1e-9
    elif shape == "triangle":  # apex at top centre, base along the bottom edge
        m = np.abs(u - h) <= v / 2.0 + 1e-9
    else:
        raise ValueError(shape)
    m.setflags(write=False)
    return m


def _cell_centre_px(cell: int, image_size: int) -> tuple[int, int]:
    """Integer pixel (row, col) at the centre of a cell.

    Centres are ``S // 2 + (i - 1) * round(S / 3)``: evenly spaced, so two large objects in
    neighbouring cells are always >= 2 px apart (they stay separable after a 3x3 blur).
    """
    r, c = divmod(cell, 3)
    mid, step = image_size // 2, int(round(image_size / 3.0))
    return mid + (r - 1) * step, mid + (c - 1) * step


def _object_box(obj: Obj, image_size: int) -> tuple[int, int, int]:
    """(top, left, extent) of the object's bounding box in pixels."""
    n = object_extent(obj.size, image_size)
    cy, cx = _cell_centre_px(obj.cell, image_size)
    return cy - n // 2, cx - n // 2, n


def render_array(scene: Scene, size: int = 32) -> np.ndarray:
    """Render ``scene`` to an (size, size, 3) uint8 array (see :func:`render`)."""
    img = np.empty((size, size, 3), dtype=np.uint8)
    img[...] = BACKGROUND
    for o in scene.objects:
        top, left, n = _object_box(o, size)
        m = _shape_mask(o.shape, n)
        img[top : top + n, left : left + n][m] = COLOURS[o.colour]
    return img


def render(scene: Scene, size: int = 32) -> Image.Image:
    """Render ``scene`` as an RGB image of side ``size`` (deterministic, no anti-aliasing)."""
    return Image.fromarray(render_array(scene, size))


# --------------------------------------------------------------------------- text


def _join(parts: Sequence[str]) -> str:
    if len(parts) <= 1:
        return "".join(parts)
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def caption(scene: Scene) -> str:
    """'a small red circle at the top left and a large blue square in the center'."""
    return _join([o.phrase() for o in scene.objects])


def t2i_prompt(scene: Scene) -> str:
    """Text-to-image prompt: 'draw ' + :func:`caption`."""
    return "draw " + caption(scene)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _qa(question: str, answer: str, qtype: str) -> dict[str, str]:
    return {"question": question, "answer": answer, "type": qtype}


def qa_pairs(scene: Scene, rng: Rng) -> list[dict[str, str]]:
    """One unambiguous question-answer pair per type of :data:`QA_TYPES`, in random order.

    * colour: "what colour is the object at the top left?" -> "red"
    * shape: "what shape is the red object?" (colour unique in the scene) or
      "what shape is the object in the center?" -> "circle"
    * count: "how many objects are there?" / "how many red objects are there?" /
      "how many circles are there?" -> "zero" .. "three"
    * position: "where is the red circle?" (pair unique) or "where is the red object?"
      (colour unique) or "where is the circle?" (shape unique) -> "top left"; skipped
      in the (rare) scene of identical objects
    * existence: "is there a red circle?" / "is there an orange square?" -> "yes" / "no"
      (50/50)
    """
    objs = scene.objects
    colour_count = {c: sum(o.colour == c for o in objs) for c in COLOURS}
    shape_count = {s: sum(o.shape == s for o in objs) for s in SHAPES}
    pair_count = {p: sum((o.colour, o.shape) == p for o in objs) for p in _ALL_PAIRS}
    out: list[dict[str, str]] = []

    o = _choice(rng, objs)
    out.append(_qa(f"what colour is the object {_PREPOSITION[o.position]} {o.position}?", o.colour, "colour"))

    o = _choice(rng, objs)
    if colour_count[o.colour] == 1 and _randbelow(rng, 2) == 0:
        q = f"what shape is the {o.colour} object?"
    else:
        q = f"what shape is the object {_PREPOSITION[o.position]} {o.position}?"
    out.append(_qa(q, o.shape, "shape"))

    kind = _randbelow(rng, 3)
    if kind == 0:
        out.append(_qa("how many objects are there?", _NUMBER_WORDS[len(objs)], "count"))
    elif kind == 1:
        c = _choice(rng, tuple(COLOURS))
        out.append(_qa(f"how many {c} objects are there?", _NUMBER_WORDS[colour_count[c]], "count"))
    else:
        s = _choice(rng, SHAPES)
        out.append(_qa(f"how many {_PLURAL[s]} are there?", _NUMBER_WORDS[shape_count[s]], "count"))

    candidates: list[tuple[str, str]] = []
    for o in objs:
        if pair_count[(o.colour, o.shape)] == 1:
            candidates.append((f"where is the {o.colour} {o.shape}?", o.position))
        if colour_count[o.colour] == 1:
            candidates.append((f"where is the {o.colour} object?", o.position))
        if shape_count[o.shape] == 1:
            candidates.append((f"where is the {o.shape}?", o.position))
    if not candidates:  # every object has the same colour and shape: name the size
        for o in objs:
            if sum((p.size, p.colour, p.shape) == (o.size, o.colour, o.shape) for p in objs) == 1:
                candidates.append((f"where is the {o.size} {o.colour} {o.shape}?", o.position))
    if candidates:  # empty only for identical objects (no unambiguous question exists)
        q, a = _choice(rng, candidates)
        out.append(_qa(q, a, "position"))

    present = sorted({(o.colour, o.shape) for o in objs})
    absent = [p for p in _ALL_PAIRS if p not in present]
    if _randbelow(rng, 2) == 0:
        (c, s), a = _choice(rng, present), "yes"
    else:
        (c, s), a = _choice(rng, absent), "no"
    out.append(_qa(f"is there {_article(c)} {c} {s}?", a, "existence"))

    order = _sample_k(rng, range(len(out)), len(out))
    return [out[i] for i in order]


def parse_objects(text: str) -> list[dict[str, str]]:
    """Parse the objects named in a caption / t2i prompt back to attribute dicts.

    Inverse of :func:`caption` / :func:`t2i_prompt`; each dict has the keys
    (``shape``, ``colour``, ``size``, ``position``) that were named.
    """
    words = text.lower().replace(",", " ").replace("?", " ").split()
    objs: list[dict[str, str]] = []
    cur: dict[str, str] | None = None
    i = 0
    while i < len(words):
        w = words[i]
        if w in ("a", "an"):
            cur = {}
            objs.append(cur)
        elif cur is not None:
            if w in SIZES:
                cur["size"] = w
            elif w in COLOURS:
                cur["colour"] = w
            elif w in SHAPES:
                cur["shape"] = w
            elif w in ("top", "bottom", "left", "right", "center"):
                if w in ("top", "bottom") and i + 1 < len(words) and words[i + 1] in ("left", "right"):
                    cur["position"] = f"{w} {words[i + 1]}"
                    i += 1
                else:
                    cur["position"] = w
        i += 1
    return objs


# --------------------------------------------------------------------------- judge

_PALETTE = np.array([COLOURS[c] for c in COLOURS], dtype=np.float32)  # (K, 3)
_COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
_BG = np.array(BACKGROUND, dtype=np.float32)
_DIRS = _PALETTE - _BG  # (K, 3): white -> colour
_DIR_NORM2 = (_DIRS**2).sum(-1)  # (K,)

#: A pixel is foreground if its coverage along the best white->colour segment is at least
#: this ...
ALPHA_THRESHOLD = 0.5
#: ... and its distance to that segment (RGB units) is at most this.
RESIDUAL_THRESHOLD = 70.0
#: Coverage below this is ignored when measuring a component's soft area / centroid.
SOFT_FLOOR = 0.1
#: Gaussian blur sigmas (px) the templates are also compared at (besides none and 3x3 box).
BLUR_SIGMAS: tuple[float, ...] = (0.7, 1.0, 1.4)
#: Range of the per-template colour-strength gain fitted with the template (pale decodes).
GAIN_LO, GAIN_HI = 0.8, 1.0


def _to_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """(S, S, 3) float32 array; non-square inputs are resized to the larger side."""
    if isinstance(image, Image.Image):
        image = image.convert("RGB")
        if image.width != image.height:
            s = max(image.size)
            image = image.resize((s, s), Image.Resampling.BILINEAR)
        return np.asarray(image, dtype=np.float32)
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) array, got shape {arr.shape}")
    if arr.shape[0] != arr.shape[1]:
        return _to_array(Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)))
    return arr.astype(np.float32)


def _coverage(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-colour coverage ``alpha`` in [0, 1] and distance to the white->colour segment.

    Both are (K, H, W). A pixel that is a mix ``a * colour + (1 - a) * white`` (as on a
    blurred edge) has alpha ``a`` and residual 0 for that colour.
    """
    x = arr - _BG  # (H, W, 3)
    alpha = np.einsum("hwc,kc->khw", x, _DIRS) / _DIR_NORM2[:, None, None]
    alpha = np.clip(alpha, 0.0, 1.0)
    resid = np.sqrt(((x[None] - alpha[..., None] * _DIRS[:, None, None, :]) ** 2).sum(-1))
    return alpha, resid


def _label(mask: np.ndarray, cls: np.ndarray) -> np.ndarray:
    """Labels of the 4-connected components of ``mask`` whose pixels share ``cls``; 0 = none."""
    h, w = mask.shape
    big = h * w + 1
    lab = np.where(mask, np.arange(1, h * w + 1, dtype=np.int64).reshape(h, w), big)
    link_r = mask[:, 1:] & mask[:, :-1] & (cls[:, 1:] == cls[:, :-1])
    link_d = mask[1:, :] & mask[:-1, :] & (cls[1:, :] == cls[:-1, :])
    while True:
        new = lab.copy()
        np.minimum(new[:, :-1], np.where(link_r, lab[:, 1:], big), out=new[:, :-1])
        np.minimum(new[:, 1:], np.where(link_r, lab[:, :-1], big), out=new[:, 1:])
        np.minimum(new[:-1, :], np.where(link_d, lab[1:, :], big), out=new[:-1, :])
        np.minimum(new[1:, :], np.where(link_d, lab[:-1, :], big), out=new[1:, :])
        # pointer jumping: a label is the index (+1) of a pixel of the same component
        flat = new.ravel()
        idx = np.nonzero(flat < big)[0]
        flat[idx] = np.minimum(flat[idx], flat[flat[idx] - 1])
        if np.array_equal(new, lab):
            break
        lab = new
    return np.where(mask, lab, 0)


def _dilate(m: np.ndarray) -> np.ndarray:
    """3x3 binary dilation."""
    p = np.pad(m, 1)
    h, w = m.shape
    out = np.zeros_like(m)
    for dy in range(3):
        for dx in range(3):
            out |= p[dy : dy + h, dx : dx + w]
    return out


def _blur_kernels() -> tuple[np.ndarray, ...]:
    """1-D separable kernels of the blur levels the templates are compared at."""
    out = [np.array([1.0]), np.ones(3) / 3.0]
    for sig in BLUR_SIGMAS:
        g = np.exp(-(np.arange(-4, 5) ** 2) / (2.0 * sig * sig))
        out.append(g / g.sum())
    return tuple(out)


def _sep_blur(img: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Separable 2-D blur with zero padding (same size)."""
    r = len(k) // 2
    if r == 0:
        return img.copy()
    h, w = img.shape
    p = np.pad(img, r)
    tmp = sum(k[i] * p[i : i + h, :] for i in range(len(k)))
    return sum(k[i] * tmp[:, i : i + w] for i in range(len(k)))


@lru_cache(maxsize=None)
def _templates(image_size: int) -> tuple[tuple[str, str, np.ndarray, float, float, float], ...]:
    """Every shape x size x blur level as (shape, size, patch, centroid y, centroid x, sum of
    squares); patches are the binary render padded by 4 px, then blurred."""
    out = []
    for shape in SHAPES:
        for size in SIZES:
            canvas = np.pad(_shape_mask(shape, object_extent(size, image_size)).astype(np.float64), 4)
            ys, xs = np.nonzero(canvas)
            for k in _blur_kernels():
                t = _sep_blur(canvas, k)
                out.append((shape, size, t, float(ys.mean()), float(xs.mean()), float((t**2).sum())))
    return tuple(out)


def _match_template(obs: np.ndarray, cy: float, cx: float, image_size: int) -> tuple[str, str]:
    """(shape, size) whose template, centred on (cy, cx), has the least squared error
    against the coverage map ``obs``."""
    h, w = obs.shape
    total = float((obs**2).sum())
    best, best_err = ("square", "small"), np.inf
    for shape, size, t, ty, tx, t2 in _templates(image_size):
        top, left = int(round(cy - ty)), int(round(cx - tx))
        th, tw = t.shape
        y0, x0, y1, x1 = max(top, 0), max(left, 0), min(top + th, h), min(left + tw, w)
        if y1 <= y0 or x1 <= x0:
            continue
        cross = float((obs[y0:y1, x0:x1] * t[y0 - top : y1 - top, x0 - left : x1 - left]).sum())
        g = min(max(cross / t2, GAIN_LO), GAIN_HI)  # colour strength (pale / saturated decodes)
        err = total - 2.0 * g * cross + g * g * t2
        if err < best_err:
            best, best_err = (shape, size), err
    return best


@lru_cache(maxsize=None)
def _min_area(image_size: int) -> int:
    """Components smaller than this (40% of the smallest object) are noise."""
    smallest = min(_shape_mask(s, object_extent("small", image_size)).sum() for s in SHAPES)
    return max(3, int(0.4 * smallest))


def _detect(arr: np.ndarray) -> list[dict[str, Any]]:
    """Segment a (S, S, 3) float image into objects.

    Returns one dict per component: colour, shape, size, soft area and centroid (cy, cx).
    """
    s = arr.shape[0]
    cell = s / 3.0
    alpha, resid = _coverage(arr)
    best = np.argmin(resid, axis=0)
    a_best = np.take_along_axis(alpha, best[None], 0)[0]
    r_best = np.take_along_axis(resid, best[None], 0)[0]
    fg = (a_best >= ALPHA_THRESHOLD) & (r_best <= RESIDUAL_THRESHOLD)
    lab = _label(fg, best)

    # components larger than a cell (e.g. same-colour neighbours joined by blur) are split by cell
    ys, xs = np.mgrid[0:s, 0:s]
    cell_of = np.minimum((ys / cell).astype(int), 2) * 3 + np.minimum((xs / cell).astype(int), 2)
    pieces: list[np.ndarray] = []
    for lid in np.unique(lab[lab > 0]):
        m = lab == lid
        rows, cols = np.nonzero(m)
        if max(rows.max() - rows.min(), cols.max() - cols.min()) + 1 > 1.15 * cell:
            pieces.extend(m & (cell_of == c) for c in np.unique(cell_of[m]))
        else:
            pieces.append(m)
    pieces = [m for m in pieces if m.sum() >= _min_area(s)]
    taken = np.zeros_like(fg)
    for m in pieces:
        taken |= m

    out = []
    win = int(cell) // 2 + 4
    for m in pieces:
        k = int(np.bincount(best[m], minlength=len(_COLOUR_NAMES)).argmax())
        own1 = _dilate(m)
        # coverage of colour k, without other objects (and their first ring) and pixels
        # that clearly belong to another colour
        keep = ~(_dilate(taken & ~m) & ~own1) & (resid[k] <= RESIDUAL_THRESHOLD) & ((best == k) | (a_best < 0.15))
        obs = np.where(keep, alpha[k], 0.0)
        # soft area / centroid over the mask and two rings around it (the blur fringe)
        soft = np.where(_dilate(own1) & (obs >= SOFT_FLOOR), obs, 0.0)
        area = float(soft.sum())
        if area <= 0.0:
            continue
        cy, cx = float((soft * ys).sum() / area), float((soft * xs).sum() / area)
        r0, c0 = max(int(round(cy)) - win, 0), max(int(round(cx)) - win, 0)
        sub = obs[r0 : int(round(cy)) + win + 1, c0 : int(round(cx)) + win + 1]
        shape, size = _match_template(sub, cy - r0, cx - c0, s)
        out.append({"colour": _COLOUR_NAMES[k], "shape": shape, "size": size, "area": area, "cy": cy, "cx": cx})
    return out


def judge(image: Image.Image | np.ndarray) -> list[dict[str, str]]:
    """Recover the objects of a shapes-world image (ground truth or a blurry/noisy decode).

    1. Every pixel is projected on each white->palette-colour segment: it takes the
       colour with the smallest distance to its segment, and is foreground if its
       coverage on that segment is >= 0.5 and the distance <= 70 (RGB units); pixels
       far from every palette colour are background.
    2. 4-connected same-colour components smaller than 40% of the smallest object are
       dropped; components wider than a cell (same-colour neighbours joined by blur)
       are split along the grid.
    3. Geometry: the component's soft coverage map (which keeps the blurred fringe) is
       compared by least squares with the rendered shape x size templates at several
       blur levels (none, 3x3 box, Gaussian :data:`BLUR_SIGMAS`) and a fitted colour
       strength in [0.8, 1], each centred on the component's centroid; the best fit
       gives shape and size. (A pure fill-ratio / moment classifier is exact on clean
       renders but lost up to 7% of 32 px scenes to strong blur or noise: the 5 px small
       shapes are only a few pixels; the fit stays ~100%.)
    4. Position is the cell holding the soft centroid; at most one object per cell is
       kept (the largest).

    Args:
        image: PIL image or (H, W, 3) uint8 array, any size (32-64 px intended);
            non-square images are resized to square first.

    Returns:
        ``[{"shape", "colour", "size", "position"}, ...]`` sorted by position index.
    """
    arr = _to_array(image)
    cell = arr.shape[0] / 3.0
    by_cell: dict[int, dict[str, Any]] = {}
    for d in _detect(arr):
        idx = 3 * min(int(d["cy"] // cell), 2) + min(int(d["cx"] // cell), 2)
        if idx not in by_cell or d["area"] > by_cell[idx]["area"]:
            by_cell[idx] = d
    return [
        {"shape": d["shape"], "colour": d["colour"], "size": d["size"], "position": POSITIONS[idx]}
        for idx, d in sorted(by_cell.items())
    ]


def score(image: Image.Image | np.ndarray, scene: Scene) -> dict[str, Any]:
    """Compare the judged image with the intended scene.

    Returns a dict of booleans: ``all_correct`` (exactly the scene's objects),
    ``count`` (same number of objects), ``position`` (same set of occupied cells),
    and ``shape`` / ``colour`` / ``size`` (every scene object has a judged object in
    its cell with that attribute right); plus ``n_pred`` (int).
    """
    pred = {d["position"]: d for d in judge(image)}
    true = {o.position: o.to_dict() for o in scene.objects}
    res: dict[str, Any] = {
        "count": len(pred) == len(true),
        "position": set(pred) == set(true),
    }
    for attr in ("shape", "colour", "size"):
        res[attr] = all(p in pred and pred[p][attr] == t[attr] for p, t in true.items())
    res["all_correct"] = pred == true
    res["n_pred"] = len(pred)
    return res


def judgeable(text: str) -> bool:
    """Whether :func:`matches_prompt` can judge a drawing of ``text``: it names at least one
    object, and a shape for each (every prompt this world writes does). A caption of another
    world ("a teal bar running across") parses to objects without attributes, which any picture
    with an object would match, so it is not judged."""
    objs = parse_objects(text)
    return bool(objs) and all("shape" in o for o in objs)


def matches_prompt(image: Image.Image | np.ndarray, objects: Iterable[Obj | Mapping[str, str]] | Scene | str) -> bool:
    """True if every object named in a prompt is present with all its named attributes.

    ``objects`` is a :class:`Scene`, a sequence of :class:`Obj` / partial attribute
    dicts (e.g. ``{"colour": "red", "shape": "circle"}``), or prompt text (parsed by
    :func:`parse_objects`). Each named object must match a distinct judged object;
    extra objects in the image are allowed.
    """
    if isinstance(objects, str):
        wanted: list[Mapping[str, str]] = parse_objects(objects)
    elif isinstance(objects, Scene):
        wanted = [o.to_dict() for o in objects.objects]
    else:
        wanted = [o.to_dict() if isinstance(o, Obj) else dict(o) for o in objects]
    found = judge(image)
    if len(wanted) > len(found):
        return False
    ok = [[all(f.get(k) == v for k, v in w.items()) for f in found] for w in wanted]
    for perm in itertools.permutations(range(len(found)), len(wanted)):
        if all(ok[i][j] for i, j in enumerate(perm)):
            return True
    return False


# --------------------------------------------------------------------------- dataset writing


def _split_rng(seed: int, split: str) -> random.Random:
    """Independent, deterministic RNG per (seed, split)."""
    return random.Random(f"unicodebook.shapes:{seed}:{split}")


def _split_scenes(rng: random.Random, n: int, split: str) -> list[Scene]:
    """Scenes for a split: train's may hold held-out pairs at any size (those never become t2i
    targets, :func:`write_dataset`); val/test alternate held-out / seen among the 1-2 object
    scenes (so ~half of their t2i records are held-out)."""
    scenes = []
    t2i_k = 0
    for _ in range(n):
        k = 1 + _randbelow(rng, MAX_OBJECTS)
        mode: Literal["any", "exclude", "require"]
        if split == "train":
            mode = "any"
        elif k <= MAX_T2I_OBJECTS:
            mode = "require" if t2i_k % 2 == 0 else "exclude"
            t2i_k += 1
        else:
            mode = "any"
        scenes.append(sample_scene(rng, k, held_out=mode))
    return scenes


def _png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def _write_jsonl(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, sort_keys=False) + "\n")


def write_dataset(
    out: Path | str,
    n_train: int = 2000,
    n_val: int = 200,
    n_test: int = 500,
    size: int = DEFAULT_SIZE,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Write the shapes-world dataset to ``out`` (layout in the module docstring).

    Deterministic: the same arguments give byte-identical files. Each split uses its
    own RNG derived from (seed, split). ``t2i.jsonl`` lists the split's 1-2 object scenes
    with their prompt, in train only those without a held-out pair.

    Returns:
        The metadata written to ``out/meta.json``.
    """
    from tqdm.auto import tqdm

    out = Path(out)
    counts = {"train": n_train, "val": n_val, "test": n_test}
    out.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {
        "size": size,
        "seed": seed,
        "counts": counts,
        "colours": {k: list(v) for k, v in COLOURS.items()},
        "shapes": list(SHAPES),
        "sizes": list(SIZES),
        "positions": list(POSITIONS),
        "held_out": [list(p) for p in HELD_OUT],
        "background": list(BACKGROUND),
        "extents_px": {z: object_extent(z, size) for z in SIZES},
        "qa_types": list(QA_TYPES),
        "vocab": list(VOCAB_WORDS),
        "version": 2,
    }
    for split in SPLITS:
        rng = _split_rng(seed, split)
        place = _split_rng(seed, f"{split}:describe")  # own stream: the questions stay as they were
        scenes = _split_scenes(rng, counts[split], split)
        d = out / split
        (d / "images").mkdir(parents=True, exist_ok=True)
        scene_rows, cap_rows, t2i_rows, instruct = [], [], [], []
        it = tqdm(scenes, desc=f"shapes/{split}", disable=not progress, leave=False)
        for i, sc in enumerate(it):
            rel = f"images/{i:06d}.png"
            (d / rel).write_bytes(_png_bytes(render_array(sc, size)))
            scene_rows.append({"image": rel, "scene": sc.to_dict()})
            cap_rows.append({"image": rel, "caption": caption(sc)})
            if len(sc) <= MAX_T2I_OBJECTS and not (split == "train" and sc.held_out):
                t2i_rows.append({"image": rel, "caption": t2i_prompt(sc), "held_out": sc.held_out})
            turns = qa_pairs(sc, rng)
            turns.insert(place.randrange(len(turns) + 1), _qa(DESCRIBE, caption(sc), DESCRIBE_TYPE))
            conv: list[dict[str, str]] = []
            for j, qa in enumerate(turns):
                q = ("<image>\n" if j == 0 else "") + qa["question"]
                conv.append({"from": "human", "value": q, "type": qa["type"]})
                conv.append({"from": "gpt", "value": qa["answer"]})
            instruct.append({"id": f"{split}_{i:06d}", "image": rel, "conversations": conv})
        _write_jsonl(d / "scenes.jsonl", scene_rows)
        _write_jsonl(d / "captions.jsonl", cap_rows)
        _write_jsonl(d / "t2i.jsonl", t2i_rows)
        with open(d / "instruct.json", "w", encoding="utf-8") as f:
            json.dump(instruct, f)
            f.write("\n")
    with open(out / "meta.json", "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    return meta
