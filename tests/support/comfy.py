"""The node tests' ComfyUI server: one headless ComfyUI (tools/comfy_launcher.py) shared by the whole pytest
session, started on first use and stopped at exit; the ComfyUI oracle import; small helpers for /history."""

from __future__ import annotations

import atexit
import importlib
from types import ModuleType

import pytest

from tests.support import COMFY_DIR
from tools.comfy_launcher import ComfyServer

_SERVER: ComfyServer | None = None


def require_comfyui() -> None:
    """Fail the test with the set-up step to run when ComfyUI is not installed in ``.comfyui/``."""
    if not (COMFY_DIR / "main.py").exists():
        pytest.fail(f"ComfyUI runtime missing at {COMFY_DIR}; run `make env` (scripts/bootstrap.sh) first")


def get_server() -> ComfyServer:
    """The session's one server, started on first use and stopped when the interpreter exits."""
    global _SERVER
    if _SERVER is None:
        require_comfyui()
        server = ComfyServer()
        atexit.register(server.stop)
        _SERVER = server.start()
    return _SERVER


def import_comfy(module: str) -> ModuleType:
    """Import a module of the bundled ComfyUI (``.comfyui/``, on pytest's ``pythonpath``) as an independent
    oracle, forced onto the CPU."""
    require_comfyui()
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    return importlib.import_module(module)


def history_error(entry: dict) -> str:
    """The execution_error message(s) of a history entry, '' when there is none."""
    messages = entry.get("status", {}).get("messages", [])
    return "\n".join(f"{data.get('node_type')}: {data.get('exception_message')}"
                     for kind, data in messages if kind == "execution_error")
