"""PhantomRephrase in a real headless ComfyUI server (CPU), driven over its HTTP API.

Uses the session's shared server from `comfy_server.py`. The tiny random Qwen2-VL of `test_rephraser_local` is
put in its `<base>/models/LLM`, and a recording chat-completions server on 127.0.0.1 stands in for the endpoint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.support import COMFY_DIR
from tests.support.chat import good_answer
from tests.support.comfy import history_error, watch
from tests.support.tiny_vlm import build_tiny_vlm
from tools.comfy_launcher import ComfyServer

ROOT = Path(__file__).resolve().parents[2]
KEY_ENV = "PHANTOM_REPHRASE_NODE_TEST_KEY"
KEY = "sk-node-SECRET-9876543210"
os.environ[KEY_ENV] = KEY  # set at collection, before any server starts, so the server's environment has it
MODEL = "tiny-qwen2-vl"


@pytest.fixture(scope="module")
def server(comfy_server) -> ComfyServer:
    """The session's shared server, with the tiny VLM in its models/LLM (listed because the schema is live)."""
    build_tiny_vlm(comfy_server.base / "models" / "LLM" / MODEL)
    return comfy_server


def upload_refs(server: ComfyServer, tmp_path: Path, n: int) -> list[str]:
    rng = np.random.default_rng(7)
    names = []
    for k in range(n):
        path = tmp_path / f"rephrase_ref_{k}.png"
        Image.fromarray(rng.integers(0, 256, (64, 48, 3), dtype=np.uint8)).save(path)
        names.append(server.upload_image(path))
    return names


def workflow(images: list[str], **settings) -> dict:
    """LoadImage x N -> PhantomRephrase -> PreviewAny (prompt) + PreviewAny (descriptions)."""
    inputs = {"prompt": "a man walks a dog in the park", "backend": "local", "endpoint_url": "",
              "endpoint_model": "", "api_key_env": "", "local_model": MODEL, "language": "auto",
              "max_new_tokens": 16, "temperature": 0.0, "seed": 0, "timeout_s": 30.0, "strict": False} | settings
    wf = {}
    for k, name in enumerate(images, start=1):
        wf[f"img{k}"] = {"class_type": "LoadImage", "inputs": {"image": name}}
        inputs[f"image_{k}"] = [f"img{k}", 0]
    wf["rephrase"] = {"class_type": "PhantomRephrase", "inputs": inputs}
    wf["show_prompt"] = {"class_type": "PreviewAny", "inputs": {"source": ["rephrase", 0]}}
    wf["show_desc"] = {"class_type": "PreviewAny", "inputs": {"source": ["rephrase", 1]}}
    return wf


def test_schema(server):
    info = server.object_info()["PhantomRephrase"]
    spec = info["input"]["required"] | info["input"]["optional"]
    assert {"prompt", "backend", "endpoint_url", "endpoint_model", "api_key_env", "local_model", "language",
            "references", "image_1", "image_4", "hint_1", "hint_4"} <= set(spec)
    assert all(opts[1].get("tooltip") for opts in spec.values()), "every input has a tooltip"
    assert spec["prompt"][1]["multiline"] is True
    assert MODEL in spec["local_model"][1]["options"]
    assert info["output"] == ["STRING", "STRING"] and info["output_name"] == ["prompt", "descriptions"]
    assert spec["keep_loaded"][1]["default"] is False and "keep_loaded" in info["input"]["optional"]
    assert "whole rephrase" in spec["timeout_s"][1]["tooltip"]
    assert "Chinese if the prompt is mostly Chinese, else English" in spec["language"][1]["tooltip"]
    assert info["input"]["hidden"] == {"unique_id": ["UNIQUE_ID"]}


def test_rewritten_text_is_drawn_on_the_node(server, tmp_path, chat_server):
    """The frontend draws progress text on any node (ui "text" only on PreviewAny): the node sends its own."""
    rewritten = "a man in a green jacket walks a brown dog in the park"
    rec = chat_server([{"content": good_answer(["a man in a green jacket", "a brown dog"], rewritten)}])
    wf = workflow(upload_refs(server, tmp_path, 2), backend="openai-compatible", endpoint_url=rec.url,
                  endpoint_model="vlm-test", local_model="none", strict=True, prompt="a man walks a dog (shown)")
    seen = watch(server, wf)
    assert seen.messages[-1]["type"] == "execution_success", seen.messages[-1]
    assert seen.texts == [("rephrase", f"{rewritten}\n\n1: a man in a green jacket\n2: a brown dog")]


def test_hint_k_belongs_to_image_k(server, tmp_path, chat_server):
    rec = chat_server([{"content": good_answer(["a red car", "a blue bike"], "a red car passes a blue bike")}])
    names = upload_refs(server, tmp_path, 2)
    base = dict(backend="openai-compatible", endpoint_url=rec.url, endpoint_model="vlm-test", local_model="none",
                strict=False)

    def labels(wf: dict) -> list[str]:
        entry = server.run(wf)
        assert entry["status"]["status_str"] == "success", history_error(entry)
        parts = rec.requests[-1]["json"]["messages"][1]["content"]
        return [p["text"] for p in parts if p["type"] == "text" and p["text"].startswith("Reference ")]

    gap = workflow(names, prompt="hints: gap", hint_2="the bike", **base)  # image_1 empty, image_2 + hint_2
    gap["rephrase"]["inputs"]["image_2"] = gap["rephrase"]["inputs"].pop("image_1")
    assert labels(gap) == ["Reference 1 (user's hint: the bike):"]
    batch = workflow(names[:1], prompt="hints: batch", hint_1="a car", hint_2="unused", **base)
    batch["pair"] = {"class_type": "ImageBatch", "inputs": {"image1": ["img1", 0], "image2": ["img1", 0]}}
    batch["rephrase"]["inputs"]["image_1"] = ["pair", 0]  # a 2-image batch on image_1: hint_1 for both
    assert labels(batch) == ["Reference 1 (user's hint: a car):", "Reference 2 (user's hint: a car):"]


def test_node_helpers_in_process(tmp_path):
    """Run in a subprocess with ComfyUI importable, the extension loaded as ComfyUI loads it (its folder as a
    package, so our `nodes/` is `ComfyUI_Phantom.nodes` and never meets ComfyUI's own `nodes` module): the hint
    rule of `gather_images` and the request to ComfyUI's memory manager before the VLM goes to a GPU."""
    script = textwrap.dedent(f"""
        import importlib, importlib.util, sys, torch
        import comfy.cli_args
        comfy.cli_args.args.cpu = True
        import comfy.model_management as mm
        spec = importlib.util.spec_from_file_location("ComfyUI_Phantom", {str(ROOT / "__init__.py")!r},
                                                      submodule_search_locations=[{str(ROOT)!r}])
        sys.modules[spec.name] = package = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(package)
        node = importlib.import_module("ComfyUI_Phantom.nodes.rephrase")
        img = lambda n, v: torch.full((n, 72, 64, 3), v)
        images, hints = node.gather_images(None, [None, img(2, 0.2), None, img(1, 0.9)], ["h1", "h2", "", "h4"])
        assert hints == ["h2", "h2", "h4"] and [round(i.getpixel((0, 0))[0]) for i in images] == [51, 51, 230]
        images, hints = node.gather_images({{"images": [img(1, 0.5)[0], img(1, 0.6)[0]]}}, [None] * 4,
                                           ["a", "", "x", ""])
        assert hints == ["a", ""] and len(images) == 2
        cutout = torch.zeros(72, 64, 4)  # black, fully transparent: composited over white
        assert node.gather_images({{"images": [cutout]}}, [None] * 4, [""] * 4)[0][0].getpixel((0, 0)) == (255,) * 3
        calls = []
        mm.free_memory = lambda n, device: calls.append((n, device))
        node.free_comfy_memory(3 << 30, "cpu")
        node.free_comfy_memory(3 << 30, "cuda:0")
        assert calls == [(3 << 30, torch.device("cuda:0"))], calls
        print("OK")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(COMFY_DIR)})
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stdout + proc.stderr[-3000:]


def test_local_model_through_the_server(server, tmp_path):
    entry = server.run(workflow(upload_refs(server, tmp_path, 2), hint_2="brown dog"))
    assert entry["status"]["status_str"] == "success", history_error(entry) + server.log()
    out = entry["outputs"]
    shown = out["rephrase"]["text"][0]  # the rewritten text on the node
    assert shown.strip() and out["show_prompt"]["text"][0] == shown.split("\n\n")[0]
    assert out["show_desc"]["text"][0] == "1: \n2: "  # lenient: the nonsense has no descriptions

    strict = server.run(workflow(upload_refs(server, tmp_path, 1), strict=True))
    assert strict["status"]["status_str"] == "error"
    assert "local model 'tiny-qwen2-vl': unusable answer after 2 attempts" in history_error(strict)


def test_endpoint_through_the_server_key_cache_and_errors(server, tmp_path, chat_server):
    descs = ["a man in a green jacket", "a brown dog"]
    rec = chat_server([{"content": good_answer(descs, "a man in a green jacket walks a brown dog in the park")}])
    wf = workflow(upload_refs(server, tmp_path, 2), backend="openai-compatible", endpoint_url=rec.url,
                  endpoint_model="vlm-test", api_key_env=KEY_ENV, local_model="none", strict=True)
    entry = server.run(wf)
    assert entry["status"]["status_str"] == "success", history_error(entry)
    assert entry["outputs"]["show_prompt"]["text"][0] == "a man in a green jacket walks a brown dog in the park"
    assert entry["outputs"]["show_desc"]["text"][0] == "1: a man in a green jacket\n2: a brown dog"
    assert len(rec.requests) == 1 and rec.requests[0]["headers"]["Authorization"] == f"Bearer {KEY}"
    assert sum(p["type"] == "image_url" for p in rec.requests[0]["json"]["messages"][1]["content"]) == 2
    history = json.dumps(entry)
    assert KEY not in history and KEY not in json.dumps(wf) and KEY_ENV in history  # the name, never the key

    wf["rephrase"]["inputs"]["timeout_s"] = 31.0  # ComfyUI re-runs the node; our cache answers
    again = server.run(wf)
    assert again["status"]["status_str"] == "success" and len(rec.requests) == 1
    assert again["outputs"]["show_prompt"] == entry["outputs"]["show_prompt"]

    bad = server.run(wf | {"rephrase": {"class_type": "PhantomRephrase",
                                        "inputs": wf["rephrase"]["inputs"] | {"endpoint_url": ""}}})
    assert bad["status"]["status_str"] == "error"
    assert "no rephraser back-end configured" in history_error(bad)

    denied = chat_server([{"status": 401, "body": {"error": f"bad key {KEY}"}}])
    refused = server.run(wf | {"rephrase": {"class_type": "PhantomRephrase",
                                            "inputs": wf["rephrase"]["inputs"] | {"endpoint_url": denied.url}}})
    message = history_error(refused)
    assert "OpenAI-compatible endpoint" in message and "HTTP 401" in message and KEY not in json.dumps(refused)

    wf["rephrase"]["inputs"]["hint_1"] = "the owner"  # the queue is unaffected by the failures above
    after = server.run(wf)
    assert after["status"]["status_str"] == "success" and len(rec.requests) == 2


def test_references_input_and_both_sources_error(server, tmp_path, chat_server):
    rec = chat_server([{"content": good_answer(["a red car", "a blue bike"], "a red car passes a blue bike")}])
    names = upload_refs(server, tmp_path, 2)
    wf = workflow(names, backend="openai-compatible", endpoint_url=rec.url, endpoint_model="vlm-test",
                  local_model="none", strict=True)
    wf["refs"] = {"class_type": "PhantomReferences",
                  "inputs": {"image_1": ["img1", 0], "image_2": ["img2", 0], "mode": "letterbox"}}
    inputs = {k: v for k, v in wf["rephrase"]["inputs"].items() if not k.startswith("image_")}
    wf["rephrase"]["inputs"] = inputs | {"references": ["refs", 0]}
    entry = server.run(wf)
    assert entry["status"]["status_str"] == "success", history_error(entry)
    assert entry["outputs"]["show_desc"]["text"][0] == "1: a red car\n2: a blue bike"
    assert sum(p["type"] == "image_url" for p in rec.requests[0]["json"]["messages"][1]["content"]) == 2
    wf["rephrase"]["inputs"]["image_1"] = ["img1", 0]
    both = server.run(wf)
    assert "connect either `references` or image_1..image_4, not both" in history_error(both)
