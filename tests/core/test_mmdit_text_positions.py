"""The MMDiT's learned text positions (``MMDiTConfig.text_positions``): without them the text stream is a set (its
tokens are not rotated), so the velocity cannot depend on the order of the prompt's tokens or of the references'
CLIP tokens; with them it can. ``with_text_positions`` adds them as a scaled sin-cos table (at scale 0: the same
velocity), checkpoints carry them, and a reference beyond the index table is refused."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from phantom_core.mmdit.config import MAX_CLIP_REFERENCES, MMDIT_PRESETS, TEXT_POSITION_SCALE
from phantom_core.mmdit.load import infer_mmdit_config, load_mmdit
from phantom_core.mmdit.positions import frame_table
from phantom_core.world.mmdit_default import with_reference_index, with_text_positions
from tests.support.weights import trained_like_mmdit

CFG = replace(MMDIT_PRESETS["world"], num_layers=2)


def _inputs(refs: int = 2):
    g = torch.Generator().manual_seed(5)
    return (torch.randn(1, 16, 3, 16, 16, generator=g), torch.tensor([700.0]),
            torch.randn(1, 6, CFG.text_dim, generator=g), torch.randn(1, 16, refs, 16, 16, generator=g),
            torch.randn(1, refs, 3, CFG.clip_dim, generator=g))


@torch.no_grad()
def test_only_text_positions_make_the_velocity_depend_on_token_and_reference_order():
    """Reversing the prompt's tokens, or the order of the CLIP features alone (the VAE references kept), leaves the
    velocity of a model without positions the same (1e-5: a set), and changes that of one with them (> 1e-3)."""
    x, t, context, refs, clip = _inputs()
    plain, placed = trained_like_mmdit(CFG), trained_like_mmdit(replace(CFG, text_positions=True))
    for model, changes in ((plain, False), (placed, True)):
        base = model(x, t, context, refs, ref_clip=clip)
        for other in (model(x, t, context.flip(1), refs, ref_clip=clip), model(x, t, context, refs,
                                                                                ref_clip=clip.flip(1))):
            gap = float((base - other).abs().max())
            assert (gap > 1e-3) if changes else (gap < 1e-5), gap


def test_with_text_positions_starts_from_the_scaled_table_learns_and_round_trips():
    x, t, context, refs, clip = _inputs()
    model = trained_like_mmdit(CFG)
    silent, placed = with_text_positions(model, scale=0.0), with_text_positions(model)
    assert placed.config == replace(CFG, text_positions=True)
    table = frame_table(CFG.text_len + MAX_CLIP_REFERENCES, CFG.dim) * TEXT_POSITION_SCALE
    torch.testing.assert_close(placed.text_pos_embed.detach(), table[: CFG.text_len], rtol=0, atol=0)
    torch.testing.assert_close(placed.clip_index_embed.detach(), table[CFG.text_len:], rtol=0, atol=0)
    with torch.no_grad():
        want = model(x, t, context, refs, ref_clip=clip)
        got, moved = silent(x, t, context, refs, ref_clip=clip), placed(x, t, context, refs, ref_clip=clip)
    assert float(want.abs().mean()) > 1e-2
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)  # scale 0: the same velocity
    assert float((moved - want).abs().max()) > 1e-3  # the default scale: the blocks notice the positions
    placed.train()
    placed(x, t, context, refs, ref_clip=clip).square().mean().backward()
    assert float(placed.text_pos_embed.grad.abs().sum()) > 0 and float(placed.clip_index_embed.grad.abs().sum()) > 0
    with pytest.raises(ValueError, match=r"already has text positions \(text_positions\)"):
        with_text_positions(placed)
    with pytest.raises(ValueError, match="text positions are an MMDiT's"):
        with_text_positions(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="this MMDiT has no text positions"):
        model.set_text_positions(0.1)
    # the stored keys say it: inferred, loaded with the same weights
    sd = {k: v.clone() for k, v in placed.state_dict().items()}
    sd["text_pos_embed"].normal_()
    assert infer_mmdit_config(sd) == replace(CFG, text_positions=True)
    assert not infer_mmdit_config(model.state_dict()).text_positions
    loaded = load_mmdit(sd)
    torch.testing.assert_close(loaded.text_pos_embed, sd["text_pos_embed"], rtol=0, atol=0)


@torch.no_grad()
def test_a_reference_beyond_the_index_table_is_refused():
    x, t, context, refs, clip = _inputs(refs=MAX_CLIP_REFERENCES + 1)
    with pytest.raises(ValueError, match=f"ref_clip holds {MAX_CLIP_REFERENCES + 1} references; this MMDiT's "
                                         "reference index embedding"):
        trained_like_mmdit(replace(CFG, text_positions=True))(x, t, context, refs, ref_clip=clip)
    assert trained_like_mmdit(CFG)(x, t, context, refs, ref_clip=clip).shape == x.shape  # no table, no limit here


def test_reference_index_is_per_reference_batched_learned_and_inferred():
    """``MMDiTConfig.reference_index``: ``with_reference_index`` starts each VAE reference's index as the CLIP
    reference index of the same k (so one vector names reference k in both streams); a batch of two gives what each
    sample gives alone (1e-5: the rows follow the ``(b n)`` order); it learns, is inferred from its key, and more
    reference latents than its table are refused."""
    x, t, context, refs, clip = _inputs()
    placed = with_text_positions(trained_like_mmdit(CFG))
    with torch.no_grad():
        placed.clip_index_embed.normal_()
    indexed = with_reference_index(placed)
    assert indexed.config == replace(CFG, text_positions=True, reference_index=True)
    torch.testing.assert_close(indexed.ref_index_embed.detach(), placed.clip_index_embed.detach(), rtol=0, atol=0)
    with torch.no_grad():
        want = placed(x, t, context, refs, ref_clip=clip)
        got = indexed(x, t, context, refs, ref_clip=clip)
        assert float((got - want).abs().max()) > 1e-3  # the index reaches the velocity
        pair = indexed(torch.cat([x, x.flip(3)]), t.expand(2), torch.cat([context, context.flip(1)]),
                       torch.cat([refs, refs.flip(2)]), ref_clip=torch.cat([clip, clip.flip(1)]))
        alone = indexed(x.flip(3), t, context.flip(1), refs.flip(2), ref_clip=clip.flip(1))
    torch.testing.assert_close(pair, torch.cat([got, alone]), rtol=1e-5, atol=1e-5)
    indexed.train()
    indexed(x, t, context, refs, ref_clip=clip).square().mean().backward()
    assert float(indexed.ref_index_embed.grad.abs().sum()) > 0
    sd = indexed.state_dict()
    assert infer_mmdit_config(sd).reference_index and not infer_mmdit_config(placed.state_dict()).reference_index
    with pytest.raises(ValueError, match=r"already has a reference index \(reference_index\)"):
        with_reference_index(indexed)
    # no CLIP index: the table x scale
    vae_only = with_reference_index(trained_like_mmdit(replace(CFG, clip_dim=0)), scale=0.0)
    assert float(vae_only.ref_index_embed.detach().abs().max()) == 0.0
    x, t, context, refs, _ = _inputs(refs=MAX_CLIP_REFERENCES + 1)
    with torch.no_grad(), pytest.raises(ValueError, match=f"ref_latents hold {MAX_CLIP_REFERENCES + 1} references; "
                                                          "this MMDiT's reference index embedding"):
        vae_only(x, t, context, refs)
