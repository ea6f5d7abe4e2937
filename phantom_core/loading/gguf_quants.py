"""GGML block quantizations dequantized in torch, on whatever device the packed bytes are (the forward's).

The ``gguf`` package dequantizes with numpy on the CPU, which would cost a device round trip per layer and per
forward; these kernels do the same arithmetic in torch, block by block, and are tested against ``gguf.quants``
(an independent implementation) in ``tests/core/test_gguf.py``. Layouts (source: ggml ``ggml-common.h``
``block_q8_0`` / ``block_q4_K`` / ``block_q5_K`` / ``block_q6_K`` and ``ggml-quants.c`` ``dequantize_row_*``):

- Q8_0, 32 values in 34 bytes: ``d`` (fp16), 32 x int8 ``q``; ``w = d * q``.
- Q4_K, 256 values in 144 bytes: ``d``, ``dmin`` (fp16), 12 bytes of eight 6-bit (scale, min) pairs, 128 bytes
  of 4-bit ``q``; sub-block ``j`` of 32: ``w = d * sc_j * q - dmin * m_j``.
- Q5_K, 256 values in 176 bytes: as Q4_K plus 32 bytes ``qh`` giving each ``q`` a fifth bit.
- Q6_K, 256 values in 210 bytes: 128 bytes low 4 bits, 64 bytes high 2 bits, 16 x int8 scales, ``d`` (fp16);
  ``w = d * sc_j * (q - 32)`` for sub-blocks of 16.
- F32 / F16 / BF16: stored as they are (BF16 as its 16 raw bits).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

QK_K = 256  # values per K-quant super-block

# ggml type id -> (name, values per block, bytes per block)
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 30: ("BF16", 1, 2), 8: ("Q8_0", 32, 34),
    12: ("Q4_K", QK_K, 144), 13: ("Q5_K", QK_K, 176), 14: ("Q6_K", QK_K, 210),
}


def _f16(blocks: Tensor, start: int) -> Tensor:
    """The fp16 number at byte ``start`` of each block ``(n, bytes)`` uint8 -> ``(n, 1)`` float32."""
    return blocks[:, start:start + 2].contiguous().view(torch.float16).float()


def _q8_0(blocks: Tensor) -> Tensor:
    d = _f16(blocks, 0)  # (n, 1)
    q = blocks[:, 2:].contiguous().view(torch.int8).float()  # (n, 32)
    return d * q


def _k_scales(packed: Tensor) -> tuple[Tensor, Tensor]:
    """The eight 6-bit scales and mins of a Q4_K / Q5_K block from its 12 packed bytes ``(n, 12)`` -> 2 x ``(n, 8)``
    (ggml ``get_scale_min_k4``)."""
    p = packed.to(torch.int32)
    low_sc, low_m = p[:, 0:4] & 63, p[:, 4:8] & 63  # sub-blocks 0..3
    high_sc = (p[:, 8:12] & 0xF) | ((p[:, 0:4] >> 6) << 4)  # sub-blocks 4..7
    high_m = (p[:, 8:12] >> 4) | ((p[:, 4:8] >> 6) << 4)
    return torch.cat([low_sc, high_sc], 1).float(), torch.cat([low_m, high_m], 1).float()


def _nibbles(qs: Tensor) -> Tensor:
    """``(n, 128)`` bytes -> ``(n, 8, 32)`` 4-bit values: for each 32-byte group, its low nibbles then its high."""
    q = qs.to(torch.int32).view(-1, 4, 32)  # (n, 4, 32)
    return torch.stack([q & 0xF, q >> 4], dim=2).view(-1, 8, 32)  # (n, 8, 32)


def _q4_k(blocks: Tensor) -> Tensor:
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)  # (n, 1) each
    sc, m = _k_scales(blocks[:, 4:16])  # (n, 8) each
    q = _nibbles(blocks[:, 16:144]).float()  # (n, 8, 32)
    return ((d * sc).unsqueeze(-1) * q - (dmin * m).unsqueeze(-1)).flatten(1)  # (n, 256)


def _q5_k(blocks: Tensor) -> Tensor:
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)
    sc, m = _k_scales(blocks[:, 4:16])
    qh = blocks[:, 16:48].to(torch.int32)  # (n, 32): bit j of byte l is the fifth bit of value l of sub-block j
    bits = torch.arange(8, device=blocks.device, dtype=torch.int32)
    high = ((qh.unsqueeze(1) >> bits.view(1, 8, 1)) & 1) << 4  # (n, 8, 32)
    q = (_nibbles(blocks[:, 48:176]) | high).float()  # (n, 8, 32)
    return ((d * sc).unsqueeze(-1) * q - (dmin * m).unsqueeze(-1)).flatten(1)


def _q6_k(blocks: Tensor) -> Tensor:
    ql = blocks[:, 0:128].to(torch.int32).view(-1, 2, 2, 32)  # (n, half, 32-byte group, 32)
    qh = blocks[:, 128:192].to(torch.int32).view(-1, 2, 1, 32)  # (n, half, 1, 32)
    sc = blocks[:, 192:208].contiguous().view(torch.int8).float().view(-1, 2, 8)  # (n, half, 8)
    d = _f16(blocks, 208)  # (n, 1)
    low = torch.stack([ql & 0xF, ql >> 4], dim=2).view(-1, 2, 4, 32)  # (n, half, quarter, 32)
    shifts = torch.tensor([0, 2, 4, 6], device=blocks.device, dtype=torch.int32).view(1, 1, 4, 1)
    q = (low | (((qh >> shifts) & 3) << 4)).float() - 32.0  # (n, half, quarter, 32)
    scale = sc.view(-1, 2, 4, 2).repeat_interleave(16, dim=-1)  # (n, half, quarter, 32): 16 values per scale
    return (d.view(-1, 1, 1, 1) * scale * q).flatten(1)  # (n, 256)


_BLOCK_KERNELS: dict[str, Callable[[Tensor], Tensor]] = {"Q8_0": _q8_0, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}
SUPPORTED = tuple(name for name, _, _ in GGML_TYPES.values())


def dequantize_ggml(raw: Tensor, ggml_type: int, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
    """Unpack GGML-stored bytes into a tensor of the logical ``shape``.

    Args:
        raw: uint8 bytes of the tensor as stored, any shape (row-major, rows of whole blocks), on any device.
        ggml_type: the ggml type id (``GGML_TYPES``; e.g. 12 = Q4_K).
        shape: the logical (torch-order) shape; its element count must fill whole blocks.
        dtype: the result's dtype (arithmetic in float32, rounded once).
    Returns:
        ``shape`` tensor of ``dtype`` on ``raw``'s device.
    Raises:
        ValueError: an unsupported type, or a byte count that does not match ``shape``.
    """
    if ggml_type not in GGML_TYPES:
        raise ValueError(f"GGML type {ggml_type} is not supported; supported: {', '.join(SUPPORTED)}")
    name, per_block, nbytes = GGML_TYPES[ggml_type]
    count = 1
    for s in shape:
        count *= int(s)
    if count % per_block or raw.numel() != count // per_block * nbytes:
        raise ValueError(f"{name} tensor of shape {tuple(shape)} needs {count // per_block * nbytes} bytes in whole "
                         f"blocks of {per_block}; got {raw.numel()} bytes")
    flat = raw.reshape(-1).contiguous()
    if name == "F32":
        values = flat.view(torch.float32)
    elif name == "F16":
        values = flat.view(torch.float16)
    elif name == "BF16":
        values = flat.view(torch.bfloat16)
    else:
        values = _BLOCK_KERNELS[name](flat.view(-1, nbytes))  # (blocks, per_block) float32
    return values.reshape(shape).to(dtype)
