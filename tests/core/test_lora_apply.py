"""apply_loras: merged == unmerged, several LoRAs at strengths, fp8 weights, and the refusals (keys of another
network, shapes of another model size) that leave the model untouched."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

import phantom_core
from phantom_core.loading.fp8 import dequantize
from phantom_core.lora.adapter import LoRALinear, lora_modules
from phantom_core.wan.dit import DIT_PRESETS, WanDiTConfig
from phantom_core.wan.load import load_dit
from tests.support.lora import random_lora
from tests.support.weights import random_dit_state_dict

CFG = DIT_PRESETS["tiny"]
E4M3 = torch.float8_e4m3fn


@pytest.fixture(scope="module")
def sd() -> dict[str, Tensor]:
    return random_dit_state_dict(CFG)


@pytest.fixture(scope="module")
def loras(sd) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Two LoRAs: rank 4 on the default targets, rank 2 on the FFN only (overlapping modules)."""
    a = random_lora(model_of(sd), rank=4, alpha=2.0, seed=1)
    b = random_lora(model_of(sd), rank=2, alpha=4.0, seed=2, targets=[r"blocks\.\d+\.ffn\.[02]"])
    return a, b


def model_of(sd, dtype=torch.float32):
    return load_dit({k: v.clone() for k, v in sd.items()}, dtype=dtype)


def inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 16, 2, 16, 16, generator=g), torch.tensor([600.0]),
            torch.randn(1, 7, CFG.text_dim, generator=g), torch.randn(1, 16, 1, 16, 16, generator=g))


def rel(a: Tensor, b: Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@torch.no_grad()
def test_public_name_and_merged_equals_unmerged_fp32(sd, loras):
    a, b = loras
    spec = [(a, 0.7), (b, -0.4)]
    base = model_of(sd)(*inputs())
    merged = phantom_core.apply_loras(model_of(sd), spec)
    unmerged_model = phantom_core.apply_loras(model_of(sd), spec, merge=False)
    m, u = merged(*inputs()), unmerged_model(*inputs())
    assert rel(m, base) > 1e-2  # the LoRAs change the output
    assert rel(u, m) <= 1e-5  # tolerance: fp32 summation order (W x + B A x vs (W + B A) x)
    q = unmerged_model.blocks[0].ffn[0]
    assert isinstance(q, LoRALinear) and q.rank == 6 and q.scale == 1.0  # both LoRAs in one adapter
    assert not any(p.requires_grad for p in unmerged_model.parameters())
    assert torch.equal(q.base.weight, sd["blocks.0.ffn.0.weight"])  # base weights untouched


@torch.no_grad()
def test_strength_scales_and_zero_is_off(sd, loras):
    a, _ = loras
    base = model_of(sd)
    assert phantom_core.apply_loras(model_of(sd), [(a, 0.0)]).state_dict().keys() == base.state_dict().keys()
    assert all(torch.equal(v, sd[k]) for k, v in phantom_core.apply_loras(model_of(sd), [(a, 0.0)]).state_dict().items())
    half = phantom_core.apply_loras(model_of(sd), [(a, 0.5)]).state_dict()
    full = phantom_core.apply_loras(model_of(sd), [(a, 1.0)]).state_dict()
    key = "blocks.1.cross_attn.k.weight"
    torch.testing.assert_close(full[key] - sd[key], 2 * (half[key] - sd[key]), rtol=0, atol=1e-6)


@torch.no_grad()
def test_trained_adapters_equal_their_file_applied_to_a_fresh_model(sd):
    trained = model_of(sd)
    lora = random_lora(trained, rank=4, alpha=8.0, seed=5)
    want = trained(*inputs())
    assert rel(phantom_core.apply_loras(model_of(sd), [(lora, 1.0)])(*inputs()), want) <= 1e-5


@torch.no_grad()
def test_unmerged_chains_and_merges_onto_adapters(sd, loras):
    a, b = loras
    chained = phantom_core.apply_loras(phantom_core.apply_loras(model_of(sd), [(a, 0.7)], merge=False),
                                       [(b, -0.4)], merge=False)
    once = phantom_core.apply_loras(model_of(sd), [(a, 0.7), (b, -0.4)])
    assert rel(chained(*inputs()), once(*inputs())) <= 1e-5
    mixed = phantom_core.apply_loras(phantom_core.apply_loras(model_of(sd), [(a, 0.7)], merge=False), [(b, -0.4)])
    assert rel(mixed(*inputs()), once(*inputs())) <= 1e-5


@torch.no_grad()
def test_bf16_merged_equals_unmerged(sd, loras):
    a, b = loras
    m = phantom_core.apply_loras(model_of(sd, torch.bfloat16), [(a, 0.7), (b, 0.3)])
    u = phantom_core.apply_loras(model_of(sd, torch.bfloat16), [(a, 0.7), (b, 0.3)], merge=False)
    assert rel(u(*inputs()), m(*inputs())) <= 3e-2  # bf16 has 8 significant bits; merging rounds W + delta once


@torch.no_grad()
def test_fp8_merged_is_requantized_and_unmerged_keeps_the_stored_weights(sd, loras):
    a, _ = loras
    key = "blocks.0.self_attn.q"
    plain = model_of(sd, E4M3)
    stored = plain.get_submodule(key).weight.clone()
    expected = dequantize(stored, plain.get_submodule(key).scale_weight, torch.float32) + \
        0.7 * lora_modules_delta(sd, a, key)
    merged = phantom_core.apply_loras(model_of(sd, E4M3), [(a, 0.7)]).get_submodule(key)
    assert merged.weight.dtype == E4M3
    got = dequantize(merged.weight, merged.scale_weight, torch.float32)
    # e4m3 keeps 3 mantissa bits: rounding error <= 2^-4 relative, plus the subnormal step (2^-9 x scale)
    bound = 2**-4 * expected.abs() + 2**-9 * merged.scale_weight.item() + 1e-7
    assert ((got - expected).abs() <= bound).all()
    assert rel(got, expected) > 0  # re-quantized, not a float copy
    unmerged = phantom_core.apply_loras(model_of(sd, E4M3), [(a, 0.7)], merge=False)
    assert torch.equal(unmerged.get_submodule(key).base.weight.view(torch.uint8), stored.view(torch.uint8))
    m, u = phantom_core.apply_loras(model_of(sd, E4M3), [(a, 0.7)])(*inputs()), unmerged(*inputs())
    assert rel(m, u) <= 0.15  # one more e4m3 rounding of every adapted weight in the merged model


def lora_modules_delta(sd, lora: dict[str, Tensor], name: str) -> Tensor:
    """scale * up @ down of module ``name`` from a ComfyUI-layout state dict, computed here."""
    k = f"diffusion_model.{name}"
    down, up, alpha = lora[f"{k}.lora_down.weight"], lora[f"{k}.lora_up.weight"], lora[f"{k}.alpha"].item()
    return alpha / down.shape[0] * up @ down


def test_lora_for_another_model_size_is_refused_by_shape(sd, loras):
    bigger = WanDiTConfig(dim=384, ffn_dim=512, num_heads=3, num_layers=2, text_dim=64)
    big_lora = random_lora(model_of(random_dit_state_dict(bigger)), rank=4)
    model = model_of(sd)
    with pytest.raises(ValueError, match=r"another model size.*blocks\.0\.cross_attn\.k: the LoRA's up @ down is "
                                         r"\(384, 384\), the model's blocks\.0\.cross_attn\.k\.weight is \(256, 256\)"):
        phantom_core.apply_loras(model, [(loras[0], 1.0), (big_lora, 1.0)])
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())  # the first LoRA was not applied


def test_keys_of_no_module_are_listed(sd, loras):
    a, _ = loras
    extra = {**a, "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(4, 2),
             "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 4),
             "diffusion_model.blocks.7.self_attn.q.lora_up.weight": torch.zeros(256, 2),
             "diffusion_model.blocks.7.self_attn.q.lora_down.weight": torch.zeros(2, 256)}
    model = model_of(sd)
    with pytest.raises(ValueError, match=r"4 LoRA keys match no module.*blocks\.7\.self_attn\.q\.lora_down\.weight.*"
                                         r"lora_te1_text_model_encoder_layers_0_mlp_fc1\.lora_down\.weight"):
        phantom_core.apply_loras(model, [(extra, 1.0)])
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("strength", [float("nan"), "1", None, True])
def test_bad_strength_is_named(sd, loras, strength):
    with pytest.raises(ValueError, match="LoRA 0 strength is"):
        phantom_core.apply_loras(model_of(sd), [(loras[0], strength)])


def test_missing_file_is_named(sd, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        phantom_core.apply_loras(model_of(sd), [(tmp_path / "nope.safetensors", 1.0)])


def test_adapter_count_and_rank_of_unmerged(sd, loras):
    model = phantom_core.apply_loras(model_of(sd), [(loras[1], 1.0)], merge=False)
    assert sorted(lora_modules(model)) == [f"blocks.{i}.ffn.{j}" for i in range(2) for j in (0, 2)]
    assert math.isclose(lora_modules(model)["blocks.1.ffn.2"].scale, 1.0)
