"""Helpers shared by the tests (servers, tiny models, random weights); fixtures live in tests/conftest.py."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository
COMFY_DIR = ROOT / ".comfyui"  # ComfyUI installed by scripts/bootstrap.sh
EXAMPLES_DIR = ROOT.parent / "shared" / "data" / "phantom_examples"  # real photos (tests only; never shipped)
