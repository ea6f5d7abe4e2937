"""How much memory a Phantom-Wan forward needs, references included: a memory model for the host's load planning
(ComfyUI's native Wan estimate counts only the video tokens, which is why 4 references run out of memory) and for
checking a configuration against a memory budget without the GPU.

Token count: the references are appended to the video on the time axis, so the DiT attends over
``L = (F + N) * (h / 2) * (w / 2)`` tokens (latent frames ``F``, references ``N``, patch 1 x 2 x 2).
Peak activations of one block (no autograd, memory-efficient attention: no ``L x L`` matrix), in values per
token: self-attention keeps the residual stream, the modulated input, q, k and v before and after their norms and
RoPE, the attention output and its projection alive together, ~9 x ``D``; the FFN keeps the residual, its input,
the gated output and the hidden layer with its GELU, ~6 x ``D`` + 2 x ``ffn``. The larger of the two, times the
batch (one row per guidance pass when the passes are batched), plus the text context (the padded umT5 features
and ~4 copies of their ``512 x D`` embedding: text MLP, cross-attention k and v) and the RoPE tables. The
coefficients were fitted to the live-tensor peaks of real forwards and rounded up;
``tests/core/test_memory_model.py`` checks that the model bounds the measured peak from above, within 1.6 x.

``sampling_activation_bytes`` is the figure the sampler node hands ComfyUI's memory manager
(``load_models_gpu(memory_required=...)``) so that it frees, or leaves unloaded, room for the forward with the
references counted, before the weights are placed.
"""

from __future__ import annotations

import math

import torch

from phantom_core.sampling.guidance import guidance_weights
from phantom_core.wan.dit import WanDiTConfig
from phantom_core.wan.latents import latent_shape
from phantom_core.wan.load import expected_shapes


def dit_tokens(config: WanDiTConfig, frames: int, height: int, width: int, num_refs: int) -> int:
    """Tokens the DiT attends over: video latent frames plus one frame per reference, each (h/pt) x (w/pw)."""
    _, _, f, h, w = latent_shape(frames, height, width)
    pt, ph, pw = config.patch_size
    return math.ceil((f + num_refs) / pt) * math.ceil(h / ph) * math.ceil(w / pw)


def activation_bytes(config: WanDiTConfig, frames: int, height: int, width: int, num_refs: int, batch: int = 3,
                     bytes_per_value: int = 2) -> int:
    """Peak activation bytes of one DiT forward without autograd (see the module docstring).

    Args:
        config: the DiT's architecture.
        frames, height, width: the video (4k + 1 frames, px).
        num_refs: references appended (0 to 4).
        batch: rows per forward: 3 for Phantom's three guidance passes batched, 1 when run one by one.
        bytes_per_value: 2 for bf16 / fp16 activations, 4 for fp32.
    Returns:
        bytes (int).
    """
    tokens = dit_tokens(config, frames, height, width, num_refs)
    per_row = max(9 * config.dim, 6 * config.dim + 2 * config.ffn_dim) * tokens  # values inside one block
    context = config.text_len * (4 * config.dim + config.text_dim)  # raw and embedded text context, k, v
    rope = tokens * config.head_dim  # cos and sin tables, (L, 1, d/2) each, float32
    return batch * (per_row + context) * bytes_per_value + rope * 4


def weight_bytes_estimate(config: WanDiTConfig, bytes_per_weight: float = 2.0) -> int:
    """Bytes of the DiT's weights at ``bytes_per_weight`` (2 bf16, 1 fp8, ~0.56 Q4_K): every tensor of the
    state dict (``wan.load.expected_shapes``, a meta-device build), norms and biases included."""
    return int(sum(math.prod(shape) for shape in expected_shapes(config).values()) * bytes_per_weight)


def peak_bytes(config: WanDiTConfig, frames: int, height: int, width: int, num_refs: int, *, batch: int = 3,
               bytes_per_value: int = 2, bytes_per_weight: float = 2.0, blocks_on_device: int | None = None) -> int:
    """Device bytes for sampling: the weights kept on the device plus the peak activations.

    ``blocks_on_device``: with block swap, only that many blocks' weights (plus one being prefetched) live on the
    device; None keeps every block there.
    """
    weights = weight_bytes_estimate(config, bytes_per_weight)
    if blocks_on_device is not None:  # the blocks swapped out leave the device; one more is being prefetched
        block = sum(math.prod(v) for k, v in expected_shapes(config).items() if k.startswith("blocks.0."))
        weights -= int(block * bytes_per_weight) * max(0, config.num_layers - blocks_on_device - 1)
    return weights + activation_bytes(config, frames, height, width, num_refs, batch, bytes_per_value)


def sampling_activation_bytes(config: WanDiTConfig, frames: int, height: int, width: int, num_refs: int, *,
                              w_img: float, w_text: float, dtype: torch.dtype, batch: int = 1) -> int:
    """Peak activation bytes of one sampling step as ``sampling.loop.sample_phantom`` runs it by default: the
    guidance passes the weights need (``guidance.guidance_weights``: 3 for the official 5.0 / 7.5, fewer when a pass
    cannot matter) batched into one forward, activations in ``dtype``.

    Args:
        config: the DiT's architecture.
        frames, height, width: the video (4k + 1 frames, px). num_refs: references appended (>= 0).
        w_img, w_text: the guidance weights of Eq. 5 (inside the image-guidance window, where most passes run).
        dtype: the DiT's activation dtype (``PhantomWanDiT.compute_dtype``). batch: videos sampled together.
    Returns:
        bytes (int), weights not included (the host's memory manager counts those itself).
    """
    rows = batch * len(guidance_weights(w_img, w_text))  # one row per pass per video, one forward
    return activation_bytes(config, frames, height, width, num_refs, batch=rows, bytes_per_value=dtype.itemsize)
