"""3-D window attention over the video tokens with Phantom's dynamic injection (arXiv 2502.11079, Sec. 3.2, Fig. 5).

The video tokens of one block are cut into 3-D windows of the latent token grid ``(f, h, w)``; every window
attends on its own. The *injected* tokens, the reference VAE tokens ``F_ref,v`` followed by the text tokens and
the CLIP reference tokens ``F_T = F_text (+) F_ref,c``, are appended to the end of every window, so each window's
joint attention runs over ``[window tokens, F_ref,v, F_T]`` (queries, keys and values alike). After attention a
window's video outputs go back to their own places, and the injected tokens' outputs of all windows are averaged
(each window weighs the same) back into one copy. So a block's outputs have exactly its inputs' shapes, and the
windows depend on the video grid alone: adding or removing references changes neither the partition nor any video
token's place in it.

Windows (our reading of the paper's "windows of size 9"; see docs/DESIGN.md): a window is ``window[a]`` tokens
along each axis ``a`` of the token grid (the paper's 9 read as 9 latent tokens on each of t, h, w), cut to the
grid when the grid is smaller. Alternate blocks shift the cuts by half a window (``window // 2``), as Swin
(Liu et al. 2021) and SeedVR (Wang et al. 2025) do, so information crosses window borders; like SeedVR, the
shifted partition has smaller windows at the borders instead of Swin's cyclic roll and masks, so no window ever
holds padding or tokens from the opposite border. An axis one window covers entirely is not shifted (as Swin),
hence one window over the whole grid is exactly full joint attention in every block.

Windows of one shape are batched into a single attention call (at most 27 shapes: first, middle and last segment of
each axis), run by the selected back-end (``phantom_core.wan.attention``: sdpa, flash, sage or math). A plan with a
key mask (``WindowPlan.key_keep``, ``MMDiTConfig.reference_key_mask``: each reference's background tokens,
:func:`reference_key_keep`) runs PyTorch SDPA with a boolean mask whatever the back-end, since flash and sage
take no arbitrary mask.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from phantom_core.wan.attention import attention
from phantom_core.wan.dit import pad_to_patch


@dataclass(frozen=True)
class WindowPlan:
    """The windows of one block over a video token grid.

    ``groups``: one int64 tensor ``(n_windows, tokens_per_window)`` per window shape, each row the flat indices
    (``(t * h + y) * w + x``) of one window's tokens in grid order; together the rows cover every video token once.
    ``count``: number of windows in all groups. ``n_video``: tokens in the grid (``f * h * w``).
    ``key_keep``: None (every token is a key), or ``(B, n_injected)`` bool, False for an injected token that no
    query may attend to (``window_plan`` never sets it; ``dataclasses.replace`` a cached plan per forward).
    """

    groups: tuple[Tensor, ...]
    count: int
    n_video: int
    key_keep: Tensor | None = None


def axis_segments(n: int, size: int, shifted: bool) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` cutting positions ``0..n-1`` of one axis into windows of ``size`` tokens.

    Unshifted: cuts at ``size, 2 size, ...`` (the last window may be shorter). Shifted: cuts at
    ``size // 2, size // 2 + size, ...`` (the first window is half a window, the last may be shorter). When one
    window covers the axis (``size >= n``) there is a single segment, shifted or not.

    Raises ``ValueError`` for ``n < 1`` or ``size < 1``.
    """
    if n < 1 or size < 1:
        raise ValueError(f"window axis: {n} tokens, window {size}; both must be >= 1")
    if size >= n:
        return [(0, n)]
    first = size // 2 if shifted and size > 1 else size
    cuts = [0, *range(first, n, size), n]
    return list(zip(cuts[:-1], cuts[1:]))


@lru_cache(maxsize=64)
def _plan_cached(grid: tuple[int, int, int], window: tuple[int, int, int], shifted: bool, device: str) -> WindowPlan:
    f, h, w = grid
    flat = torch.arange(f * h * w, device=device).view(f, h, w)  # flat index of each grid position
    by_shape: dict[tuple[int, int, int], list[Tensor]] = {}
    for (t0, t1), (y0, y1), (x0, x1) in itertools.product(
            *(axis_segments(n, s, shifted) for n, s in zip(grid, window))):
        by_shape.setdefault((t1 - t0, y1 - y0, x1 - x0), []).append(flat[t0:t1, y0:y1, x0:x1].reshape(-1))
    groups = tuple(torch.stack(rows) for rows in by_shape.values())  # each (n_windows, tokens_per_window)
    return WindowPlan(groups, sum(g.shape[0] for g in groups), f * h * w)


def window_plan(grid: tuple[int, int, int], window: tuple[int, int, int], shifted: bool,
                device: torch.device | str = "cpu") -> WindowPlan:
    """The windows of a ``(f, h, w)`` video token grid (see the module docstring), cached per arguments.

    Args:
        grid: video tokens per axis after patchify (references are not part of it).
        window: window size in tokens per axis ``(t, h, w)``; cut to the grid where the grid is smaller.
        shifted: cut half a window later on every axis that has more than one window (odd blocks).
        device: where the index tensors live.

    Returns:
        A :class:`WindowPlan` (treat its tensors as read-only; they are cached).
    """
    if len(grid) != 3 or len(window) != 3:
        raise ValueError(f"grid {tuple(grid)} and window {tuple(window)} must each be 3 sizes (t, h, w)")
    return _plan_cached(tuple(int(g) for g in grid), tuple(int(s) for s in window), bool(shifted),
                        str(torch.device(device)))


def window_joint_attention(q: Tensor, k: Tensor, v: Tensor, plan: WindowPlan) -> Tensor:
    """Joint attention of every window of ``plan`` with the injected tokens appended (dynamic injection).

    The first ``plan.n_video`` tokens of ``q, k, v`` are the video tokens (grid order); the rest are the injected
    tokens (reference VAE tokens, then text and CLIP reference tokens), appended to the end of every window. For
    window ``j`` with tokens ``W_j`` and injected tokens ``I``: ``out_j = softmax(q K^T / sqrt(d)) V`` over the
    sequence ``[W_j, I]`` (queries, keys and values). Returned:

    - video token ``i`` in window ``j``: its row of ``out_j`` (every video token is in exactly one window);
    - injected token ``i``: ``(1 / n_windows) * sum_j out_j[i]``, the mean over all windows, each window weighted
      equally whatever its size.

    With ``plan.key_keep`` the injected tokens it marks False are left out of every window's keys (their own
    queries still attend to the rest); the window's video tokens are always keys, so no row is empty.

    Args:
        q, k, v: ``(B, n_video + n_injected, H, d)``; q and k already normalised and rotated (RoPE).
        plan: from :func:`window_plan` for the video grid (``key_keep``, if set, ``(B, n_injected)`` bool).

    Returns:
        ``(B, n_video + n_injected, H * d)`` in the dtype of ``q``.
    """
    B, L, H, d = q.shape
    nv = plan.n_video
    assert L >= nv, f"{L} tokens, fewer than the {nv} video tokens of the window plan"
    out_video = q.new_empty(B, nv, H * d)
    injected_sum = q.new_zeros(B, L - nv, H * d, dtype=torch.float32)  # the mean is accumulated in fp32
    inj = [t[:, nv:] for t in (q, k, v)]  # 3 x (B, n_injected, H, d)
    for idx in plan.groups:  # (n_windows, Lw): every window of this group has the same shape
        n_win, lw = idx.shape
        parts = []
        for full, tail in zip((q, k, v), inj):
            win = full[:, idx]  # (B, n_windows, Lw, H, d)
            tails = tail.unsqueeze(1).expand(B, n_win, *tail.shape[1:])  # (B, n_windows, n_injected, H, d)
            parts.append(torch.cat([win, tails], dim=2).flatten(0, 1))  # (B * n_windows, Lw + n_injected, H, d)
        if plan.key_keep is None:
            out = attention(*parts)  # (B * n_windows, Lw + n_injected, H, d)
        else:
            keep = torch.cat([plan.key_keep.new_ones(B, lw), plan.key_keep], dim=1)  # (B, Lw + n_injected)
            out = masked_attention(*parts, keep.repeat_interleave(n_win, dim=0))  # rows in (b, window) order
        out = out.flatten(2).unflatten(0, (B, n_win))  # (B, n_windows, Lw + n_injected, H * d)
        out_video[:, idx.reshape(-1)] = out[:, :, :lw].reshape(B, n_win * lw, H * d)
        injected_sum += out[:, :, lw:].float().sum(dim=1)  # (B, n_injected, H * d)
    injected = (injected_sum / plan.count).to(q.dtype)  # (B, n_injected, H * d)
    return torch.cat([out_video, injected], dim=1)  # (B, n_video + n_injected, H * d)


def masked_attention(q: Tensor, k: Tensor, v: Tensor, keep: Tensor) -> Tensor:
    """Attention over the keys ``keep`` marks: ``q, k, v`` ``(B, L, H, d)``, ``keep`` ``(B, L)`` bool (at least one
    True per row) -> ``(B, L, H, d)``: ``softmax`` over the kept keys only (PyTorch SDPA with a boolean mask, on any
    back-end selection: flash and sage take no arbitrary mask)."""
    mask = keep[:, None, None, :]  # (B, 1, 1, L): the same keys for every head and query
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)  # (B, L, H, d)


def reference_key_keep(ref_latents: Tensor, patch_size: tuple[int, int, int], threshold: float) -> Tensor:
    """Which reference VAE tokens stay keys under ``MMDiTConfig.reference_key_mask`` (``threshold``).

    Each reference latent is cut into the model's patches (as its tokens are: padded to the patch, one token per
    patch), and a token's distance is the L2 norm of its patch minus the reference's median patch (the per-value
    median over its patches, torch's lower median): the median patch is the reference's dominant background, the
    white letterbox of a prepared reference. A token is kept when its distance exceeds ``threshold`` times the
    reference's largest distance; so an all-zero reference (dropped, or the ``v_neg`` pass) keeps none.

    Args:
        ref_latents: ``(B, C, N, H, W)`` reference latents (one frame each), any float dtype (computed in fp32).
        patch_size: the model's ``(t, h, w)`` patch.
        threshold: in [0, 1).

    Returns:
        ``(B, N * h * w)`` bool, in the order of the reference tokens (reference-major, then the token grid).
    """
    B, _, N = ref_latents.shape[:3]
    refs = rearrange(ref_latents.float(), "b c n h w -> (b n) c 1 h w")
    patches = rearrange(pad_to_patch(refs, patch_size), "r c (f pf) (h ph) (w pw) -> r (f h w) (c pf ph pw)",
                        pf=patch_size[0], ph=patch_size[1], pw=patch_size[2])  # (B * N, h * w, patch values)
    dist = (patches - patches.median(dim=1, keepdim=True).values).norm(dim=-1)  # (B * N, h * w)
    keep = dist > threshold * dist.amax(dim=1, keepdim=True).clamp_min(1e-6)  # (B * N, h * w)
    return keep.reshape(B, -1)  # (B, N * h * w)
