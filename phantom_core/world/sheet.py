"""A contact sheet so a person can look: per case its references, frames of the output and of the ground truth.

One block per case: a caption line (the prompt; the measured motions and background), then two rows of tiles at
the video's size: the references as the model sees them (letterboxed on white) followed by ``frames`` evenly spaced
output frames, and below them the same frames of the ground truth. Written as PNG atomically.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from phantom_core.world.metrics import CaseScore, prepared_references
from phantom_core.world.sample import WorldSample

GAP = 4
CAPTION_PX = 26  # two lines of Pillow's default font


def _frame_indices(count: int, shown: int) -> list[int]:
    return sorted({round(i * (count - 1) / max(1, shown - 1)) for i in range(shown)})


def contact_sheet(entries: list[tuple[WorldSample, np.ndarray, CaseScore | None]], frames: int = 5) -> Image.Image:
    """The sheet for ``(sample, output uint8 [T, H, W, 3], score or None)`` entries (module docstring).

    Raises ``ValueError`` when ``entries`` is empty.
    """
    if not entries:
        raise ValueError("contact sheet: got no cases to show")
    fmt = entries[0][0].config.video
    tile_w, tile_h = fmt.width, fmt.height
    max_refs = max(len(s.references) for s, _, _ in entries)
    indices = _frame_indices(fmt.frames, frames)
    width = (max_refs + len(indices)) * (tile_w + GAP) + GAP * 3
    block = CAPTION_PX + 2 * (tile_h + GAP) + GAP
    sheet = Image.new("RGB", (width, block * len(entries) + GAP), (96, 96, 96))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for row, (sample, output, score) in enumerate(entries):
        top = row * block + GAP
        draw.text((GAP, top), _caption(sample, score), fill=(255, 255, 255), font=font)
        y = top + CAPTION_PX
        for k, ref in enumerate(prepared_references(sample)):
            sheet.paste(Image.fromarray(ref), (GAP + k * (tile_w + GAP), y))
        left = GAP * 3 + max_refs * (tile_w + GAP)
        for j, t in enumerate(indices):
            sheet.paste(Image.fromarray(output[t]), (left + j * (tile_w + GAP), y))
            sheet.paste(Image.fromarray(sample.video[t]), (left + j * (tile_w + GAP), y + tile_h + GAP))
    return sheet


def _caption(sample: WorldSample, score: CaseScore | None) -> str:
    text = f"#{sample.index}: {sample.prompt}\n"
    if score is not None:
        moves = ", ".join(s.measured for s in score.subjects)
        text += f"measured: {moves}; {score.measured_background} background.  "
    return text + "Top: output, bottom: ground truth."


def save_png(image: Image.Image, path: str | os.PathLike) -> Path:
    """Save ``image`` as PNG at ``path`` atomically (a hidden temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part")
    try:
        image.save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
