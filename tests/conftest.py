"""Shared fixtures (helpers live in tests/support/). Tests are marked by folder: core/ -> ``core`` (no server),
nodes/ and workflows/ -> ``server`` (a real headless ComfyUI)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support import EXAMPLES_DIR
from tests.support.chat import ChatServer
from tests.support.comfy import get_server, import_comfy
from tools.comfy_launcher import ComfyServer

_MARKS = {"core": "core", "nodes": "server", "workflows": "server"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        folder = Path(str(item.fspath)).parent.name
        if folder in _MARKS:
            item.add_marker(_MARKS[folder])


@pytest.fixture(scope="session")
def comfy_import() -> Callable:
    """Returns ``import_comfy``: ``comfy_import("comfy.ldm.wan.model")`` (ComfyUI's own code as an oracle)."""
    return import_comfy


@pytest.fixture(scope="session")
def comfy_server() -> ComfyServer:
    """A running headless ComfyUI with ComfyUI-Phantom and the tiny default checkpoints (shared per session)."""
    return get_server()


@pytest.fixture(scope="session")
def examples_dir() -> Path:
    """``../shared/data/phantom_examples`` (real reference photos and ``cases.json``)."""
    if not (EXAMPLES_DIR / "cases.json").exists():
        pytest.fail(f"reference photos missing: {EXAMPLES_DIR}/cases.json")
    return EXAMPLES_DIR


@pytest.fixture(autouse=True)
def _restore_torch_threads() -> Iterator[None]:
    """torch's CPU thread count put back after every test: a test calling a tool's ``main`` that sets it (e.g.
    ``--threads 1``) would otherwise change the float rounding of every test after it."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def single_thread() -> Iterator[None]:
    """torch on one CPU thread for the test: the trainer's micro models take milliseconds per step, and two
    threads spin-waiting on a shared, loaded machine make each step ten times slower."""
    import torch

    torch.set_num_threads(1)  # _restore_torch_threads puts the count back
    yield


@pytest.fixture
def chat_server() -> Iterator[Callable[[list[dict]], ChatServer]]:
    """``chat_server(script)`` starts a recording chat-completions server (see ``ChatServer``); all are closed
    after the test."""
    servers: list[ChatServer] = []

    def start(script: list[dict]) -> ChatServer:
        servers.append(ChatServer(script))
        return servers[-1]

    yield start
    for s in servers:
        s.close()
