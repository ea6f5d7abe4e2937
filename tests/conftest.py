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


@pytest.fixture(scope="session")
def examples_dir() -> Path:
    """``../shared/data/phantom_examples`` (real reference photos and ``cases.json``)."""
    if not (EXAMPLES_DIR / "cases.json").exists():
        pytest.fail(f"reference photos missing: {EXAMPLES_DIR}/cases.json")
    return EXAMPLES_DIR
