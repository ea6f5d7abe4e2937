"""PhantomWanDiT: numerical parity with ComfyUI's own Wan2.1 model, and the Phantom-specific behaviour."""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F

from phantom_core.wan.dit import DIT_PRESETS, PhantomWanDiT, WanDiTConfig, sinusoidal_embedding
from phantom_core.wan.rope import apply_rope, rope_axis_pairs, rope_table
from tests.support.weights import random_dit_state_dict

CFG = DIT_PRESETS["tiny"]


@pytest.fixture(scope="module")
def models(comfy_import):
    wan = comfy_import("comfy.ldm.wan.model")
    import comfy.ops

    torch.manual_seed(0)
    ours = PhantomWanDiT(CFG).eval()
    sd = random_dit_state_dict(CFG)
    ours.load_state_dict(sd, strict=True)
    theirs = wan.WanModel(
        model_type="t2v", patch_size=CFG.patch_size, text_len=CFG.text_len, in_dim=CFG.in_dim, dim=CFG.dim,
        ffn_dim=CFG.ffn_dim, freq_dim=CFG.freq_dim, text_dim=CFG.text_dim, out_dim=CFG.out_dim,
        num_heads=CFG.num_heads, num_layers=CFG.num_layers, qk_norm=True, cross_attn_norm=True, eps=CFG.eps,
        operations=comfy.ops.disable_weight_init,
    ).eval()
    theirs.load_state_dict(sd, strict=True)
    return ours, theirs, sd


def inputs(F_: int, H: int, W: int, N: int, L: int = 20, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 16, F_, H, W, generator=g)
    t = torch.tensor([999.0, 250.5])
    ctx = torch.randn(2, L, CFG.text_dim, generator=g)
    refs = torch.randn(2, 16, N, H, W, generator=g) if N else None
    return x, t, ctx, refs


def comfy_forward(theirs, x, t, ctx, refs):
    ctx512 = F.pad(ctx, (0, 0, 0, 512 - ctx.shape[1]))
    return theirs(x, t, ctx512, time_dim_concat=refs, transformer_options={})


def test_same_parameter_names_and_shapes_as_comfyui(models):
    ours, theirs, _ = models
    a = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    b = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert a == b


@pytest.mark.parametrize(
    "F_,H,W,N", [(3, 16, 16, 0), (2, 9, 13, 0), (3, 10, 14, 1), (2, 9, 13, 4), (1, 10, 14, 4)], ids=str
)
@torch.no_grad()
def test_parity_with_comfyui(models, F_, H, W, N):
    ours, theirs, _ = models
    x, t, ctx, refs = inputs(F_, H, W, N)
    a = ours(x, t, ctx, refs)
    b = comfy_forward(theirs, x, t, ctx, refs)
    assert a.shape == b.shape == x.shape
    assert a.dtype == x.dtype
    err, scale = (a - b).abs().max().item(), b.abs().max().item()
    assert scale > 0.1
    assert err <= 1e-4 * scale, f"max abs diff {err:.3g} vs max abs output {scale:.3g}"


@torch.no_grad()
def test_unpadded_context_gives_a_different_output(models):
    """Padding the text to 512 tokens is not cosmetic: the model attends to the padding rows."""
    ours, theirs, _ = models
    x, t, ctx, refs = inputs(2, 10, 14, 1)
    padded = ours(x, t, ctx, refs)
    unpadded = theirs(x, t, ctx, time_dim_concat=refs, transformer_options={})
    rel = (padded - unpadded).abs().max() / padded.abs().max()
    assert rel > 1e-2
    # padding explicitly to 512 ourselves is the same as letting the model do it
    explicit = ours(x, t, F.pad(ctx, (0, 0, 0, 512 - ctx.shape[1])), refs)
    torch.testing.assert_close(explicit, padded, rtol=0, atol=1e-5)


@torch.no_grad()
def test_references_change_the_output(models):
    ours, _, _ = models
    x, t, ctx, refs = inputs(2, 10, 14, 2)
    with_refs = ours(x, t, ctx, refs)
    no_refs = ours(x, t, ctx, None)
    other_refs = ours(x, t, ctx, refs.flip(2))  # same references, other order -> other RoPE time slots
    assert with_refs.shape == no_refs.shape == x.shape
    assert (with_refs - no_refs).abs().max() > 1e-2 * no_refs.abs().max()
    assert (with_refs - other_refs).abs().max() > 1e-3 * no_refs.abs().max()


@torch.no_grad()
def test_deterministic_and_batch_independent(models):
    ours, _, _ = models
    x, t, ctx, refs = inputs(2, 9, 13, 2)
    a, b = ours(x, t, ctx, refs), ours(x, t, ctx, refs)
    assert torch.equal(a, b)
    single = ours(x[1:], t[1:], ctx[1:], refs[1:])
    torch.testing.assert_close(single, a[1:], rtol=0, atol=1e-5 * a.abs().max().item())


@torch.no_grad()
def test_long_context_is_truncated_with_a_warning(models, caplog):
    ours, _, _ = models
    x, t, ctx, refs = inputs(1, 8, 8, 1, L=530)
    with caplog.at_level(logging.WARNING, logger="phantom"):
        long = ours(x, t, ctx, refs)
    assert any("truncating to 512" in r.getMessage() for r in caplog.records)
    torch.testing.assert_close(long, ours(x, t, ctx[:, :512], refs), rtol=0, atol=0)


@torch.no_grad()
def test_bfloat16_input_returns_bfloat16(models):
    ours, _, _ = models
    x, t, ctx, refs = inputs(1, 8, 8, 1)
    out = ours(x.bfloat16(), t, ctx.bfloat16(), refs.bfloat16())
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    ref = ours(x.bfloat16().float(), t, ctx.bfloat16().float(), refs.bfloat16().float())
    assert (out.float() - ref).abs().max() < 2e-2 * ref.abs().max()


@torch.no_grad()
def test_comfy_ops_namespace(models, comfy_import):
    comfy_import("comfy.ops")
    import comfy.ops

    ours, _, sd = models
    alt = PhantomWanDiT(CFG, ops=comfy.ops.manual_cast, device="meta")
    alt.load_state_dict(sd, assign=True)
    x, t, ctx, refs = inputs(1, 10, 14, 1)
    torch.testing.assert_close(alt(x, t, ctx, refs), ours(x, t, ctx, refs), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "bad, word",
    [
        (dict(x=torch.randn(1, 4, 2, 8, 8)), "x has shape"),
        (dict(t=torch.tensor([1.0, 2.0])), "t has shape"),
        (dict(context=torch.randn(1, 5, 32)), "context has shape"),
        (dict(ref_latents=torch.randn(1, 16, 1, 6, 8)), "ref_latents has shape"),
    ],
)
def test_bad_inputs_are_named(models, bad, word):
    ours, _, _ = models
    args = dict(x=torch.randn(1, 16, 2, 8, 8), t=torch.tensor([10.0]), context=torch.randn(1, 5, 64),
                ref_latents=None) | bad
    with pytest.raises(ValueError, match=word):
        ours(**args)


def test_rope_matches_complex_rotation():
    """Independent check: adjacent pairs as complex numbers, 22/21/21 pairs for time/height/width."""
    assert rope_axis_pairs(128) == (22, 21, 21)
    grid, d = (3, 2, 5), 128
    cos, sin = rope_table(grid, d)
    assert cos.shape == (30, 1, 64) and cos.dtype == torch.float32
    pos = torch.stack(torch.meshgrid(*[torch.arange(n) for n in grid], indexing="ij"), -1).reshape(-1, 3)
    axis_dims = (44, 42, 42)
    angles = torch.cat(
        [pos[:, i : i + 1].double() / 10000.0 ** (torch.arange(0, a, 2).double() / a)
         for i, a in enumerate(axis_dims)], dim=1,
    )  # (L, 64)
    x = torch.randn(2, 30, 3, d)
    rotation = torch.polar(torch.ones_like(angles), angles)[:, None]  # (L, 1, 64) complex
    expected = torch.view_as_real(torch.view_as_complex(x.double().reshape(2, 30, 3, 64, 2)) * rotation)
    expected = expected.reshape(2, 30, 3, d)
    torch.testing.assert_close(apply_rope(x, cos, sin).double(), expected, rtol=0, atol=1e-5)


def test_sinusoidal_embedding_is_cos_first():
    t = torch.tensor([0.0, 500.0])
    e = sinusoidal_embedding(t, 256)
    assert e.shape == (2, 256) and e.dtype == torch.float32
    assert torch.equal(e[0, :128], torch.ones(128)) and torch.equal(e[0, 128:], torch.zeros(128))
    assert math.isclose(e[1, 0].item(), math.cos(500.0), abs_tol=1e-6)
    assert math.isclose(e[1, 128 + 1].item(), math.sin(500.0 * 10000 ** (-1 / 128)), abs_tol=1e-6)


@torch.no_grad()
def test_scalar_timestep_and_zero_references(models):
    ours, _, _ = models
    x, t, ctx, _ = inputs(1, 8, 8, 0)
    same_t = torch.full((2,), 300.0)
    expected = ours(x, same_t, ctx, None)
    assert torch.equal(ours(x, torch.tensor(300.0), ctx, torch.zeros(2, 16, 0, 8, 8)), expected)


def test_inference_in_place_ops_leave_inputs_and_equal_autograd_path():
    """Without autograd the block adds its residuals and the FFN's GELU in place: the caller's tokens are unchanged
    and the output equals the autograd path's (the same operations, fp32, 1e-6)."""
    cfg = WanDiTConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=1, text_dim=64)
    torch.manual_seed(0)
    block = PhantomWanDiT(cfg).blocks[0]
    x, ctx, e0 = torch.randn(2, 12, 256), torch.randn(2, 7, 256), torch.randn(2, 6, 256)
    cos, sin = rope_table((3, 2, 2), cfg.head_dim)
    kept = x.clone()
    with torch.no_grad():
        fast = block(x, e0, cos, sin, ctx)
    assert torch.equal(x, kept)
    torch.testing.assert_close(fast, block(x, e0, cos, sin, ctx).detach(), rtol=0, atol=1e-6)
    h = torch.randn(4, 512)
    with torch.no_grad():
        torch.testing.assert_close(block.ffn[1](h.clone()), F.gelu(h, approximate="tanh"))


def test_padding_rows_embedded_once_equal_embedding_all_rows():
    """``_embed_text`` embeds the real rows and one zero row, repeated to ``text_len``: equal (fp32, 1e-6) to
    embedding the whole zero-padded context, as upstream does."""
    cfg = WanDiTConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=1, text_dim=64)
    torch.manual_seed(0)
    model = PhantomWanDiT(cfg)
    for real in (5, cfg.text_len - 1, cfg.text_len):
        ctx = torch.randn(2, real, 64)
        with torch.no_grad():
            ours = model._embed_text(ctx)
            upstream = model.text_embedding(F.pad(ctx, (0, 0, 0, cfg.text_len - real)))
        assert ours.shape == (2, cfg.text_len, 256)
        torch.testing.assert_close(ours, upstream, rtol=0, atol=1e-6)
