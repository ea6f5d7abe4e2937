"""How much memory a Phantom-Wan forward needs, references included: a memory model for the host's load planning
(ComfyUI's native Wan estimate counts only the video tokens, which is why 4 references run out of memory) and for
checking a configuration against a memory budget without the GPU.

Token count: the references are appended to the video on the time axis, so the DiT attends over
``L = (F + N) * (h / 2) * (w / 2)`` tokens (latent frames ``F``, references ``N``, patch 1 x 2 x 2).
Peak activations of one block (no autograd, memory-efficient attention: no ``L x L`` matrix), in values per
token: self-attention keeps the residual stream, the modulated input, q, k and v before and after their norms and
RoPE, the attention output and its projection alive together, ~9 x ``D`` (below fp32 plus 8 x (4 - bytes per value)
x ``D`` bytes: RoPE rotates q and k in float32); the FFN keeps the residual, its input,
the gated output and the hidden layer with its GELU, ~6 x ``D`` + 2 x ``ffn``. The larger of the two, times the
batch (one row per guidance pass when the passes are batched), plus the text context (the padded umT5 features
and ~4 copies of their ``512 x D`` embedding: text MLP, cross-attention k and v) and the RoPE tables. The
coefficients were fitted to the live-tensor peaks of real forwards and rounded up;
``tests/core/test_memory_model.py`` checks that the model bounds the measured peak from above, within 1.6 x, in
fp32 and bf16. On an H200 (README, GPU check) a 14B fp8 step with 30 blocks swapped peaked at 10.37 GiB, which the
model puts at 10.64 GiB, and the 1.3B in bf16 with the passes batched at 7.81 GiB (model: 8.60 GiB).

With block swap (``wan.block_swap``) the weights on the device are the non-swapped blocks, two block buffers and
everything outside the blocks (``resident_weight_bytes``); ``peak_bytes`` adds the activations and
``smallest_block_swap`` picks the fewest swapped blocks that fit a budget. ``tests/core/test_memory_model.py``
checks these against the measured peak of tiny swapped models on the CPU (fp32 and fp8 weights), and the
14B / fp8 / 832x480x81 / 4 references case against a 24 GB card.

``sampling_activation_bytes`` is the figure the sampler node hands ComfyUI's memory manager
(``load_models_gpu(memory_required=...)``) so that it frees, or leaves unloaded, room for the forward with the
references counted, before the weights are placed.
"""

from __future__ import annotations

import math

import torch

from phantom_core.sampling.guidance import guidance_weights
from phantom_core.wan.block_swap import check_block_swap
from phantom_core.wan.dit import WanDiTConfig
from phantom_core.wan.latents import token_grid
from phantom_core.wan.load import expected_shapes


def dit_tokens(config: WanDiTConfig, frames: int, height: int, width: int, num_refs: int) -> int:
    """Tokens the DiT attends over: video latent frames plus one frame per reference, each (h/pt) x (w/pw)."""
    return math.prod(token_grid(config.patch_size, frames, height, width, extra_latent_frames=num_refs))


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
    # bytes per token inside one block: RoPE rotates q and k in float32 (wan.rope.apply_rope), so below fp32 its
    # float32 copy, products and output outlive the attention's own values: 8 x (4 - bytes_per_value) x D more
    attention = 9 * config.dim * bytes_per_value + 8 * config.dim * max(0, 4 - bytes_per_value)
    ffn = (6 * config.dim + 2 * config.ffn_dim) * bytes_per_value
    per_row = max(attention, ffn) * tokens
    context = config.text_len * (4 * config.dim + config.text_dim) * bytes_per_value  # raw and embedded text, k, v
    rope = tokens * config.head_dim * 4  # cos and sin tables, (L, 1, d/2) each, float32
    return batch * (per_row + context) + rope


def weight_bytes_estimate(config: WanDiTConfig, bytes_per_weight: float = 2.0) -> int:
    """Bytes of the DiT's weights at ``bytes_per_weight`` (2 bf16, 1 fp8, ~0.56 Q4_K): every tensor of the
    state dict (``wan.load.expected_shapes``, a meta-device build), norms and biases included."""
    return int(sum(math.prod(shape) for shape in expected_shapes(config).values()) * bytes_per_weight)


def resident_weight_bytes(config: WanDiTConfig, block_swap: int = 0, bytes_per_weight: float = 2.0,
                          bytes_per_value: int | None = None) -> int:
    """Device bytes of the DiT's weights during sampling with ``block_swap`` blocks swapped (``wan.block_swap``).

    Resident: everything outside the blocks (patch and text / time embeddings, head), the ``num_layers -
    block_swap`` blocks kept on the device, and ``min(block_swap, 2)`` block buffers (the running swapped block and
    the prefetched next one). Linear weights count ``bytes_per_weight`` each; every other tensor (norms, biases,
    modulation, the patch Conv3d) ``bytes_per_value`` (None: ``bytes_per_weight``), as an fp8 load keeps those in
    the compute dtype (``loading.fp8.convert_tensor``).

    Raises:
        ValueError: ``block_swap`` outside ``0..num_layers`` (naming ``block_swap``).
    """
    check_block_swap(block_swap, config.num_layers)
    block, outside = _block_and_outside_bytes(config, bytes_per_weight, bytes_per_value or bytes_per_weight)
    return outside + block * (config.num_layers - block_swap + min(block_swap, 2))


def _block_and_outside_bytes(config: WanDiTConfig, bytes_per_weight: float, bytes_per_value: float) -> tuple[int, int]:
    """(bytes of one block, bytes of everything outside the blocks); 2-D ``.weight`` tensors are the Linears."""
    block = outside = 0.0
    for key, shape in expected_shapes(config).items():
        size = math.prod(shape) * (bytes_per_weight if len(shape) == 2 and key.endswith(".weight") else bytes_per_value)
        if key.startswith("blocks.0."):
            block += size
        elif not key.startswith("blocks."):
            outside += size
    return int(block), int(outside)


def cast_buffer_bytes(config: WanDiTConfig, bytes_per_weight: float, bytes_per_value: int) -> int:
    """Bytes of the one Linear weight an fp8 / cast-on-forward layer materialises in the compute dtype while it
    runs (the largest: the FFN's ``ffn_dim x dim``); 0 when the weights are stored in the compute dtype."""
    return config.ffn_dim * config.dim * bytes_per_value if bytes_per_weight < bytes_per_value else 0


def peak_bytes(config: WanDiTConfig, frames: int, height: int, width: int, num_refs: int, *, batch: int = 3,
               bytes_per_value: int = 2, bytes_per_weight: float = 2.0, block_swap: int = 0) -> int:
    """Peak device bytes of sampling: resident weights (``resident_weight_bytes``: with ``block_swap`` blocks on
    the CPU, two block buffers), the fp8 cast buffer, and one forward's peak activations with the reference tokens
    (``activation_bytes``; ``batch`` rows: 3 for the guidance passes batched, 1 one by one).

    Not counted: the text encoder (not on the device while the DiT samples: ComfyUI offloads it; the CLI with
    ``--text-encoder-device cpu``), the VAE, the CUDA context and allocator fragmentation (leave ~1 GiB for those).

    Raises:
        ValueError: ``block_swap`` outside ``0..num_layers``.
    """
    return (resident_weight_bytes(config, block_swap, bytes_per_weight, bytes_per_value)
            + cast_buffer_bytes(config, bytes_per_weight, bytes_per_value)
            + activation_bytes(config, frames, height, width, num_refs, batch, bytes_per_value))


def smallest_block_swap(config: WanDiTConfig, frames: int, height: int, width: int, num_refs: int,
                        budget_bytes: int, **options) -> int | None:
    """The smallest ``block_swap`` (0..num_layers) whose ``peak_bytes`` fits ``budget_bytes``; None when even
    swapping every block does not (the activations alone are too large: fewer frames, a smaller size, or the
    guidance passes one at a time). ``options``: ``batch``, ``bytes_per_value``, ``bytes_per_weight``."""
    for n in range(config.num_layers + 1):
        if peak_bytes(config, frames, height, width, num_refs, block_swap=n, **options) <= budget_bytes:
            return n
    return None


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


def batched_passes_fit(model: object, video_shape: tuple[int, ...], num_refs: int, passes: int,
                       device: torch.device, headroom: float = 0.9, clip_tokens: int = 0) -> bool:
    """Whether a forward of ``passes`` guidance passes batched fits in what the CUDA device has free now
    (``torch.cuda.mem_get_info``; the weights are already placed): the memory model's activations of that batch
    (this module's for a Phantom-Wan DiT, ``mmdit.memory``'s for a Phantom MMDiT, with ``clip_tokens`` CLIP
    tokens per reference) against ``headroom`` x the free bytes. True off CUDA (host memory is not planned here)
    and for a network without a memory model. ``video_shape``: the latents ``(B, 16, F, h, w)``."""
    from phantom_core.mmdit.config import MMDiTConfig
    from phantom_core.mmdit.memory import mmdit_activation_bytes

    config = getattr(model, "config", None)
    if device.type != "cuda" or passes < 2 or not isinstance(config, (WanDiTConfig, MMDiTConfig)):
        return True
    b, _, f, h, w = (int(s) for s in video_shape)
    dtype = getattr(model, "compute_dtype", torch.bfloat16)
    size = (4 * (f - 1) + 1, 8 * h, 8 * w)
    if isinstance(config, MMDiTConfig):
        need = mmdit_activation_bytes(config, *size, num_refs, clip_tokens=clip_tokens, batch=b * passes,
                                      bytes_per_value=dtype.itemsize)
    else:
        need = activation_bytes(config, *size, num_refs, batch=b * passes, bytes_per_value=dtype.itemsize)
    free, _ = torch.cuda.mem_get_info(device)
    return need <= headroom * free
