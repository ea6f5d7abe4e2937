"""The node tests' ComfyUI server: one headless ComfyUI (tools/comfy_launcher.py) shared by the whole pytest
session, started on first use and stopped at exit, plus small helpers for reading /history."""

from __future__ import annotations

import atexit
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "tools") not in sys.path:
    sys.path.insert(0, str(ROOT / "tools"))

from comfy_launcher import COMFY_DIR, ComfyServer, free_port  # noqa: E402,F401  (re-exported for the tests)


_SERVER: ComfyServer | None = None


def get_server() -> ComfyServer:
    """The session's one server, started on first use and stopped when the interpreter exits."""
    global _SERVER
    if _SERVER is None:
        server = ComfyServer()
        atexit.register(server.stop)
        _SERVER = server.start()
    return _SERVER


@pytest.fixture(scope="session")
def comfy_server() -> ComfyServer:
    """A running headless ComfyUI with ComfyUI-Phantom and the tiny default checkpoints (shared per session)."""
    if not (COMFY_DIR / "main.py").exists():
        pytest.fail(f"ComfyUI runtime missing at {COMFY_DIR}; run scripts/bootstrap.sh first")
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return get_server()


def history_error(entry: dict) -> str:
    """The execution_error message(s) of a history entry, '' when there is none."""
    messages = entry.get("status", {}).get("messages", [])
    return "\n".join(f"{data.get('node_type')}: {data.get('exception_message')}"
                     for kind, data in messages if kind == "execution_error")
