"""The paper's MMDiT beyond the shared contract: dynamic injection (0-4 references, positions, sizes), the CLIP
reference branch, the config presets and their inference from checkpoints, the loader's errors."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
import torch
from torch import Tensor

from phantom_core.mmdit.config import MMDIT_PRESETS, MMDiTConfig
from phantom_core.mmdit.inputs import clip_features_for
from phantom_core.mmdit.load import infer_mmdit_config, load_mmdit, validate_mmdit_state_dict
from phantom_core.mmdit.model import MMDIT_LORA_TARGETS, PhantomMMDiT
from phantom_core.wan.dit import DIT_PRESETS, PhantomWanDiT
from phantom_core.wan.rope import rope_table
from tests.support.weights import random_state_dict

CFG = MMDIT_PRESETS["tiny"]


@pytest.fixture(scope="module")
def model() -> PhantomMMDiT:
    m = PhantomMMDiT(CFG).eval()
    m.load_state_dict(random_state_dict(m, seed=5))
    return m


def inputs(n_refs: int, clip_tokens: int = 3, seed: int = 0, frames: int = 3) -> tuple[Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, frames, 16, 16, generator=g)
    ctx = torch.randn(1, 6, CFG.text_dim, generator=g)
    refs = torch.randn(1, 16, 4, 16, 16, generator=g)[:, :, :n_refs]  # the same references, a prefix of them
    clip = torch.randn(1, 4, clip_tokens, CFG.clip_dim, generator=g)[:, :n_refs]
    return x, torch.tensor([500.0]), ctx, refs, clip


def rel_err(a: Tensor, b: Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@torch.no_grad()
def test_references_change_neither_the_windows_nor_the_video_positions(model):
    """For 0..4 references the block loop gets the same window plans (the same cached objects) and the same RoPE
    rows for the video tokens; reference k sits at time index f + k."""
    seen = []
    original = model.run_blocks

    def recording(tokens, ctx, c, cos, sin, plans):
        seen.append((tokens.shape[1], ctx.shape[1], plans, cos, sin))
        return original(tokens, ctx, c, cos, sin, plans)

    model.run_blocks = recording
    try:
        for n in range(5):
            model(*inputs(n))
    finally:
        del model.run_blocks
    f, h, w = 3, 8, 8
    n_video = f * h * w
    for n, (length, ctx_len, plans, cos, sin) in enumerate(seen):
        assert length == n_video + n * h * w and ctx_len == CFG.text_len + n * 3
        assert plans[0] is seen[0][2][0] and plans[1] is seen[0][2][1]  # the video grid's plans, whatever N
        assert plans[0].n_video == n_video
        assert torch.equal(cos[:n_video], seen[0][3]) and torch.equal(sin[:n_video], seen[0][4])
        if n:  # reference k: the video grid's rows of time index f + k
            table_cos, _ = rope_table((f + n, h, w), CFG.head_dim)
            assert torch.equal(cos[n_video:], table_cos[n_video:])
            assert not torch.equal(cos[n_video:n_video + h * w], cos[:h * w])  # not the first frame's positions


@torch.no_grad()
def test_zero_to_four_references_keep_every_block_size(model):
    """Each joint block returns its inputs' shapes, and the velocity has x's shape, for 0..4 references (VAE and
    CLIP, CLIP tokens or one pooled vector)."""
    sizes = []
    hooks = [b.register_forward_hook(lambda m, i, o: sizes.append(((i[0].shape, i[1].shape), (o[0].shape, o[1].shape))))
             for b in model.joint_blocks]
    try:
        for n, tokens in [(0, 3), (1, 3), (2, 1), (3, 3), (4, 3), (4, 1)]:
            x, t, ctx, refs, clip = inputs(n, clip_tokens=tokens, frames=1)
            assert model(x, t, ctx, refs, clip).shape == x.shape
    finally:
        for h in hooks:
            h.remove()
    assert len(sizes) == 6 * CFG.num_layers
    assert all(i == o for i, o in sizes)


@torch.no_grad()
def test_clip_references_are_read_and_zero_clip_references_are_none(model):
    x, t, ctx, refs, clip = inputs(2)
    vae_only = model(x, t, ctx, refs)
    assert rel_err(model(x, t, ctx, refs, clip[:, :0]), vae_only) < 1e-6
    both = model(x, t, ctx, refs, clip)
    assert rel_err(both, vae_only) > 1e-3
    clip_only = model(x, t, ctx, None, clip)
    assert rel_err(clip_only, both) > 1e-3 and clip_only.shape == x.shape


def test_bad_reference_inputs_are_named(model):
    x, t, ctx, refs, clip = inputs(2)
    with pytest.raises(ValueError, match="ref_latents hold 2 references but ref_clip holds 1"):
        model(x, t, ctx, refs, clip[:, :1])
    with pytest.raises(ValueError, match=r"ref_clip has shape .*expected \(1, N, T, 128\)"):
        model(x, t, ctx, refs, clip[..., :100])
    no_clip = PhantomMMDiT(replace(CFG, clip_dim=0))
    assert not any(k.startswith("clip_embedder") for k in no_clip.state_dict())
    with pytest.raises(ValueError, match="no CLIP branch"):
        no_clip(x, t, ctx, refs, clip)


def test_one_billion_preset_and_config_inference_from_shapes():
    """Every preset (and a custom variant, and one without a CLIP branch) is recovered from a meta-device state
    dict; the large preset has about 1e9 parameters."""
    for name, cfg in MMDIT_PRESETS.items():
        sd = PhantomMMDiT(cfg, device="meta").state_dict()
        assert infer_mmdit_config(sd) is cfg, name
        validate_mmdit_state_dict(sd, cfg)
    big = PhantomMMDiT(MMDIT_PRESETS["phantom-mmdit-1b"], device="meta")
    assert 0.95e9 < sum(p.numel() for p in big.parameters()) < 1.05e9
    for custom in (replace(CFG, num_layers=3, window=(1, 2, 3), text_len=77, clip_dim=0),
                   replace(CFG, num_heads=4, ffn_dim=96, text_dim=32, patch_size=(1, 1, 1))):
        assert infer_mmdit_config(PhantomMMDiT(custom, device="meta").state_dict()) == custom


def test_config_and_loader_errors_are_clear():
    with pytest.raises(ValueError, match="num_heads"):
        MMDiTConfig(dim=64, num_heads=3, num_layers=1, ffn_dim=8)
    with pytest.raises(ValueError, match="window"):
        MMDiTConfig(dim=64, num_heads=2, num_layers=1, ffn_dim=8, window=(0, 4, 4))
    wan = PhantomWanDiT(DIT_PRESETS["tiny"], device="meta").state_dict()
    with pytest.raises(ValueError, match="Phantom-Wan"):
        infer_mmdit_config(wan)
    sd = random_state_dict(PhantomMMDiT(CFG, device="meta"))
    sd3 = dict(sd, **{"x_embedder.proj.weight": torch.zeros(64, 16, 2, 2)})
    with pytest.raises(ValueError, match="SD3 image MMDiT"):
        infer_mmdit_config(sd3)
    broken = {k: v for k, v in sd.items() if k != "joint_blocks.1.x_block.mlp.fc2.bias"}
    broken["joint_blocks.0.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"1 missing keys: joint_blocks\.1\.x_block\.mlp\.fc2\.bias.*1 unexpected"):
        load_mmdit(broken)
    with pytest.raises(ValueError, match="window_size is missing"):
        load_mmdit({k: v for k, v in sd.items() if k != "window_size"})


def test_comfyui_prefixes_and_bf16_loading():
    sd = random_state_dict(PhantomMMDiT(CFG, device="meta"), seed=2)
    model = load_mmdit({f"model.diffusion_model.{k}": v for k, v in sd.items()}, dtype=torch.bfloat16)
    assert model.compute_dtype == torch.bfloat16 and model.window_size.tolist() == list(CFG.window)
    x, t, ctx, refs, clip = inputs(1)
    reference = load_mmdit(dict(sd))
    with torch.no_grad():
        out = model(x.bfloat16(), t, ctx, refs, clip)
        assert out.dtype == torch.bfloat16
        assert rel_err(out.float(), reference(x, t, ctx, refs, clip)) < 0.05  # bf16 weights and activations


def test_which_clip_features_a_model_reads(model, caplog):
    """``clip_features_for`` (the sampler node's choice): the MMDiT reads them, Phantom-Wan and a VAE-only MMDiT
    ignore them (warned), a CLIP-branch MMDiT given none runs without (warned), a wrong width is refused."""
    clip = inputs(2)[4]
    assert clip_features_for(model, clip) is clip
    with caplog.at_level("WARNING", logger="phantom"):
        assert clip_features_for(PhantomWanDiT(DIT_PRESETS["tiny"], device="meta"), clip) is None
        assert clip_features_for(PhantomMMDiT(replace(CFG, clip_dim=0), device="meta"), clip) is None
        assert clip_features_for(model, None) is None
    assert [r.message.split(":")[0].split(",")[0] for r in caplog.records] == [
        "the reference CLIP features are ignored", "the reference CLIP features are ignored",
        "this MMDiT reads CLIP features of the references"]
    with pytest.raises(ValueError, match="64 wide but this MMDiT reads 128"):
        clip_features_for(model, clip[..., :64])


def test_lora_target_patterns_name_the_blocks_linears():
    """``MMDIT_LORA_TARGETS`` match attention and MLP Linears of both streams in every block, and nothing else."""
    names = {n: m for n, m in PhantomMMDiT(CFG, device="meta").named_modules()}
    matched = {n for n in names if any(re.fullmatch(p, n) for p in MMDIT_LORA_TARGETS)}
    assert all(isinstance(names[n], torch.nn.Linear) for n in matched)
    last = 4 + 1  # the last block: x_block's qkv, proj, fc1, fc2; its pre-only text stream's qkv alone
    assert len(matched) == 8 * (CFG.num_layers - 1) + last
    assert {n.split(".")[2] for n in matched} == {"x_block", "context_block"}
