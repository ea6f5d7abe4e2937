"""From a scene to a video with its ground truth: subject sizes, trajectories (the world's physics) and compositing.

The world's physics (what a model must learn, and what ``evaluate`` checks):

- a subject's longer side is ``SIZE_FRACTIONS[size]`` of the frame's shorter side (small 0.22, normal 0.3,
  large 0.42), its aspect kept;
- a moving subject travels ``TRAVEL_FRACTION`` (0.3; ``WorldConfig.travel`` sets another, up to ``MAX_TRAVEL``) of
  the frame's width (left / right) or height (up / down) at constant speed from the first frame to the last, or, where
  its path would not fit inside the frame at its size, as far as it fits (frame side minus its box side: only above
  0.5, e.g. a large subject at 0.75 travels 0.58); a still one stays put;
- where it is (``layout``): ``"anchored"`` (the world's default) centres the k-th subject's path on the k-th
  anchor of ``ANCHORS[n]`` (n subjects: the frame's centre for one; for more, the main diagonal from the top
  left, else the other diagonal from the top right: the first subject named is always the highest) moved by a
  uniform jitter of up to ``ANCHOR_JITTER`` (0.08) of the frame per axis, shifted back inside the frame where it
  would leave it; a scene whose anchored paths come too close on both diagonals falls back to ``"free"``: a
  uniform start anywhere the subject stays whole inside the frame throughout (the only layout before
  2026-12-03; a model must then break that symmetry from noise, which the 5 M-parameter world DiT did not
  learn: docs/WORLD.md);
- subjects never overlap (boxes at least ``GAP_PX`` apart in every frame); later subjects are drawn on top;
- the background is one flat colour (``grammar.BACKGROUND_COLOURS``).

Positions are rounded to whole pixels per frame, so the ground truth is exact: per frame and subject the box
``(x0, y0, x1, y1)`` (x1, y1 exclusive), its centre and the mask of the subject's pixels (alpha >= 0.5).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from phantom_core.world.grammar import BACKGROUND_COLOURS, Scene

SIZE_FRACTIONS = {"small": 0.22, "normal": 0.3, "large": 0.42}
TRAVEL_FRACTION = 0.3
MAX_TRAVEL = 0.75  # up to 0.5 every subject's whole path fits; above it a subject goes as far as fits (travel_px)
GAP_PX = 2
LAYOUT_TRIES = 200
LAYOUT_MODES = ("anchored", "free")
# n subjects -> anchor sets tried in turn (fractions of the frame, (x, y) per subject in prompt order): the main
# diagonal, then the other one (where paths along the first would meet, e.g. the first moving right, the second up)
ANCHORS = {1: (((0.5, 0.5),),),
           2: (((0.3, 0.3), (0.7, 0.7)), ((0.7, 0.3), (0.3, 0.7))),
           3: (((0.22, 0.22), (0.5, 0.5), (0.78, 0.78)), ((0.78, 0.22), (0.5, 0.5), (0.22, 0.78)))}
ANCHOR_JITTER = 0.08
ANCHOR_TRIES = 20
_DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "still": (0, 0)}


@dataclass(frozen=True)
class VideoFormat:
    """Frame size in px (multiples of 16, at least 64), frames (4k + 1, at least 5), frames per second."""

    width: int = 128
    height: int = 128
    frames: int = 17
    fps: float = 16.0

    def __post_init__(self) -> None:
        for name in ("width", "height"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 64 or value % 16:
                raise ValueError(f"{name}: got {value!r}; the world's frames are multiples of 16 px, at least 64")
        if not isinstance(self.frames, int) or self.frames < 5 or (self.frames - 1) % 4:
            raise ValueError(f"frames: got {self.frames!r}; the world's videos have 4k + 1 frames, at least 5")
        if not self.fps > 0:
            raise ValueError(f"fps: got {self.fps!r}; must be > 0")


@dataclass(frozen=True)
class WorldTruth:
    """Ground truth of a rendered video (S subjects in reference order, T frames).

    ``boxes``: int64 ``[S, T, 4]`` (x0, y0, x1, y1) px, exclusive ends; ``centres``: float64 ``[S, T, 2]`` (x, y)
    px; ``masks``: bool ``[S, T, H, W]``; ``background``: colour name; ``names``/``motions``/``sizes``: per subject.
    """

    background: str
    names: tuple[str, ...]
    motions: tuple[str, ...]
    sizes: tuple[str, ...]
    boxes: np.ndarray
    centres: np.ndarray
    masks: np.ndarray

    @property
    def background_rgb(self) -> tuple[int, int, int]:
        return BACKGROUND_COLOURS[self.background]


def subject_box_size(cutout: Image.Image, size: str, fmt: VideoFormat) -> tuple[int, int]:
    """(w, h) px of a cut-out drawn at ``size``: longer side = SIZE_FRACTIONS[size] x the frame's shorter side."""
    side = SIZE_FRACTIONS[size] * min(fmt.width, fmt.height)
    scale = side / max(cutout.size)
    return max(4, round(cutout.width * scale)), max(4, round(cutout.height * scale))


def check_travel(travel: float) -> float:
    """``travel`` (a fraction of the frame) when it is in (0, ``MAX_TRAVEL``]; else ``ValueError`` naming the range."""
    if isinstance(travel, bool) or not isinstance(travel, (int, float)) or not 0 < travel <= MAX_TRAVEL:
        raise ValueError(f"travel: got {travel!r}; expected a fraction of the frame in (0, {MAX_TRAVEL}]")
    return float(travel)


def travel_px(motion: str, fmt: VideoFormat, travel: float = TRAVEL_FRACTION,
              box: tuple[int, int] | None = None) -> tuple[float, float]:
    """(dx, dy) px from the first frame to the last for ``motion``, moving ``travel`` of the frame's side; with the
    subject's ``box`` (w, h) px, at most the frame's side minus the box's (the whole path inside the frame)."""
    ux, uy = _DIRECTIONS[motion]
    dx, dy = travel * fmt.width, travel * fmt.height
    if box is not None:
        dx, dy = min(dx, max(0.0, fmt.width - box[0])), min(dy, max(0.0, fmt.height - box[1]))
    return ux * dx, uy * dy


def trajectory(start: tuple[float, float], motion: str, fmt: VideoFormat,
               travel: float = TRAVEL_FRACTION, box: tuple[int, int] | None = None) -> np.ndarray:
    """int64 ``[T, 2]``: the box's top-left corner (x, y) in each frame, rounded to whole px (``travel_px``)."""
    dx, dy = travel_px(motion, fmt, travel, box)
    s = np.linspace(0.0, 1.0, fmt.frames)[:, None]  # (T, 1)
    return np.round(np.array(start) + s * np.array([dx, dy])).astype(np.int64)  # (T, 2)


def layout(scene: Scene, cutouts: list[Image.Image], fmt: VideoFormat, rng: np.random.Generator,
           mode: str = "anchored", travel: float = TRAVEL_FRACTION) -> np.ndarray | None:
    """Start corners for each subject so that all stay inside and apart: int64 ``[S, T, 4]`` boxes, or None.

    ``mode`` ``"anchored"``: up to ``ANCHOR_TRIES`` jittered placements on each anchor set of ``ANCHORS``
    (module docstring), then as ``"free"``: up to ``LAYOUT_TRIES`` uniform placements; the first that fits is
    returned. ``travel``: the moving subjects' path length (``check_travel``). All draws come from ``rng``. Raises
    ``ValueError`` for another mode or a travel outside (0, ``MAX_TRAVEL``].
    """
    if mode not in LAYOUT_MODES:
        raise ValueError(f"layout mode: got {mode!r}; valid modes are {', '.join(LAYOUT_MODES)}")
    check_travel(travel)
    sizes = [subject_box_size(c, s.size, fmt) for c, s in zip(cutouts, scene.subjects)]
    ranges = []  # per subject: (x_lo, x_hi, y_lo, y_hi) of the start corner, (dx, dy) travel
    for (w, h), clause in zip(sizes, scene.subjects):
        dx, dy = travel_px(clause.motion, fmt, travel, (w, h))
        x_lo, x_hi = max(0.0, -dx), fmt.width - w - max(0.0, dx)
        y_lo, y_hi = max(0.0, -dy), fmt.height - h - max(0.0, dy)
        if x_hi < x_lo or y_hi < y_lo:
            return None  # the subject is larger than the frame (travel_px keeps any other path inside it)
        ranges.append((x_lo, x_hi, y_lo, y_hi, dx, dy))
    anchor_sets = ANCHORS.get(len(sizes), ()) if mode == "anchored" else ()
    tries = ANCHOR_TRIES * len(anchor_sets)
    for attempt in range(LAYOUT_TRIES + tries):
        anchored, anchors = attempt < tries, anchor_sets[attempt // ANCHOR_TRIES] if attempt < tries else None
        boxes = []
        for k, ((w, h), clause) in enumerate(zip(sizes, scene.subjects)):
            x_lo, x_hi, y_lo, y_hi, dx, dy = ranges[k]
            if anchored:  # the path's middle on the jittered anchor, the start corner clamped inside the frame
                jx, jy = rng.uniform(-ANCHOR_JITTER, ANCHOR_JITTER, size=2)
                x = (anchors[k][0] + jx) * fmt.width - w / 2 - dx / 2
                y = (anchors[k][1] + jy) * fmt.height - h / 2 - dy / 2
                start = (min(max(x, x_lo), x_hi), min(max(y, y_lo), y_hi))
            else:
                start = (rng.uniform(x_lo, x_hi), rng.uniform(y_lo, y_hi))
            corner = trajectory(start, clause.motion, fmt, travel, (w, h))  # (T, 2)
            boxes.append(np.concatenate([corner, corner + np.array([w, h])], axis=1))  # (T, 4)
        stacked = np.stack(boxes)  # (S, T, 4)
        if not _any_overlap(stacked):
            return stacked
    return None


def _any_overlap(boxes: np.ndarray) -> bool:
    """True when two subjects' boxes come closer than GAP_PX in any frame. boxes: ``[S, T, 4]``."""
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            a, b = boxes[i], boxes[j]  # (T, 4)
            apart = ((a[:, 2] + GAP_PX <= b[:, 0]) | (b[:, 2] + GAP_PX <= a[:, 0])
                     | (a[:, 3] + GAP_PX <= b[:, 1]) | (b[:, 3] + GAP_PX <= a[:, 1]))
            if not apart.all():
                return True
    return False


def render_video(scene: Scene, cutouts: list[Image.Image], boxes: np.ndarray,
                 fmt: VideoFormat) -> tuple[np.ndarray, WorldTruth]:
    """Composite the subjects over the background -> (uint8 video ``[T, H, W, 3]``, ground truth).

    Args:
        scene: background and the subjects' clauses (reference order). cutouts: RGBA images, one per subject.
        boxes: int64 ``[S, T, 4]`` from :func:`layout` (each box's size is the subject's drawn size).
    """
    t_count, h, w = fmt.frames, fmt.height, fmt.width
    video = np.empty((t_count, h, w, 3), dtype=np.float64)
    video[:] = np.array(BACKGROUND_COLOURS[scene.background], dtype=np.float64)
    masks = np.zeros((len(cutouts), t_count, h, w), dtype=bool)
    for k, cutout in enumerate(cutouts):
        bw, bh = (int(v) for v in boxes[k, 0, 2:] - boxes[k, 0, :2])
        rgba = np.asarray(cutout.resize((bw, bh), Image.Resampling.LANCZOS), dtype=np.float64) / 255.0  # (bh, bw, 4)
        alpha = rgba[..., 3:]
        for t in range(t_count):
            x0, y0, x1, y1 = (int(v) for v in boxes[k, t])
            region = video[t, y0:y1, x0:x1]
            video[t, y0:y1, x0:x1] = region * (1 - alpha) + rgba[..., :3] * 255.0 * alpha
            masks[:, t, y0:y1, x0:x1] &= ~(alpha[..., 0] >= 0.5)  # later subjects hide earlier ones
            masks[k, t, y0:y1, x0:x1] = alpha[..., 0] >= 0.5
    centres = (boxes[..., :2] + boxes[..., 2:]) / 2.0  # (S, T, 2)
    truth = WorldTruth(background=scene.background, names=tuple(s.words for s in scene.subjects),
                       motions=tuple(s.motion for s in scene.subjects), sizes=tuple(s.size for s in scene.subjects),
                       boxes=boxes.astype(np.int64), centres=centres, masks=masks)
    return np.round(video).clip(0, 255).astype(np.uint8), truth
