"""The Phantom nodes through a real headless ComfyUI server on the CPU, driven over its HTTP API.

The shipped API workflows are queued with real reference photos (../shared/data/phantom_examples), the tiny
default checkpoints and a tiny size; the MP4 that comes out must have the requested frame count, size and fps,
and the sampler's LATENT must equal phantom_core driven directly. Native CONDITIONING is accepted, progress and
previews are reported every step, /interrupt stops the sampler. Bad requests fail with an error that names the
input, and leave no output file behind.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import pytest
import requests

from phantom_core.video_io import probe_mp4
from tests.support.comfy import history_error, refusal_message, watch
from tools.comfy_launcher import ComfyServer
from tools.make_workflows import api_path

ROOT = Path(__file__).resolve().parents[2]
PHANTOM_NODES = {
    "PhantomDiTLoader", "PhantomVAELoader", "PhantomTextEncoderLoader", "PhantomTextEncode", "PhantomReferences",
    "PhantomEncodeReferences", "PhantomSampler", "PhantomDecode", "PhantomSaveVideo",
}
SAVE_NODE, SAMPLER_NODE, ENCODE_REFS_NODE, REFS_NODE = "32", "30", "21", "20"


def load_api(num_refs: int) -> dict:
    return json.loads(api_path(f"phantom_{num_refs}ref").read_text(encoding="utf-8"))


def cases(examples_dir: Path) -> dict[int, list[Path]]:
    """Reference photos: one case with 1 reference, one with 4 (from cases.json)."""
    data = json.loads((examples_dir / "cases.json").read_text(encoding="utf-8"))
    four = next(c for c in data["cases"] if len(c["refs"]) == 4)
    return {1: [examples_dir / data["cases"][0]["refs"][0]], 4: [examples_dir / r for r in four["refs"]]}


def configure(prompt: dict, server: ComfyServer, refs: list[Path], *, width: int, height: int, frames: int,
              steps: int = 3, fps: float = 16.0, solver: str = "unipc", prefix: str = "Phantom") -> dict:
    """The API workflow with uploaded references and a tiny size / few steps."""
    prompt = copy.deepcopy(prompt)
    for k, path in enumerate(refs):
        prompt[str(10 + k)]["inputs"]["image"] = server.upload_image(path)
    prompt[ENCODE_REFS_NODE]["inputs"] |= {"width": width, "height": height}
    prompt[SAMPLER_NODE]["inputs"] |= {"width": width, "height": height, "frames": frames, "steps": steps,
                                       "solver": solver}
    prompt[SAVE_NODE]["inputs"] |= {"fps": fps, "filename_prefix": prefix}
    return prompt


def saved_videos(entry: dict, server: ComfyServer) -> list[Path]:
    """The files PhantomSaveVideo reported in its UI output (checked to exist in the output folder)."""
    results = entry["outputs"][SAVE_NODE]["images"]
    paths = [server.output_dir / r["subfolder"] / r["filename"] for r in results]
    assert all(r["type"] == "output" for r in results) and all(p.is_file() for p in paths), results
    return paths


# ------------------------------------------------------------------------------------------------- schema


def test_object_info_lists_every_phantom_node_with_tooltips(comfy_server: ComfyServer) -> None:
    info = comfy_server.object_info()
    missing = PHANTOM_NODES - set(info)
    assert not missing, f"not registered: {missing}\n{comfy_server.log()}"
    for node_id in [k for k in info if k.startswith("Phantom")]:  # ours and any later Phantom node
        spec = info[node_id]
        assert spec["category"] == "Phantom" and spec["description"], node_id
        inputs = {**spec["input"]["required"], **spec["input"].get("optional", {})}
        assert inputs or node_id == "PhantomSaveVideo"
        for name, (_, options) in inputs.items():
            assert options.get("tooltip"), f"{node_id}.{name} has no tooltip"
    assert info["PhantomSaveVideo"]["output_node"] is True
    assert info["PhantomSampler"]["output"] == ["LATENT"]
    assert info["PhantomDiTLoader"]["output"] == ["PHANTOM_DIT"]
    dit_names = info["PhantomDiTLoader"]["input"]["required"]["dit_name"][1]["options"]
    assert "phantom_tiny_dit.safetensors" in dit_names


def test_tiny_default_is_complete_random_and_stable(comfy_server: ComfyServer, tmp_path: Path) -> None:
    """The embedded default the server runs on: official layouts, every tensor random, O(1) outputs, and a
    rewrite only when a file's bytes differ."""
    import torch

    from phantom_core.tiny.default import write_tiny_default
    from phantom_core.wan.dit import DIT_PRESETS
    from phantom_core.wan.load import load_dit
    from phantom_core.wan.umt5 import TEXT_ENCODER_PRESETS, load_text_encoder
    from phantom_core.wan.vae import VAE_PRESETS, load_vae

    models = comfy_server.base / "models"
    dit = load_dit(models / "diffusion_models" / "phantom_tiny_dit.safetensors")
    assert dit.config == DIT_PRESETS["tiny"]
    flat = [name for name, p in dit.state_dict().items() if float(p.float().std()) == 0.0]
    assert not flat, f"constant tensors in the tiny DiT: {flat}"  # includes upstream's zero-initialised head
    gen = torch.Generator().manual_seed(0)
    x, refs = torch.randn(1, 16, 2, 4, 4, generator=gen), torch.randn(1, 16, 1, 4, 4, generator=gen)
    with torch.no_grad():
        v = dit(x, torch.tensor([700.0]), torch.randn(1, 5, dit.config.text_dim, generator=gen), refs)
    assert v.shape == x.shape and 0.1 < float(v.std()) < 10.0
    assert load_vae(models / "vae" / "phantom_tiny_vae.safetensors").config == VAE_PRESETS["tiny"]
    encoder = load_text_encoder(models / "text_encoders" / "phantom_tiny_umt5.safetensors")  # embedded tokenizer
    assert encoder.spec == TEXT_ENCODER_PRESETS["tiny"]

    first = write_tiny_default(tmp_path)
    stamps = {k: p.stat().st_mtime_ns for k, p in first.items()}
    original = first["vae"].read_bytes()
    first["vae"].write_bytes(original[:-8] + bytes(8))  # damaged
    second = write_tiny_default(tmp_path)
    assert second["vae"].read_bytes() == original
    assert {k: p.stat().st_mtime_ns for k, p in second.items() if k != "vae"} == \
        {k: v for k, v in stamps.items() if k != "vae"}  # intact files are left alone
    for name, path in second.items():  # same bytes as the server's copy: deterministic
        assert path.read_bytes() == (models / path.relative_to(tmp_path)).read_bytes(), name


# ------------------------------------------------------------------------------------------------- success


@pytest.mark.parametrize(("num_refs", "width", "height", "fps", "solver"),
                         [(1, 64, 64, 16.0, "unipc"), (4, 96, 64, 24.0, "euler")])
def test_workflow_makes_mp4_of_requested_size(comfy_server: ComfyServer, examples_dir: Path, num_refs: int,
                                              width: int, height: int, fps: float, solver: str) -> None:
    refs = cases(examples_dir)[num_refs]
    prompt = configure(load_api(num_refs), comfy_server, refs, width=width, height=height, frames=5, fps=fps,
                       solver=solver, prefix=f"e2e_{num_refs}ref")
    entry = comfy_server.run(prompt)
    assert entry["status"]["status_str"] == "success", history_error(entry) + comfy_server.log()
    [video] = saved_videos(entry, comfy_server)
    assert video.name.startswith(f"e2e_{num_refs}ref_") and video.suffix == ".mp4"
    meta = probe_mp4(video)
    assert (meta["frames"], meta["width"], meta["height"]) == (5, width, height), meta
    assert meta["fps"] == pytest.approx(fps, rel=1e-3)
    served = requests.get(f"{comfy_server.url}/view", timeout=30,
                          params={"filename": video.name, "subfolder": "", "type": "output"})
    assert served.ok and served.content == video.read_bytes()


def test_native_conditioning_is_accepted(comfy_server: ComfyServer, examples_dir: Path) -> None:
    """A CONDITIONING made by ComfyUI's own node (ConditioningZeroOut) feeds PhantomSampler unchanged."""
    prompt = configure(load_api(1), comfy_server, cases(examples_dir)[1], width=64, height=48, frames=1,
                       steps=2, prefix="e2e_native")
    prompt["40"] = {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["5", 0]}}
    prompt[SAMPLER_NODE]["inputs"]["negative"] = ["40", 0]
    entry = comfy_server.run(prompt)
    assert entry["status"]["status_str"] == "success", history_error(entry) + comfy_server.log()
    [video] = saved_videos(entry, comfy_server)
    assert probe_mp4(video)["frames"] == 1


def cut_out_png(photo: Path, target: Path) -> Path:
    """An RGBA PNG of `photo` whose outer part is fully transparent with black under it (as cut-outs often
    have): composited over white it differs strongly from the black RGB that Load Image's IMAGE carries."""
    import numpy as np
    from PIL import Image

    rgb = np.asarray(Image.open(photo).convert("RGB")).copy()
    h, w = rgb.shape[:2]
    alpha = np.zeros((h, w), np.uint8)
    alpha[h // 3: 2 * h // 3, w // 3: 2 * w // 3] = 255
    rgb[alpha == 0] = 0
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(target)
    return target


@pytest.mark.parametrize("reference", ["photo", "cut_out_with_mask"])
def test_node_chain_matches_phantom_core_run_directly(comfy_server: ComfyServer, examples_dir: Path,
                                                      tmp_path: Path, reference: str) -> None:
    """The server's LATENT (saved by ComfyUI's own SaveLatent) equals phantom_core driven directly with the same
    inputs: proves the nodes' boundary conversions (raw <-> normalized latents, text context, noise, sizes), and
    for a transparent cut-out wired with Load Image's MASK, that it is composited over white as in the core."""
    import torch
    from safetensors.torch import load_file

    from phantom_core.references import encode_references, open_reference
    from phantom_core.sampling.loop import make_noise, sample_phantom
    from phantom_core.wan.latents import denormalize_latents
    from phantom_core.wan.load import load_dit
    from phantom_core.wan.umt5 import load_text_encoder
    from phantom_core.wan.vae import load_vae

    ref = cases(examples_dir)[1]
    if reference == "cut_out_with_mask":
        ref = [cut_out_png(ref[0], tmp_path / "cut_out.png")]
    width, height, frames, steps, seed = 64, 48, 5, 3, 5
    prompt = configure(load_api(1), comfy_server, ref, width=width, height=height, frames=frames, steps=steps,
                       prefix=f"e2e_parity_{reference}")
    if reference == "cut_out_with_mask":
        prompt["20"]["inputs"]["mask_1"] = ["10", 1]  # Load Image's MASK
    prompt[SAMPLER_NODE]["inputs"]["seed"] = seed
    prompt["50"] = {"class_type": "SaveLatent", "inputs": {"samples": [SAMPLER_NODE, 0], "filename_prefix": "parity"}}
    entry = comfy_server.run(prompt)
    assert entry["status"]["status_str"] == "success", history_error(entry) + comfy_server.log()
    [saved] = entry["outputs"]["50"]["latents"]
    served = load_file(comfy_server.output_dir / saved["subfolder"] / saved["filename"])["latent_tensor"]

    models = comfy_server.base / "models"
    dit = load_dit(models / "diffusion_models" / prompt["1"]["inputs"]["dit_name"])  # the workflow's own files
    vae = load_vae(models / "vae" / prompt["2"]["inputs"]["vae_name"])
    encoder = load_text_encoder(models / "text_encoders" / prompt["3"]["inputs"]["text_encoder_name"])
    texts = [prompt["4"]["inputs"]["text"], prompt["5"]["inputs"]["text"]]
    with torch.no_grad():
        context, context_neg = (c[None] for c in encoder.encode(texts))  # (1, L, D) unpadded
        refs = encode_references(vae, [open_reference(ref[0])], width, height, "letterbox")  # (1, 16, 1, h, w)
        noise = make_noise(seed, (1, 16, 1 + (frames - 1) // 4, height // 8, width // 8), 1)
        guidance = {k: prompt[SAMPLER_NODE]["inputs"][k] for k in ("w_img", "w_text")}  # the workflow's own
        latents = sample_phantom(dit, noise, refs, context, context_neg, steps=steps, shift=5.0, solver="unipc",
                                 **guidance)
    expected = denormalize_latents(latents)  # ComfyUI's LATENT holds raw latents
    assert served.shape == expected.shape == (1, 16, 2, height // 8, width // 8)
    err = float((served - expected).abs().max() / expected.abs().max())
    assert err < 1e-4, f"node chain differs from phantom_core: relative max error {err:.2e}"


def test_sampler_preset_switches_to_the_paper_settings(comfy_server: ComfyServer, examples_dir: Path) -> None:
    """preset "paper" with the official widgets gives exactly the latent of custom Euler / w_img 3 / w_text 7.5,
    and a different one from the official settings: the preset really overrides the widgets."""
    from safetensors.torch import load_file

    def latent(steps: int, solver: str, w_img: float, preset: str):
        prompt = configure(load_api(1), comfy_server, cases(examples_dir)[1], width=32, height=32, frames=1,
                           steps=steps, prefix=f"preset_{preset}_{solver}")
        prompt[SAMPLER_NODE]["inputs"] |= {"solver": solver, "w_img": w_img, "w_text": 7.5, "preset": preset}
        prompt["50"] = {"class_type": "SaveLatent",
                        "inputs": {"samples": [SAMPLER_NODE, 0], "filename_prefix": f"preset_{preset}_{solver}"}}
        entry = comfy_server.run(prompt)
        assert entry["status"]["status_str"] == "success", history_error(entry) + comfy_server.log()
        [saved] = entry["outputs"]["50"]["latents"]
        return load_file(comfy_server.output_dir / saved["subfolder"] / saved["filename"])["latent_tensor"]

    paper = latent(50, "unipc", 5.0, "paper")  # the widgets say official; the preset says paper
    custom_paper = latent(50, "euler", 3.0, "custom")
    official = latent(50, "unipc", 5.0, "custom")
    assert (paper - custom_paper).abs().max() == 0
    assert (paper - official).abs().max() > 1e-3


def test_sampler_reports_progress_and_previews_every_step(comfy_server: ComfyServer, examples_dir: Path) -> None:
    prompt = configure(load_api(1), comfy_server, cases(examples_dir)[1], width=48, height=32, frames=5,
                       steps=4, prefix="e2e_progress")
    prompt[SAMPLER_NODE]["inputs"]["seed"] = 7
    seen = watch(comfy_server, prompt)
    assert seen.messages[-1]["type"] == "execution_success", seen.messages[-1]
    progress = seen.progress(SAMPLER_NODE)
    assert progress == [(k, 4) for k in range(1, 5)], progress
    assert seen.previews >= 4, "no latent preview frames were sent (server runs with --preview-method latent2rgb)"


# ------------------------------------------------------------------------------------------------- errors


def five_references(prompt: dict) -> None:
    """image_1 becomes a 2-image batch (ImageBatch of references 1 and 2): 5 images over the four inputs."""
    prompt["41"] = {"class_type": "ImageBatch", "inputs": {"image1": ["10", 0], "image2": ["11", 0]}}
    prompt[REFS_NODE]["inputs"]["image_1"] = ["41", 0]


BAD_REQUESTS = {
    "five_references": (five_references, ["5 images", "1 to 4"]),
    "missing_checkpoint": (lambda p: p["1"]["inputs"].update(dit_name="no_such_dit.safetensors"),
                           ["dit_name", "no_such_dit.safetensors"]),
    "frames_not_4k_plus_1": (lambda p: p[SAMPLER_NODE]["inputs"].update(frames=6), ["frames", "4k+1"]),
    "size_mismatch": (lambda p: p[SAMPLER_NODE]["inputs"].update(width=80), ["80x64", "reference_latents"]),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_request_names_the_input_and_writes_nothing(comfy_server: ComfyServer, examples_dir: Path,
                                                        case: str) -> None:
    edit, expected = BAD_REQUESTS[case]
    prompt = configure(load_api(4), comfy_server, cases(examples_dir)[4], width=64, height=64, frames=5,
                       steps=2, prefix=f"bad_{case}")
    edit(prompt)
    before = comfy_server.output_files()
    message = refusal_message(comfy_server, prompt)
    for fragment in expected:
        assert fragment in message, f"{case}: {fragment!r} not in error: {message[:2000]}"
    assert comfy_server.output_files() == before


def test_interrupt_stops_the_sampler_between_steps(comfy_server: ComfyServer, examples_dir: Path) -> None:
    """/interrupt lands within a few steps (the sampler callback checks it every step) and saves nothing."""
    prompt = configure(load_api(1), comfy_server, cases(examples_dir)[1], width=64, height=64, frames=5,
                       steps=1000, prefix="e2e_interrupt")
    prompt[SAMPLER_NODE]["inputs"]["seed"] = 123  # not cached from another test
    before = comfy_server.output_files()
    r = comfy_server.queue(prompt)
    assert r.status_code == 200, r.text
    prompt_id = r.json()["prompt_id"]
    deadline = time.monotonic() + 120
    while not any(item[1] == prompt_id for item in requests.get(f"{comfy_server.url}/queue").json()["queue_running"]):
        assert time.monotonic() < deadline, "the prompt never started"
        time.sleep(0.2)
    time.sleep(3.0)  # loaders, text encoding and reference encoding are done within this on the tiny default
    requests.post(f"{comfy_server.url}/interrupt", json={"prompt_id": prompt_id}, timeout=30)
    entry = comfy_server.wait(prompt_id, timeout_s=60)  # 1000 steps would take minutes
    kinds = [kind for kind, _ in entry["status"]["messages"]]
    assert entry["status"]["status_str"] == "error" and "execution_interrupted" in kinds, kinds
    assert comfy_server.output_files() == before
