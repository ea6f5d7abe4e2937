"""Window attention with dynamic injection (``phantom_core.mmdit.windows``), against independent references.

Oracles: plain ``scaled_dot_product_attention`` over the whole joint sequence (one window covering the grid), and
a per-window loop written here from the docstring (each window on its own, the injected outputs averaged).
"""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from phantom_core.mmdit import blocks
from phantom_core.mmdit.config import MMDIT_PRESETS
from phantom_core.mmdit.model import PhantomMMDiT
from phantom_core.mmdit.windows import axis_segments, window_joint_attention, window_plan
from tests.support.weights import random_state_dict

H, D = 2, 8  # heads, channels per head


def qkv(n_video: int, n_injected: int, seed: int = 0) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, n_video + n_injected, H, D, generator=g) for _ in range(3)]


def sdpa(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """``(B, L, H, d)`` -> ``(B, L, H * d)``: the reference full attention."""
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)) \
        .transpose(1, 2).flatten(2)


def rel_err(a: Tensor, b: Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize(("n", "size"), [(7, 3), (8, 4), (9, 9), (5, 9), (1, 4), (10, 1)])
@pytest.mark.parametrize("shifted", [False, True])
def test_axis_segments_cover_the_axis_once(n, size, shifted):
    segments = axis_segments(n, size, shifted)
    assert segments[0][0] == 0 and segments[-1][1] == n
    assert all(a < b for a, b in segments) and all(s[1] == t[0] for s, t in zip(segments, segments[1:]))
    assert max(b - a for a, b in segments) <= size
    if size >= n:
        assert segments == [(0, n)]  # one window covers the axis: never shifted
    elif shifted and size > 1:
        assert segments[0] == (0, size // 2)  # half a window first, so the cuts fall between the unshifted ones
        unshifted = {b for _, b in axis_segments(n, size, False)}
        assert not ({b for _, b in segments[:-1]} & unshifted)


@pytest.mark.parametrize("grid", [(2, 8, 8), (3, 5, 7), (1, 4, 4)], ids=str)
@pytest.mark.parametrize("shifted", [False, True])
def test_plan_puts_every_video_token_in_exactly_one_window(grid, shifted):
    plan = window_plan(grid, (2, 4, 4), shifted)
    flat = torch.cat([g.reshape(-1) for g in plan.groups])
    assert torch.equal(flat.sort().values, torch.arange(grid[0] * grid[1] * grid[2]))
    assert plan.count == sum(g.shape[0] for g in plan.groups) and plan.n_video == flat.numel()
    for g in plan.groups:  # each window is a 3-D box of the grid
        t, y, x = (g // (grid[1] * grid[2]), (g // grid[2]) % grid[1], g % grid[2])
        volume = [(a.max(1).values - a.min(1).values + 1) for a in (t, y, x)]
        assert torch.equal(volume[0] * volume[1] * volume[2], torch.full((g.shape[0],), g.shape[1]))


@pytest.mark.parametrize("n_injected", [0, 5, 40])
def test_one_window_covering_the_grid_is_full_joint_attention(n_injected):
    """Shifted or not, a window at least as large as the grid: equal to full attention (<= 1e-5 rel)."""
    grid = (2, 4, 6)
    q, k, v = qkv(48, n_injected)
    for shifted in (False, True):
        plan = window_plan(grid, (2, 9, 9), shifted)
        assert plan.count == 1
        assert rel_err(window_joint_attention(q, k, v, plan), sdpa(q, k, v)) < 1e-5


def test_windows_and_injected_mean_match_a_per_window_loop():
    """The docstring's definition computed window by window (<= 1e-5 rel): video outputs from their own window,
    injected outputs the unweighted mean over windows of different sizes."""
    grid, window = (3, 5, 6), (2, 4, 4)
    n_video, n_injected = 90, 7
    q, k, v = qkv(n_video, n_injected, seed=1)
    for shifted in (False, True):
        plan = window_plan(grid, window, shifted)
        sizes = {g.shape[1] for g in plan.groups}
        assert len(sizes) > 1  # windows of several sizes: an unweighted mean differs from a token-weighted one
        video, injected_sum = torch.zeros(2, n_video, H * D), torch.zeros(2, n_injected, H * D)
        boxes = itertools.product(*(axis_segments(n, s, shifted) for n, s in zip(grid, window)))
        count = 0
        for (t0, t1), (y0, y1), (x0, x1) in boxes:
            idx = torch.tensor([(t * grid[1] + y) * grid[2] + x for t in range(t0, t1) for y in range(y0, y1)
                                for x in range(x0, x1)])
            sel = torch.cat([idx, torch.arange(n_video, n_video + n_injected)])
            out = sdpa(q[:, sel], k[:, sel], v[:, sel])
            video[:, idx] = out[:, : len(idx)]
            injected_sum += out[:, len(idx):]
            count += 1
        expected = torch.cat([video, injected_sum / count], dim=1)
        assert plan.count == count
        assert rel_err(window_joint_attention(q, k, v, plan), expected) < 1e-5


def test_video_tokens_only_see_their_own_window_and_the_injected_tokens():
    """Changing the tokens of one window changes no other window's video outputs (<= 1e-6 abs), but changes
    the averaged injected outputs."""
    grid = (2, 8, 8)
    plan = window_plan(grid, (2, 4, 4), False)
    q, k, v = qkv(128, 6, seed=2)
    base = window_joint_attention(q, k, v, plan)
    first = plan.groups[0][0]  # the tokens of one window
    k2, v2 = k.clone(), v.clone()
    k2[:, first] += 1.0
    v2[:, first] -= 2.0
    changed = window_joint_attention(q, k2, v2, plan)
    others = torch.ones(128, dtype=torch.bool)
    others[first] = False
    assert (changed[:, :128][:, others] - base[:, :128][:, others]).abs().max() < 1e-6
    assert (changed[:, first] - base[:, first]).abs().max() > 1e-3
    assert (changed[:, 128:] - base[:, 128:]).abs().max() > 1e-4


def full_joint_attention(q: Tensor, k: Tensor, v: Tensor, plan) -> Tensor:
    """The MMDiT without windows: every token attends to every token."""
    return sdpa(q, k, v)


@torch.no_grad()
def test_mmdit_with_one_window_equals_the_mmdit_with_full_attention(monkeypatch):
    """A tiny MMDiT whose window covers the grid against the same weights with plain joint attention swapped in
    (<= 1e-5 rel), 2 references and CLIP tokens; with (2, 4, 4) windows the output differs."""
    cfg = MMDIT_PRESETS["tiny"]
    sd = random_state_dict(PhantomMMDiT(cfg, device="meta"), seed=4)
    big = PhantomMMDiT(replace(cfg, window=(8, 16, 16)))
    big.load_state_dict({**sd, "window_size": torch.tensor([8, 16, 16])})
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(1, 16, 2, 16, 16, generator=g), torch.tensor([600.0]), torch.randn(1, 5, 64, generator=g),
            torch.randn(1, 16, 2, 16, 16, generator=g), torch.randn(1, 2, 3, 128, generator=g))
    small = PhantomMMDiT(cfg)
    small.load_state_dict(sd)
    windowed, small_windows = big(*args), small(*args)
    monkeypatch.setattr(blocks, "window_joint_attention", full_joint_attention)
    full = big(*args)
    assert rel_err(windowed, full) < 1e-5
    assert rel_err(small_windows, full) > 1e-3
