"""The MMDiT's reference key mask (``MMDiTConfig.reference_key_mask``): each reference's background tokens (the white
letterbox) are no key for any query. Oracles: the detector against references built with a known subject region,
the masked window attention against a per-window loop that drops the masked keys by indexing, and the model against
itself (a masked token's content cannot reach the video; an all-zero reference is no reference)."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from phantom_core.mmdit.config import MMDIT_PRESETS
from phantom_core.mmdit.load import infer_mmdit_config, load_mmdit
from phantom_core.mmdit.windows import axis_segments, reference_key_keep, window_joint_attention, window_plan
from phantom_core.world.mmdit_default import with_reference_key_mask
from tests.support.weights import trained_like_mmdit

CFG = replace(MMDIT_PRESETS["tiny"], reference_key_mask=0.25)


def _references(seed: int = 0) -> tuple[Tensor, list[Tensor]]:
    """``(2, 16, 2, 16, 16)`` reference latents: a constant background (another per reference) with a random
    subject of a few 2 x 2 patches at a known place, and the ``(N * 8 * 8,)`` bool truth of each batch row."""
    g = torch.Generator().manual_seed(seed)
    refs = torch.randn(2, 16, 2, 1, 1, generator=g).expand(2, 16, 2, 16, 16).clone()
    truth = []
    for b, boxes in enumerate((((2, 6, 4, 8), (10, 14, 0, 4)), ((0, 4, 12, 16), (6, 12, 6, 12)))):
        keep = torch.zeros(2, 8, 8, dtype=torch.bool)
        for n, (y0, y1, x0, x1) in enumerate(boxes):
            refs[b, :, n, y0:y1, x0:x1] += 3.0 + torch.randn(16, y1 - y0, x1 - x0, generator=g)
            keep[n, y0 // 2: y1 // 2, x0 // 2: x1 // 2] = True
        truth.append(keep.reshape(-1))
    return refs, truth


def test_the_detector_keeps_the_subject_tokens_and_drops_the_background_and_zero_references():
    refs, truth = _references()
    keep = reference_key_keep(refs, (1, 2, 2), 0.25)
    assert keep.shape == (2, 2 * 64) and keep.dtype == torch.bool
    for b in range(2):
        assert torch.equal(keep[b], truth[b])
    refs[1, :, 1] = 0.0  # a dropped reference: no key at all
    assert not reference_key_keep(refs, (1, 2, 2), 0.25)[1, 64:].any()
    assert torch.equal(reference_key_keep(refs, (1, 2, 2), 0.0)[0], truth[0])  # 0: all but the exact background


def test_the_detector_pads_an_odd_latent_to_the_patch_as_the_tokens_are():
    refs, _ = _references()
    assert reference_key_keep(refs[..., :15, :13], (1, 2, 2), 0.25).shape == (2, 2 * 8 * 7)


def _qkv(n: int, seed: int) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, n, 2, 8, generator=g) for _ in range(3)]


def test_masked_window_attention_equals_a_loop_that_leaves_the_masked_keys_out():
    """Each window by hand, the masked injected tokens removed from the keys and values by indexing (<= 1e-5 rel);
    the masked tokens' own outputs (they still query) are averaged as the others."""
    grid, window, n_inj = (2, 4, 6), (2, 2, 4), 9
    nv = 48
    q, k, v = _qkv(nv + n_inj, seed=3)
    keep = torch.rand(2, n_inj, generator=torch.Generator().manual_seed(4)) > 0.5
    keep[:, 0] = False
    for shifted in (False, True):
        plan = replace(window_plan(grid, window, shifted), key_keep=keep)
        got = window_joint_attention(q, k, v, plan)
        for b in range(2):
            kept = nv + keep[b].nonzero().flatten()
            video, inj_sum, count = torch.zeros(nv, 16), torch.zeros(n_inj, 16), 0
            for (t0, t1), (y0, y1), (x0, x1) in itertools.product(
                    *(axis_segments(n, s, shifted) for n, s in zip(grid, window))):
                idx = torch.tensor([(t * 4 + y) * 6 + x for t in range(t0, t1) for y in range(y0, y1)
                                    for x in range(x0, x1)])
                rows = torch.cat([idx, torch.arange(nv, nv + n_inj)])
                keys = torch.cat([idx, kept])
                out = F.scaled_dot_product_attention(q[b, rows].transpose(0, 1), k[b, keys].transpose(0, 1),
                                                     v[b, keys].transpose(0, 1)).transpose(0, 1).flatten(1)
                video[idx], inj_sum, count = out[: len(idx)], inj_sum + out[len(idx):], count + 1
            want = torch.cat([video, inj_sum / count])
            assert ((got[b] - want).abs().max() / want.abs().max()).item() < 1e-5
        assert (got - window_joint_attention(q, k, v, window_plan(grid, window, shifted))).abs().max() > 1e-3


def _inputs() -> tuple[Tensor, ...]:
    g = torch.Generator().manual_seed(7)
    return (torch.randn(2, 16, 3, 16, 16, generator=g), torch.tensor([700.0, 300.0]),
            torch.randn(2, 6, CFG.text_dim, generator=g))


@torch.no_grad()
def test_a_masked_background_token_cannot_reach_the_video_but_an_unmasked_one_can():
    """Changing one background patch of a reference (it stays background: the median and the mask are unchanged)
    changes the video's velocity by <= 1e-6 rel with the mask (float rounding), by > 1e-4 without it; the same
    change on a subject patch reaches the video with the mask (> 5e-5 rel)."""
    masked = trained_like_mmdit(CFG)
    plain = trained_like_mmdit(replace(CFG, reference_key_mask=0.0))
    x, t, ctx = _inputs()
    refs, _ = _references()
    moved = refs.clone()
    moved[:, :, 0, 14:16, 14:16] += 0.5  # background in both batch rows (see _references)
    assert torch.equal(reference_key_keep(moved, (1, 2, 2), 0.25), reference_key_keep(refs, (1, 2, 2), 0.25))
    base = masked(x, t, ctx, refs)
    assert ((masked(x, t, ctx, moved) - base).abs().max() / base.abs().max()).item() < 1e-6
    base = plain(x, t, ctx, refs)
    assert ((plain(x, t, ctx, moved) - base).abs().max() / base.abs().max()).item() > 1e-4
    subject = refs.clone()
    subject[:, :, 0, 4:6, 4:6] += 0.5  # a subject patch of batch row 0 stays a key: it reaches the video
    assert ((masked(x, t, ctx, subject) - masked(x, t, ctx, refs))[0].abs().max() / base.abs().max()).item() > 5e-5


@torch.no_grad()
def test_with_the_mask_an_all_zero_reference_is_no_reference():
    """Zero references (the dropout's and the v_neg pass's) leave only their own queries: the video's velocity equals
    the call without references (<= 1e-5 rel); without the mask the zero tokens are keys and it differs."""
    x, t, ctx = _inputs()
    zeros = torch.zeros(2, 16, 2, 16, 16)
    for config, close in ((CFG, True), (replace(CFG, reference_key_mask=0.0), False)):
        model = trained_like_mmdit(config)
        none, zero = model(x, t, ctx), model(x, t, ctx, zeros)
        assert (((zero - none).abs().max() / none.abs().max()).item() < 1e-5) == close


def test_the_mask_round_trips_through_a_checkpoint_and_the_config_refuses_bad_values():
    model = trained_like_mmdit(CFG)
    sd = model.state_dict()
    assert float(sd["reference_key_mask"]) == 0.25
    assert infer_mmdit_config(sd).reference_key_mask == 0.25
    assert infer_mmdit_config({k: v for k, v in sd.items() if k != "reference_key_mask"}).reference_key_mask == 0.0
    loaded = load_mmdit(sd)
    x, t, ctx = _inputs()
    refs, _ = _references()
    with torch.no_grad():
        assert (loaded(x, t, ctx, refs) - model(x, t, ctx, refs)).abs().max() < 1e-6
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="reference_key_mask"):
            replace(CFG, reference_key_mask=bad)


@torch.no_grad()
def test_with_reference_key_mask_keeps_the_weights_and_changes_the_velocity_only_with_references():
    plain = trained_like_mmdit(replace(CFG, reference_key_mask=0.0))
    masked = with_reference_key_mask(plain, 0.25).eval()
    assert masked.config.reference_key_mask == 0.25
    x, t, ctx = _inputs()
    assert (masked(x, t, ctx) - plain(x, t, ctx)).abs().max() < 1e-6
    refs, _ = _references()
    assert (masked(x, t, ctx, refs) - plain(x, t, ctx, refs)).abs().max() > 1e-4
    for bad_model, bad_t, match in ((masked, 0.25, "already"), (plain, 1.0, "threshold"), (torch.nn.Linear(2, 2),
                                                                                           0.25, "PhantomMMDiT")):
        with pytest.raises(ValueError, match=match):
            with_reference_key_mask(bad_model, bad_t)
