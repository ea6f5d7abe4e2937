"""Phantom's separated image/text guidance (Phantom, arXiv 2502.11079, Eq. 5).

    v = v_neg + w_img * (v_img - v_neg) + w_text * (v_text_img - v_img)

- ``v_text_img``: prompt + reference latents,
- ``v_img``:      negative prompt + reference latents,
- ``v_neg``:      negative prompt + all-zero reference latents
  (upstream ``subject2video.py``: ``ref_latents_neg = zeros_like(ref_latents)``).

A network that also reads CLIP features of the references (the paper's MMDiT, ``phantom_core.mmdit``) gets them as
``ref_clip``, which travels with the reference latents: the same in ``v_text_img`` and ``v_img``, all zero in
``v_neg`` (the paper's unconditional-image pass drops both encodings of the references). Without ``ref_clip`` the
model is called exactly as before, ``model(x, t, context, ref_latents)``.

Expanded, ``v = (1 - w_img) v_neg + (w_img - w_text) v_img + w_text v_text_img``: a pass whose coefficient is 0
cannot change the result and is not run (``w_img == 1``: no ``v_neg``; ``w_img == w_text``: no ``v_img``;
``w_text == 0``: no ``v_text_img``), so ``w_img = w_text = 1`` costs one model call per step instead of three.
The combination is computed in this expanded form for every case (fp32, equal to Eq. 5 up to rounding).

The reference tail the model sees is always the clean reference latents (zeros in ``v_neg``); the model itself
appends them after the video latents and cuts them off its output (see ``wan_dit.py``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from phantom_core.log import logger

VelocityModel = Callable[..., Tensor]
"""``model(x [B,16,F,h,w], t [B] in [0, 1000], context [B,L,D], ref_latents [B,16,N,h,w]) -> v`` like ``x``; a model
given CLIP reference features takes them as the keyword ``ref_clip`` ``[B, N, T, C]``."""

PassRunner = Callable[..., dict[str, Tensor]]
"""``runner(model, x, t, context, context_neg, ref_latents, names, *, batch_passes, model_dtype, ref_clip)`` ->
``{pass name: velocity}``: how the loop gets a step's passes. :func:`run_passes` runs them here; a parallel strategy
with the same signature (``sampling.guidance_parallel.GuidanceParallel``) shares them out among ranks."""

PASS_NAMES = ("text_img", "img", "neg")


def guidance_weights(w_img: float, w_text: float) -> dict[str, float]:
    """The non-zero coefficients of the expanded Eq. 5, keyed by pass name (in ``PASS_NAMES`` order).

    The coefficients always sum to 1 (a guided velocity of identical passes is that velocity), so at least one
    pass is always kept. Example: ``(5.0, 7.5) -> {"text_img": 7.5, "img": -2.5, "neg": -4.0}``;
    ``(1.0, 1.0) -> {"text_img": 1.0}``.
    """
    coefficients = {"text_img": float(w_text), "img": float(w_img) - float(w_text), "neg": 1.0 - float(w_img)}
    return {name: c for name, c in coefficients.items() if c != 0.0}


def combine_guidance(velocities: dict[str, Tensor], w_img: float, w_text: float) -> Tensor:
    """Eq. 5 from the velocities of the passes named by :func:`guidance_weights` (others may be absent).

    Raises:
        KeyError: a needed pass is missing from ``velocities``.
    """
    (first, c0), *rest = guidance_weights(w_img, w_text).items()
    v = c0 * velocities[first]
    for name, c in rest:
        v = v + c * velocities[name]
    return v


def pad_context(context: Tensor, length: int) -> Tensor:
    """Zero-pad text context ``[B, L, D]`` to ``[B, length, D]`` (what the DiT does itself up to 512 tokens)."""
    return F.pad(context, (0, 0, 0, length - context.shape[1]))


def _pass_inputs(name: str, context: Tensor, context_neg: Tensor, refs: tuple[Tensor, ...]
                 ) -> tuple[Tensor, tuple[Tensor, ...]]:
    """(context, reference inputs) of one pass: ``refs`` are the reference latents (and CLIP features), all zero in
    ``v_neg``."""
    if name == "text_img":
        return context, refs
    if name == "img":
        return context_neg, refs
    return context_neg, tuple(torch.zeros_like(r) for r in refs)


def _call(model: VelocityModel, x: Tensor, t: Tensor, context: Tensor, refs: tuple[Tensor, ...]) -> Tensor:
    """``model(x, t, context, ref_latents)``, plus ``ref_clip=`` when the CLIP features are given; fp32 out."""
    extra = {"ref_clip": refs[1]} if len(refs) > 1 else {}
    return model(x, t, context, refs[0], **extra).float()


def phantom_guidance(model: VelocityModel, x: Tensor, t: float, context: Tensor, context_neg: Tensor,
                     ref_latents: Tensor, *, w_img: float, w_text: float, batch_passes: bool = True,
                     model_dtype: torch.dtype | None = None, ref_clip: Tensor | None = None) -> Tensor:
    """The guided velocity at one step: run the needed passes (:func:`run_passes`) and combine them (Eq. 5).

    Arguments as :func:`run_passes`; ``w_img``, ``w_text``: guidance weights of Eq. 5 (upstream 5.0 and 7.5).
    Returns the guided velocity, fp32, shaped like ``x``.
    """
    velocities = run_passes(model, x, t, context, context_neg, ref_latents, list(guidance_weights(w_img, w_text)),
                            batch_passes=batch_passes, model_dtype=model_dtype, ref_clip=ref_clip)
    return combine_guidance(velocities, w_img, w_text)


def run_passes(model: VelocityModel, x: Tensor, t: float, context: Tensor, context_neg: Tensor,
               ref_latents: Tensor, names: list[str], *, batch_passes: bool = True,
               model_dtype: torch.dtype | None = None, ref_clip: Tensor | None = None) -> dict[str, Tensor]:
    """The velocities of the named guidance passes at one step, batched or one by one.

    Args:
        model: velocity model, see :data:`VelocityModel`.
        x: noisy video latents ``[B, 16, F, h, w]`` (normalized latent space), any float dtype.
        t: model timestep in [0, 1000] (``1000 * sigma``).
        context / context_neg: prompt / negative-prompt embeddings ``[B, L1, D]`` / ``[B, L2, D]``; the shorter is
            zero-padded to the longer when the passes are batched (the model must be invariant to zero padding
            of the context, as the Wan DiT is: it pads to 512 tokens itself).
        ref_latents: clean reference latents ``[B, 16, N, h, w]``.
        names: passes to run, from ``PASS_NAMES`` (e.g. ``list(guidance_weights(w_img, w_text))``).
        batch_passes: concatenate the passes on the batch dim into one model call (faster, P times the
            activation memory); ``False`` calls the model once per pass.
        model_dtype: dtype of the model's inputs (x, references, context); ``None`` keeps the inputs' dtypes.
        ref_clip: CLIP features of the references ``[B, N, T, C]`` for a model that reads them (passed as
            ``ref_clip=``, zeroed in ``v_neg`` with the latents), or None (the model is called without it).
    Returns:
        ``{pass name: velocity}``, fp32, each shaped like ``x``.
    """
    cast = (lambda a: a.to(model_dtype)) if model_dtype is not None else (lambda a: a)
    refs = (ref_latents,) if ref_clip is None else (ref_latents, ref_clip)
    inputs = [_pass_inputs(n, context, context_neg, refs) for n in names]
    b = x.shape[0]
    if batch_passes and len(names) > 1:
        length = max(c.shape[1] for c, _ in inputs)
        ctx = torch.cat([pad_context(c, length) for c, _ in inputs])  # (P*B, L, D)
        refs_in = tuple(cast(torch.cat(parts)) for parts in zip(*(r for _, r in inputs)))  # (P*B, 16, N, h, w), ...
        x_in = x.repeat(len(names), *([1] * (x.ndim - 1)))  # (P*B, 16, F, h, w)
        t_in = torch.full((len(names) * b,), float(t), dtype=torch.float32, device=x.device)  # (P*B,)
        v_all = _call(model, cast(x_in), t_in, cast(ctx), refs_in)  # (P*B, 16, F, h, w)
        velocities = dict(zip(names, v_all.split(b), strict=True))
    else:
        t_in = torch.full((b,), float(t), dtype=torch.float32, device=x.device)  # (B,)
        velocities = {n: _call(model, cast(x), t_in, cast(c), tuple(cast(a) for a in r))
                      for n, (c, r) in zip(names, inputs)}
    logger.debug("guidance t=%.1f passes=%s batched=%s", float(t), names, batch_passes and len(names) > 1)
    return velocities
