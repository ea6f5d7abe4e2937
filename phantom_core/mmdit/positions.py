"""Absolute token positions for the MMDiT: SD3's fixed 2-D sin-cos table, centre-cropped to a token grid.

Why an MMDiT needs one: 3-D RoPE tells attention only how far apart two tokens are, and the window attention runs
every window with the same weights, so without an absolute table no token knows where in the frame it is. A model
of the miniature world then cannot put a subject at the frame's centre, nor start a ``moves left`` path on the right
(measured: ``docs/WORLD.md``). SD3 (arXiv 2403.03206; ``mmditx.py``'s ``pos_embed`` / ``cropped_pos_embed``, after
MAE's ``get_2d_sincos_pos_embed``) adds such a table to the patch tokens, from a square of ``pos_embed_max_size``
sides cropped at its centre, so that every resolution up to that size shares the table's centre. SD3 makes images;
a video also needs to know which frame a token is in (``moves left`` starts on the right in the first frame, not in
the last), which relative RoPE does not say either: as the video DiTs with absolute positions do (Latte, Open-Sora
1.0: a temporal embedding per frame), a 1-D sin-cos of the latent frame index, counted from the first frame, is added
too (``frame_table``).
"""

from __future__ import annotations

import torch
from torch import Tensor


def sincos_table(size: int, dim: int) -> Tensor:
    """The fixed 2-D sin-cos position table of a ``size x size`` token grid.

    Each axis takes half the channels: ``[sin(p w_i), cos(p w_i)]`` with ``w_i = 10000^(-i / (dim / 4))``,
    ``i < dim / 4`` and ``p`` the row (first half) or column (second half), counted from 0 (MAE / SD3's formula).

    Returns:
        ``(size * size, dim)`` float32, row-major over ``(y, x)``.

    Raises:
        ValueError: ``size < 1`` or ``dim`` not a positive multiple of 4.
    """
    if size < 1 or dim < 4 or dim % 4:
        raise ValueError(f"sincos_table: size {size} must be >= 1 and dim {dim} a positive multiple of 4")
    omega = 1.0 / 10000.0 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))  # (dim / 4,)
    pos = torch.arange(size, dtype=torch.float64)[:, None] * omega  # (size, dim / 4)
    axis = torch.cat([pos.sin(), pos.cos()], dim=1)  # (size, dim / 2)
    rows = axis[:, None, :].expand(size, size, dim // 2)
    cols = axis[None, :, :].expand(size, size, dim // 2)
    return torch.cat([rows, cols], dim=-1).reshape(size * size, dim).float()


def cropped_table(table: Tensor, size: int, h: int, w: int) -> Tensor:
    """The ``h x w`` centre of a ``size x size`` table (``(size * size, D)``, from ``sincos_table``) ->
    ``(h * w, D)``, row-major; the top-left corner is ``((size - h) // 2, (size - w) // 2)`` as SD3's
    ``cropped_pos_embed``.

    Raises:
        ValueError: ``h`` or ``w`` larger than ``size`` (the video is larger than the model's table).
    """
    if h > size or w > size:
        raise ValueError(f"the token grid is {h} x {w} (height x width), larger than the MMDiT's absolute position "
                         f"table ({size} x {size} tokens, MMDiTConfig.pos_embed_max): use a smaller resolution, at "
                         f"most {size} tokens (patch_size times that in latent pixels) a side")
    top, left = (size - h) // 2, (size - w) // 2
    return table.reshape(size, size, -1)[top: top + h, left: left + w].reshape(h * w, -1)


def frame_table(frames: int, dim: int) -> Tensor:
    """The 1-D sin-cos embedding of latent frame indices ``0 .. frames - 1``: ``[sin(f w_i), cos(f w_i)]`` with
    ``w_i = 10000^(-i / (dim / 2))``, ``i < dim / 2`` (the Transformer's formula over all ``dim`` channels).

    Returns:
        ``(frames, dim)`` float32.

    Raises:
        ValueError: ``frames < 1`` or ``dim`` not a positive even number.
    """
    if frames < 1 or dim < 2 or dim % 2:
        raise ValueError(f"frame_table: frames {frames} must be >= 1 and dim {dim} a positive even number")
    omega = 1.0 / 10000.0 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    pos = torch.arange(frames, dtype=torch.float64)[:, None] * omega  # (frames, dim / 2)
    return torch.cat([pos.sin(), pos.cos()], dim=1).float()
