"""The text context's reuse across the steps of one sampling run (``wan.context_reuse``): the video equals the
plain path's, the embedding and each block's keys / values are computed once per distinct context, nothing is
reused while autograd records or after the run. Tiny config, 16x16 latents, CPU."""

from __future__ import annotations

import pytest
import torch

from phantom_core.sampling.loop import sample_phantom
from phantom_core.wan.context_reuse import reuse_text_context
from phantom_core.wan.dit import WanDiTConfig
from phantom_core.wan.load import load_dit
from tests.support.weights import random_dit_state_dict

CFG = WanDiTConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=2, text_dim=64)


@pytest.fixture(scope="module")
def dit():
    return load_dit(random_dit_state_dict(CFG, seed=3), dtype=torch.float32)


def run_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(1, 16, 2, 16, 16, generator=g)
    refs = torch.randn(1, 16, 2, 16, 16, generator=g)
    return noise, refs, torch.randn(1, 9, CFG.text_dim, generator=g), torch.randn(1, 5, CFG.text_dim, generator=g)


class Counter:
    """Counts forward calls of a module (a forward hook)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = 0
        module.register_forward_hook(lambda *_: setattr(self, "calls", self.calls + 1))


def plain(dit, *args, **kw):
    """The loop without reuse (the plain path), the loop's scope replaced by a no-op."""
    import contextlib

    import phantom_core.sampling.loop as loop

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop, "reuse_text_context", lambda model: contextlib.nullcontext())
        return sample_phantom(dit, *args, **kw)


@pytest.mark.parametrize("window", [(0.0, 1.0), (0.0, 0.5)])
def test_video_equals_plain_path_and_context_work_runs_once(dit, window):
    noise, refs, ctx, ctx_neg = run_inputs()
    kw = dict(steps=4, solver="unipc", w_img=3.0, w_text=5.0, image_guidance_window=window)
    embed, keys = Counter(dit.text_embedding[0]), Counter(dit.blocks[1].cross_attn.k)
    reference = plain(dit, noise, refs, ctx, ctx_neg, **kw)
    assert embed.calls == 4 and keys.calls == 4  # one batched call per step
    embed.calls = keys.calls = 0
    reused = sample_phantom(dit, noise, refs, ctx, ctx_neg, **kw)
    distinct = 1 if window == (0.0, 1.0) else 2  # three passes, then two outside the image-guidance window
    assert embed.calls == distinct and keys.calls == distinct
    err = (reused - reference).abs().max().item()
    assert err <= 1e-5 * reference.abs().max().item(), err  # the same operations on the same inputs
    assert dit.text_memo is None and dit.blocks[0].cross_attn.kv_memo is None  # nothing survives the run


def test_unbatched_passes_reuse_each_context(dit):
    noise, refs, ctx, ctx_neg = run_inputs(1)
    kw = dict(steps=3, solver="euler", w_img=3.0, w_text=5.0, batch_passes=False)
    embed = Counter(dit.text_embedding[0])
    reference = plain(dit, noise, refs, ctx, ctx_neg, **kw)
    assert embed.calls == 9
    embed.calls = 0
    reused = sample_phantom(dit, noise, refs, ctx, ctx_neg, **kw)
    assert embed.calls == 2  # the prompt, and the negative prompt shared by v_img and v_neg
    assert (reused - reference).abs().max().item() <= 1e-5 * reference.abs().max().item()


def test_a_new_context_is_not_served_from_the_memo(dit):
    noise, refs, ctx, ctx_neg = run_inputs(2)
    t = torch.tensor([500.0])
    with torch.no_grad(), reuse_text_context(dit):
        first = dit(noise, t, ctx, refs)
        other = dit(noise, t, ctx + 0.5, refs)
        again = dit(noise, t, ctx.clone(), refs)  # equal values in a new tensor: reused
        assert dit.text_memo.hits == 1
    with torch.no_grad():  # the plain path attends to every padding row, the scope to folded ones: fp32 rounding
        plain_other = dit(noise, t, ctx + 0.5, refs)
    assert (other - plain_other).abs().max().item() <= 1e-5 * plain_other.abs().max().item()
    assert not torch.allclose(first, other, atol=1e-4)
    assert torch.allclose(again, first, rtol=0, atol=1e-6)


def test_autograd_bypasses_the_memo(dit):
    noise, refs, ctx, _ = run_inputs(3)
    embed = Counter(dit.text_embedding[0])
    ctx.requires_grad_(True)
    with reuse_text_context(dit):
        for _ in range(2):
            dit(noise, torch.tensor([500.0]), ctx, refs).sum().backward()
        assert not dit.text_memo.entries
    assert embed.calls == 2 and ctx.grad is not None and dit.text_memo is None


def test_other_models_run_unchanged():
    calls = []
    with reuse_text_context(lambda *a: calls.append(a)) as scope:
        assert scope is None


def test_folded_padding_rows_attend_like_the_full_ones():
    """``fold_repeated_rows`` plus the log-weight mask equals attention over every padding row (fp32, 1e-5)."""
    import torch.nn.functional as F

    from phantom_core.wan.context_reuse import fold_repeated_rows

    g = torch.Generator().manual_seed(0)
    ctx = torch.randn(3, 64, 32, generator=g)
    for b, real in enumerate((9, 20, 5)):  # each item's padding rows repeat one row, as the embedded zero-padding does
        ctx[b, real:] = ctx[b, -1]
    keep, log_weight = fold_repeated_rows(ctx)
    assert keep == 21 and log_weight.shape == (3, 21)  # the longest item's 20 rows + 1 tail row
    assert log_weight[0, 8].item() == 0.0 and abs(log_weight[1, 20].item() - torch.tensor(44.0).log().item()) < 1e-6
    wk, wv = torch.randn(2, 32, 32, generator=g)  # a row-wise key and value projection, 2 heads of 16
    q = torch.randn(3, 2, 40, 16, generator=g)  # (B, H, Lq, d)
    kv = (lambda c, w: (c @ w).unflatten(-1, (2, 16)).transpose(1, 2))  # (B, L, 32) -> (B, H, L, 16)
    full = F.scaled_dot_product_attention(q, kv(ctx, wk), kv(ctx, wv))
    part = ctx[:, :keep]
    folded = F.scaled_dot_product_attention(q, kv(part, wk), kv(part, wv), attn_mask=log_weight[:, None, None])
    torch.testing.assert_close(folded, full, rtol=1e-5, atol=1e-5)
    ctx[1] = torch.randn(64, 32, generator=g)  # an item without repeated rows: nothing to fold
    assert fold_repeated_rows(ctx) is None


def test_padding_is_folded_only_for_fp32_sdpa(dit):
    from phantom_core.wan.attention import use_attention

    noise, refs, ctx, _ = run_inputs(4)
    attn = dit.blocks[0].cross_attn
    for choice, folded in (("sdpa", True), ("math", False)):
        with torch.no_grad(), use_attention(choice), reuse_text_context(dit):
            dit(noise, torch.tensor([500.0]), ctx, refs)
            k, _, log_weight = attn.kv_memo.entries[0][1]
            assert (log_weight is not None) == folded
            assert k.shape[1] == (ctx.shape[1] + 1 if folded else CFG.text_len)
