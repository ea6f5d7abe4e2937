"""Shared fixtures: repository paths, the ComfyUI oracle (its own Wan code), the real reference photos."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMFY_DIR = ROOT / ".comfyui"
EXAMPLES_DIR = ROOT.parent / "shared" / "data" / "phantom_examples"

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def import_comfy(module: str):
    """Import a module of the bundled ComfyUI (``.comfyui/``) as an independent oracle, forced onto the CPU."""
    if not (COMFY_DIR / "main.py").exists():
        pytest.fail(f"ComfyUI runtime missing at {COMFY_DIR}; run `make env` (scripts/bootstrap.sh) first")
    if str(COMFY_DIR) not in sys.path:
        sys.path.append(str(COMFY_DIR))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    return importlib.import_module(module)


@pytest.fixture(scope="session")
def comfy_import():
    """Returns ``import_comfy``: ``comfy_import("comfy.ldm.wan.model")``."""
    return import_comfy


def make_tiny_files(root: Path, seed: int, sizes: list[tuple[int, int]]) -> dict[str, Path]:
    """The embedded tiny default under ``root/models`` ("dit", "vae", "text_encoder") plus one random RGB PNG
    reference per ``(height, width)`` in ``sizes`` ("ref0", "ref1", ...), drawn from ``seed``; "root": ``root``."""
    import numpy as np
    from PIL import Image

    from phantom_core.tiny.default import write_tiny_default

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


@pytest.fixture(scope="session")
def examples_dir() -> Path:
    """``../shared/data/phantom_examples`` (real reference photos and ``cases.json``)."""
    if not (EXAMPLES_DIR / "cases.json").exists():
        pytest.fail(f"reference photos missing: {EXAMPLES_DIR}/cases.json")
    return EXAMPLES_DIR
