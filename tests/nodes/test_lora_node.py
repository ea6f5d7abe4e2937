"""Phantom Load LoRA through a real headless ComfyUI: a LoRA file in models/loras changes the sampler's LATENT,
strength 0 leaves it as without the node, the patched DiT equals a DiT file with the LoRA merged by phantom_core,
nodes chain, and bad names or LoRAs of another model size are refused with the input named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from phantom_core.lora.apply import apply_loras
from phantom_core.lora.files import diff_state_dict, lora_metadata, save_lora
from phantom_core.wan.dit import DIT_PRESETS, WanDiTConfig
from phantom_core.wan.load import load_dit
from tests.support.comfy import history_error
from tests.support.lora import random_lora
from tests.support.weights import random_dit_state_dict
from tools.comfy_launcher import ComfyServer
from tools.make_workflows import api_path

ROOT = Path(__file__).resolve().parents[2]
TINY_DIT = "phantom_tiny_dit.safetensors"
LORA, BIG_LORA, MERGED_DIT = "phantom_test_style.safetensors", "phantom_test_other_size.safetensors", \
    "phantom_tiny_dit_merged_style.safetensors"
FULL, TUNED_DIT = "phantom_test_full_fine_tune.safetensors", "phantom_tiny_dit_tuned.safetensors"
DIT, LORA_NODE, SAMPLER, SAVE = "1", "40", "30", "50"


@pytest.fixture(scope="module")
def server(comfy_server: ComfyServer) -> ComfyServer:
    """The shared server with, in its models folders: a random LoRA for the tiny DiT, one for a wider DiT, and the
    tiny DiT with that LoRA merged at strength 0.7 by phantom_core."""
    models = comfy_server.base / "models"
    dit_file = models / "diffusion_models" / TINY_DIT
    lora = random_lora(load_dit(dit_file), rank=4, alpha=4.0, seed=3, std=0.3)
    save_lora(models / "loras" / LORA, lora, lora_metadata(4, 4.0, "tiny", steps=0))
    wider = WanDiTConfig(**{**DIT_PRESETS["tiny"].__dict__, "dim": 384, "num_heads": 3})
    save_lora(models / "loras" / BIG_LORA, random_lora(load_dit(random_dit_state_dict(wider)), rank=2), {})
    merged = apply_loras(load_dit(dit_file), [(lora, 0.7)])
    save_file({k: v.contiguous() for k, v in merged.state_dict().items()}, models / "diffusion_models" / MERGED_DIT)
    base = load_dit(dit_file).state_dict()  # a "full fine-tune" of block 1 (modulation included) as .diff deltas
    g = torch.Generator().manual_seed(4)
    tuned = {k: v + 0.05 * v.std() * torch.randn(v.shape, generator=g) if k.startswith("blocks.1.") else v
             for k, v in base.items()}
    save_lora(models / "loras" / FULL, diff_state_dict(base, tuned), {})
    save_file({k: v.contiguous() for k, v in tuned.items()}, models / "diffusion_models" / TUNED_DIT)
    return comfy_server


def prompt_for(server: ComfyServer, examples_dir: Path, loras: list[tuple[str, float]], dit: str = TINY_DIT,
               prefix: str = "lora", weight_dtype: str = "default") -> dict:
    """The shipped 1-reference API workflow, tiny and fast, LoRA nodes chained between the DiT loader and the
    sampler, the sampler's LATENT saved by ComfyUI's SaveLatent (decode and video nodes dropped)."""
    prompt = json.loads(api_path("phantom_1ref").read_text(encoding="utf-8"))
    for node in [k for k, v in prompt.items() if v["class_type"] in ("PhantomDecode", "PhantomSaveVideo")]:
        del prompt[node]
    cases = json.loads((examples_dir / "cases.json").read_text(encoding="utf-8"))
    prompt["10"]["inputs"]["image"] = server.upload_image(examples_dir / cases["cases"][0]["refs"][0])
    encode = next(k for k, v in prompt.items() if v["class_type"] == "PhantomEncodeReferences")
    prompt[encode]["inputs"] |= {"width": 32, "height": 32}
    prompt[DIT]["inputs"] |= {"dit_name": dit, "weight_dtype": weight_dtype}
    upstream = [DIT, 0]
    for k, (name, strength) in enumerate(loras):
        prompt[f"{LORA_NODE}{k}"] = {"class_type": "PhantomLoadLoRA",
                                     "inputs": {"model": upstream, "lora_name": name, "strength": strength}}
        upstream = [f"{LORA_NODE}{k}", 0]
    prompt[SAMPLER]["inputs"] |= {"model": upstream, "width": 32, "height": 32, "frames": 5, "steps": 3, "seed": 9}
    prompt[SAVE] = {"class_type": "SaveLatent", "inputs": {"samples": [SAMPLER, 0], "filename_prefix": prefix}}
    return prompt


def latent(server: ComfyServer, examples_dir: Path, loras: list[tuple[str, float]], **kw) -> torch.Tensor:
    entry = server.run(prompt_for(server, examples_dir, loras, **kw))
    assert entry["status"]["status_str"] == "success", history_error(entry) + server.log()
    [saved] = entry["outputs"][SAVE]["latents"]
    return load_file(server.output_dir / saved["subfolder"] / saved["filename"])["latent_tensor"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_node_is_listed_with_the_loras_folder(server: ComfyServer) -> None:
    spec = server.object_info()["PhantomLoadLoRA"]
    assert spec["output"] == ["PHANTOM_DIT"] and spec["category"] == "Phantom"
    required = spec["input"]["required"]
    assert required["model"][0] == "PHANTOM_DIT"
    assert LORA in required["lora_name"][1]["options"]
    assert required["strength"][1]["default"] == 1.0


def test_lora_changes_the_latent_like_a_merged_dit_and_chains(server: ComfyServer, examples_dir: Path) -> None:
    plain = latent(server, examples_dir, [])
    off = latent(server, examples_dir, [(LORA, 0.0)])
    styled = latent(server, examples_dir, [(LORA, 0.7)])
    merged_file = latent(server, examples_dir, [], dit=MERGED_DIT)
    chained = latent(server, examples_dir, [(LORA, 0.35), (LORA, 0.35)])
    assert rel(styled, plain) > 1e-2  # the LoRA changes what the sampler makes
    assert rel(off, plain) <= 1e-6  # strength 0 is no LoRA (same weights, same code path)
    assert rel(styled, merged_file) <= 1e-4  # ComfyUI's patching == phantom_core's merge (fp32 rounding only)
    assert rel(chained, styled) <= 1e-4  # two nodes at 0.35 add up to one at 0.7
    assert rel(latent(server, examples_dir, []), plain) <= 1e-6  # the loaded DiT was restored after the patches


def test_full_weight_deltas_reach_every_parameter(server: ComfyServer, examples_dir: Path) -> None:
    """.diff on blocks.1.modulation too, which ComfyUI's weight patching skips (the node object-patches it)."""
    patched = latent(server, examples_dir, [(FULL, 1.0)])
    assert rel(patched, latent(server, examples_dir, [], dit=TUNED_DIT)) <= 1e-4
    assert rel(patched, latent(server, examples_dir, [])) > 1e-3


def test_lora_on_scaled_fp8_weights(server: ComfyServer, examples_dir: Path) -> None:
    """fp8 Linear weights with per-tensor scales: the patch is added to the stored tensor divided by its scale, so
    the LoRA acts as on float weights, up to fp8 rounding (ComfyUI rounds the patched weight stochastically)."""
    fp8 = {"weight_dtype": "fp8_e4m3fn"}
    plain = latent(server, examples_dir, [], **fp8)
    styled = latent(server, examples_dir, [(LORA, 0.7)], **fp8)
    merged = latent(server, examples_dir, [], dit=MERGED_DIT, **fp8)
    effect, error = rel(styled, plain), rel(styled, merged)
    # measured: effect 0.30, error 0.058; a patch not divided by the scale would leave error ~ effect
    assert error < 0.4 * effect, f"node vs merged {error:.3g} is not small against the LoRA's effect {effect:.3g}"


@pytest.mark.parametrize("name, fragments", [
    ("../escape.safetensors", ["lora_name", "../escape.safetensors", "no '..'"]),
    ("/etc/passwd", ["lora_name", "/etc/passwd", "no absolute path"]),
    ("missing.safetensors", ["lora_name", "missing.safetensors", "not in models/loras"]),
    (BIG_LORA, ["lora_name", BIG_LORA, "another model size", "(384, 384)", "(256, 256)"]),
], ids=["dotdot", "absolute", "missing", "other-size"])
def test_bad_lora_is_refused_naming_the_input(server: ComfyServer, examples_dir: Path, name: str,
                                              fragments: list[str]) -> None:
    r = server.queue(prompt_for(server, examples_dir, [(name, 1.0)], prefix="bad_lora"))
    if r.status_code == 400:  # refused by /prompt validation
        message = json.dumps(r.json())
    else:
        entry = server.wait(r.json()["prompt_id"])
        assert entry["status"]["status_str"] == "error", f"{name} unexpectedly succeeded"
        message = history_error(entry)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in error: {message[:2000]}"
