"""One world sample (a Phantom triplet): 1-3 reference images, a prompt, the video they describe, its ground truth.

Sample ``index`` of a split is drawn from ``numpy.random.default_rng([seed, index])`` alone, so any sample can be
made on its own, in any order, in any process, and is the same every time. Scene sampling:

1. the number of subjects from ``WorldConfig.subject_weights`` (P(1), P(2), P(3)), unless the caller fixes it;
2. distinct subjects of the split; in a scene of several, their mean colours at least ``SUBJECT_CONTRAST`` apart
   (RGB distance, so a tracker can tell them apart; up to 50 draws, then the last draw is kept);
3. distinct motions among left, right, up, down, still (so a motion given to the wrong subject is visible);
4. sizes: small / normal / large for one subject, small / normal for several;
5. the background: uniform among the colours whose RGB distance to every subject's mean colour is at least
   ``BACKGROUND_CONTRAST`` (else the farthest colour);
6. a layout (``render.layout``, ``WorldConfig.layout``); when none fits, back to 2 with the same generator.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from phantom_core.world.grammar import BACKGROUND_COLOURS, MAX_SUBJECTS, MOTIONS, Scene, SubjectClause
from phantom_core.world.pairs import PAIR_MODES, CrossPairStyle, cross_pair_reference, in_pair_reference
from phantom_core.world.render import (
    LAYOUT_MODES,
    TRAVEL_FRACTION,
    VideoFormat,
    WorldTruth,
    check_travel,
    layout,
    render_video,
)
from phantom_core.world.subjects import Subject, split_subjects

SUBJECT_CONTRAST = 60.0
BACKGROUND_CONTRAST = 90.0
SCENE_TRIES = 50


@dataclass(frozen=True)
class WorldConfig:
    """What a sample looks like: video format, reference pairing, how many subjects, which subject sources."""

    video: VideoFormat = field(default_factory=VideoFormat)
    pair_mode: str = "cross"
    subject_weights: tuple[float, float, float] = (0.5, 0.35, 0.15)
    sources: tuple[str, ...] | None = None  # None: every available source (subjects.available_sources)
    style: CrossPairStyle = field(default_factory=CrossPairStyle)
    layout: str = "anchored"  # render.LAYOUT_MODES: "anchored" (paths centred on fixed anchors) or "free"
    travel: float = TRAVEL_FRACTION  # a moving subject's path, a fraction of the frame's side, in (0, MAX_TRAVEL]

    def __post_init__(self) -> None:
        if self.pair_mode not in PAIR_MODES:
            raise ValueError(f"pair_mode: got {self.pair_mode!r}; valid modes are {', '.join(PAIR_MODES)}")
        if self.layout not in LAYOUT_MODES:
            raise ValueError(f"layout: got {self.layout!r}; valid layouts are {', '.join(LAYOUT_MODES)}")
        check_travel(self.travel)
        w = self.subject_weights
        if len(w) != MAX_SUBJECTS or min(w) < 0 or sum(w) <= 0:
            raise ValueError(f"subject_weights: got {w!r}; expected {MAX_SUBJECTS} non-negative weights, P(1..3)")


@dataclass(frozen=True)
class WorldSample:
    """A triplet with its ground truth.

    ``video``: uint8 ``[T, H, W, 3]``; ``references``: PIL images in prompt order (cross-pair: RGBA W x H;
    in-pair: RGB crops); ``ref_boxes``: int64 ``[S, 4]`` subject boxes in the prepared (letterboxed W x H)
    references; ``ref_variants``: per reference, ``plain`` / ``flip`` / ``rotate`` / ``light`` / ``in-pair``.
    """

    split: str
    seed: int
    index: int
    scene: Scene
    subjects: tuple[Subject, ...]
    video: np.ndarray
    references: tuple[Image.Image, ...]
    ref_boxes: np.ndarray
    ref_variants: tuple[str, ...]
    truth: WorldTruth
    config: WorldConfig

    @property
    def prompt(self) -> str:
        return self.scene.prompt


def make_sample(split: str, seed: int, index: int, config: WorldConfig = WorldConfig(),
                count: int | None = None, pool: list[Subject] | None = None) -> WorldSample:
    """Sample ``index`` of ``split`` for ``seed`` (see the module docstring).

    Args:
        count: fix the number of subjects (1-3) instead of drawing it.
        pool: the subjects to draw from (default: ``split_subjects(split, config.sources)``).
    Raises:
        ValueError: bad split, count or index, or a pool too small for the scene.
    """
    if not isinstance(index, int) or index < 0 or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed and index must be integers >= 0; got seed={seed!r}, index={index!r}")
    pool = split_subjects(split, config.sources) if pool is None else pool
    rng = np.random.default_rng([seed, index])
    weights = np.array(config.subject_weights) / sum(config.subject_weights)
    n = int(rng.choice(MAX_SUBJECTS, p=weights)) + 1 if count is None else count
    if not 1 <= n <= MAX_SUBJECTS or len(pool) < n:
        raise ValueError(f"count: got {n} subjects from a pool of {len(pool)}; a scene has 1 to {MAX_SUBJECTS}")
    fmt = config.video
    for _ in range(SCENE_TRIES):
        subjects = _draw_subjects(pool, n, rng)
        scene = _draw_scene(subjects, rng)
        cutouts = [s.image() for s in subjects]
        boxes = layout(scene, cutouts, fmt, rng, config.layout, config.travel)
        if boxes is not None:
            break
    else:
        raise ValueError(f"sample {index} of {split} (seed {seed}): no layout fits in {SCENE_TRIES} scenes")
    video, truth = render_video(scene, cutouts, boxes, fmt)
    refs, ref_boxes, variants = [], [], []
    for k, cutout in enumerate(cutouts):
        if config.pair_mode == "cross":
            size = (int(boxes[k, 0, 2] - boxes[k, 0, 0]), int(boxes[k, 0, 3] - boxes[k, 0, 1]))
            image, box, variant = cross_pair_reference(cutout, size, fmt, rng, config.style)
        else:
            image, box, variant = in_pair_reference(video, boxes[k], fmt, rng)
        refs.append(image)
        ref_boxes.append(box)
        variants.append(variant)
    return WorldSample(split, seed, index, scene, tuple(subjects), video, tuple(refs), np.stack(ref_boxes),
                       tuple(variants), truth, config)


def _draw_subjects(pool: list[Subject], n: int, rng: np.random.Generator) -> list[Subject]:
    """``n`` distinct subjects; for n > 1 their mean colours at least SUBJECT_CONTRAST apart (best effort)."""
    chosen: list[Subject] = []
    for _ in range(SCENE_TRIES):
        chosen = [pool[int(i)] for i in rng.choice(len(pool), size=n, replace=False)]
        colours = [s.mean_colour() for s in chosen]
        if all(np.linalg.norm(colours[i] - colours[j]) >= SUBJECT_CONTRAST
               for i in range(n) for j in range(i + 1, n)):
            break
    return chosen


def _draw_scene(subjects: list[Subject], rng: np.random.Generator) -> Scene:
    """Motions, sizes and background for ``subjects`` (steps 3-5 of the module docstring)."""
    n = len(subjects)
    motions = [MOTIONS[int(i)] for i in rng.choice(len(MOTIONS), size=n, replace=False)]
    size_choices = ("small", "normal", "large") if n == 1 else ("small", "normal")
    sizes = [size_choices[int(i)] for i in rng.integers(len(size_choices), size=n)]
    names = list(BACKGROUND_COLOURS)
    distances = np.array([[np.linalg.norm(np.array(BACKGROUND_COLOURS[c], dtype=np.float64) - s.mean_colour())
                           for s in subjects] for c in names]).min(axis=1)  # (colours,)
    allowed = [c for c, d in zip(names, distances) if d >= BACKGROUND_CONTRAST]
    background = allowed[int(rng.integers(len(allowed)))] if allowed else names[int(distances.argmax())]
    clauses = tuple(SubjectClause(s.name, m, z) for s, m, z in zip(subjects, motions, sizes))
    return Scene(clauses, background)
