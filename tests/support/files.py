"""Tiny model files and reference images on disk for the CLI and pipeline tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from phantom_core.tiny.default import write_tiny_default


def make_tiny_files(root: Path, seed: int, sizes: list[tuple[int, int]]) -> dict[str, Path]:
    """The embedded tiny default under ``root/models`` ("dit", "vae", "text_encoder") plus one random RGB PNG
    reference per ``(height, width)`` in ``sizes`` ("ref0", "ref1", ...), drawn from ``seed``; "root": ``root``."""
    paths = dict(write_tiny_default(root / "models"))
    rng = np.random.default_rng(seed)
    for k, size in enumerate(sizes):
        paths[f"ref{k}"] = root / f"ref{k}.png"
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(paths[f"ref{k}"])
    return paths | {"root": root}


def model_args(files: dict[str, Path]) -> list[str]:
    """The CLI's model and reference options for ``make_tiny_files``'s files (two references)."""
    return ["--dit", str(files["dit"]), "--vae", str(files["vae"]), "--text-encoder", str(files["text_encoder"]),
            "--ref", str(files["ref0"]), "--ref", str(files["ref1"])]
