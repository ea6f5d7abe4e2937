"""Phantom Train LoRA through a real headless ComfyUI: a tiny dataset (MP4 clips + PNG references written into the
server's input folder) trained a few steps on the tiny default; the LoRA lands in models/loras in ComfyUI's
layout, ComfyUI's own Save LoRA and Plot Loss Graph nodes take the LORA_MODEL and LOSS_MAP outputs, the LoRA
changes the sampler's output, Cancel stops training with the last checkpoint kept, and resume continues it."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import requests
import torch
from safetensors import safe_open

from phantom_core.lora.apply import apply_loras
from phantom_core.sampling.loop import sample_from_seed
from phantom_core.training.runlog import read_log
from phantom_core.wan.load import load_dit
from tests.support.comfy import history_error
from tests.support.training import write_dataset
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


@pytest.fixture(scope="module")
def dataset(comfy_server: ComfyServer) -> str:
    write_dataset(comfy_server.base / "input" / "phantom_test_dataset", samples=2, frames=5)
    return "phantom_test_dataset"


def test_the_node_is_registered_with_comfyuis_training_types(comfy_server: ComfyServer) -> None:
    info = comfy_server.object_info()["PhantomTrainLoRA"]
    assert info["output"] == ["LORA_MODEL", "LOSS_MAP", "STRING"] and info["output_node"] is True
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

    # the LoRA changes the sampler's output (applied with the core's apply_loras: the Phantom Load LoRA node is
    # not on this branch yet)
    dit_file = comfy_server.base / "models" / "diffusion_models" / "phantom_tiny_dit.safetensors"
    gen = torch.Generator().manual_seed(0)
    refs, ctx = torch.randn(1, 16, 1, 4, 4, generator=gen), torch.randn(1, 4, 64, generator=gen)
    def sample(model):
        return sample_from_seed(model, 3, (1, 16, 2, 4, 4), refs, ctx, ctx[:, :2], steps=2, w_img=1.0, w_text=1.0)
    assert (sample(apply_loras(load_dit(dit_file), [(lora, 1.0)])) - sample(load_dit(dit_file))).abs().max() > 1e-3


def test_cancel_keeps_the_last_checkpoint_and_resume_finishes(comfy_server: ComfyServer, dataset: str) -> None:
    run = comfy_server.output_dir / "phantom_training" / "cancelled"
    lora = comfy_server.base / "models" / "loras" / "cancelled.safetensors"
    r = comfy_server.queue(train_prompt(dataset, "cancelled", steps=100_000))
    assert r.status_code == 200, r.text
    prompt_id = r.json()["prompt_id"]
    deadline = time.monotonic() + 300
    while not (run / "checkpoints" / "step_000002").is_dir():
        assert time.monotonic() < deadline, "no checkpoint after 300 s\n" + comfy_server.log()
        time.sleep(0.2)
    requests.post(f"{comfy_server.url}/interrupt", json={"prompt_id": prompt_id}, timeout=30)
    entry = comfy_server.wait(prompt_id, timeout_s=120)
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
    ("../models", "give a relative path inside"),
    ("/etc", "give a relative path inside"),
    ("no_such_dataset", "no folder"),
])
def test_dataset_outside_or_missing_is_refused_by_name(comfy_server: ComfyServer, dataset: str, message: str) -> None:
    entry = comfy_server.run(train_prompt(dataset, "refused"), timeout_s=120)
    assert entry["status"]["status_str"] == "error"
    assert "dataset" in history_error(entry) and message in history_error(entry), history_error(entry)
    assert not Path(comfy_server.base / "models" / "loras" / "refused.safetensors").exists()
