"""The checks of ``PhantomMMDiT.forward``'s inputs: one clear ValueError naming the input, its shape and what fits."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

if TYPE_CHECKING:
    from phantom_core.mmdit.config import MMDiTConfig


def _none_if_empty(refs: Tensor | None, axis: int) -> Tensor | None:
    """None for no tensor or zero references (size 0 on the reference axis of a tensor of the right rank)."""
    if refs is None or (refs.ndim > axis and refs.shape[axis] == 0):
        return None
    return refs


def check_mmdit_inputs(cfg: MMDiTConfig, x: Tensor, t: Tensor, context: Tensor, ref_latents: Tensor | None,
                 ref_clip: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """Validate the velocity model's inputs; returns ``(ref_latents, ref_clip)`` with zero references as None.

    Raises:
        ValueError: ``x`` not ``(B, in_dim, F, H, W)``; ``t`` not ``(B,)``; ``context`` not ``(B, L, text_dim)``;
            ``ref_latents`` not ``(B, in_dim, N, H, W)``; ``ref_clip`` not ``(B, N, T, clip_dim)`` or given to a
            model without a CLIP branch; the two reference inputs with different N.
    """
    if x.ndim != 5 or x.shape[1] != cfg.in_dim:
        raise ValueError(f"x has shape {tuple(x.shape)}; expected (B, {cfg.in_dim}, F, H, W) video latents")
    B = x.shape[0]
    if t.ndim != 1 or t.shape[0] != B:
        raise ValueError(f"t has shape {tuple(t.shape)}; expected ({B},): one timestep in [0, 1000] per sample")
    if context.ndim != 3 or context.shape[0] != B or context.shape[2] != cfg.text_dim:
        raise ValueError(f"context has shape {tuple(context.shape)}; expected ({B}, L, {cfg.text_dim})")
    ref_latents, ref_clip = _none_if_empty(ref_latents, 2), _none_if_empty(ref_clip, 1)
    if ref_latents is not None:
        want = (B, cfg.in_dim, x.shape[3], x.shape[4])
        if ref_latents.ndim != 5 or (ref_latents.shape[0], ref_latents.shape[1], *ref_latents.shape[3:]) != want:
            raise ValueError(f"ref_latents has shape {tuple(ref_latents.shape)}; expected ({B}, {cfg.in_dim}, N, "
                             f"{x.shape[3]}, {x.shape[4]}): one 1-frame latent per reference, same size as the video")
    if ref_clip is not None:
        if not cfg.clip_dim:
            raise ValueError(f"ref_clip has shape {tuple(ref_clip.shape)}, but this MMDiT has no CLIP branch "
                             "(clip_dim 0): pass ref_clip=None")
        if ref_clip.ndim != 4 or ref_clip.shape[0] != B or ref_clip.shape[3] != cfg.clip_dim or ref_clip.shape[2] < 1:
            raise ValueError(f"ref_clip has shape {tuple(ref_clip.shape)}; expected ({B}, N, T, {cfg.clip_dim}): "
                             "T >= 1 CLIP tokens (or 1 pooled embedding) per reference")
    if ref_latents is not None and ref_clip is not None and ref_latents.shape[2] != ref_clip.shape[1]:
        raise ValueError(f"ref_latents hold {ref_latents.shape[2]} references but ref_clip holds "
                         f"{ref_clip.shape[1]}; give both for the same references")
    return ref_latents, ref_clip
