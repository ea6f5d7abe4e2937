"""Recognising Phantom MMDiT checkpoints and loading them into ``PhantomMMDiT``; loading either DiT by its keys.

The key layout is ours (no MMDiT weights of the paper were released) and follows SD3's names (``x_embedder.proj``,
``t_embedder.mlp``, ``context_embedder``, ``joint_blocks.N.{x_block,context_block}.{adaLN_modulation.1,
attn.{qkv,ln_q,ln_k,proj},mlp.{fc1,fc2}}``, ``final_layer``), plus ``clip_embedder`` (the CLIP reference features)
and two integer buffers holding what no weight shape tells (``window_size``, ``text_len``). ComfyUI's
``model.diffusion_model.`` / ``diffusion_model.`` prefixes are dropped. Files are read by
``phantom_core.loading.files``, keys checked by ``phantom_core.loading.keys``, and the tensors assigned into a
meta-device build by ``phantom_core.loading.assign``, as for the Phantom-Wan DiT.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from phantom_core.loading.assign import load_network
from phantom_core.loading.fp8 import SCALED_FP8_KEY, detect_fp8_format, is_scale_key, plan_load
from phantom_core.loading.headers import read_tensor_infos, stand_ins
from phantom_core.loading.keys import key_problems, key_shape
from phantom_core.mmdit.config import MMDIT_PRESETS, MMDiTConfig
from phantom_core.mmdit.model import PhantomMMDiT
from phantom_core.wan.block_swap import enable_block_swap
from phantom_core.wan.load import DIT_PREFIXES, load_dit

MARKER_KEY = "joint_blocks.0.x_block.attn.qkv.weight"  # present in every Phantom MMDiT (and in SD3 image MMDiTs)


def is_mmdit_keys(keys: Any) -> bool:
    """True when state-dict ``keys`` (ComfyUI prefixes allowed) are an MMDiT's (``joint_blocks.0.x_block...``)."""
    return any(k.endswith(MARKER_KEY) for k in keys)


def _ints(sd: dict[str, Tensor], key: str, count: int) -> tuple[int, ...]:
    """The integer values of buffer ``key`` (``count`` of them; 0-d for 1)."""
    value = sd.get(key)
    if value is None or value.is_floating_point() or value.numel() != count or value.device.type == "meta":
        got = "missing" if value is None else f"{value.dtype} {tuple(value.shape)} on {value.device}"
        raise ValueError(f"MMDiT state dict: {key} is {got}; expected {count} integer(s) with their values")
    return tuple(int(v) for v in value.reshape(-1).tolist())


def _pos_embed_side(sd: dict[str, Tensor], dim: int) -> int:
    """The side of the ``pos_embed`` table ``(1, side * side, dim)`` (SD3's ``pos_embed_max_size``), 0 without one."""
    if "pos_embed" not in sd:
        return 0
    _, cells, width = key_shape(sd, "pos_embed", 3, "MMDiT")
    side = math.isqrt(cells)
    if side * side != cells or width != dim:
        raise ValueError(f"MMDiT state dict: pos_embed is (1, {cells}, {width}); expected (1, side * side, {dim})")
    return side


def _key_mask(sd: dict[str, Tensor]) -> float:
    """The value of the ``reference_key_mask`` buffer (a float32 scalar), 0.0 without one."""
    value = sd.get("reference_key_mask")
    if value is None:
        return 0.0
    if not value.is_floating_point() or value.numel() != 1 or value.device.type == "meta":
        raise ValueError(f"MMDiT state dict: reference_key_mask is {value.dtype} {tuple(value.shape)} on "
                         f"{value.device}; expected one float with its value")
    return float(value.reshape(()))


def infer_mmdit_config(sd: dict[str, Tensor]) -> MMDiTConfig:
    """The architecture of a Phantom MMDiT from its tensor shapes (and its two integer buffers).

    ``num_heads = dim // head_dim`` with ``head_dim`` the length of the per-head qk-norm weight; ``clip_dim`` 0 when
    there is no ``clip_embedder``; ``pos_embed_max`` the side of the ``pos_embed`` table, 0 without one;
    ``pooled_text`` / ``pooled_reference`` whether there is a ``y_embedder`` / ``r_embedder``; ``text_positions``
    / ``reference_index`` whether there is a ``text_pos_embed`` / ``ref_index_embed``; ``window`` and
    ``text_len`` from the ``window_size`` / ``text_len`` buffers, ``reference_key_mask`` from its buffer (0 without).
    Returns the ``MMDIT_PRESETS`` object when one is equal.

    Raises:
        ValueError: naming what the state dict looks like when it is not a Phantom MMDiT (an SD3 image MMDiT, a
            Phantom-Wan DiT, ...), or the key with an unexpected shape.
    """
    if not is_mmdit_keys(sd):
        wan = "patch_embedding.weight" in sd or any(re.match(r"blocks\.\d+\.self_attn\.", k) for k in sd)
        what = "a Phantom-Wan / Wan2.1 DiT (blocks.N.self_attn keys)" if wan else f"not an MMDiT (first keys: " \
            f"{sorted(sd)[:5]})"
        raise ValueError(f"this checkpoint is {what}; expected a Phantom MMDiT (joint_blocks.N.x_block keys)")
    if "x_embedder.proj.weight" in sd and sd["x_embedder.proj.weight"].ndim == 4:
        raise ValueError("this checkpoint is an SD3 image MMDiT (2-D x_embedder.proj); expected a Phantom video MMDiT")
    dim, in_dim, *patch = key_shape(sd, "x_embedder.proj.weight", 5, "MMDiT")
    head_dim = key_shape(sd, "joint_blocks.0.x_block.attn.ln_q.weight", 1, "MMDiT")[0]
    if head_dim < 1 or dim % head_dim:
        raise ValueError(f"MMDiT state dict: qk-norm width {head_dim} does not divide the model width {dim}")
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"joint_blocks\.(\d+)\.", k))}
    config = MMDiTConfig(
        dim=dim, num_heads=dim // head_dim, num_layers=max(layers) + 1,
        ffn_dim=key_shape(sd, "joint_blocks.0.x_block.mlp.fc1.weight", 2, "MMDiT")[0],
        in_dim=in_dim, out_dim=key_shape(sd, "final_layer.linear.weight", 2, "MMDiT")[0] // math.prod(patch),
        patch_size=tuple(patch), text_dim=key_shape(sd, "context_embedder.weight", 2, "MMDiT")[1],
        text_len=_ints(sd, "text_len", 1)[0],
        clip_dim=key_shape(sd, "clip_embedder.1.weight", 2, "MMDiT")[1] if "clip_embedder.1.weight" in sd else 0,
        window=_ints(sd, "window_size", 3), freq_dim=key_shape(sd, "t_embedder.mlp.0.weight", 2, "MMDiT")[1],
        pos_embed_max=_pos_embed_side(sd, dim), pooled_text="y_embedder.mlp.0.weight" in sd,
        pooled_reference="r_embedder.mlp.0.weight" in sd, text_positions="text_pos_embed" in sd,
        reference_index="ref_index_embed" in sd, reference_key_mask=_key_mask(sd),
    )
    return next((preset for preset in MMDIT_PRESETS.values() if preset == config), config)


def mmdit_preset_name(config: MMDiTConfig) -> str | None:
    """The ``MMDIT_PRESETS`` name equal to ``config``, or None."""
    return next((name for name, preset in MMDIT_PRESETS.items() if preset == config), None)


def validate_mmdit_state_dict(sd: dict[str, Tensor], config: MMDiTConfig) -> None:
    """Check that ``sd`` has exactly the keys and shapes of ``PhantomMMDiT(config)`` (the extra keys of a
    scaled-fp8 file accepted, as for the Phantom-Wan DiT).

    Raises:
        ValueError: listing missing keys, unexpected keys and wrong shapes (up to 10 each, with counts).
    """
    want = {k: tuple(v.shape) for k, v in PhantomMMDiT(config, device="meta").state_dict().items()}
    extra = {k for k in sd if k == SCALED_FP8_KEY or (is_scale_key(k) and k.rsplit(".", 1)[0] + ".weight" in want)}
    if problems := key_problems(want, sd, extra):
        raise ValueError(f"MMDiT state dict does not match {mmdit_preset_name(config) or config}: "
                         + "; ".join(problems))


def load_mmdit(path_or_state_dict: str | Path | dict[str, Tensor], dtype: torch.dtype | None = torch.float32,
               device: torch.device | str = "cpu", ops: Any = nn, compute_dtype: torch.dtype | None = None,
               trainable: bool = False) -> PhantomMMDiT:
    """Load a Phantom MMDiT for inference (or training), tensor by tensor.

    Args:
        path_or_state_dict: a checkpoint path (``loading.files.read_state_dict``: safetensors, ``.pth``, sharded)
            or an in-memory state dict; float or (scaled) fp8 weights.
        dtype, device, ops, compute_dtype, trainable: exactly as ``phantom_core.wan.load.load_dit``.

    Returns:
        ``PhantomMMDiT`` in eval mode, frozen (or in train mode with gradients, ``trainable=True``).

    Raises:
        ValueError: naming the file, for a checkpoint that is not a Phantom MMDiT, missing / unexpected /
            mis-shaped keys, or the dtype problems ``load_dit`` raises.
    """
    return load_network(
        path_or_state_dict, DIT_PREFIXES, infer=infer_mmdit_config, validate=validate_mmdit_state_dict,
        build=lambda config, layers, dt: PhantomMMDiT(config, ops=layers, dtype=dt, device="meta"),
        describe=lambda c: f"MMDiT {mmdit_preset_name(c) or 'custom config'} ({c.num_layers} joint blocks, "
                           f"dim {c.dim})",
        dtype=dtype, device=device, ops=ops, compute_dtype=compute_dtype, trainable=trainable)


def load_any_dit(path: str | os.PathLike, block_swap: int = 0, **options: Any) -> nn.Module:
    """Load the velocity model a checkpoint file holds: a Phantom MMDiT when its keys are an MMDiT's (read from
    the header alone), else a Phantom-Wan DiT. ``options``: those of ``load_dit`` / ``load_mmdit``.

    ``block_swap``: as ``load_dit``'s, for either network. An MMDiT is then loaded on the CPU, with the compute
    dtype ``device`` would get (``fp8.plan_load``), and its last ``block_swap`` joint blocks stay there, streamed per
    forward, while the rest moves to ``device`` (``wan.block_swap.enable_block_swap``; inference only).

    Raises FileNotFoundError / ValueError (naming the file) as the two loaders do; ValueError for ``block_swap``
    outside ``0..num_layers`` or with ``trainable=True``.
    """
    _, infos, _, _ = read_tensor_infos(path)
    if not is_mmdit_keys(infos):
        return load_dit(path, block_swap=block_swap, **options)
    if not block_swap:
        return load_mmdit(path, **options)
    if options.get("trainable"):
        raise ValueError(f"block_swap is {block_swap} with trainable=True; block swap is for inference (use "
                         "gradient checkpointing to save memory when training), pass block_swap=0")
    device = options.pop("device", "cpu")
    stored = detect_fp8_format(stand_ins(infos))  # the compute dtype of `device`, not of the CPU it loads on
    options["compute_dtype"] = plan_load(stored, options.get("dtype", torch.float32), options.get("compute_dtype"),
                                         device).compute_dtype
    return enable_block_swap(load_mmdit(path, device="cpu", **options), block_swap, device)
