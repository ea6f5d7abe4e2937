"""The MMDiT's absolute position table (SD3's fixed 2-D sin-cos ``pos_embed``, centre-cropped): its formula, its
crop, that the model adds it to the video and reference tokens, and that checkpoints carry it."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from phantom_core.mmdit.config import MMDIT_PRESETS, MMDiTConfig
from phantom_core.mmdit.load import infer_mmdit_config, load_mmdit
from phantom_core.mmdit.model import PhantomMMDiT
from phantom_core.mmdit.positions import cropped_table, frame_table, sincos_table
from tests.support.weights import random_state_dict

CFG = replace(MMDIT_PRESETS["tiny"], pos_embed_max=12)


def test_table_follows_the_sincos_formula():
    """Row y and column x of cell (y, x): [sin(y w), cos(y w), sin(x w), cos(x w)], w_i = 10000^(-i / (D / 4))."""
    dim, size = 16, 5
    table = sincos_table(size, dim)
    assert table.shape == (size * size, dim) and table.dtype == torch.float32
    for y, x in ((0, 0), (3, 1), (4, 4)):
        cell = table[y * size + x]
        for i in range(dim // 4):
            w = 10000.0 ** (-i / (dim / 4))
            expected = (math.sin(y * w), math.cos(y * w), math.sin(x * w), math.cos(x * w))
            got = (cell[i], cell[dim // 4 + i], cell[dim // 2 + i], cell[3 * dim // 4 + i])
            assert all(abs(float(g) - e) < 1e-6 for g, e in zip(got, expected))
    with pytest.raises(ValueError, match="multiple of 4"):
        sincos_table(4, 18)
    frames = frame_table(3, 8)
    assert frames.shape == (3, 8)
    for f in range(3):
        for i in range(4):
            w = 10000.0 ** (-i / 4)
            assert abs(float(frames[f, i]) - math.sin(f * w)) < 1e-6
            assert abs(float(frames[f, 4 + i]) - math.cos(f * w)) < 1e-6
    with pytest.raises(ValueError, match="positive even"):
        frame_table(2, 7)


def test_crop_is_the_centre_and_too_large_a_grid_is_named():
    size, dim = 12, 8
    table = sincos_table(size, dim)
    crop = cropped_table(table, size, 4, 6)  # top (12 - 4) // 2 = 4, left (12 - 6) // 2 = 3
    grid = table.reshape(size, size, dim)
    assert torch.equal(crop.reshape(4, 6, dim), grid[4:8, 3:9])
    assert torch.equal(cropped_table(table, size, size, size), table)
    with pytest.raises(ValueError, match=r"13 x 4.*12 x 12 tokens, MMDiTConfig\.pos_embed_max"):
        cropped_table(table, size, 13, 4)
    with pytest.raises(ValueError, match="pos_embed_max is -1"):
        replace(CFG, pos_embed_max=-1)


@torch.no_grad()
def test_model_adds_the_table_to_video_and_reference_tokens():
    """The tables change the output; a video token gets its cell of the spatial table plus its frame's embedding, a
    reference token its cell only; a frame's tokens differ from the frame before by the frame embedding alone."""
    model = PhantomMMDiT(CFG).eval()
    weights = random_state_dict(model, seed=3)
    weights["pos_embed"] = model.pos_embed.clone()  # the fixed sin-cos table, not a random one
    model.load_state_dict(weights)
    plain = PhantomMMDiT(replace(CFG, pos_embed_max=0)).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if k != "pos_embed"})
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 16, 3, 16, 16, generator=g), torch.randn(1, 5, CFG.text_dim, generator=g)
    refs, clip = torch.randn(1, 16, 2, 16, 16, generator=g), torch.randn(1, 2, 3, CFG.clip_dim, generator=g)
    t = torch.tensor([400.0])
    with_table = model(x, t, ctx, refs, clip)
    without = plain(x, t, ctx, refs, clip)
    assert (with_table - without).abs().max() > 1e-3
    tokens, grid = model._patchify(x)
    bare, _ = plain._patchify(x)
    cell = cropped_table(model.pos_embed[0], CFG.pos_embed_max, grid[1], grid[2])  # (h * w, D)
    expected = (cell[None] + frame_table(grid[0], CFG.dim)[:, None]).flatten(0, 1)
    assert torch.allclose(tokens - bare, expected[None], atol=1e-6)
    ref_tokens, _ = model._patchify(refs[:, :, :1], frames=False)
    ref_bare, _ = plain._patchify(refs[:, :, :1], frames=False)
    assert torch.allclose(ref_tokens - ref_bare, cell[None], atol=1e-6)
    with pytest.raises(ValueError, match="pos_embed_max"):
        model(torch.randn(1, 16, 1, 32, 16), t, ctx)  # 16 x 8 tokens: larger than the 12 x 12 table


def test_checkpoints_carry_the_table_and_its_size_is_inferred():
    sd = PhantomMMDiT(CFG).state_dict()
    assert sd["pos_embed"].shape == (1, 144, CFG.dim)
    assert infer_mmdit_config(sd) == CFG
    loaded = load_mmdit(random_state_dict(PhantomMMDiT(CFG, device="meta"), seed=1) | {"pos_embed": sd["pos_embed"]})
    assert loaded.config.pos_embed_max == 12 and torch.equal(loaded.pos_embed, sd["pos_embed"])
    with pytest.raises(ValueError, match=r"pos_embed is \(1, 143, 64\)"):
        infer_mmdit_config(dict(sd, pos_embed=torch.zeros(1, 143, 64)))
    fresh = PhantomMMDiT(CFG, device="meta").to_empty(device="cpu")
    fresh.init_weights()
    assert torch.equal(fresh.pos_embed, sd["pos_embed"])
    with pytest.raises(ValueError, match="divisible by 4"):
        MMDiTConfig(dim=66, num_heads=1, num_layers=1, ffn_dim=8, pos_embed_max=4)
