"""ComfyUI reserves what our forward needs, references counted: the sampler node hands
``wan.memory.sampling_activation_bytes`` to ComfyUI's ``model_management.load_models_gpu``.

The expected numbers are written out here from the memory model's stated terms (tokens per reference frame, values
per token per batched pass, RoPE tables), not computed by calling it, so a change of either side shows.
"""

from __future__ import annotations

import torch

from phantom_core.wan.dit import DIT_PRESETS, PhantomWanDiT
from phantom_core.wan.memory import sampling_activation_bytes


def per_token_bytes(dim: int, ffn_dim: int, head_dim: int, rows: int, value_bytes: int) -> int:
    """Bytes one more token costs: the larger block stage (FFN here) per row, plus its float32 cos/sin entries."""
    return rows * max(9 * dim, 6 * dim + 2 * ffn_dim) * value_bytes + head_dim * 4


def test_four_references_add_their_tokens_share_at_832x480x81() -> None:
    cfg = DIT_PRESETS["phantom-wan-1.3b"]
    none, four = (sampling_activation_bytes(cfg, 81, 480, 832, n, w_img=5.0, w_text=7.5, dtype=torch.bfloat16)
                  for n in (0, 4))
    ref_tokens = 4 * (480 // 16) * (832 // 16)  # one latent frame per reference, patch 2 x 2 over the 8x VAE
    assert ref_tokens == 6240
    assert four - none == ref_tokens * per_token_bytes(1536, 8960, 128, rows=3, value_bytes=2)  # 1.02 GB
    assert 1.15 < four / none < 25 / 21 + 0.01  # 21 video latent frames: the refs add up to 4/21, less the text part
    one_pass = sampling_activation_bytes(cfg, 81, 480, 832, 4, w_img=1.0, w_text=1.0, dtype=torch.bfloat16)
    assert 2.9 < four / one_pass < 3.0  # w_img = w_text = 1 runs one pass: one row instead of three


def test_the_sampler_node_reserves_the_estimate_through_comfyui(comfy_import, monkeypatch) -> None:
    """A sampling run of the node (tiny DiT, CPU) calls ComfyUI's load_models_gpu with our estimate, and it grows
    with the references by their tokens' share."""
    ops = comfy_import("comfy.ops")
    mm = comfy_import("comfy.model_management")
    from nodes.sampler import PhantomSampler
    from nodes.types import manage

    cpu = torch.device("cpu")
    torch.manual_seed(0)
    cfg = DIT_PRESETS["tiny"]
    model = manage(PhantomWanDiT(cfg, ops=ops.disable_weight_init), cpu, cpu)
    calls: list[dict] = []
    real = mm.load_models_gpu

    def spy(models, **kwargs):
        calls.append(kwargs)
        return real(models, **kwargs)

    monkeypatch.setattr(mm, "load_models_gpu", spy)
    cond = [[torch.randn(1, 7, cfg.text_dim), {}]]
    for refs in (1, 4):
        latents = {"samples": torch.randn(1, 16, refs, 4, 6), "width": 48, "height": 32}
        out = PhantomSampler.execute(model, cond, cond, latents, width=48, height=32, frames=5, steps=1, shift=5.0,
                                     solver="euler", w_img=5.0, w_text=7.5, seed=0)
        assert out.result[0]["samples"].shape == (1, 16, 2, 4, 6)
    assert len(calls) == 2
    one, four = calls
    video_tokens = 2 * 2 * 3  # 5 frames -> 2 latent frames, 32x48 px -> 4x6 latent -> 2x3 patches
    context = cfg.text_len * (4 * cfg.dim + cfg.text_dim)
    for call, refs in ((one, 1), (four, 4)):
        tokens = video_tokens + refs * 2 * 3
        rows_bytes = (max(9 * cfg.dim, 6 * cfg.dim + 2 * cfg.ffn_dim) * tokens + context) * 4
        # batch_passes "auto": room for the three passes batched, at least one pass's (run one at a time otherwise)
        assert call == {"memory_required": 3 * rows_bytes + tokens * cfg.head_dim * 4,
                        "minimum_memory_required": rows_bytes + tokens * cfg.head_dim * 4}
    share = 3 * 2 * 3 * per_token_bytes(cfg.dim, cfg.ffn_dim, cfg.head_dim, rows=3, value_bytes=4)
    assert four["memory_required"] - one["memory_required"] == share


def test_the_sampler_node_reserves_by_batch_passes(comfy_import, monkeypatch) -> None:
    """batch_passes "on" reserves the batched need as the minimum too, "off" one pass's only; a bad value is refused
    by name before ComfyUI loads anything."""
    import pytest

    ops = comfy_import("comfy.ops")
    mm = comfy_import("comfy.model_management")
    from nodes.sampler import PhantomSampler
    from nodes.types import manage

    cpu = torch.device("cpu")
    torch.manual_seed(0)
    cfg = DIT_PRESETS["tiny"]
    from tests.support.weights import random_dit_state_dict

    dit = PhantomWanDiT(cfg, ops=ops.disable_weight_init)
    dit.load_state_dict(random_dit_state_dict(cfg))  # finite weights: the two runs' latents are compared
    model = manage(dit, cpu, cpu)
    calls: list[dict] = []
    real = mm.load_models_gpu
    monkeypatch.setattr(mm, "load_models_gpu", lambda models, **kw: calls.append(kw) or real(models, **kw))
    cond = [[torch.randn(1, 7, cfg.text_dim), {}]]
    latents = {"samples": torch.randn(1, 16, 2, 4, 6), "width": 48, "height": 32}
    run = dict(width=48, height=32, frames=5, steps=2, shift=5.0, solver="euler", w_img=5.0, w_text=7.5, seed=0)
    outs = {mode: PhantomSampler.execute(model, cond, cond, latents, **run, batch_passes=mode).result[0]["samples"]
            for mode in ("on", "off")}
    on, off = calls
    assert on["memory_required"] == on["minimum_memory_required"] > off["memory_required"]
    assert off["memory_required"] == off["minimum_memory_required"]
    assert 2.5 < on["memory_required"] / off["memory_required"] < 3.0  # three rows against one, RoPE counted once
    assert torch.allclose(outs["on"], outs["off"], rtol=0, atol=1e-5 * outs["off"].abs().max().item())
    with pytest.raises(ValueError, match="batch_passes"):
        PhantomSampler.execute(model, cond, cond, latents, **run, batch_passes="sometimes")
    assert len(calls) == 2


def test_the_sampler_node_reserves_the_mmdit_estimate_with_its_clip_tokens(comfy_import, monkeypatch) -> None:
    """A Phantom MMDiT gets its own memory model (`mmdit.memory`), its CLIP tokens counted, not ComfyUI's default."""
    ops = comfy_import("comfy.ops")
    mm = comfy_import("comfy.model_management")
    from nodes.sampler import load_for_sampling
    from nodes.types import manage
    from phantom_core.mmdit.config import MMDIT_PRESETS
    from phantom_core.mmdit.memory import mmdit_sampling_activation_bytes
    from phantom_core.mmdit.model import PhantomMMDiT

    cpu = torch.device("cpu")
    cfg = MMDIT_PRESETS["tiny"]
    model = manage(PhantomMMDiT(cfg, ops=ops.disable_weight_init), cpu, cpu)
    calls: list[dict] = []
    monkeypatch.setattr(mm, "load_models_gpu", lambda models, **kw: calls.append(kw))
    for tokens in (1, 50):
        load_for_sampling(model, 17, 128, 128, 2, 5.0, 7.5, "auto", clip_tokens=tokens)
    few, many = calls
    expected = {w: mmdit_sampling_activation_bytes(cfg, 17, 128, 128, 2, w_img=w, w_text=w2, dtype=torch.float32,
                                                   clip_tokens=50) for w, w2 in ((5.0, 7.5), (1.0, 1.0))}
    assert many == {"memory_required": expected[5.0], "minimum_memory_required": expected[1.0]}
    assert many["memory_required"] > few["memory_required"] > 0
