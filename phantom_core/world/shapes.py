"""Procedural subjects: textured shapes named ``<colour> [<texture>] <shape>`` (``red striped star``, ``blue circle``).

12 colours x 4 textures (plain, striped, dotted, checked) x 10 shapes = 480 subjects, always available (no file).
Each renders as an RGBA cut-out at ``SHAPE_SIDE`` px: the shape's outline filled with its colour, the texture drawn
in a lighter (dark colours) or darker (light colours) shade of it, anti-aliased by drawing at 4x and downsampling.
A very light colour (``white``: mean channel above ``OUTLINED_ABOVE``) also gets a border of ``OUTLINE_FRACTION`` of
the side in its darker shade: references are letterboxed on white, and an unbordered white shape there (or on a
white background) would be invisible: no model could be asked to keep a subject nobody can see.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

SHAPE_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (210, 40, 40), "orange": (240, 140, 30), "yellow": (240, 215, 40), "green": (50, 170, 70),
    "blue": (40, 90, 210), "purple": (130, 60, 180), "pink": (240, 130, 180), "brown": (130, 80, 40),
    "grey": (128, 128, 128), "black": (25, 25, 25), "white": (250, 250, 250), "cyan": (40, 200, 210),
}
TEXTURES = ("plain", "striped", "dotted", "checked")  # "plain" is not written in the name
SHAPES = ("circle", "square", "triangle", "star", "diamond", "hexagon", "heart", "cross", "ring", "crescent")
SHAPE_SIDE = 96  # px of the rendered cut-out
OUTLINED_ABOVE = 200.0  # mean channel value (0..255) above which a shape gets a darker border
OUTLINE_FRACTION = 0.06  # border width, fraction of SHAPE_SIDE
_SUPERSAMPLE = 4


def shape_names() -> list[str]:
    """Every procedural subject name, in a fixed order (colour, texture, shape)."""
    return [shape_name(c, t, s) for c in SHAPE_COLOURS for t in TEXTURES for s in SHAPES]


def shape_name(colour: str, texture: str, shape: str) -> str:
    return f"{colour} {shape}" if texture == "plain" else f"{colour} {texture} {shape}"


def parse_shape_name(name: str) -> tuple[str, str, str]:
    """``name`` -> (colour, texture, shape); ``ValueError`` when it is not a procedural subject's name."""
    words = name.split(" ")
    if len(words) == 2:
        words = [words[0], "plain", words[1]]
    if len(words) != 3 or words[0] not in SHAPE_COLOURS or words[1] not in TEXTURES or words[2] not in SHAPES:
        raise ValueError(f"shape subject: got {name!r}; expected '<colour> [striped|dotted|checked] <shape>'")
    return words[0], words[1], words[2]


def render_shape(name: str) -> Image.Image:
    """The RGBA cut-out of a procedural subject, ``SHAPE_SIDE`` px square (transparent outside the shape)."""
    colour, texture, shape = parse_shape_name(name)
    big = SHAPE_SIDE * _SUPERSAMPLE
    mask = Image.new("L", (big, big), 0)
    _draw_outline(ImageDraw.Draw(mask), shape, big)
    pixels = _texture(SHAPE_COLOURS[colour], texture, big)  # (big, big, 3) uint8
    if np.mean(SHAPE_COLOURS[colour]) > OUTLINED_ABOVE:
        pixels = _outline(pixels, np.asarray(mask) > 127, _shade(SHAPE_COLOURS[colour]), round(OUTLINE_FRACTION * big))
    fill = Image.fromarray(pixels)
    cutout = fill.convert("RGBA")
    cutout.putalpha(mask)
    return cutout.resize((SHAPE_SIDE, SHAPE_SIDE), Image.Resampling.LANCZOS)


def _shade(rgb: tuple[int, int, int]) -> np.ndarray:
    """The texture's second colour: 45% towards white for dark colours, towards black for light ones."""
    c = np.array(rgb, dtype=np.float64)
    target = 255.0 if c.mean() < 140 else 0.0
    return np.round(c + 0.45 * (target - c))


def _outline(pixels: np.ndarray, inside: np.ndarray, colour: np.ndarray, width: int) -> np.ndarray:
    """``pixels [s, s, 3]`` uint8 with the shape's pixels within ``width`` px (Euclidean) of its edge painted
    ``colour``; ``inside [s, s]`` bool is the shape."""
    from scipy.ndimage import distance_transform_edt

    border = inside & (distance_transform_edt(inside) <= width)  # distance to the nearest pixel outside
    out = pixels.copy()
    out[border] = colour.astype(np.uint8)
    return out


def _texture(rgb: tuple[int, int, int], texture: str, side: int) -> np.ndarray:
    """uint8 ``[side, side, 3]``: the colour with the texture's pattern in its shade."""
    y, x = np.mgrid[0:side, 0:side] / side  # (side, side) in [0, 1)
    period = 1 / 6
    if texture == "striped":  # diagonal stripes
        pattern = ((x + y) / period) % 1 < 0.5
    elif texture == "dotted":
        cx, cy = (x / period) % 1 - 0.5, (y / period) % 1 - 0.5
        pattern = cx**2 + cy**2 < 0.25**2
    elif texture == "checked":
        pattern = ((x // period) + (y // period)) % 2 == 1
    else:
        pattern = np.zeros_like(x, dtype=bool)
    out = np.where(pattern[..., None], _shade(rgb), np.array(rgb, dtype=np.float64))
    return out.astype(np.uint8)


def _polygon(points: int, radius: float, centre: float, inner: float | None = None, turn: float = -90.0) -> list:
    """Vertices of a regular polygon (or a star when ``inner`` is given), first vertex at ``turn`` degrees."""
    out = []
    steps = points * 2 if inner is not None else points
    for k in range(steps):
        r = radius if inner is None or k % 2 == 0 else inner
        a = math.radians(turn + 360.0 * k / steps)
        out.append((centre + r * math.cos(a), centre + r * math.sin(a)))
    return out


def _draw_outline(draw: ImageDraw.ImageDraw, shape: str, side: int) -> None:
    """Fill the shape's outline with 255 on an ``L`` canvas of ``side`` px (margin 4%)."""
    m, c, r = side * 0.04, side / 2, side * 0.46
    if shape == "circle":
        draw.ellipse((m, m, side - m, side - m), fill=255)
    elif shape == "square":
        draw.rectangle((side * 0.1, side * 0.1, side * 0.9, side * 0.9), fill=255)
    elif shape == "triangle":
        draw.polygon([(c, m), (side - m, side * 0.9), (m, side * 0.9)], fill=255)
    elif shape == "star":
        draw.polygon(_polygon(5, r, c, inner=r * 0.45), fill=255)
    elif shape == "diamond":
        draw.polygon([(c, m), (side * 0.8, c), (c, side - m), (side * 0.2, c)], fill=255)
    elif shape == "hexagon":
        draw.polygon(_polygon(6, r, c, turn=0.0), fill=255)
    elif shape == "heart":
        draw.ellipse((m, side * 0.12, c + side * 0.02, side * 0.55), fill=255)
        draw.ellipse((c - side * 0.02, side * 0.12, side - m, side * 0.55), fill=255)
        draw.polygon([(side * 0.06, side * 0.40), (side * 0.94, side * 0.40), (c, side - m)], fill=255)
    elif shape == "cross":
        draw.rectangle((side * 0.35, m, side * 0.65, side - m), fill=255)
        draw.rectangle((m, side * 0.35, side - m, side * 0.65), fill=255)
    elif shape == "ring":
        draw.ellipse((m, m, side - m, side - m), fill=255)
        draw.ellipse((side * 0.3, side * 0.3, side * 0.7, side * 0.7), fill=0)
    elif shape == "crescent":
        draw.ellipse((m, m, side - m, side - m), fill=255)
        draw.ellipse((side * 0.3, m - side * 0.05, side * 1.05, side * 0.8), fill=0)
