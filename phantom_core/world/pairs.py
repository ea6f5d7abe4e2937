"""Reference images of a world sample: cross-pair (Phantom-Data) or in-pair.

``cross`` (the default, and what ``evaluate`` always uses): the reference shows the subject in another context
than the video: a transparent W x H canvas (letterboxed on white by ``phantom_core.references.prepare_reference``,
as the real pipeline prepares any reference), the subject at another scale (its longer side ``CrossPairStyle``
``scale`` times the video's, at most 90% of the frame) near the centre, and one variant of pose or lighting drawn
per reference: ``plain``, ``flip`` (mirrored left-right), ``rotate`` (by 5-12 degrees either way) or ``light``
(RGB times 0.75-0.9 or 1.1-1.25). A flip cannot be undone from the reference alone for an asymmetric subject: it
is an honest ambiguity, and it caps subject fidelity below the VAE's for those cases (``flip`` weight 0.15).

``in`` (in-pair, for the training comparison): the reference is a crop of one frame of the target video around the
subject (background and all), with the frame's aspect ratio, so it carries the video's context: colour, scale, pose.

Each reference comes with its subject's box in the prepared reference (W x H px), which ``evaluate`` uses to tell a
copied reference from the prompted video.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from phantom_core.world.render import VideoFormat

PAIR_MODES = ("cross", "in")
REF_VARIANTS = ("plain", "flip", "rotate", "light")
MAX_REF_FRACTION = 0.9  # of the frame's shorter side


@dataclass(frozen=True)
class CrossPairStyle:
    """How cross-pair references differ from the video: scale factor range and the variants' weights."""

    scale: tuple[float, float] = (1.5, 2.2)
    weights: tuple[float, ...] = (0.4, 0.15, 0.25, 0.2)  # plain, flip, rotate, light
    rotate_degrees: tuple[float, float] = (5.0, 12.0)
    light: tuple[float, float] = (0.1, 0.25)  # |gain - 1|
    offset: float = 0.05  # of the frame size, each way

    def __post_init__(self) -> None:
        if len(self.weights) != len(REF_VARIANTS) or min(self.weights) < 0 or sum(self.weights) <= 0:
            raise ValueError(f"weights: got {self.weights!r}; expected {len(REF_VARIANTS)} non-negative weights "
                             f"for {', '.join(REF_VARIANTS)}")
        if not 0 < self.scale[0] <= self.scale[1]:
            raise ValueError(f"scale: got {self.scale!r}; expected 0 < low <= high")


def cross_pair_reference(cutout: Image.Image, video_size: tuple[int, int], fmt: VideoFormat,
                         rng: np.random.Generator, style: CrossPairStyle = CrossPairStyle()
                         ) -> tuple[Image.Image, np.ndarray, str]:
    """A cross-pair reference: (RGBA W x H image, int64 box ``[4]`` of the subject in it, variant name).

    ``video_size``: (w, h) px of the subject in the video; the reference's scale is relative to it.
    """
    weights = np.array(style.weights, dtype=np.float64)
    variant = REF_VARIANTS[int(rng.choice(len(REF_VARIANTS), p=weights / weights.sum()))]
    factor = rng.uniform(*style.scale)
    limit = MAX_REF_FRACTION * min(fmt.width, fmt.height) / max(video_size)
    factor = min(factor, limit)
    size = (max(4, round(video_size[0] * factor)), max(4, round(video_size[1] * factor)))
    subject = cutout.resize(size, Image.Resampling.LANCZOS)
    if variant == "flip":
        subject = ImageOps.mirror(subject)
    elif variant == "rotate":
        angle = rng.uniform(*style.rotate_degrees) * rng.choice([-1.0, 1.0])
        subject = subject.rotate(angle, resample=Image.Resampling.BICUBIC, expand=True)
    elif variant == "light":
        gain = 1.0 + rng.uniform(*style.light) * rng.choice([-1.0, 1.0])
        alpha = subject.getchannel("A")
        subject = ImageEnhance.Brightness(subject.convert("RGB")).enhance(gain).convert("RGBA")
        subject.putalpha(alpha)
    subject = _fit(subject, fmt)
    canvas = Image.new("RGBA", (fmt.width, fmt.height), (0, 0, 0, 0))
    cx = (fmt.width - subject.width) / 2 + rng.uniform(-style.offset, style.offset) * fmt.width
    cy = (fmt.height - subject.height) / 2 + rng.uniform(-style.offset, style.offset) * fmt.height
    x = int(np.clip(round(cx), 0, fmt.width - subject.width))
    y = int(np.clip(round(cy), 0, fmt.height - subject.height))
    canvas.alpha_composite(subject, (x, y))
    bbox = canvas.getchannel("A").getbbox() or (x, y, x + 1, y + 1)  # every pixel the subject touches
    return canvas, np.array(bbox, dtype=np.int64), variant


def _fit(image: Image.Image, fmt: VideoFormat) -> Image.Image:
    """Shrink an (expanded, rotated) cut-out that no longer fits the frame."""
    scale = min(1.0, fmt.width / image.width, fmt.height / image.height)
    if scale >= 1.0:
        return image
    return image.resize((max(1, int(image.width * scale)), max(1, int(image.height * scale))),
                        Image.Resampling.LANCZOS)


def in_pair_reference(video: np.ndarray, boxes: np.ndarray, fmt: VideoFormat,
                      rng: np.random.Generator) -> tuple[Image.Image, np.ndarray, str]:
    """An in-pair reference: (RGB crop of one frame, int64 box ``[4]`` in the prepared W x H reference, "in-pair").

    ``video``: uint8 ``[T, H, W, 3]``; ``boxes``: int64 ``[T, 4]`` of this subject. The crop window has the frame's
    aspect ratio, its longer side 1.2-1.6 times the subject's box, shifted to lie inside the frame.
    """
    t = int(rng.integers(fmt.frames))
    x0, y0, x1, y1 = (int(v) for v in boxes[t])
    margin = rng.uniform(1.2, 1.6)
    side = max((x1 - x0) / fmt.width, (y1 - y0) / fmt.height) * margin  # fraction of the frame
    win_w, win_h = min(fmt.width, round(side * fmt.width)), min(fmt.height, round(side * fmt.height))
    left = int(np.clip(round((x0 + x1 - win_w) / 2), 0, fmt.width - win_w))
    top = int(np.clip(round((y0 + y1 - win_h) / 2), 0, fmt.height - win_h))
    crop = Image.fromarray(video[t, top:top + win_h, left:left + win_w])
    scale_x, scale_y = fmt.width / win_w, fmt.height / win_h
    box = np.array([(x0 - left) * scale_x, (y0 - top) * scale_y, (x1 - left) * scale_x, (y1 - top) * scale_y])
    return crop, np.round(box).astype(np.int64), "in-pair"
