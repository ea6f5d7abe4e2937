"""CLIP reference features (``phantom_core.mmdit.clip`` / ``clip_keys``) against independent implementations.

Oracles: transformers' ``CLIPVisionModelWithProjection`` on the same random weights (ComfyUI's ``models/clip_vision``
layout is transformers'), and ComfyUI's own open_clip -> transformers key conversion (``comfy.clip_vision``), run
backwards through ours. Tolerance for the features: max abs difference <= 1e-5 x the oracle's max abs value (fp32;
the two towers use different attention kernels).
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor

from phantom_core.mmdit.clip import build_vision_tower, encode_clip_references, load_clip_vision
from phantom_core.mmdit.clip_keys import (
    CLIP_VISION_PRESETS,
    convert_transformers_clip_vision,
    infer_clip_vision_config,
    to_open_clip_visual,
)
from tests.support.networks import random_clip_state_dict, save_safetensors, transformers_clip

TINY = CLIP_VISION_PRESETS["tiny"]
ROOT = Path(__file__).resolve().parents[2]


def rel_err(a: Tensor, b: Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def pixels(n: int = 3, size: int = 32, seed: int = 0) -> Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("quick_gelu", [False, True], ids=["gelu", "quick_gelu"])
@torch.no_grad()
def test_converted_keys_give_transformers_features(quick_gelu):
    """ComfyUI / transformers keys -> ours: penultimate tokens = transformers' hidden_states[-2], pooled =
    image_embeds (<= 1e-5 rel), for GELU and OpenAI's QuickGELU."""
    sd = random_clip_state_dict(TINY, seed=1, quick_gelu=quick_gelu)
    oracle = transformers_clip(TINY, sd, quick_gelu=quick_gelu)
    tower = load_clip_vision(dict(sd))
    assert tower.config == TINY  # inferred from the shapes: the tiny preset (GELU)
    if quick_gelu:
        tower.visual = build_vision_tower(replace(TINY, quick_gelu=True))
        tower.visual.load_state_dict(convert_transformers_clip_vision(sd))
        tower.config = replace(TINY, quick_gelu=True)
    x = pixels()
    out = oracle(pixel_values=x, output_hidden_states=True)
    tokens, pooled = tower.encode_images(x, "tokens"), tower.encode_images(x, "pooled")
    assert tokens.shape == (3, TINY.tokens, TINY.width) and pooled.shape == (3, 1, TINY.output_dim)
    assert rel_err(tokens, out.hidden_states[-2]) < 1e-5
    assert rel_err(pooled[:, 0], out.image_embeds) < 1e-5
    assert rel_err(tokens, out.hidden_states[-1]) > 1e-2  # the penultimate block, not the last


def test_conversion_inverts_comfyuis_open_clip_to_transformers_conversion(comfy_import):
    """An open_clip checkpoint (visual.* + text tower) converted by ComfyUI's ``convert_to_transformers`` and back
    by ours gives every visual tensor back unchanged (a pure renaming / concatenation)."""
    comfy_clip_vision = comfy_import("comfy.clip_vision")
    visual = build_vision_tower(TINY).state_dict()
    g = torch.Generator().manual_seed(2)
    visual = {k: torch.randn(v.shape, generator=g) for k, v in visual.items()}
    full = {f"visual.{k}": v.clone() for k, v in visual.items()} | {"logit_scale": torch.ones(())}
    hf = comfy_clip_vision.convert_to_transformers(dict(full), "visual.")
    ours = to_open_clip_visual(hf)
    assert ours.keys() == visual.keys()
    assert all(torch.equal(ours[k], visual[k]) for k in visual)
    assert to_open_clip_visual(full).keys() == visual.keys()  # the open_clip layout itself


def test_real_file_layouts_load_from_disk(tmp_path: Path):
    """ComfyUI's layout (with position ids, as transformers saves them) and an open_clip checkpoint (visual part
    kept, text tower ignored) load from safetensors files into the same features (<= 1e-6 rel)."""
    sd = random_clip_state_dict(TINY, seed=3)
    comfy_file = save_safetensors(sd | {"vision_model.embeddings.position_ids": torch.arange(TINY.tokens)[None]},
                                  tmp_path / "clip_vision" / "tiny_clip_vision.safetensors")
    open_clip_sd = {f"visual.{k}": v for k, v in convert_transformers_clip_vision(sd).items()}
    open_clip_sd |= {"token_embedding.weight": torch.zeros(10, 8), "logit_scale": torch.ones(())}
    open_clip_file = save_safetensors(open_clip_sd, tmp_path / "open_clip_model.safetensors")
    a, b = load_clip_vision(comfy_file), load_clip_vision(open_clip_file)
    x = pixels(2)
    with torch.no_grad():
        assert rel_err(a.encode_images(x), b.encode_images(x)) < 1e-6


def test_presets_are_recognised_from_shapes_alone():
    """ViT-H-14 (ComfyUI's clip_vision_h: 32 blocks of 1280, 16 heads of 80) from a shapes-only state dict in
    ComfyUI's layout, and every other preset in open_clip's; a width matching no preset gets open_clip's
    defaults (heads of 64, GELU)."""
    for name, config in CLIP_VISION_PRESETS.items():
        visual = build_vision_tower(config, device="meta").state_dict()
        assert infer_clip_vision_config(visual) is config, name
    vit_h = CLIP_VISION_PRESETS["vit-h-14"]
    hf_meta = {k: torch.empty(v.shape, device="meta") for k, v in random_clip_state_dict(TINY).items()}
    assert infer_clip_vision_config(to_open_clip_visual(hf_meta)) is TINY
    assert vit_h.heads == 16 and vit_h.tokens == 257
    custom = replace(TINY, width=192, head_width=64, mlp_dim=384)
    assert infer_clip_vision_config(build_vision_tower(custom, device="meta").state_dict()) == custom


def test_bad_files_are_named(tmp_path: Path):
    not_clip = save_safetensors({"encoder.conv1.weight": torch.zeros(4, 3, 3, 3)}, tmp_path / "vae.safetensors")
    with pytest.raises(ValueError, match=r"vae\.safetensors.*not a CLIP ViT image tower"):
        load_clip_vision(not_clip)
    sd = random_clip_state_dict(TINY)
    del sd["vision_model.encoder.layers.1.self_attn.v_proj.bias"]
    with pytest.raises(ValueError, match=r"layer 1: self_attn has only the \['k', 'q'\] projections' bias"):
        load_clip_vision(sd)
    sd = random_clip_state_dict(TINY)
    del sd["vision_model.post_layernorm.bias"]
    with pytest.raises(ValueError, match=r"1 missing keys: ln_post\.bias"):
        load_clip_vision(sd)


def test_reference_encoding_letterboxes_on_white():
    """References -> (1, N, 17, 128) tokens or (1, N, 1, 64) pooled; a fully transparent image is a white one,
    and a wide image is padded with white, not cropped (its left and right edges reach the tower)."""
    tower = load_clip_vision(random_clip_state_dict(TINY, seed=4))
    rng = np.random.default_rng(0)
    wide = Image.fromarray(rng.integers(0, 256, (40, 120, 3), dtype=np.uint8))
    transparent = Image.fromarray(np.zeros((50, 50, 4), dtype=np.uint8), "RGBA")
    white = Image.new("RGB", (50, 50), (255, 255, 255))
    feats = encode_clip_references(tower, [wide, transparent, white])
    assert feats.shape == (1, 3, TINY.tokens, TINY.width) and feats.dtype == torch.float32
    assert rel_err(feats[0, 1], feats[0, 2]) < 1e-6
    assert encode_clip_references(tower, [wide], "pooled").shape == (1, 1, 1, TINY.output_dim)
    px = tower.preprocess([wide])[0]  # (3, 32, 32): 120 x 40 fitted to 32 x 10 (rounded), white above and below
    white_px = tower.preprocess([white])[0]
    assert torch.allclose(px[:, 0], white_px[:, 0]) and torch.allclose(px[:, -1], white_px[:, -1])
    assert not torch.allclose(px[:, 16, :2], white_px[:, 16, :2])  # the image's left edge is kept
    with pytest.raises(ValueError, match="1 to 4"):
        encode_clip_references(tower, [white] * 5)


def test_importing_the_clip_modules_loads_no_open_clip():
    code = ("import sys, phantom_core.mmdit.clip, phantom_core.mmdit.load\n"
            "print('open_clip' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", "False"]
