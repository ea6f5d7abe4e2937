"""The node tests' ComfyUI server: one headless ComfyUI (tools/comfy_launcher.py) shared by the whole pytest
session, started on first use and stopped at exit; the ComfyUI oracle import; small helpers for /history."""

from __future__ import annotations

import atexit
import importlib
import json
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


def refusal_message(server: ComfyServer, prompt: dict) -> str:
    """Queue a prompt that must fail: the /prompt validation error (HTTP 400, as JSON text) or, once it ran, the
    execution error (``history_error``); asserts that it did not succeed."""
    r = server.queue(prompt)
    if r.status_code == 400:  # refused by /prompt validation
        return json.dumps(r.json())
    assert r.status_code == 200, r.text
    entry = server.wait(r.json()["prompt_id"])
    assert entry["status"]["status_str"] == "error", "the prompt unexpectedly succeeded"
    return history_error(entry)
