"""The checks of ``PhantomMMDiT.forward``'s inputs (one clear ValueError naming the input, its shape and what fits),
and which CLIP reference features a velocity model reads (``clip_features_for``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor

from phantom_core.log import logger
from phantom_core.mmdit.config import MAX_CLIP_REFERENCES
from phantom_core.wan.dit import check_velocity_inputs

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
            model without a CLIP branch, or with more than ``MAX_CLIP_REFERENCES`` references to a model with
            ``text_positions``; more than ``MAX_CLIP_REFERENCES`` reference latents to a model with
            ``reference_index``; the two reference inputs with different N.
    """
    ref_latents, ref_clip = _none_if_empty(ref_latents, 2), _none_if_empty(ref_clip, 1)
    check_velocity_inputs(x, t, context, ref_latents, cfg.in_dim, cfg.text_dim)
    B = x.shape[0]
    if ref_clip is not None:
        if not cfg.clip_dim:
            raise ValueError(f"ref_clip has shape {tuple(ref_clip.shape)}, but this MMDiT has no CLIP branch "
                             "(clip_dim 0): pass ref_clip=None")
        if ref_clip.ndim != 4 or ref_clip.shape[0] != B or ref_clip.shape[3] != cfg.clip_dim or ref_clip.shape[2] < 1:
            raise ValueError(f"ref_clip has shape {tuple(ref_clip.shape)}; expected ({B}, N, T, {cfg.clip_dim}): "
                             "T >= 1 CLIP tokens (or 1 pooled embedding) per reference")
        if cfg.text_positions and ref_clip.shape[1] > MAX_CLIP_REFERENCES:
            raise ValueError(f"ref_clip holds {ref_clip.shape[1]} references; this MMDiT's reference index "
                             f"embedding (text_positions) has {MAX_CLIP_REFERENCES}: give 1 to {MAX_CLIP_REFERENCES}")
    if cfg.reference_index and ref_latents is not None and ref_latents.shape[2] > MAX_CLIP_REFERENCES:
        raise ValueError(f"ref_latents hold {ref_latents.shape[2]} references; this MMDiT's reference index embedding "
                         f"(reference_index) has {MAX_CLIP_REFERENCES}: give 1 to {MAX_CLIP_REFERENCES}")
    if ref_latents is not None and ref_clip is not None and ref_latents.shape[2] != ref_clip.shape[1]:
        raise ValueError(f"ref_latents hold {ref_latents.shape[2]} references but ref_clip holds "
                         f"{ref_clip.shape[1]}; give both for the same references")
    return ref_latents, ref_clip


def clip_features_for(model: object, ref_clip: Tensor | None) -> Tensor | None:
    """The CLIP reference features ``model`` reads: ``ref_clip`` for a network with a CLIP branch (its
    ``config.clip_dim > 0``), None for one without (the Phantom-Wan DiT, a "VAE only" MMDiT: the features are
    ignored, with a warning). A CLIP-branch model given none runs without them (warned: the paper's model was
    trained with both encodings of the references).

    Raises:
        ValueError: ``ref_clip``'s width differs from the model's ``clip_dim`` (tokens vs pooled features, or
            another CLIP tower).
    """
    clip_dim = getattr(getattr(model, "config", None), "clip_dim", 0)
    if ref_clip is None:
        if clip_dim:
            logger.warning("this MMDiT reads CLIP features of the references, but none were given; running without")
        return None
    if not clip_dim:
        logger.warning("the reference CLIP features are ignored: %s has no CLIP input", type(model).__name__)
        return None
    if ref_clip.shape[-1] != clip_dim:
        raise ValueError(f"the reference CLIP features are {ref_clip.shape[-1]} wide but this MMDiT reads "
                         f"{clip_dim}: encode them with the CLIP tower and output (tokens / pooled) it was trained on")
    return ref_clip


def clip_references_only(model: Any) -> Any:
    """Make ``model`` (a ``PhantomMMDiT`` with a CLIP branch) ignore the VAE reference latents it is given, so that
    the references reach it through their CLIP features alone: how the paper's "CLIP only" ablation variant was
    trained (``TrainConfig.vae_references = False``; ``world.mmdit_default``'s ``clip`` variant). The sampler's
    passes stay as they are (the ``v_neg`` pass zeroes the CLIP features). Replaces the instance's ``forward``;
    returns ``model``.

    Raises:
        ValueError: ``model`` has no CLIP branch (``config.clip_dim`` 0, or a Phantom-Wan DiT): it would see no
            reference at all.
    """
    if not getattr(getattr(model, "config", None), "clip_dim", 0):
        raise ValueError(f"{type(model).__name__} has no CLIP branch (config.clip_dim 0): without the VAE reference "
                         "latents it would see no reference at all; the CLIP-only setting is for an MMDiT with one")
    forward = model.forward

    def clip_only_forward(x: Tensor, t: Tensor, context: Tensor, ref_latents: Tensor | None = None,
                          ref_clip: Tensor | None = None) -> Tensor:
        return forward(x, t, context, None, ref_clip=ref_clip)

    model.forward = clip_only_forward
    return model
