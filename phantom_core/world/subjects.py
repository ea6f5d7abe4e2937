"""The subject pool and its held-out split, fixed by rule.

Three sources (``SOURCES``): ``emoji`` (Noto colour emoji, ~1,300 glyphs; only when the font is installed,
``emoji.py``), ``photo`` (13 crops of scikit-image's photos, ``photos.py``), ``shape`` (480 procedural textured
shapes, ``shapes.py``). A name that the prompt grammar cannot carry (``grammar.subject_words_problem``: it starts
with a size word such as ``large red circle``, or contains ``moves``) is dropped; a name already taken by an earlier
source is dropped too (order: photo, shape, emoji).

Held-out rule (``is_held_out``): every photo; any other subject whose name's SHA-256 (UTF-8) begins with a byte
below 32, i.e. 1 in 8 by name. The rule depends on nothing but the name, so the split is the same on every machine,
for every seed and every pool: training (``split="train"``) never sees a held-out subject.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from phantom_core.world.emoji import emoji_font_path, emoji_names, render_emoji
from phantom_core.world.grammar import subject_words_problem
from phantom_core.world.photos import photo_names, render_photo
from phantom_core.world.shapes import render_shape, shape_names

SOURCES = ("photo", "shape", "emoji")
SPLITS = ("train", "test")
HELD_OUT_BYTE = 32  # a name is held out when sha256(name)[0] < 32 (1/8 of the names)


@dataclass(frozen=True)
class Subject:
    """One subject: its name (the prompt's subject words), its source and how to draw it.

    ``key`` is what the source needs to render it (a code point for emoji, the name otherwise).
    """

    name: str
    source: str
    key: int | str = field(default="", compare=False)

    @property
    def split(self) -> str:
        return "test" if is_held_out(self) else "train"

    def image(self) -> Image.Image:
        """The RGBA cut-out (cached per subject); treat it as read-only."""
        return _cutout(self.source, self.name, self.key)

    def mean_colour(self) -> np.ndarray:
        """float64 ``[3]``: the alpha-weighted mean RGB (0..255) of the cut-out (contrast checks)."""
        return _mean_colour(self.source, self.name, self.key)


def is_held_out(subject: Subject) -> bool:
    """The held-out rule of the module docstring (photos always; others by the first byte of sha256(name))."""
    if subject.source == "photo":
        return True
    return hashlib.sha256(subject.name.encode("utf-8")).digest()[0] < HELD_OUT_BYTE


@functools.lru_cache(maxsize=4096)
def _cutout(source: str, name: str, key: int | str) -> Image.Image:
    if source == "emoji":
        return render_emoji(str(emoji_font_path()), int(key))
    if source == "photo":
        return render_photo(name)
    return render_shape(name)


@functools.lru_cache(maxsize=4096)
def _mean_colour(source: str, name: str, key: int | str) -> np.ndarray:
    rgba = np.asarray(_cutout(source, name, key), dtype=np.float64)  # (h, w, 4)
    weight = rgba[..., 3:] / 255.0
    return (rgba[..., :3] * weight).sum(axis=(0, 1)) / max(float(weight.sum()), 1e-6)


def available_sources() -> tuple[str, ...]:
    """The sources usable on this machine: photo and shape always, emoji when the font is installed."""
    return SOURCES if emoji_font_path() is not None else ("photo", "shape")


def subject_pool(sources: tuple[str, ...] | None = None) -> list[Subject]:
    """Every subject of ``sources`` (default: ``available_sources()``), names unique, in a fixed order.

    Raises:
        ValueError: an unknown source, or ``emoji`` without the font (naming the path and how to install it).
    """
    sources = available_sources() if sources is None else tuple(sources)
    for source in sources:
        if source not in SOURCES:
            raise ValueError(f"subject source: got {source!r}; valid sources are {', '.join(SOURCES)}")
    font = emoji_font_path() if "emoji" in sources else None
    if "emoji" in sources and font is None:
        raise ValueError("subject source 'emoji' needs fonts-noto-color-emoji (apt-get install fonts-noto-color-emoji"
                         " or `make train-default`), or PHANTOM_EMOJI_FONT naming NotoColorEmoji.ttf")
    return list(_pool(tuple(s for s in SOURCES if s in sources), str(font) if font else ""))


@functools.lru_cache(maxsize=8)
def _pool(sources: tuple[str, ...], font: str) -> tuple[Subject, ...]:
    candidates: list[Subject] = []
    if "photo" in sources:
        candidates += [Subject(n, "photo", n) for n in photo_names()]
    if "shape" in sources:
        candidates += [Subject(n, "shape", n) for n in shape_names()]
    if "emoji" in sources:
        candidates += [Subject(n, "emoji", p) for n, p in emoji_names(font).items()]
    seen: set[str] = set()
    pool = []
    for subject in candidates:
        if subject.name in seen or subject_words_problem(subject.name):
            continue
        seen.add(subject.name)
        pool.append(subject)
    return tuple(pool)


def split_subjects(split: str, sources: tuple[str, ...] | None = None) -> list[Subject]:
    """The subjects of ``split`` (``train``: not held out; ``test``: held out), in pool order.

    Raises ``ValueError`` for an unknown split (and as ``subject_pool``).
    """
    if split not in SPLITS:
        raise ValueError(f"split: got {split!r}; valid splits are {', '.join(SPLITS)}")
    return [s for s in subject_pool(sources) if s.split == split]


def pool_signature(subjects: list[Subject]) -> str:
    """A short hash of the subjects' names and sources: two runs compare only when their signatures match."""
    text = "\n".join(f"{s.source}:{s.name}" for s in subjects)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def font_hint(path: Path | None = None) -> str:
    """One line saying whether emoji subjects are available (for logs and reports)."""
    path = emoji_font_path() if path is None else path
    return f"emoji font {path}" if path is not None else "emoji font not installed: photo and shape subjects only"
