"""Reading every LoRA layout (phantom_core.lora.keys.read_lora): one known LoRA written in each key layout must
give the same merged weights, computed here independently (W + strength * alpha / rank * up @ down)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor

from phantom_core.lora.apply import apply_loras
from phantom_core.lora.files import diff_state_dict, save_lora
from phantom_core.lora.keys import read_lora
from phantom_core.wan.dit import DIT_PRESETS
from phantom_core.wan.load import load_dit
from tests.support.weights import random_dit_state_dict

CFG = DIT_PRESETS["tiny"]
STRENGTH = 0.8
# upstream Wan name -> diffusers WanTransformer3DModel name (diffusers' scripts/convert_wan_to_diffusers.py)
DIFFUSERS = {
    "blocks.0.self_attn.q": "blocks.0.attn1.to_q",
    "blocks.0.self_attn.o": "blocks.0.attn1.to_out.0",
    "blocks.1.cross_attn.v": "blocks.1.attn2.to_v",
    "blocks.1.cross_attn.o": "blocks.1.attn2.to_out.0",
    "blocks.0.ffn.0": "blocks.0.ffn.net.0.proj",
    "blocks.1.ffn.2": "blocks.1.ffn.net.2",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out",
}


@pytest.fixture(scope="module")
def sd() -> dict[str, Tensor]:
    return random_dit_state_dict(CFG)


@pytest.fixture(scope="module")
def known(sd) -> dict[str, tuple[Tensor, Tensor, float]]:
    """``{module: (down, up, alpha)}`` drawn at random for every module of DIFFUSERS, rank 3 or 5."""
    g = torch.Generator().manual_seed(7)
    out = {}
    for i, name in enumerate(DIFFUSERS):
        w = sd[f"{name}.weight"]
        rank = 3 if i % 2 else 5
        out[name] = (torch.randn(rank, w.shape[1], generator=g) * 0.1, torch.randn(w.shape[0], rank, generator=g) * 0.1,
                     float(2 * rank if i % 2 else 1.5))
    return out


def expected_weights(sd, known) -> dict[str, Tensor]:
    return {f"{n}.weight": sd[f"{n}.weight"] + STRENGTH * alpha / down.shape[0] * up @ down
            for n, (down, up, alpha) in known.items()}


def comfyui(known):
    return {k: v for n, (d, u, a) in known.items() for k, v in (
        (f"diffusion_model.{n}.lora_up.weight", u), (f"diffusion_model.{n}.lora_down.weight", d),
        (f"diffusion_model.{n}.alpha", torch.tensor(a)))}


def kohya(known, prefix="lora_unet_"):
    return {k: v for n, (d, u, a) in known.items() for k, v in (
        (f"{prefix}{n.replace('.', '_')}.lora_up.weight", u), (f"{prefix}{n.replace('.', '_')}.lora_down.weight", d),
        (f"{prefix}{n.replace('.', '_')}.alpha", torch.tensor(a)))}


def a_b(known, names, prefix, tag=""):
    """lora_A (down) / lora_B (up) without an alpha: the scale alpha / rank is folded into B, as such files are."""
    return {k: v for n, (d, u, a) in known.items() for k, v in (
        (f"{prefix}{names(n)}.lora_A{tag}.weight", d), (f"{prefix}{names(n)}.lora_B{tag}.weight", u * a / d.shape[0]))}


def diffusers_with_alpha(known):
    return {k: v for n, (d, u, a) in known.items() for k, v in (
        (f"transformer.{DIFFUSERS[n]}.lora_A.weight", d), (f"transformer.{DIFFUSERS[n]}.lora_B.weight", u),
        (f"transformer.{DIFFUSERS[n]}.alpha", torch.tensor(a)))}


LAYOUTS = {
    "comfyui": comfyui,
    "kohya-musubi": kohya,
    "wan-fun": lambda k: kohya(k, "lora_unet__"),
    "diffusion-pipe": lambda k: a_b(k, lambda n: n, "diffusion_model."),
    "bare-names": lambda k: a_b(k, lambda n: n, ""),
    "diffusers": lambda k: a_b(k, DIFFUSERS.get, "transformer."),
    "diffusers-alpha": diffusers_with_alpha,
    "peft": lambda k: a_b(k, DIFFUSERS.get, "base_model.model.", ".default"),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_layout_gives_the_same_merged_weights(sd, known, layout, tmp_path):
    path = tmp_path / f"{layout}.safetensors"
    save_file({k: v.contiguous() for k, v in LAYOUTS[layout](known).items()}, path)
    model = apply_loras(load_dit({k: v.clone() for k, v in sd.items()}), [(path, STRENGTH)])
    got = model.state_dict()
    for key, want in expected_weights(sd, known).items():
        torch.testing.assert_close(got[key], want, rtol=0, atol=1e-5, msg=f"{layout}: {key}")
    untouched = "blocks.0.self_attn.k.weight"
    assert torch.equal(got[untouched], sd[untouched])


def test_read_lora_normalises_names_scales_and_keys(known):
    lora = read_lora(kohya(known))
    assert sorted(lora) == sorted(known)
    w = lora["blocks.1.cross_attn.o"]
    down, up, alpha = known["blocks.1.cross_attn.o"]
    assert w.rank == down.shape[0] and w.alpha == alpha and w.scale == alpha / down.shape[0]
    assert w.keys == tuple(sorted(f"lora_unet_blocks_1_cross_attn_o.{p}" for p in
                                  ("alpha", "lora_down.weight", "lora_up.weight")))
    torch.testing.assert_close(w.delta(), alpha / down.shape[0] * up @ down)
    assert read_lora(a_b(known, lambda n: n, "diffusion_model."))["head.head"].alpha is None


def test_full_weight_deltas(sd, tmp_path):
    g = torch.Generator().manual_seed(3)
    d_w = torch.randn(CFG.dim, CFG.dim, generator=g) * 0.01
    d_b = torch.randn(CFG.dim, generator=g) * 0.01
    d_mod = torch.randn(1, 6, CFG.dim, generator=g) * 0.01
    d_norm = torch.randn(CFG.dim, generator=g) * 0.01
    lora = {"diffusion_model.blocks.1.self_attn.v.diff": d_w, "diffusion_model.blocks.1.self_attn.v.diff_b": d_b,
            "diffusion_model.blocks.0.modulation.diff": d_mod}
    got = apply_loras(load_dit({k: v.clone() for k, v in sd.items()}), [(lora, 0.5)]).state_dict()
    torch.testing.assert_close(got["blocks.1.self_attn.v.weight"], sd["blocks.1.self_attn.v.weight"] + 0.5 * d_w)
    torch.testing.assert_close(got["blocks.1.self_attn.v.bias"], sd["blocks.1.self_attn.v.bias"] + 0.5 * d_b)
    torch.testing.assert_close(got["blocks.0.modulation"], sd["blocks.0.modulation"] + 0.5 * d_mod)
    # diffusers calls the cross-attention norm (upstream norm3) norm2
    diffusers = {"transformer.blocks.1.norm2.diff": d_norm, "transformer.blocks.1.attn1.to_q.diff_b": d_b}
    got = apply_loras(load_dit({k: v.clone() for k, v in sd.items()}), [(diffusers, 1.0)]).state_dict()
    torch.testing.assert_close(got["blocks.1.norm3.weight"], sd["blocks.1.norm3.weight"] + d_norm)
    torch.testing.assert_close(got["blocks.1.self_attn.q.bias"], sd["blocks.1.self_attn.q.bias"] + d_b)


def test_our_file_round_trips_through_save_and_read(known, tmp_path):
    path = save_lora(tmp_path / "ours.safetensors", comfyui(known), {"rank": "5"})
    back = read_lora(path)
    for name, (down, up, alpha) in known.items():
        assert torch.equal(back[name].down, down) and torch.equal(back[name].up, up) and back[name].alpha == alpha
    torch.save(comfyui(known), tmp_path / "ours.pt")
    assert sorted(read_lora(tmp_path / "ours.pt")) == sorted(known)


@pytest.mark.parametrize("keys, word", [
    ({"blocks.0.self_attn.q.weight": torch.zeros(2, 2)}, "of no layout we read"),
    ({"lora_unet_blocks_0_self_attn_q.hada_w1_a": torch.zeros(2, 2)}, "LoHa"),
    ({"lora_unet_blocks_0_self_attn_q.lokr_w1": torch.zeros(2, 2)}, "LoKr"),
    ({"diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(4, 2),
      "diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(2, 4),
      "diffusion_model.blocks.0.self_attn.q.dora_scale": torch.zeros(4, 1)}, "DoRA"),
    ({"diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(4, 2)}, "without its lora_down"),
    ({"diffusion_model.blocks.0.self_attn.q.alpha": torch.tensor(1.0)}, "alpha but no lora_up"),
    ({"diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(4, 2),
      "diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(3, 4)}, "do not form a low-rank pair"),
    ({"diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(4, 2),
      "diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(2, 4),
      "lora_unet_blocks_0_self_attn_q.lora_up.weight": torch.zeros(4, 2)}, "both give the up of blocks.0.self_attn.q"),
    ({}, "no tensors"),
], ids=["plain-weights", "loha", "lokr", "dora", "up-alone", "alpha-alone", "ranks", "two-spellings", "empty"])
def test_bad_files_are_refused_with_the_reason(keys, word):
    with pytest.raises(ValueError, match=word):
        read_lora(keys)


def test_diff_state_dict_round_trip_and_refusals(sd):
    g = torch.Generator().manual_seed(8)
    tuned = {k: v + 0.01 * torch.randn(v.shape, generator=g) if k.startswith(("blocks.0.", "head.")) else v
             for k, v in sd.items()}
    diff = diff_state_dict(sd, tuned, dtype=torch.float32)
    assert "diffusion_model.head.modulation.diff" in diff and "diffusion_model.head.head.diff_b" in diff
    assert not any(k.startswith("diffusion_model.blocks.1.") for k in diff)
    got = apply_loras(load_dit({k: v.clone() for k, v in sd.items()}), [(diff, 1.0)]).state_dict()
    for key, want in tuned.items():
        torch.testing.assert_close(got[key], want, rtol=0, atol=1e-6, msg=key)
    with pytest.raises(ValueError, match="different keys"):
        diff_state_dict(sd, {**tuned, "extra": torch.zeros(1)})
    with pytest.raises(ValueError, match="no delta"):
        diff_state_dict(sd, dict(sd))
