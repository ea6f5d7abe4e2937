"""The paper's MMDiT and its CLIP reference features through the nodes of a real headless ComfyUI (CPU, HTTP API).

A tiny random MMDiT (``MMDIT_PRESETS["tiny"]``) and a tiny random CLIP vision tower in ComfyUI's
``models/clip_vision`` layout (transformers' key names) are written into the server's model folders by a fixture.
The same loader, encoder and sampler nodes drive either network: the MMDiT's LATENT must equal phantom_core driven
directly with the same inputs, the Phantom-Wan DiT runs with CLIP features connected (ignored), and a bad
``clip_vision_name`` fails with an error naming the input, writing nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from phantom_core.mmdit.clip_keys import CLIP_VISION_PRESETS
from phantom_core.mmdit.config import MMDIT_PRESETS
from phantom_core.mmdit.model import PhantomMMDiT
from tests.support.comfy import history_error, refusal_message
from tests.support.networks import random_clip_state_dict, save_safetensors
from tests.support.prompts import pipeline_prompt
from tests.support.weights import random_state_dict
from tools.comfy_launcher import ComfyServer

MMDIT_FILE, CLIP_FILE = "phantom_tiny_mmdit.safetensors", "phantom_tiny_clip_vision.safetensors"
WAN_FILE = "phantom_tiny_dit.safetensors"  # the embedded tiny default the server always has
PROMPT = "A girl in a green dress and a small dog play in a garden, slow dolly-in."
NEGATIVE = "blurry, static, low quality"


@pytest.fixture(scope="module")
def models(comfy_server: ComfyServer) -> Path:
    """The server's models folder with the tiny MMDiT and the tiny CLIP vision tower written into it."""
    base = comfy_server.base / "models"
    save_safetensors(random_state_dict(PhantomMMDiT(MMDIT_PRESETS["tiny"], device="meta"), seed=21),
                     base / "diffusion_models" / MMDIT_FILE)
    save_safetensors(random_clip_state_dict(CLIP_VISION_PRESETS["tiny"], seed=22) |
                     {"vision_model.embeddings.position_ids": torch.arange(17)[None]},  # as transformers saves it
                     base / "clip_vision" / CLIP_FILE)
    return base


def graph(server: ComfyServer, refs: list[Path], *, dit: str, clip_vision: str | None, seed: int = 3,
          frames: int = 5, prefix: str = "mmdit") -> dict:
    """``pipeline_prompt`` at 32 x 32 px, 2 Euler steps, with ``dit``, the references uploaded, the CLIP encoder
    chained after the VAE encoder when ``clip_vision`` names a file, and SaveLatent ("latent") instead of the video."""
    prompt = pipeline_prompt([server.upload_image(p) for p in refs], size=32, frames=frames, steps=2, seed=seed,
                             prefix=prefix, dit={"dit_name": dit, "weight_dtype": "fp32"}, pos={"text": PROMPT},
                             neg={"text": NEGATIVE}, sampler={"w_img": 3.0})
    del prompt["decode"], prompt["save"]
    prompt["latent"] = {"class_type": "SaveLatent", "inputs": {"samples": ["sampler", 0], "filename_prefix": prefix}}
    if clip_vision is not None:
        prompt["clip"] = {"class_type": "PhantomCLIPVisionLoader", "inputs": {"clip_vision_name": clip_vision}}
        prompt["clipenc"] = {"class_type": "PhantomCLIPEncodeReferences",
                             "inputs": {"clip_vision": ["clip", 0], "references": ["refs", 0],
                                        "reference_latents": ["enc", 0], "clip_output": "tokens"}}
        prompt["sampler"]["inputs"]["reference_latents"] = ["clipenc", 0]
    return prompt


def saved_latent(server: ComfyServer, entry: dict) -> torch.Tensor:
    [saved] = entry["outputs"]["latent"]["latents"]
    return load_file(server.output_dir / saved["subfolder"] / saved["filename"])["latent_tensor"]


def two_refs(examples_dir: Path) -> list[Path]:
    data = json.loads((examples_dir / "cases.json").read_text(encoding="utf-8"))
    case = next(c for c in data["cases"] if len(c["refs"]) >= 2)
    return [examples_dir / r for r in case["refs"][:2]]


def test_schema_lists_the_clip_nodes(comfy_server: ComfyServer, models: Path):
    info = comfy_server.object_info()
    loader = info["PhantomCLIPVisionLoader"]
    assert loader["output"] == ["PHANTOM_CLIP_VISION"] and loader["category"] == "Phantom"
    listed = loader["input"]["required"]["clip_vision_name"]
    names = listed[1]["options"] if isinstance(listed[0], str) else listed[0]
    assert CLIP_FILE in names
    encode = info["PhantomCLIPEncodeReferences"]
    assert encode["output"] == ["PHANTOM_REF_LATENTS"]
    assert [encode["input"]["required"][k][0] for k in ("clip_vision", "references", "reference_latents")] == \
        ["PHANTOM_CLIP_VISION", "PHANTOM_REFERENCES", "PHANTOM_REF_LATENTS"]


def test_mmdit_with_clip_references_matches_phantom_core(comfy_server: ComfyServer, examples_dir: Path,
                                                         models: Path):
    """DiT loader (recognising the MMDiT by its keys), CLIP vision loader, VAE then CLIP reference encoding,
    sampler: the LATENT equals phantom_core run directly (relative max error < 1e-4)."""
    from phantom_core.mmdit.clip import encode_clip_references, load_clip_vision
    from phantom_core.mmdit.load import load_mmdit
    from phantom_core.references import encode_references, open_reference
    from phantom_core.sampling.loop import make_noise, sample_phantom
    from phantom_core.wan.latents import denormalize_latents
    from phantom_core.wan.umt5 import load_text_encoder
    from phantom_core.wan.vae import load_vae

    refs = two_refs(examples_dir)
    entry = comfy_server.run(graph(comfy_server, refs, dit=MMDIT_FILE, clip_vision=CLIP_FILE, prefix="mmdit_clip"))
    assert entry["status"]["status_str"] == "success", history_error(entry) + comfy_server.log()
    served = saved_latent(comfy_server, entry)
    assert "loading MMDiT tiny" in comfy_server.log(60000)

    dit = load_mmdit(models / "diffusion_models" / MMDIT_FILE)
    tower = load_clip_vision(models / "clip_vision" / CLIP_FILE)
    vae = load_vae(models / "vae" / "phantom_tiny_vae.safetensors")
    encoder = load_text_encoder(models / "text_encoders" / "phantom_tiny_umt5.safetensors")
    images = [open_reference(p) for p in refs]
    with torch.no_grad():
        context, context_neg = (c[None] for c in encoder.encode([PROMPT, NEGATIVE]))
        ref_latents = encode_references(vae, images, 32, 32, "letterbox")  # (1, 16, 2, 4, 4)
        ref_clip = encode_clip_references(tower, images, "tokens")  # (1, 2, 17, 128)
        noise = make_noise(3, (1, 16, 2, 4, 4), 2)
        latents = sample_phantom(dit, noise, ref_latents, context, context_neg, steps=2, shift=5.0, solver="euler",
                                 w_img=3.0, w_text=7.5, ref_clip=ref_clip)
        without_clip = sample_phantom(dit, noise, ref_latents, context, context_neg, steps=2, shift=5.0,
                                      solver="euler", w_img=3.0, w_text=7.5)
    expected = denormalize_latents(latents)
    assert served.shape == expected.shape == (1, 16, 2, 4, 4)
    err = float((served - expected).abs().max() / expected.abs().max())
    assert err < 1e-4, f"node chain differs from phantom_core: relative max error {err:.2e}"
    assert float((served - denormalize_latents(without_clip)).abs().max()) > 1e-3  # the CLIP features were used


@pytest.mark.parametrize(("dit", "clip_vision", "warning"), [
    (MMDIT_FILE, None, "reads CLIP features of the references, but none were given"),
    (WAN_FILE, CLIP_FILE, "reference CLIP features are ignored: PhantomWanDiT has no CLIP input"),
], ids=["mmdit_vae_only", "phantom_wan_with_clip"])
def test_either_network_with_or_without_clip_features(comfy_server: ComfyServer, examples_dir: Path, models: Path,
                                                      dit: str, clip_vision: str | None, warning: str):
    entry = comfy_server.run(graph(comfy_server, two_refs(examples_dir)[:1], dit=dit, clip_vision=clip_vision,
                                   frames=1, seed=11, prefix=f"either_{dit}"))
    assert entry["status"]["status_str"] == "success", history_error(entry) + comfy_server.log()
    assert saved_latent(comfy_server, entry).shape == (1, 16, 1, 4, 4)
    assert warning in comfy_server.log(60000)


@pytest.mark.parametrize(("name", "phrase"), [
    ("../vae/phantom_tiny_vae.safetensors", "clip_vision_name"),
    ("/etc/passwd", "clip_vision_name"),
    ("a_vae_as_clip.safetensors", "not a CLIP ViT image tower"),
], ids=["dot_dot", "absolute", "wrong_file"])
def test_bad_clip_vision_files_are_refused_by_name(comfy_server: ComfyServer, examples_dir: Path, models: Path,
                                                   name: str, phrase: str):
    vae = models / "vae" / "phantom_tiny_vae.safetensors"
    (models / "clip_vision" / "a_vae_as_clip.safetensors").write_bytes(vae.read_bytes())
    prompt = graph(comfy_server, two_refs(examples_dir)[:1], dit=MMDIT_FILE, clip_vision=name, frames=1,
                   prefix="bad_clip")
    before = comfy_server.output_files()
    message = refusal_message(comfy_server, prompt)  # at /prompt (a name not in the folder) or on the loader
    assert "PhantomCLIPVisionLoader" in message and phrase in message and name.split("/")[-1] in message, message
    assert comfy_server.output_files() == before


def test_clip_encoding_of_other_references_is_refused(comfy_server: ComfyServer, examples_dir: Path, models: Path):
    """CLIP features of 2 references added to the latents of 1: refused on the CLIP encoder, naming both counts."""
    refs = two_refs(examples_dir)
    prompt = graph(comfy_server, refs, dit=MMDIT_FILE, clip_vision=CLIP_FILE, frames=1, prefix="mismatch")
    prompt["refs1"] = {"class_type": "PhantomReferences", "inputs": {"mode": "letterbox", "image_1": ["img1", 0]}}
    prompt["enc"]["inputs"]["references"] = ["refs1", 0]  # the VAE encodes one reference, CLIP two
    before = comfy_server.output_files()
    message = refusal_message(comfy_server, prompt)
    assert message.startswith("PhantomCLIPEncodeReferences:") and "hold 1 references but references has 2" in message
    assert comfy_server.output_files() == before
