"""Photo subjects: hand-picked crops of the photos scikit-image ships (``skimage.data``, no download needed).

Each entry names a subject, the ``skimage.data`` function, the crop box ``(left, top, right, bottom)`` in the
photo's pixels, and how the cut-out's alpha is made: ``box`` (the whole rectangle, the photo's own background
included), ``image`` (the file's alpha channel), ``dark`` / ``light`` (pixels darker / lighter than mid-grey: the
silhouette of a binary photo) or ``disc`` (the inscribed circle). All photo subjects are held out (``subjects.py``):
training never sees a photograph, so the demo's astronaut and cat are always new to a trained model.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

# name -> (skimage.data function, crop box, alpha rule)
PHOTO_CROPS: dict[str, tuple[str, tuple[int, int, int, int], str]] = {
    "astronaut": ("astronaut", (110, 10, 360, 330), "box"),
    "space shuttle model": ("astronaut", (350, 0, 475, 290), "box"),
    "black space helmet": ("astronaut", (275, 340, 512, 512), "box"),
    "mission patch": ("astronaut", (130, 345, 212, 427), "disc"),
    "cat": ("chelsea", (30, 0, 400, 300), "box"),
    "espresso cup": ("coffee", (75, 10, 485, 390), "box"),
    "rocket": ("rocket", (285, 120, 365, 410), "box"),
    "cameraman": ("camera", (0, 60, 340, 512), "box"),
    "ancient coin": ("coins", (300, 5, 378, 98), "box"),
    "horse silhouette": ("horse", (0, 0, 400, 328), "dark"),
    "snake logo": ("logo", (0, 0, 500, 500), "image"),
    "colour wheel": ("colorwheel", (0, 0, 370, 370), "disc"),
    "motorcycle": ("stereo_motorcycle", (90, 95, 690, 455), "box"),
}


def photo_names() -> list[str]:
    """Every photo subject's name, in table order."""
    return list(PHOTO_CROPS)


def _photo_array(function: str) -> np.ndarray:
    """The ``skimage.data`` photo as uint8 ``[H, W, C]`` (C = 1, 3 or 4); the motorcycle is the stereo pair's left."""
    from skimage import data

    if function == "stereo_motorcycle":
        array = data.stereo_motorcycle()[0]
    else:
        array = getattr(data, function)()
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    return array if array.ndim == 3 else array[..., None]


def render_photo(name: str) -> Image.Image:
    """The RGBA cut-out of a photo subject (crop box, alpha by its rule).

    Raises:
        ValueError: ``name`` is not in ``PHOTO_CROPS``.
    """
    if name not in PHOTO_CROPS:
        raise ValueError(f"photo subject: got {name!r}; valid names are {', '.join(PHOTO_CROPS)}")
    function, box, rule = PHOTO_CROPS[name]
    array = _photo_array(function)[box[1]:box[3], box[0]:box[2]]  # (h, w, C)
    rgb = np.repeat(array, 3, axis=2) if array.shape[2] == 1 else array[..., :3]
    if rule == "image":
        alpha = array[..., 3]
    elif rule in ("dark", "light"):
        grey = rgb.mean(axis=2)
        alpha = np.where((grey < 128) if rule == "dark" else (grey >= 128), 255, 0).astype(np.uint8)
    elif rule == "disc":
        disc = Image.new("L", (rgb.shape[1], rgb.shape[0]), 0)
        ImageDraw.Draw(disc).ellipse((0, 0, rgb.shape[1] - 1, rgb.shape[0] - 1), fill=255)
        alpha = np.asarray(disc)
    else:
        alpha = np.full(rgb.shape[:2], 255, dtype=np.uint8)
    cutout = Image.fromarray(np.dstack([rgb, alpha]).astype(np.uint8), mode="RGBA")
    bbox = cutout.getchannel("A").getbbox()
    return cutout.crop(bbox) if bbox is not None else cutout
