"""The LoRA adapter (phantom_core.lora.adapter): injection on the DiT's named Linears (plain and fp8), zero-init,
gradients, ComfyUI's key layout, and the atomic LoRA file."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor, nn

from phantom_core.lora.adapter import DEFAULT_TARGETS, LoRALinear, inject_lora, lora_modules, lora_state_dict
from phantom_core.lora.files import lora_metadata, save_lora
from phantom_core.wan.dit import DIT_PRESETS
from phantom_core.wan.load import load_dit
from tests.support.weights import random_dit_state_dict

CFG = DIT_PRESETS["tiny"]
PER_BLOCK = ["self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
             "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2"]


@pytest.fixture(scope="module")
def sd() -> dict[str, Tensor]:
    return random_dit_state_dict(CFG)


def model_of(sd: dict[str, Tensor], dtype: torch.dtype = torch.float32):
    return load_dit({k: v.clone() for k, v in sd.items()}, dtype=dtype)


def inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 16, 2, 16, 16, generator=g), torch.tensor([700.0]),
            torch.randn(1, 7, CFG.text_dim, generator=g), torch.randn(1, 16, 1, 16, 16, generator=g))


def test_default_targets_are_attention_and_ffn_of_every_block(sd):
    model = model_of(sd)
    names = inject_lora(model, rank=4, alpha=4.0)
    assert names == [f"blocks.{i}.{p}" for i in range(CFG.num_layers) for p in PER_BLOCK]
    assert set(lora_modules(model)) == set(names)
    assert len(DEFAULT_TARGETS) == 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn], ids=str)
@torch.no_grad()
def test_zero_initialised_lora_leaves_the_output_unchanged(sd, dtype):
    model = model_of(sd, dtype)
    before = model(*inputs())
    inject_lora(model, rank=8, alpha=16.0)
    after = model(*inputs())
    assert after.dtype == before.dtype
    scale = before.abs().max().item()
    assert (after.float() - before.float()).abs().max().item() <= 1e-6 * scale


def test_adapter_dtypes_and_frozen_base(sd):
    model = model_of(sd, torch.float8_e4m3fn)
    inject_lora(model, rank=4, alpha=4.0)
    q = model.blocks[0].self_attn.q
    assert isinstance(q, LoRALinear) and q.base.weight.dtype == torch.float8_e4m3fn
    assert q.lora_down.weight.shape == (4, CFG.dim) and q.lora_up.weight.shape == (CFG.dim, 4)
    assert q.lora_down.weight.dtype == q.lora_up.weight.dtype == torch.float32
    assert torch.count_nonzero(q.lora_up.weight) == 0 and torch.count_nonzero(q.lora_down.weight) > 0
    ffn0 = model.blocks[1].ffn[0]
    assert ffn0.lora_down.weight.shape == (4, CFG.dim) and ffn0.lora_up.weight.shape == (CFG.ffn_dim, 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float8_e4m3fn], ids=str)
def test_gradients_reach_lora_down_and_up_only(sd, dtype):
    model = model_of(sd, dtype)
    names = inject_lora(model, rank=4, alpha=4.0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{m}.lora_{w}.weight" for m in names for w in ("down", "up")}
    model(*inputs()).square().mean().backward()  # step 1: lora_up is zero, so only it gets a gradient
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (n in trainable), n
    ups = [p for n, p in model.named_parameters() if n.endswith("lora_up.weight")]
    assert all(p.grad.abs().sum() > 0 for p in ups)
    with torch.no_grad():  # once lora_up is non-zero, lora_down gets gradients too
        for p in ups:
            p.normal_(std=0.01)
    model.zero_grad()
    model(*inputs()).square().mean().backward()
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n.endswith("lora_down.weight"))


@torch.no_grad()
def test_forward_is_base_plus_scaled_low_rank_update():
    torch.manual_seed(0)
    base = nn.Linear(12, 10)
    ad = LoRALinear(base, rank=3, alpha=6.0)
    ad.lora_up.weight.normal_()
    x = torch.randn(5, 12)
    expected = base(x) + 2.0 * x @ ad.lora_down.weight.T @ ad.lora_up.weight.T
    torch.testing.assert_close(ad(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ad.delta_weight(), 2.0 * ad.lora_up.weight @ ad.lora_down.weight)


def test_a_fixed_generator_gives_the_same_adapters(sd):
    a, b = model_of(sd), model_of(sd)
    inject_lora(a, 4, 4.0, generator=torch.Generator().manual_seed(3))
    inject_lora(b, 4, 4.0, generator=torch.Generator().manual_seed(3))
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb and torch.equal(pa, pb)


@pytest.mark.parametrize("kwargs, word", [
    (dict(rank=0, alpha=1.0), "rank is 0"),
    (dict(rank=2.5, alpha=1.0), "rank is 2.5"),
    (dict(rank=4, alpha=0.0), "alpha is 0.0"),
    (dict(rank=4, alpha=float("nan")), "alpha is nan"),
    (dict(rank=4, alpha=4.0, dropout=1.0), "dropout is 1.0"),
    (dict(rank=4, alpha=4.0, targets=[r"blocks\.\d+\.self_attn\.q", r"blocks\.\d+\.attn1\.to_q"]),
     r"\['blocks\\\\.\\\\d\+\\\\.attn1\\\\.to_q'\] match no Linear"),
    (dict(rank=4, alpha=4.0, targets=["blocks.(0"]), "not a valid regular expression"),
    (dict(rank=4, alpha=4.0, targets=[]), "non-empty list"),
])
def test_bad_arguments_are_named(sd, kwargs, word):
    with pytest.raises(ValueError, match=word):
        inject_lora(model_of(sd), **kwargs)


def test_injecting_twice_is_refused(sd):
    model = model_of(sd)
    inject_lora(model, 2, 2.0)
    with pytest.raises(ValueError, match="already carries LoRA adapters"):
        inject_lora(model, 2, 2.0)


def test_custom_targets_and_dropout(sd):
    model = model_of(sd)
    names = inject_lora(model, 2, 1.0, targets=[r"blocks\.1\.ffn\.2"], dropout=0.1)
    assert names == ["blocks.1.ffn.2"]
    assert isinstance(model.blocks[1].ffn[2].dropout, nn.Dropout)


def test_state_dict_is_comfyui_layout(sd):
    model = model_of(sd)
    names = inject_lora(model, rank=4, alpha=8.0)
    out = lora_state_dict(model)
    assert len(out) == 3 * len(names)
    k = "diffusion_model.blocks.0.cross_attn.v"
    assert out[f"{k}.lora_up.weight"].shape == (CFG.dim, 4) and out[f"{k}.lora_down.weight"].shape == (4, CFG.dim)
    assert out[f"{k}.alpha"].shape == () and out[f"{k}.alpha"].item() == 8.0
    assert out[f"{k}.alpha"].dtype == torch.float32
    half = lora_state_dict(model, prefix="", dtype=torch.bfloat16)
    assert half["blocks.0.cross_attn.v.lora_down.weight"].dtype == torch.bfloat16
    with pytest.raises(ValueError, match="carries no LoRA adapters"):
        lora_state_dict(model_of(sd))


def test_save_lora_round_trip_metadata_and_permissions(sd, tmp_path):
    model = model_of(sd)
    inject_lora(model, rank=4, alpha=4.0)
    meta = lora_metadata(4, 4.0, "tiny", steps=10, settings={"lr": 1e-4, "targets": list(DEFAULT_TARGETS)})
    out = lora_state_dict(model)
    old = os.umask(0o027)
    try:
        path = save_lora(tmp_path / "sub" / "x.safetensors", out, meta)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.safetensors"]  # no temp file left
    back = load_file(path)
    assert back.keys() == out.keys() and all(torch.equal(back[k], out[k]) for k in out)
    with safe_open(path, "pt") as f:
        got = f.metadata()
    assert got["rank"] == "4" and got["alpha"] == "4.0" and got["base_model"] == "tiny" and got["steps"] == "10"
    assert json.loads(got["settings"])["lr"] == 1e-4


def test_save_lora_failure_leaves_no_file(tmp_path):
    with pytest.raises(ValueError, match="metadata values must be strings"):
        save_lora(tmp_path / "x.safetensors", {"a": torch.zeros(1)}, {"rank": 4})
    with pytest.raises(ValueError, match="empty"):
        save_lora(tmp_path / "x.safetensors", {}, {})
    shared = torch.zeros(3)
    with pytest.raises(RuntimeError, match="share memory"):  # safetensors refuses it half-way: no file is left
        save_lora(tmp_path / "x.safetensors", {"a": shared, "b": shared}, {})
    assert list(tmp_path.iterdir()) == []
