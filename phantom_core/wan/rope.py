"""3-D rotary position embedding (RoPE) in the Wan2.1 convention, used by ``wan_dit.py``.

Wan splits each attention head's ``head_dim`` channels into ``head_dim // 2`` complex pairs, formed from
*adjacent* channels ``(2i, 2i + 1)`` (not the "rotate half" layout of GPT-NeoX/Llama). With
``c = head_dim // 2`` the pairs are shared out to the three token axes as

    time:   c - 2 * (c // 3) pairs      (22 for head_dim 128)
    height: c // 3 pairs                (21)
    width:  c // 3 pairs                (21)

and within an axis that owns ``a = 2 * pairs`` channels, pair ``i`` rotates by ``pos * theta ** (-2 i / a)``,
``theta = 10000``, positions counted from 0 along each axis of the token grid (source: Wan2.1
``wan/modules/model.py`` ``rope_params`` / ``rope_apply``; the same split is ComfyUI's ``EmbedND`` with
``axes_dim = [d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6)]``).

Reference latents appended after the video on the time axis simply get the next time indices, because the
table is built for the whole ``(frames + references, h, w)`` grid.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor


def rope_axis_pairs(head_dim: int) -> tuple[int, int, int]:
    """Complex pairs per axis ``(time, height, width)`` for one head, e.g. ``(22, 21, 21)`` for 128.

    Raises ``ValueError`` when ``head_dim`` is odd or smaller than 6 (no pair for some axis).
    """
    if head_dim % 2 or head_dim < 6:
        raise ValueError(f"head_dim is {head_dim}; RoPE needs an even head_dim of at least 6")
    c = head_dim // 2
    return c - 2 * (c // 3), c // 3, c // 3


def _axis_angles(n: int, pairs: int, theta: float) -> Tensor:
    """Rotation angles ``(n, pairs)`` float64 for positions ``0..n-1`` of one axis owning ``2 * pairs`` channels."""
    inv_freq = theta ** (-torch.arange(pairs, dtype=torch.float64) * 2.0 / (2 * pairs))  # (pairs,)
    return torch.outer(torch.arange(n, dtype=torch.float64), inv_freq)  # (n, pairs)


@lru_cache(maxsize=16)
def _rope_table_cached(grid: tuple[int, int, int], head_dim: int, theta: float, device: str) -> tuple[Tensor, Tensor]:
    with torch.inference_mode(False):  # cached: a table first made under inference mode must serve training too
        return _rope_table(grid, head_dim, theta, device)


def _rope_table(grid: tuple[int, int, int], head_dim: int, theta: float, device: str) -> tuple[Tensor, Tensor]:
    f, h, w = grid
    pt, ph, pw = rope_axis_pairs(head_dim)
    # Angles are formed in float64 (exact for any position) and stored as float32 cos/sin; the rotation
    # itself runs in float32 (``apply_rope``), as in Phantom-Wan.
    ang_t = _axis_angles(f, pt, theta)[:, None, None, :].expand(f, h, w, pt)
    ang_h = _axis_angles(h, ph, theta)[None, :, None, :].expand(f, h, w, ph)
    ang_w = _axis_angles(w, pw, theta)[None, None, :, :].expand(f, h, w, pw)
    ang = torch.cat([ang_t, ang_h, ang_w], dim=-1).reshape(f * h * w, 1, head_dim // 2)  # (L, 1, d/2)
    cos = ang.cos().to(device=device, dtype=torch.float32)
    sin = ang.sin().to(device=device, dtype=torch.float32)
    return cos, sin


def rope_table(
    grid: tuple[int, int, int], head_dim: int, theta: float = 10000.0, device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor]:
    """Cosine and sine tables for a token grid, cached per ``(grid, head_dim, theta, device)``.

    Args:
        grid: ``(f, h, w)`` token counts (after patchify), tokens flattened in ``f, h, w`` order.
        head_dim: channels per attention head (128 in every Wan2.1 model).
        theta: RoPE base (10000 in Wan2.1).
        device: where the tables live.

    Returns:
        ``(cos, sin)``, each float32 ``(f * h * w, 1, head_dim // 2)``; treat as read-only (they are cached).
    """
    if min(grid) < 1:
        raise ValueError(f"RoPE grid is {tuple(grid)}; every axis needs at least one token")
    return _rope_table_cached(tuple(int(g) for g in grid), int(head_dim), float(theta), str(torch.device(device)))


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate adjacent channel pairs of ``x`` by the table angles; computed in float32.

    Real-valued, on the ``(B, L, H, d)`` view as given: each pair ``(x0, x1)`` becomes
    ``(x0 cos - x1 sin, x1 cos + x0 sin)``, written as one ``addcmul`` of contiguous operands
    ``pairs * (cos, cos) + swapped_pairs * (-sin, sin)`` (two full-size temporaries; strided per-channel
    arithmetic on the interleaved halves would cost twice as long). The same operations under autograd,
    ``torch.compile`` and inference.

    Args:
        x: ``(B, L, H, d)`` queries or keys, any float dtype.
        cos, sin: ``(L, 1, d // 2)`` float32 from ``rope_table``.

    Returns:
        ``(B, L, H, d)`` in ``x.dtype``, contiguous: ``(x0 + i x1) * (cos + i sin)`` for each pair ``(x0, x1)``.
    """
    pairs = x.float().unflatten(-1, (-1, 2))  # (B, L, H, d/2, 2): (x0, x1)
    cos2 = torch.stack((cos, cos), dim=-1)  # (L, 1, d/2, 2)
    sin2 = torch.stack((-sin, sin), dim=-1)  # (L, 1, d/2, 2)
    out = torch.addcmul(pairs * cos2, pairs.flip(-1), sin2)  # (B, L, H, d/2, 2): (x0 c - x1 s, x1 c + x0 s)
    return out.flatten(-2).to(x.dtype)  # (B, L, H, d)
