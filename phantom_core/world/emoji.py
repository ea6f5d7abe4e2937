"""Emoji subjects: the colour glyphs of Debian's ``fonts-noto-color-emoji`` (NotoColorEmoji.ttf, CBDT bitmaps).

The font is found at ``$PHANTOM_EMOJI_FONT`` or Debian's path (``EMOJI_FONT_PATH``); ``make train-default`` installs
it with apt-get. Each code point of the font's character map (the OpenType ``cmap`` table, format 12 or 4, read here
without fontTools) that Python's ``unicodedata`` names and that is a symbol (category ``So``) becomes a subject named
by its Unicode name in lower case (U+1F431 -> ``cat face``). Tags, regional indicators and skin-tone modifiers are
left out (they are parts of sequences, not pictures). Glyphs render with Pillow at the font's bitmap size (109 pt,
``embedded_color=True``) into an RGBA cut-out cropped to its alpha.
"""

from __future__ import annotations

import functools
import os
import struct
import unicodedata
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

EMOJI_FONT_PATH = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
EMOJI_FONT_ENV = "PHANTOM_EMOJI_FONT"
EMOJI_POINT_SIZE = 109  # NotoColorEmoji's only bitmap strike; FreeType refuses other sizes for CBDT fonts
_SKIPPED_PREFIXES = ("TAG ", "REGIONAL INDICATOR", "EMOJI MODIFIER", "COMBINING")


def emoji_font_path() -> Path | None:
    """The font file: ``$PHANTOM_EMOJI_FONT`` when set (it must exist), else Debian's path; None when absent.

    Raises:
        ValueError: ``$PHANTOM_EMOJI_FONT`` names a file that does not exist.
    """
    override = os.environ.get(EMOJI_FONT_ENV)
    if override:
        if not Path(override).is_file():
            raise ValueError(f"{EMOJI_FONT_ENV}: got {override!r}; it must name the NotoColorEmoji.ttf file")
        return Path(override)
    default = Path(EMOJI_FONT_PATH)
    return default if default.is_file() else None


def read_cmap(path: str | os.PathLike) -> set[int]:
    """The code points mapped by an OpenType font's ``cmap`` (Unicode subtables of format 12 and 4).

    Source: the OpenType specification, "cmap — Character to Glyph Index Mapping Table".
    Raises ``ValueError`` when the file is not an sfnt font with a cmap table.
    """
    data = Path(path).read_bytes()
    tables = {}
    for i in range(struct.unpack_from(">H", data, 4)[0]):
        tag, _checksum, offset, _length = struct.unpack_from(">4sIII", data, 12 + 16 * i)
        tables[tag] = offset
    if b"cmap" not in tables:
        raise ValueError(f"emoji font {path}: no cmap table; expected an OpenType font such as NotoColorEmoji.ttf")
    base = tables[b"cmap"]
    points: set[int] = set()
    for i in range(struct.unpack_from(">H", data, base + 2)[0]):
        platform, _encoding, offset = struct.unpack_from(">HHI", data, base + 4 + 8 * i)
        if platform in (0, 3):  # Unicode, Windows
            points |= _subtable_points(data, base + offset)
    return points


def _subtable_points(data: bytes, at: int) -> set[int]:
    """Code points of one cmap subtable (formats 12 and 4; others are ignored)."""
    fmt = struct.unpack_from(">H", data, at)[0]
    points: set[int] = set()
    if fmt == 12:  # sequential map groups: (startCharCode, endCharCode, startGlyphID)
        for g in range(struct.unpack_from(">I", data, at + 12)[0]):
            start, end, _glyph = struct.unpack_from(">III", data, at + 16 + 12 * g)
            points.update(range(start, end + 1))
    elif fmt == 4:  # segments: endCode[], pad, startCode[] (0xFFFF terminator excluded)
        segments = struct.unpack_from(">H", data, at + 6)[0] // 2
        ends = struct.unpack_from(f">{segments}H", data, at + 14)
        starts = struct.unpack_from(f">{segments}H", data, at + 16 + 2 * segments)
        for start, end in zip(starts, ends):
            if start != 0xFFFF:
                points.update(range(start, end + 1))
    return points


@functools.lru_cache(maxsize=4)
def emoji_names(path: str) -> dict[str, int]:
    """``{subject name: code point}`` of the font's pictures (see the module docstring), in code-point order."""
    names: dict[str, int] = {}
    for point in sorted(read_cmap(path)):
        name = unicodedata.name(chr(point), "")
        if not name or unicodedata.category(chr(point)) != "So" or name.startswith(_SKIPPED_PREFIXES):
            continue
        names.setdefault(name.lower(), point)
    return names


@functools.lru_cache(maxsize=8)
def _emoji_font(path: str) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, EMOJI_POINT_SIZE)


def render_emoji(path: str, point: int) -> Image.Image:
    """The glyph of ``point`` as an RGBA cut-out cropped to its alpha (about 128 px for Noto's 109 pt strike).

    Raises ``ValueError`` when the glyph renders empty.
    """
    font = _emoji_font(path)
    canvas = Image.new("RGBA", (192, 192), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((16, 16), chr(point), font=font, embedded_color=True)
    box = canvas.getchannel("A").getbbox()
    if box is None:
        raise ValueError(f"emoji U+{point:04X} renders empty with {path}")
    return canvas.crop(box)
