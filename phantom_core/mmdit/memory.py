"""How much memory a Phantom MMDiT forward needs: the memory model of the paper's network (window attention with
dynamic injection, ``windows.py``), as ``wan.memory`` is the Phantom-Wan DiT's, for the host's load planning and
the sampler's choice of batched guidance passes.

Tokens (patch ``pt x ph x pw``, token grid ``f x h x w`` of the video): the video stream holds the video tokens
``Lv = f h w`` and the reference VAE tokens ``Lr = N h w`` (one 1-frame latent per reference); the text stream
holds the padded text ``text_len`` and the CLIP reference tokens ``N T`` (``T`` per reference: 257 for ViT-H-14's
penultimate tokens, 1 pooled). Every window attends over its own video tokens plus all the injected tokens
``I = Lr + text_len + N T``, so window attention copies the injected tokens once per window: the windows of one
shape run as one attention call over ``n_windows x (window tokens + I)`` rows (``window_rows``), the largest of
which sets the peak.

Peak activations of one joint block (no autograd, memory-efficient attention: no ``L x L`` matrix), in values
per row of the batch: ``12 D + 2 ffn`` per token of both streams (``L = Lv + Lr + text_len + N T``: residuals,
modulated inputs, q / k / v before and after qk-norm and RoPE, the MLP's hidden layer and its GELU) plus
``4.5 D`` per row of the largest window call (q, k and v gathered with the injected tokens, and the attention
output; below fp32 plus 1.5 x (4 - bytes per value) x ``D`` bytes of float32 temporaries). The coefficients were
fitted to the live-tensor peaks of real forwards (the per-``D`` peak does not depend on ``D``: no ``L x L`` term)
and rounded up; ``tests/core/test_mmdit_memory.py`` checks that the model bounds the measured peak from above,
within 1.6 x, for one window and for many, with and without references, in fp32 and bf16.
"""

from __future__ import annotations

import math

import torch

from phantom_core.mmdit.config import MMDiTConfig
from phantom_core.mmdit.windows import window_plan
from phantom_core.sampling.guidance import guidance_weights
from phantom_core.wan.latents import token_grid


def mmdit_tokens(config: MMDiTConfig, frames: int, height: int, width: int, num_refs: int,
                 clip_tokens: int = 0) -> tuple[int, int, int]:
    """``(video, reference, text)`` token counts of one forward: ``f h w``, ``N h w`` (the references' 1-frame
    latents, patchified alone) and ``text_len + N * clip_tokens`` (the text stream with ``F_ref,c``)."""
    f, h, w = token_grid(config.patch_size, frames, height, width)
    return f * h * w, num_refs * h * w, config.text_len + num_refs * clip_tokens


def window_rows(config: MMDiTConfig, frames: int, height: int, width: int, num_refs: int,
                clip_tokens: int = 0) -> int:
    """Rows of the largest window attention call (per batch row): over the unshifted and the shifted partition,
    the most ``n_windows x (window tokens + injected tokens)`` of one window shape (``windows.window_plan``)."""
    f, h, w = token_grid(config.patch_size, frames, height, width)
    _, refs, text = mmdit_tokens(config, frames, height, width, num_refs, clip_tokens)
    injected = refs + text
    largest = 0
    for shifted in (False, True):
        plan = window_plan((f, h, w), config.window, shifted)
        largest = max(largest, *(g.shape[0] * (g.shape[1] + injected) for g in plan.groups))
    return largest


def mmdit_activation_bytes(config: MMDiTConfig, frames: int, height: int, width: int, num_refs: int, *,
                           clip_tokens: int = 0, batch: int = 3, bytes_per_value: int = 2) -> int:
    """Peak activation bytes of one MMDiT forward without autograd (see the module docstring).

    Args:
        config: the MMDiT's architecture.
        frames, height, width: the video (4k + 1 frames, px).
        num_refs: references (0 to 4). clip_tokens: CLIP tokens per reference in ``ref_clip`` (0: none given;
            1: pooled; 257: ViT-H-14 penultimate tokens).
        batch: rows per forward (3 for Phantom's three guidance passes batched, 1 one by one).
        bytes_per_value: 2 for bf16 / fp16 activations, 4 for fp32.
    Returns:
        bytes (int), weights not included.
    """
    video, refs, text = mmdit_tokens(config, frames, height, width, num_refs, clip_tokens)
    tokens = video + refs + text
    rows = window_rows(config, frames, height, width, num_refs, clip_tokens)
    # bytes: below fp32 the window calls keep float32 temporaries (RoPE, wan.rope.apply_rope), 1.5 x (4 - bytes per
    # value) x D more per row (fitted to bf16 forwards, tests/core/test_mmdit_memory.py)
    window_bytes = 4.5 * config.dim * bytes_per_value + 1.5 * config.dim * max(0, 4 - bytes_per_value)
    per_row = (12 * config.dim + 2 * config.ffn_dim) * tokens * bytes_per_value + math.ceil(window_bytes * rows)
    rope = (video + refs) * config.head_dim  # cos and sin tables, (L, 1, d/2) each, float32
    return batch * per_row + rope * 4


def mmdit_sampling_activation_bytes(config: MMDiTConfig, frames: int, height: int, width: int, num_refs: int, *,
                                    w_img: float, w_text: float, dtype: torch.dtype, clip_tokens: int = 0,
                                    batch: int = 1) -> int:
    """Peak activation bytes of one sampling step with the guidance passes that ``w_img`` / ``w_text`` need
    (``guidance.guidance_weights``) batched into one forward, activations in ``dtype`` (as
    ``wan.memory.sampling_activation_bytes`` for the Phantom-Wan DiT)."""
    rows = batch * len(guidance_weights(w_img, w_text))
    return mmdit_activation_bytes(config, frames, height, width, num_refs, clip_tokens=clip_tokens, batch=rows,
                                  bytes_per_value=dtype.itemsize)
