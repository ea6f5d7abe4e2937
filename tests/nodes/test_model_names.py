"""Every file or folder name that reaches a node (DiT, VAE, text encoder, tokenizer, the rephraser's local model)
is resolved strictly inside its ComfyUI model folder: an absolute path, a `..` escape or a symbolic link leading
out of the folder is refused at /prompt with a message naming the input (ComfyUI 0.3.75 checks no V3 combo)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.support.prompts import pipeline_prompt
from tests.support.tiny_vlm import build_tiny_vlm
from tools.comfy_launcher import ComfyServer

PHRASES = {"absolute": "it is an absolute path", "dotdot": "holds a '..' part", "symlink": "a symbolic link that "
           "leads outside"}


@pytest.fixture(scope="module")
def outside(comfy_server: ComfyServer) -> Iterator[dict[str, Path]]:
    """Real model files and folders outside models/, and one symbolic link per model folder pointing at them
    (removed afterwards, so the shared server's listings are as before)."""
    models, root = comfy_server.base / "models", comfy_server.base / "outside"
    root.mkdir(exist_ok=True)
    files = {"dit": models / "diffusion_models" / "phantom_tiny_dit.safetensors",
             "vae": models / "vae" / "phantom_tiny_vae.safetensors",
             "te": models / "text_encoders" / "phantom_tiny_umt5.safetensors"}
    out = {role: shutil.copy(path, root / path.name) for role, path in files.items()}
    (root / "tok").mkdir(exist_ok=True)
    (root / "tok" / "spiece.model").write_bytes(b"not a real tokenizer; never read")
    out = {k: Path(v) for k, v in out.items()} | {"tok": root / "tok" / "spiece.model", "llm": root / "llm"}
    build_tiny_vlm(out["llm"])
    links = [(models / "diffusion_models" / "escape_dit.safetensors", out["dit"]),
             (models / "vae" / "escape_vae.safetensors", out["vae"]),
             (models / "text_encoders" / "escape_umt5.safetensors", out["te"]),
             (models / "text_encoders" / "escape_tok", out["tok"].parent),
             (models / "LLM" / "escape_llm", out["llm"])]
    (models / "LLM").mkdir(exist_ok=True)
    for link, target in links:
        link.symlink_to(target, target_is_directory=target.is_dir())
    yield out
    for link, _ in links:
        link.unlink()


def refused(server: ComfyServer, prompt: dict, node: str, input_name: str, phrase: str) -> None:
    """/prompt refuses `prompt` with an error on `node` that names `input_name` and says `phrase`."""
    r = server.queue(prompt)
    assert r.status_code == 400, f"{input_name}: accepted ({r.status_code})"
    errors = r.json()["node_errors"].get(node, {}).get("errors", [])
    details = " | ".join(e.get("details", "") for e in errors)
    assert f"{input_name} is " in details and phrase in details, f"{input_name}: {json.dumps(r.json())[:1500]}"


def loader_cases(outside: dict[str, Path]) -> list[tuple[str, str, str, str]]:
    """(node id, input, value, phrase key) for the three loaders and the tokenizer."""
    up = "../../outside/"
    return [
        ("dit", "dit_name", str(outside["dit"]), "absolute"), ("dit", "dit_name", up + outside["dit"].name, "dotdot"),
        ("dit", "dit_name", "escape_dit.safetensors", "symlink"),
        ("vae", "vae_name", str(outside["vae"]), "absolute"), ("vae", "vae_name", up + outside["vae"].name, "dotdot"),
        ("vae", "vae_name", "escape_vae.safetensors", "symlink"),
        ("te", "text_encoder_name", str(outside["te"]), "absolute"),
        ("te", "text_encoder_name", up + outside["te"].name, "dotdot"),
        ("te", "text_encoder_name", "escape_umt5.safetensors", "symlink"),
        ("te", "tokenizer", str(outside["tok"]), "absolute"), ("te", "tokenizer", up + "tok/spiece.model", "dotdot"),
        ("te", "tokenizer", "escape_tok/spiece.model", "symlink"),
    ]


def test_loader_names_outside_their_folder_are_refused(comfy_server: ComfyServer, outside, tmp_path: Path):
    image = tmp_path / "ref.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(image)
    name = comfy_server.upload_image(image)
    info = comfy_server.object_info()
    listed = info["PhantomVAELoader"]["input"]["required"]["vae_name"][1]["options"]
    assert "escape_vae.safetensors" in listed  # ComfyUI follows the link and offers it; we refuse it
    for node, input_name, value, kind in loader_cases(outside):
        refused(comfy_server, pipeline_prompt([name], **{node: {input_name: value}}), node, input_name,
                PHRASES[kind])
    refused(comfy_server, pipeline_prompt([name], vae={"vae_name": 5}), "vae", "vae_name", "int, not a file name")
    refused(comfy_server, pipeline_prompt([name], vae={"vae_name": "none.safetensors"}), "vae", "vae_name",
            "which is not in models/vae")


def test_local_model_outside_models_llm_is_refused(comfy_server: ComfyServer, outside, tmp_path: Path):
    image = tmp_path / "ref.png"
    Image.fromarray(np.full((48, 48, 3), 90, np.uint8)).save(image)
    name = comfy_server.upload_image(image)

    def rephrase(local_model: str, backend: str = "local") -> dict:
        inputs = {"prompt": "a thing", "backend": backend, "endpoint_url": "", "endpoint_model": "",
                  "api_key_env": "", "local_model": local_model, "language": "auto", "max_new_tokens": 16,
                  "temperature": 0.0, "seed": 0, "timeout_s": 30.0, "strict": False, "image_1": ["img", 0]}
        return {"img": {"class_type": "LoadImage", "inputs": {"image": name}},
                "rephrase": {"class_type": "PhantomRephrase", "inputs": inputs},
                "show": {"class_type": "PreviewAny", "inputs": {"source": ["rephrase", 0]}}}

    cases = [(str(outside["llm"]), "absolute"), ("../../outside/llm", "dotdot"), ("escape_llm", "symlink"),
             ("../outside/llm", "dotdot")]
    for value, kind in cases:
        refused(comfy_server, rephrase(value), "rephrase", "local_model", PHRASES[kind])
    refused(comfy_server, rephrase("no_such_model"), "rephrase", "local_model", "which is not in models/LLM")
    # the endpoint back-end never reads local_model: a stale name there is not an error
    r = comfy_server.queue(rephrase("no_such_model", backend="openai-compatible"))
    assert r.status_code == 200, r.text
    comfy_server.wait(r.json()["prompt_id"])  # it fails on the empty endpoint_url, which is not this test's business
