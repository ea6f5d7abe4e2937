"""PhantomRephrase in a real headless ComfyUI server (CPU), driven over its HTTP API.

Uses the session's shared server from `comfy_server.py`. The tiny random Qwen2-VL of `test_rephraser_local` is
put in its `<base>/models/LLM`, and a recording chat-completions server on 127.0.0.1 stands in for the endpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from comfy_server import ComfyServer, comfy_server, history_error  # noqa: F401 (fixture)
from test_rephraser import chat_server, good_answer  # noqa: F401 (fixture)
from test_rephraser_local import build_tiny_vlm

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
