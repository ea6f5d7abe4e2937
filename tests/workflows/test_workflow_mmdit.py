"""The shipped MMDiT workflows ("Phantom MMDiT 1 reference", "Phantom MMDiT 2 references", the latter `make demo`'s):
the paper's MMDiT default with the references' CLIP features, wired as the nodes expect; run end to end on tiny
random stand-ins of its files, and as shipped once its default is trained and exported (`make train-default-mmdit`;
until then that run skips). The schema checks every shipped workflow passes are in test_workflows.py."""

from __future__ import annotations

import copy

import pytest

from phantom_core.tiny.default import trained_mmdit_shipped
from tests.support.prompts import TINY_MODELS
from tests.support.workflow_files import by_class, load, saved_frames
from tools.comfy_launcher import ComfyServer
from tools.make_workflows import DEFAULT_FILES, MMDIT_FILES, PROMPTS, WORKFLOWS, api_path

MMDIT = "phantom_mmdit_1ref"
MMDIT_WORKFLOWS = ["phantom_mmdit_1ref", "phantom_mmdit_2ref"]


@pytest.mark.parametrize("stem", MMDIT_WORKFLOWS)
def test_mmdit_variant_wiring(stem: str) -> None:
    api = load(f"{stem}_api")
    (dit,), (vae,), (text,), (clip,), (clip_enc,), (refs,), (enc,), (sampler,) = (by_class(api, t) for t in (
        "PhantomDiTLoader", "PhantomVAELoader", "PhantomTextEncoderLoader", "PhantomCLIPVisionLoader",
        "PhantomCLIPEncodeReferences", "PhantomReferences", "PhantomEncodeReferences", "PhantomSampler"))
    # the MMDiT default's own DiT, CLIP tower and VAE (its latents' encoder: today the Phantom-Wan default's file),
    # the Phantom-Wan default's umT5
    assert api[dit]["inputs"]["dit_name"] == MMDIT_FILES["dit"] == "phantom_world_mmdit.safetensors"
    assert api[clip]["inputs"]["clip_vision_name"] == MMDIT_FILES["clip_vision"] == "phantom_world_clip.safetensors"
    assert api[vae]["inputs"]["vae_name"] == MMDIT_FILES["vae"]
    assert api[text]["inputs"]["text_encoder_name"] == DEFAULT_FILES["text_encoder"]
    c = api[clip_enc]["inputs"]
    assert (c["clip_vision"], c["references"], c["reference_latents"]) == ([clip, 0], [refs, 0], [enc, 0])
    assert c["clip_output"] == "tokens"  # what world.mmdit_default trains on
    assert api[sampler]["inputs"]["reference_latents"] == [clip_enc, 0] and api[sampler]["inputs"]["model"] == [dit, 0]
    # the default's guidance and its measured step cache (docs/speed_quality_mmdit.md), as `generate` uses them
    inputs = api[sampler]["inputs"]
    assert (inputs["w_img"], inputs["w_text"], inputs["cache_threshold"]) == (3.0, 3.0, 0.1)
    images = [k for k in api[refs]["inputs"] if k.startswith("image_")]
    assert len(images) == WORKFLOWS[stem].num_refs and len(by_class(api, "LoadImage")) == WORKFLOWS[stem].num_refs
    order = {n["id"]: n["order"] for n in load(stem)["nodes"]}
    assert all(order[src] < order[dst] for _, src, _, dst, _, _ in load(stem)["links"])


def test_demo_runs_the_mmdit_two_reference_workflow() -> None:
    """`make demo`'s default model is the MMDiT default, through the 2-reference workflow, whose prompt is the
    demo's (the astronaut first, the cat second: one clause per reference, in the photos' order)."""
    from tools import demo

    assert demo.MODELS["default-mmdit"] == api_path("phantom_mmdit_2ref")
    assert demo.build_parser().parse_args([]).model == "default-mmdit" and demo.PROMPT == PROMPTS[2]
    api = load("phantom_mmdit_2ref_api")
    (_,) = [k for k in by_class(api, "PhantomTextEncode") if api[k]["inputs"]["text"] == demo.PROMPT]  # exactly one
    assert [api[k]["inputs"]["image"] for k in sorted(by_class(api, "LoadImage"), key=int)] == \
        [p.name for p in demo.PHOTOS]


def mmdit_prompt(prefix: str, models: dict[str, str] | None = None, stem: str = MMDIT) -> dict:
    """The shipped API MMDiT workflow `stem` at 64x64, 5 frames, 2 Euler steps, saving under `prefix`; `models`:
    loader widget -> file name replacing the shipped ones."""
    prompt = copy.deepcopy(load(f"{stem}_api"))
    for node in prompt.values():
        node["inputs"] |= {k: v for k, v in (models or {}).items() if k in node["inputs"]}
        if node["class_type"] in ("PhantomEncodeReferences", "PhantomSampler"):
            node["inputs"] |= {"width": 64, "height": 64}
        if node["class_type"] == "PhantomSampler":
            node["inputs"] |= {"frames": 5, "steps": 2, "solver": "euler"}
        elif node["class_type"] == "PhantomSaveVideo":
            node["inputs"]["filename_prefix"] = prefix
    return prompt


def test_mmdit_workflow_runs_on_tiny_stand_ins(comfy_server: ComfyServer) -> None:
    """Every node of the shipped graph runs (a tiny random MMDiT and CLIP tower in place of the trained files,
    the tiny default's VAE and umT5): a 5-frame 64x64 video."""
    from phantom_core.mmdit.clip_keys import CLIP_VISION_PRESETS
    from phantom_core.mmdit.config import MMDIT_PRESETS
    from phantom_core.mmdit.model import PhantomMMDiT
    from tests.support.networks import random_clip_state_dict, save_safetensors
    from tests.support.weights import random_state_dict

    base = comfy_server.base / "models"
    save_safetensors(random_state_dict(PhantomMMDiT(MMDIT_PRESETS["tiny"], device="meta"), seed=31),
                     base / "diffusion_models" / "wf_tiny_mmdit.safetensors")
    save_safetensors(random_clip_state_dict(CLIP_VISION_PRESETS["tiny"], seed=32),
                     base / "clip_vision" / "wf_tiny_clip.safetensors")
    models = {**TINY_MODELS, "dit_name": "wf_tiny_mmdit.safetensors", "clip_vision_name": "wf_tiny_clip.safetensors"}
    entry = comfy_server.run(mmdit_prompt("wf_mmdit_tiny", models))
    assert saved_frames(comfy_server, entry).shape == (5, 64, 64, 3)


@pytest.mark.skipif(not trained_mmdit_shipped(), reason="the MMDiT default is not shipped yet: `make "
                    "train-default-mmdit` trains and exports phantom_core/tiny/trained/phantom_world_{mmdit,clip}")
@pytest.mark.parametrize("stem", MMDIT_WORKFLOWS)
def test_mmdit_workflow_runs_as_shipped(comfy_server: ComfyServer, stem: str) -> None:
    entry = comfy_server.run(mmdit_prompt(f"wf_{stem}_shipped", stem=stem))
    frames = saved_frames(comfy_server, entry)
    assert frames.shape == (5, 64, 64, 3) and frames.std() > 1  # a picture, not one flat colour
