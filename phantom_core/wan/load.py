"""Recognising DiT checkpoints and loading them into ``PhantomWanDiT``.

Keys stay exactly those of the upstream Wan2.1 / Phantom-Wan checkpoints; the only conversion is
``strip_prefixes`` (ComfyUI's ``model.diffusion_model.`` / ``diffusion_model.``). The architecture is inferred
from tensor shapes alone (``infer_dit_config``); the model is then built on the meta device and the tensors are
assigned into it, so a checkpoint is never held in memory twice.

Reading the files themselves (safetensors, torch ``.pth``, sharded indexes, and their checks) is
``phantom_core.loading.files``; the generic key checks are ``phantom_core.loading.keys``.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from phantom_core.loading.assign import build_and_assign
from phantom_core.loading.files import read_state_dict
from phantom_core.loading.fp8 import (
    SCALED_FP8_KEY,
    cast_layer_weights,
    convert_state_dict,
    default_compute_dtype,
    detect_fp8_format,
    fp8_ops,
    is_scale_key,
    plan_load,
)
from phantom_core.loading.gguf import PackedTensor, attach_packed, read_gguf, shape_stand_ins, split_packed
from phantom_core.loading.keys import errors_name_file, keep_prefixed, key_problems, key_shape
from phantom_core.log import logger
from phantom_core.wan.block_swap import check_block_swap, enable_block_swap
from phantom_core.wan.dit import DIT_PRESETS, HEAD_DIM, PhantomWanDiT, WanDiTConfig

DIT_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


def strip_prefixes(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Drop ComfyUI's ``model.diffusion_model.`` / ``diffusion_model.`` key prefixes (see ``keep_prefixed``)."""
    return keep_prefixed(sd, DIT_PREFIXES)


def _describe_non_dit(sd: dict[str, Tensor]) -> str | None:
    """What a state dict that is not a Wan T2V DiT looks like, or None when it may be one."""
    keys = sd.keys()

    def has(pattern: str) -> bool:
        return any(re.match(pattern, k) for k in keys)

    if "shared.weight" in sd or has(r"encoder\.block\.\d+\."):
        return "a T5/umT5 text encoder (shared.weight / encoder.block.* keys)"
    if "token_embedding.weight" in sd and has(r"blocks\.\d+\.attn\."):
        return "a Wan umT5 text encoder (token_embedding.weight / blocks.*.attn.* keys)"
    if "encoder.conv1.weight" in sd or has(r"decoder\.") or has(r"encoder\.downsamples\."):
        return "a VAE (encoder.conv1.weight / decoder.* keys)"
    if has(r"(visual|textual|log_scale)") and "patch_embedding.weight" not in sd:
        return "a CLIP image/text encoder (visual.* / textual.* keys)"
    if has(r"img_emb\."):
        return "a Wan2.1 image-to-video (I2V/FLF2V) DiT (img_emb.* keys)"
    if has(r"vace_"):
        return "a Wan VACE DiT (vace_* keys)"
    pe = sd.get("patch_embedding.weight")
    if pe is not None and pe.ndim == 5 and pe.shape[1] == 36:
        return "a Wan2.1 image-to-video DiT (36 input channels)"
    if pe is not None and pe.ndim == 5 and pe.shape[1] == 48:
        return "a Wan2.2 TI2V-5B DiT (48 latent channels)"
    if pe is None or pe.ndim != 5:
        return f"not a Wan DiT (no 5-D patch_embedding.weight; first keys: {sorted(keys)[:5]})"
    return None



def infer_dit_config(sd: dict[str, Tensor]) -> WanDiTConfig:
    """Recover the architecture of a Wan2.1 T2V / Phantom-Wan DiT from tensor shapes alone.

    ``num_heads = dim // 128``: heads are not stored, and every Wan2.1 model uses 128 channels per head.
    A plain Wan2.1 T2V checkpoint has the same shapes as the Phantom-Wan one of its size (Phantom adds no
    parameters), so it is recognised as that preset too. Returns the preset object when one matches.

    Raises:
        ValueError: naming what the state dict looks like (I2V DiT, VAE, text encoder, ...) when it is not a
            T2V DiT, or which key has an unexpected shape.
    """
    what = _describe_non_dit(sd)
    if what is not None:
        raise ValueError(f"this checkpoint is {what}; expected a Phantom-Wan (Wan2.1 T2V) DiT")
    dim, in_dim, *patch = key_shape(sd, "patch_embedding.weight", 5, "Wan DiT")
    if dim % HEAD_DIM:
        raise ValueError(f"patch_embedding.weight gives dim {dim}; Wan DiTs have a multiple of {HEAD_DIM}")
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    if not layers:
        raise ValueError("Wan DiT state dict has no blocks.N.* keys")
    head_out = key_shape(sd, "head.head.weight", 2, "Wan DiT")[0]
    config = WanDiTConfig(
        dim=dim,
        ffn_dim=key_shape(sd, "blocks.0.ffn.0.weight", 2, "Wan DiT")[0],
        num_heads=dim // HEAD_DIM,
        num_layers=max(layers) + 1,
        in_dim=in_dim,
        out_dim=head_out // math.prod(patch),
        patch_size=tuple(patch),
        text_dim=key_shape(sd, "text_embedding.0.weight", 2, "Wan DiT")[1],
        freq_dim=key_shape(sd, "time_embedding.0.weight", 2, "Wan DiT")[1],
    )
    name = preset_name(config)
    return DIT_PRESETS[name] if name else config


def preset_name(config: WanDiTConfig) -> str | None:
    """The ``DIT_PRESETS`` name equal to ``config``, or None."""
    return next((name for name, preset in DIT_PRESETS.items() if preset == config), None)


def expected_shapes(config: WanDiTConfig) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` of a ``PhantomWanDiT(config)`` state dict (built on the meta device, no memory)."""
    return {k: tuple(v.shape) for k, v in PhantomWanDiT(config, device="meta").state_dict().items()}


def _fp8_extras(sd: dict[str, Tensor], want: dict[str, tuple[int, ...]]) -> set[str]:
    """Keys a scaled-fp8 file adds: the ``scaled_fp8`` marker and ``<layer>.scale_weight`` / ``.scale_input``
    beside an expected ``<layer>.weight`` (a scale for any other key stays unexpected)."""
    return {k for k in sd if k == SCALED_FP8_KEY or (is_scale_key(k) and k.rsplit(".", 1)[0] + ".weight" in want)}


def validate_dit_state_dict(sd: dict[str, Tensor], config: WanDiTConfig) -> None:
    """Check that ``sd`` has exactly the keys and shapes of ``PhantomWanDiT(config)``.

    The extra keys of a scaled-fp8 file (``scaled_fp8`` marker, per-layer ``scale_weight`` / ``scale_input``)
    are accepted; whether every fp8 weight has its scale is checked at load (``fp8.split_scales``).

    Raises:
        ValueError: listing (up to 10 of each, with counts) missing keys, unexpected keys and wrong shapes.
    """
    want = expected_shapes(config)
    if problems := key_problems(want, sd, _fp8_extras(sd, want)):
        raise ValueError(f"DiT state dict does not match {preset_name(config) or config}: " + "; ".join(problems))


def _load_packed(config: WanDiTConfig, sd: dict[str, Tensor], packed: dict[str, PackedTensor],
                 compute: torch.dtype, device: torch.device | str) -> PhantomWanDiT:
    """A GGUF DiT with its block-quantized weights kept packed (dequantized per forward, ``loading.gguf``) and
    every other tensor in ``compute``; eval mode, frozen."""
    plan = plan_load(detect_fp8_format(sd), compute, compute, device)
    model = PhantomWanDiT(config, ops=fp8_ops(compute), dtype=compute, device="meta")
    convert_state_dict(sd, cast_layer_weights(model), plan, device)
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    assert set(missing) == set(packed) and not unexpected, (missing, unexpected)  # validated above
    attach_packed(model, packed, compute, device)
    logger.info("loaded GGUF DiT %s: %d packed tensors (%s), compute %s on %s", preset_name(config) or "custom",
                len(packed), ", ".join(sorted({p.type_name for p in packed.values()})), compute, device)
    return model.eval().requires_grad_(False)


def load_dit(
    path_or_state_dict: str | Path | dict[str, Tensor],
    dtype: torch.dtype | None = torch.float32,
    device: torch.device | str = "cpu",
    ops: Any = nn,
    compute_dtype: torch.dtype | None = None,
    trainable: bool = False,
    block_swap: int = 0,
) -> PhantomWanDiT:
    """Load a Phantom-Wan DiT for inference (or training), tensor by tensor (never the whole checkpoint twice).

    Args:
        path_or_state_dict: a checkpoint path (see ``read_state_dict``; ``.gguf`` too, see
            ``phantom_core.loading.gguf``) or an in-memory state dict; fp32 / fp16 / bf16, fp8 (``float8_e4m3fn`` /
            ``float8_e5m2``) or ComfyUI's scaled fp8 (see ``phantom_core.loading.fp8``).
        dtype: weight dtype. None keeps the stored one (an fp8 file stays fp8; a GGUF file stays block-quantized,
            each layer dequantizing its weight per forward). fp32 / fp16 / bf16: every tensor
            is cast to it (fp8 weights dequantized with their scales). An fp8 dtype: the Linear weights are
            stored in it (float weights quantized with a per-tensor scale), everything else in ``compute_dtype``.
        device: where the parameters go.
        ops: layer namespace (``torch.nn`` or e.g. ComfyUI's ``comfy.ops.disable_weight_init``). When the weights
            must be cast per forward (fp8, or ``compute_dtype`` != weight dtype), ``fp8_ops(compute_dtype)`` is
            used instead, logged.
        compute_dtype: activation dtype. None: the weight dtype for float weights; for fp8 weights bf16 on a
            CUDA device and fp32 elsewhere (``fp8.default_compute_dtype``).
        trainable: False (default): eval mode, ``requires_grad`` off. True: train mode, ``requires_grad`` on
            every parameter; needs float weights (fp32 / fp16 / bf16), not fp8. Parameters may share storage with
            an in-memory ``path_or_state_dict`` whose tensors need no conversion: training then updates them.
        block_swap: keep the weights of the last ``block_swap`` blocks (0 to ``num_layers``) on the CPU, pinned,
            and stream each to ``device`` just before it runs, the next one prefetched (``wan.block_swap``;
            inference only). The model is then loaded on the CPU and everything else moved to ``device``, so the
            swapped blocks never touch it. 0 (default): off.

    Returns:
        ``PhantomWanDiT`` in eval mode with ``requires_grad`` off (``trainable=False``) or in train mode with it
        on (``trainable=True``); ``model.compute_dtype`` is the activation dtype.

    Raises:
        ValueError: for a file that is not a T2V Wan DiT, missing / unexpected / mis-shaped keys, a scaled fp8
            file missing a ``scale_weight``, an unusable ``dtype`` / ``compute_dtype``, fp8 weights with
            ``trainable=True``, or ``block_swap`` outside ``0..num_layers`` or with ``trainable=True``.
    """
    owned = not isinstance(path_or_state_dict, dict)
    gguf = owned and str(path_or_state_dict).lower().endswith(".gguf")
    sd = (read_gguf if gguf else read_state_dict)(path_or_state_dict) if owned else path_or_state_dict
    sd, packed = split_packed(strip_prefixes(sd))  # packed: GGUF block-quantized tensors (none elsewhere)
    shapes = {**sd, **shape_stand_ins(packed)}  # what the checks see: packed tensors by their logical shapes
    with errors_name_file(path_or_state_dict):
        config = infer_dit_config(shapes)
        validate_dit_state_dict(shapes, config)
    check_block_swap(block_swap, config.num_layers)
    if block_swap and trainable:
        raise ValueError(f"block_swap is {block_swap} with trainable=True; block swap is for inference (use "
                         "gradient checkpointing to save memory when training), pass block_swap=0")
    if block_swap:  # load on the CPU in the dtypes the real device would get, then place all but the swapped blocks
        if packed and dtype is None:  # GGUF kept packed: as _load_packed below
            compute_dtype = compute_dtype or default_compute_dtype(device)
        else:
            compute_dtype = plan_load(detect_fp8_format(sd), dtype, compute_dtype, device).compute_dtype
        model = load_dit({**sd, **packed}, dtype=dtype, device="cpu", ops=ops, compute_dtype=compute_dtype)
        return enable_block_swap(model, block_swap, device)
    if packed and (dtype is not None or trainable):  # a float weight dtype asked for: unpack now, load as usual
        sd |= {k: p.dequantize(torch.float32) for k, p in packed.items()}
        packed = {}
    if packed:
        return _load_packed(config, sd, packed, compute_dtype or default_compute_dtype(device), device)
    name = f"DiT {preset_name(config) or 'custom config'} ({config.num_layers} layers, dim {config.dim})"
    return build_and_assign(lambda layers, dt: PhantomWanDiT(config, ops=layers, dtype=dt, device="meta"), sd, name,
                            dtype=dtype, device=device, ops=ops, compute_dtype=compute_dtype, trainable=trainable)
