"""The DiT memory model (phantom_core/wan/memory.py) against the live-tensor peak of real forwards, and what it
says of the configurations users ask about (printed with -s)."""

from __future__ import annotations

import pytest
import torch

from phantom_core.wan.dit import DIT_PRESETS, PhantomWanDiT, WanDiTConfig
from phantom_core.wan.memory import activation_bytes, dit_tokens, peak_bytes, weight_bytes_estimate
from tests.support.memory import LiveBytes

GIB = 1024**3


@pytest.mark.parametrize("ffn_mult", [2, 4])
@pytest.mark.parametrize(("frames", "height", "width", "refs", "batch"), [(9, 64, 96, 2, 3), (17, 96, 96, 4, 1)])
def test_activation_model_bounds_the_measured_peak(ffn_mult, frames, height, width, refs, batch):
    cfg = WanDiTConfig(dim=256, ffn_dim=256 * ffn_mult, num_heads=2, num_layers=2, text_dim=64)
    model = PhantomWanDiT(cfg).eval()
    g = torch.Generator().manual_seed(0)
    f = 1 + (frames - 1) // 4
    x = torch.randn(batch, 16, f, height // 8, width // 8, generator=g)
    ref_latents = torch.randn(batch, 16, refs, height // 8, width // 8, generator=g)
    with torch.no_grad(), LiveBytes() as mode:
        model(x, torch.full((batch,), 500.0), torch.randn(batch, 20, 64, generator=g), ref_latents)
    estimate = activation_bytes(cfg, frames, height, width, refs, batch=batch, bytes_per_value=4)
    assert mode.peak <= estimate <= 1.6 * mode.peak, (mode.peak, estimate)


def test_reference_tokens_are_counted():
    cfg = DIT_PRESETS["phantom-wan-1.3b"]
    assert dit_tokens(cfg, 81, 480, 832, 0) == 21 * 30 * 52
    assert dit_tokens(cfg, 81, 480, 832, 4) == 25 * 30 * 52
    no_refs, four = (activation_bytes(cfg, 81, 480, 832, n, batch=1) for n in (0, 4))
    assert 1.15 < four / no_refs < 25 / 21 + 0.01  # the token share, less the fixed text-context part


def test_weights_match_the_presets_parameter_counts():
    for name, params in (("phantom-wan-1.3b", 1_418_996_800), ("phantom-wan-14b", 14_288_491_584)):
        assert abs(weight_bytes_estimate(DIT_PRESETS[name], 1.0) - params) < 0.01 * params


def test_14b_fp8_at_832x480x81_with_4_references_fits_24_gib_with_sequential_passes_and_block_swap():
    cfg = DIT_PRESETS["phantom-wan-14b"]
    batched = peak_bytes(cfg, 81, 480, 832, 4, batch=3, bytes_per_weight=1)
    sequential = peak_bytes(cfg, 81, 480, 832, 4, batch=1, bytes_per_weight=1)
    swapped = peak_bytes(cfg, 81, 480, 832, 4, batch=1, bytes_per_weight=1, blocks_on_device=10)
    print(f"14B fp8, 832x480x81, 4 refs: batched passes {batched / GIB:.1f} GiB, sequential {sequential / GIB:.1f} "
          f"GiB, sequential + 10 blocks on the GPU {swapped / GIB:.1f} GiB")
    assert batched > 24 * GIB > sequential > swapped
