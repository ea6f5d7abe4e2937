"""The record of a training run: a JSON-lines log of every step and a loss plot (PNG, drawn with PIL).

``log.jsonl`` holds one object per optimizer step (``step``, ``loss``, ``lr``, ``grad_norm``, ``seconds``, ...),
appended and flushed as the run goes. A resumed run first cuts the log back to its checkpoint's step, so the
finished log reads as if the run had never stopped. Nothing here knows what is trained.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from phantom_core.loading.disk import atomic_write

PLOT_SIZE = (800, 400)
MARGIN = (64, 16, 16, 40)  # left, top, right, bottom (px)


class RunLog:
    """Append-only JSON-lines step log at ``path``.

    Args:
        path: the ``.jsonl`` file.
        resume_step: None starts a new log (an old one is replaced); an int keeps the records of steps up to
            it (the checkpoint a run resumes from) and drops the rest.
    """

    def __init__(self, path: str | os.PathLike, resume_step: int | None = None) -> None:
        self.path = Path(path)
        kept = [r for r in read_log(self.path) if r["step"] <= resume_step] if resume_step is not None else []
        text = "".join(json.dumps(r) + "\n" for r in kept)
        with atomic_write(self.path) as tmp:
            tmp.write_text(text, encoding="utf-8")
        self.records: list[dict[str, Any]] = kept

    def write(self, record: dict[str, Any]) -> None:
        """Append one step's record (must hold ``step`` and ``loss``) and flush it to the file."""
        self.records.append(record)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def losses(self) -> list[float]:
        """The loss of every step so far, in order."""
        return [r["loss"] for r in self.records]


def read_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a ``log.jsonl`` ([] when there is none)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def smoothed(values: Sequence[float], beta: float = 0.9) -> list[float]:
    """Bias-corrected exponential moving average (as TensorBoard's smoothing): ``m_k / (1 - beta^k)``."""
    out, m = [], 0.0
    for k, v in enumerate(values, start=1):
        m = beta * m + (1 - beta) * v
        out.append(m / (1 - beta**k))
    return out


def draw_loss_plot(losses: Sequence[float], title: str = "training loss") -> Image.Image:
    """A line plot of per-step losses (light) and their moving average (dark), with the step and loss ranges.

    Returns an RGB image of ``PLOT_SIZE``; an empty sequence gives the axes only.
    """
    img = Image.new("RGB", PLOT_SIZE, "white")
    draw = ImageDraw.Draw(img)
    left, top, right, bottom = MARGIN
    x0, y0, x1, y1 = left, top, PLOT_SIZE[0] - right, PLOT_SIZE[1] - bottom
    draw.rectangle((x0, y0, x1, y1), outline="black")
    draw.text((x0, PLOT_SIZE[1] - bottom + 22), title, fill="black")
    if not losses:
        return img
    lo, hi = min(losses), max(losses)
    span = (hi - lo) or 1.0
    n = len(losses)

    def point(i: int, v: float) -> tuple[float, float]:
        return x0 + (x1 - x0) * (i / max(n - 1, 1)), y1 - (y1 - y0) * ((v - lo) / span)

    for values, colour, width in ((losses, (170, 190, 230), 1), (smoothed(losses), (20, 60, 160), 2)):
        pts = [point(i, v) for i, v in enumerate(values)]
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=width)
        else:
            draw.ellipse((pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2), fill=colour)
    draw.text((4, y0), f"{hi:.4g}", fill="black")
    draw.text((4, y1 - 10), f"{lo:.4g}", fill="black")
    draw.text((x0, y1 + 4), "step 1", fill="black")
    draw.text((x1 - 60, y1 + 4), f"step {n}", fill="black")
    return img


def write_loss_plot(losses: Sequence[float], path: str | os.PathLike, title: str = "training loss") -> Path:
    """Draw ``draw_loss_plot`` and write it as a PNG, atomically. Returns the path."""
    img = draw_loss_plot(losses, title)
    with atomic_write(path, suffix=".png") as tmp:
        img.save(tmp, format="PNG")
    return Path(path)
