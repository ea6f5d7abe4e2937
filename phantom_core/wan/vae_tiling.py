"""Spatially tiled VAE decode: overlapping latent tiles, each decoded on its own, blended with ramps.

Decoding runs at full pixel resolution, so its activations (not the weights) bound the video size a GPU can
decode. Here the latent grid ``[B, 16, F, h, w]`` is cut into overlapping spatial tiles; every tile goes
through the complete causal temporal pass (`WanVAE.decode_raw`, so each tile has its own fresh
`CausalCache`) and is added into one preallocated output with a weight that ramps across the overlaps.
Peak memory is one tile's activations plus the output video.

Tiling is an approximation: the decoder's 3x3 convolutions and its frame-wide middle attention see only the
tile, so pixels near a tile edge differ from the untiled decode. The ramps hand each overlap over gradually
from one tile to the next and give a tile's outermost pixels (the most affected) the least weight.
Source: the usual overlap-and-feather scheme of tiled VAE decoders (e.g. ComfyUI's ``tiled_scale``),
written here from the description; the even spreading of tiles is our choice.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from phantom_core.log import logger

if TYPE_CHECKING:  # wan_vae imports this module; the type is only needed for hints
    from phantom_core.wan.vae import WanVAE

Progress = Callable[[int, int], None]  # progress(done, total), in latent frames (x tiles)
MIN_TILE_LATENT = 4  # latent cells per tile side (32 px); smaller tiles would be mostly edge
BLEND_MODES = ("linear", "cosine")
DEFAULT_TILE_LATENT = (32, 32)  # 256 x 256 px
DEFAULT_OVERLAP_LATENT = 8  # 64 px


def check_tiling(tile_latent: int | tuple[int, int], overlap_latent: int, blend: str = "linear") -> tuple[int, int]:
    """Validate tiling options and return the tile size as ``(th, tw)`` latent cells.

    Args:
        tile_latent: tile side(s) in latent cells (1 cell = 8 px), an int or ``(height, width)``;
            each side >= `MIN_TILE_LATENT`.
        overlap_latent: overlap between neighbouring tiles in latent cells, ``0 <= overlap < min(th, tw)``.
        blend: ramp shape across an overlap, one of `BLEND_MODES`.
    Raises:
        ValueError: naming the offending input, the value received and what is valid.
    """
    if isinstance(tile_latent, int):
        sizes: tuple = (tile_latent, tile_latent)
    else:
        sizes = tuple(tile_latent) if isinstance(tile_latent, (tuple, list)) else ()
    if len(sizes) != 2 or not all(isinstance(s, int) for s in sizes):
        raise ValueError(f"tile_latent={tile_latent!r}; expected an int or (height, width) ints in latent cells")
    if min(sizes) < MIN_TILE_LATENT:
        raise ValueError(f"tile_latent={tile_latent!r}; each side must be at least {MIN_TILE_LATENT} latent cells "
                         f"({8 * MIN_TILE_LATENT} px)")  # fmt: skip
    if not isinstance(overlap_latent, int) or not 0 <= overlap_latent < min(sizes):
        raise ValueError(f"overlap_latent={overlap_latent!r}; it must be an int in [0, {min(sizes) - 1}] "
                         f"(smaller than the tile side) for tile_latent={tile_latent!r}")  # fmt: skip
    if blend not in BLEND_MODES:
        raise ValueError(f"blend={blend!r}; expected one of {BLEND_MODES}")
    return sizes[0], sizes[1]


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of the fewest tiles of length ``tile`` that cover ``[0, size)`` with overlaps >= ``overlap``.

    The tiles are spread evenly (first at 0, last ending at ``size``), so every overlap is at least ``overlap``
    and neighbouring overlaps differ by at most one cell. ``[0]`` when one tile covers everything.
    """
    if tile >= size:
        return [0]
    count = math.ceil((size - overlap) / (tile - overlap))  # >= 2 because size > tile
    return [round(i * (size - tile) / (count - 1)) for i in range(count)]


def _ramp(n: int, blend: str) -> Tensor:
    """Weights rising from ~0 to ~1 over ``n`` pixels, sampled at pixel centres; ramp(k) + ramp(n-1-k) = 1."""
    pos = (torch.arange(n, dtype=torch.float64) + 0.5) / n  # (n,) in (0, 1)
    return pos if blend == "linear" else 0.5 - 0.5 * torch.cos(math.pi * pos)


def axis_weights(starts: list[int], tile: int, size: int, stride: int, blend: str) -> list[Tensor]:
    """Per-tile 1-D pixel weights along one axis; at every pixel the weights of the tiles covering it sum to 1.

    Args:
        starts: tile starts in latent cells (from `tile_starts`); tile: tile length in cells; size: axis length
            in cells; stride: pixels per cell.
    Returns:
        one float64 tensor of ``tile * stride`` weights per tile. Each tile ramps up over its overlap with the
        previous tile and down over its overlap with the next; the sums are then normalised to exactly 1
        (they already are unless three tiles overlap, i.e. an overlap exceeds half a tile).
    """
    weights = []
    for i, start in enumerate(starts):
        w = torch.ones(tile * stride, dtype=torch.float64)
        if i > 0 and (n := (starts[i - 1] + tile - start) * stride) > 0:
            w[:n] = _ramp(n, blend)
        if i < len(starts) - 1 and (n := (start + tile - starts[i + 1]) * stride) > 0:
            w[-n:] *= _ramp(n, blend).flip(0)
        weights.append(w)
    total = torch.zeros(size * stride, dtype=torch.float64)
    for start, w in zip(starts, weights):
        total[start * stride : start * stride + w.numel()] += w
    return [w / total[s * stride : s * stride + w.numel()] for s, w in zip(starts, weights)]


def decode_tiled(
    vae: WanVAE,
    latents: Tensor,
    tile_latent: int | tuple[int, int] = DEFAULT_TILE_LATENT,
    overlap_latent: int = DEFAULT_OVERLAP_LATENT,
    blend: str = "linear",
    progress: Progress | None = None,
) -> Tensor:
    """Raw latents -> video like ``vae.decode_raw(latents)``, decoded in overlapping spatial tiles.

    Args:
        vae: the Wan VAE (anything with ``config.spatial_stride``, ``config.temporal_stride`` and
            ``decode_raw(latents, progress=None)``).
        latents: ``[B, 16, F, h, w]`` float raw latents.
        tile_latent, overlap_latent, blend: see `check_tiling`. A tile side >= the latent side on that axis
            gives one tile there; if one tile covers the whole grid this is exactly ``vae.decode_raw(latents)``.
        progress: ``progress(done, total)`` after each latent frame of each tile (``total`` = tiles x F).
    Returns:
        ``[B, 3, 1 + 4 * (F - 1), 8h, 8w]`` float32 pixels (not clamped), on the device ``decode_raw`` uses.
    Raises:
        ValueError: for invalid tiling options (see `check_tiling`) or latents that are not 5-D.
    """
    th, tw = check_tiling(tile_latent, overlap_latent, blend)
    if latents.ndim != 5:
        raise ValueError(f"latents has shape {tuple(latents.shape)}; expected [B, 16, F, h, w]")
    b, _, n_latent, h, w = latents.shape
    if th >= h and tw >= w:
        return vae.decode_raw(latents, progress=progress)
    th, tw = min(th, h), min(tw, w)
    s, ts = vae.config.spatial_stride, vae.config.temporal_stride
    ys, xs = tile_starts(h, th, overlap_latent), tile_starts(w, tw, overlap_latent)
    wy, wx = axis_weights(ys, th, h, s, blend), axis_weights(xs, tw, w, s, blend)
    logger.info("tiled VAE decode: %d x %d tiles of %d x %d latent cells", len(ys), len(xs), th, tw)
    total = len(ys) * len(xs) * n_latent
    video: Tensor | None = None
    for i, y0 in enumerate(ys):
        for j, x0 in enumerate(xs):
            # 1. one tile through the full causal temporal pass (a fresh cache inside decode_raw)
            done = (i * len(xs) + j) * n_latent  # latent frames decoded by the tiles before this one
            report = None if progress is None else lambda k, _, done=done: progress(done + k, total)
            tile = vae.decode_raw(latents[:, :, :, y0 : y0 + th, x0 : x0 + tw], progress=report)  # (B,3,T,th*s,tw*s)
            if video is None:  # preallocate on the device and in the dtype decode_raw returns
                shape = (b, 3, 1 + ts * (n_latent - 1), h * s, w * s)
                video = tile.new_zeros(shape)  # (B, 3, T, H, W)
            # 2. accumulate with the separable blend weight (per-pixel weights of covering tiles sum to 1)
            weight = (wy[i][:, None] * wx[j][None, :]).to(tile)  # (th*s, tw*s)
            video[:, :, :, y0 * s : (y0 + th) * s, x0 * s : (x0 + tw) * s].addcmul_(tile, weight)
            del tile  # not kept alive while the next tile decodes
            logger.debug("decoded tile (%d, %d) of (%d, %d)", i + 1, j + 1, len(ys), len(xs))
    assert video is not None
    return video
