"""Phantom Train LoRA through a real headless ComfyUI: a tiny dataset (MP4 clips + PNG references written into the
server's input folder) trained a few steps on the tiny default; the LoRA lands in models/loras in ComfyUI's
layout, ComfyUI's own Save LoRA and Plot Loss Graph nodes take the LORA_MODEL and LOSS_MAP outputs, the LoRA
loaded by Phantom Load LoRA changes Phantom Sampler's output, Cancel stops training with the last checkpoint kept, and resume continues it."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import requests
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from phantom_core.training.checkpoint import list_checkpoints
from phantom_core.training.runlog import read_log
from tests.support.comfy import history_error
from tests.support.training import write_dataset, write_reference
from tools.comfy_launcher import ComfyServer

TRAIN = "10"


def train_prompt(dataset: str, lora_name: str, **settings) -> dict:
    """Loaders -> Phantom Train LoRA -> ComfyUI's Save LoRA and Plot Loss Graph."""
    inputs = dict(model=["1", 0], vae=["2", 0], text_encoder=["3", 0], dataset=dataset, lora_name=lora_name, steps=3,
                  learning_rate=0.01, rank=4, alpha=4.0, batch_size=1, width=32, height=32, frames=5, seed=1,
                  text_dropout=0.2, reference_dropout=0.1, checkpoint_every=1, resume=False)
    return {
        "1": {"class_type": "PhantomDiTLoader", "inputs": {"dit_name": "phantom_tiny_dit.safetensors",
                                                           "weight_dtype": "default"}},
        "2": {"class_type": "PhantomVAELoader", "inputs": {"vae_name": "phantom_tiny_vae.safetensors"}},
        "3": {"class_type": "PhantomTextEncoderLoader", "inputs": {"text_encoder_name": "phantom_tiny_umt5.safetensors",
                                                                  "tokenizer": "embedded", "device": "default"}},
        TRAIN: {"class_type": "PhantomTrainLoRA", "inputs": inputs | settings},
        "11": {"class_type": "SaveLoRA", "inputs": {"lora": [TRAIN, 0], "prefix": f"loras/native_{lora_name}"}},
        "12": {"class_type": "LossGraphNode", "inputs": {"loss": [TRAIN, 1], "filename_prefix": "loss"}},
    }


def sampled_latent(server: ComfyServer, lora: str | None, strength: float) -> torch.Tensor:
    """Phantom Sampler's LATENT (2 steps, 32x32, 5 frames) with the DiT through Phantom Load LoRA (or not)."""
    ref = write_reference(server.base / "input" / "train_node_ref.png", (40, 32), seed=5)
    model = ["1", 0]
    prompt = {
        "1": {"class_type": "PhantomDiTLoader", "inputs": {"dit_name": "phantom_tiny_dit.safetensors",
                                                           "weight_dtype": "default"}},
        "2": {"class_type": "PhantomVAELoader", "inputs": {"vae_name": "phantom_tiny_vae.safetensors"}},
        "3": {"class_type": "PhantomTextEncoderLoader", "inputs": {"text_encoder_name": "phantom_tiny_umt5.safetensors",
                                                                  "tokenizer": "embedded", "device": "default"}},
        "4": {"class_type": "PhantomTextEncode", "inputs": {"text_encoder": ["3", 0], "text": "a subject moves left"}},
        "5": {"class_type": "PhantomTextEncode", "inputs": {"text_encoder": ["3", 0], "text": ""}},
        "6": {"class_type": "LoadImage", "inputs": {"image": ref.name}},
        "7": {"class_type": "PhantomReferences", "inputs": {"image_1": ["6", 0], "mode": "letterbox"}},
        "8": {"class_type": "PhantomEncodeReferences", "inputs": {"vae": ["2", 0], "references": ["7", 0],
                                                                  "width": 32, "height": 32}},
    }
    if lora is not None:
        prompt["20"] = {"class_type": "PhantomLoadLoRA", "inputs": {"model": model, "lora_name": lora,
                                                                    "strength": strength}}
        model = ["20", 0]
    prompt["9"] = {"class_type": "PhantomSampler", "inputs": {
        "model": model, "positive": ["4", 0], "negative": ["5", 0], "reference_latents": ["8", 0], "width": 32,
        "height": 32, "frames": 5, "steps": 2, "shift": 5.0, "solver": "euler", "w_img": 5.0, "w_text": 7.5,
        "seed": 11, "preset": "custom"}}
    prompt["10"] = {"class_type": "SaveLatent", "inputs": {"samples": ["9", 0], "filename_prefix": "train_node"}}
    entry = server.run(prompt)
    assert entry["status"]["status_str"] == "success", history_error(entry) + server.log()
    [saved] = entry["outputs"]["10"]["latents"]
    return load_file(server.output_dir / saved["subfolder"] / saved["filename"])["latent_tensor"]


@pytest.fixture(scope="module")
def dataset(comfy_server: ComfyServer) -> str:
    write_dataset(comfy_server.base / "input" / "phantom_test_dataset", samples=2, frames=5)
    return "phantom_test_dataset"


def test_the_node_is_registered_with_comfyuis_training_types(comfy_server: ComfyServer) -> None:
    info = comfy_server.object_info()["PhantomTrainLoRA"]
    assert info["output"] == ["LORA_MODEL", "LOSS_MAP", "STRING,COMBO"] and info["output_node"] is True
    assert {"model", "dataset", "steps", "rank", "alpha", "resume"} <= set(info["input"]["required"])
    assert set(info["input"]["optional"]) == {"vae", "text_encoder"}


def test_train_lora_node_writes_a_lora_that_changes_the_sampler(comfy_server: ComfyServer, dataset: str) -> None:
    entry = comfy_server.run(train_prompt(dataset, "node_lora"), timeout_s=600)
    assert entry["status"]["status_str"] == "success", history_error(entry) + comfy_server.log()
    lora = comfy_server.base / "models" / "loras" / "node_lora.safetensors"
    with safe_open(str(lora), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert "diffusion_model.blocks.0.cross_attn.v.lora_down.weight" in keys and len(keys) == 60
    assert (meta["rank"], meta["steps"], meta["base_model"]) == ("4", "3", "tiny")
    native = list((comfy_server.output_dir / "loras").glob("native_node_lora_*.safetensors"))
    assert len(native) == 1  # ComfyUI's Save LoRA wrote our LORA_MODEL: the same tensors
    with safe_open(str(native[0]), framework="pt") as f:
        assert set(f.keys()) == keys
        ours = safe_open(str(lora), framework="pt")
        for key in keys:
            torch.testing.assert_close(f.get_tensor(key), ours.get_tensor(key), rtol=0, atol=0)
    assert entry["outputs"]["12"]["images"], "Plot Loss Graph drew nothing from our LOSS_MAP"
    run = comfy_server.output_dir / "phantom_training" / "node_lora"
    assert [r["step"] for r in read_log(run / "log.jsonl")] == [1, 2, 3]

    # the LoRA, loaded by Phantom Load LoRA, changes what Phantom Sampler makes (strength 0: exactly the base)
    base, off, on = (sampled_latent(comfy_server, lora, strength) for lora, strength in
                     ((None, 0.0), ("node_lora.safetensors", 0.0), ("node_lora.safetensors", 1.0)))
    assert (off - base).abs().max() <= 1e-6 * base.abs().max()
    assert (on - base).abs().max() > 1e-3 * base.abs().max()


def test_cancel_keeps_the_last_checkpoint_and_resume_finishes(comfy_server: ComfyServer, dataset: str) -> None:
    run = comfy_server.output_dir / "phantom_training" / "cancelled"
    lora = comfy_server.base / "models" / "loras" / "cancelled.safetensors"
    # a bounded run: if Cancel were ever missed, the server is busy for a minute, not for the rest of the suite
    r = comfy_server.queue(train_prompt(dataset, "cancelled", steps=3000))
    assert r.status_code == 200, r.text
    prompt_id = r.json()["prompt_id"]
    deadline = time.monotonic() + 300
    # a checkpoint of step 2 or later: with one per step and the latest 2 kept, step_000002 itself lives ~0.1 s
    while not any(step >= 2 for step, _ in list_checkpoints(run / "checkpoints")):
        assert time.monotonic() < deadline, "no checkpoint after 300 s\n" + comfy_server.log()
        time.sleep(0.2)
    entry = None
    for _ in range(20):  # Cancel, as the frontend's button sends it, until the prompt has ended
        requests.post(f"{comfy_server.url}/interrupt", json={"prompt_id": prompt_id}, timeout=30)
        try:
            entry = comfy_server.wait(prompt_id, timeout_s=3)
            break
        except TimeoutError:
            continue
    entry = entry or comfy_server.wait(prompt_id, timeout_s=600)
    kinds = [kind for kind, _ in entry["status"]["messages"]]
    assert entry["status"]["status_str"] == "error" and "execution_interrupted" in kinds, kinds
    assert not lora.exists()
    steps = sorted(int(p.name.split("_")[1]) for p in (run / "checkpoints").iterdir())
    assert steps and all(not p.name.startswith(".") for p in (run / "checkpoints").iterdir())
    last = steps[-1]
    resumed = comfy_server.run(train_prompt(dataset, "cancelled", steps=last + 1, resume=True), timeout_s=600)
    assert resumed["status"]["status_str"] == "success", history_error(resumed) + comfy_server.log()
    assert [r["step"] for r in read_log(run / "log.jsonl")] == list(range(1, last + 2))
    assert lora.is_file()


@pytest.mark.parametrize(("dataset", "message"), [
    ("../models", "holds a '..' part"),
    ("/etc", "it is an absolute path"),
    ("no_such_dataset", "no folder"),
])
def test_dataset_outside_or_missing_is_refused_by_name(comfy_server: ComfyServer, dataset: str, message: str) -> None:
    entry = comfy_server.run(train_prompt(dataset, "refused"), timeout_s=120)
    assert entry["status"]["status_str"] == "error"
    assert "dataset" in history_error(entry) and message in history_error(entry), history_error(entry)
    assert not Path(comfy_server.base / "models" / "loras" / "refused.safetensors").exists()
