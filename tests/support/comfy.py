"""The node tests' ComfyUI server: one headless ComfyUI (tools/comfy_launcher.py) shared by the whole pytest
session, started on first use and stopped at exit; the ComfyUI oracle import; small helpers for /history and for
watching a prompt run over the websocket."""

from __future__ import annotations

import asyncio
import atexit
import importlib
import json
import struct
import time
import uuid
from dataclasses import dataclass, field
from types import ModuleType

import aiohttp
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


TEXT_EVENT = 3  # ComfyUI's BinaryEventTypes.TEXT: what PromptServer.send_progress_text sends


@dataclass
class Watched:
    """What the websocket said while one prompt ran."""

    messages: list[dict] = field(default_factory=list)  # JSON messages ({"type", "data"}), in order
    texts: list[tuple[str, str]] = field(default_factory=list)  # progress texts drawn on nodes: (node id, text)
    previews: int = 0  # binary preview images

    def progress(self, node: str) -> list[tuple[int, int]]:
        """(value, max) of every "progress" message of `node`."""
        return [(m["data"]["value"], m["data"]["max"]) for m in self.messages
                if m["type"] == "progress" and m["data"].get("node") == node]


async def _watch(server, prompt: dict, timeout_s: float) -> Watched:
    client_id, seen = uuid.uuid4().hex, Watched()
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"{server.url}/ws?clientId={client_id}") as ws:
            r = server.queue(prompt, client_id)
            assert r.status_code == 200, r.text
            prompt_id, deadline = r.json()["prompt_id"], time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                msg = await ws.receive(timeout=timeout_s)
                if msg.type == aiohttp.WSMsgType.BINARY:
                    (event,) = struct.unpack(">I", msg.data[:4])
                    if event == TEXT_EVENT:
                        (n,) = struct.unpack(">I", msg.data[4:8])
                        seen.texts.append((msg.data[8:8 + n].decode(), msg.data[8 + n:].decode()))
                    else:
                        seen.previews += 1
                    continue
                data = json.loads(msg.data)
                seen.messages.append(data)
                if data["type"] in ("execution_success", "execution_error") and \
                        data["data"].get("prompt_id") == prompt_id:
                    return seen
    raise TimeoutError("prompt did not finish")


def watch(server, prompt: dict, timeout_s: float = 300.0) -> Watched:
    """Queue `prompt` with a websocket open and collect what it says until the prompt succeeds or fails."""
    return asyncio.run(_watch(server, prompt, timeout_s))
