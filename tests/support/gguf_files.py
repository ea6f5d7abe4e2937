"""Tiny GGUF checkpoints laid out as ComfyUI-GGUF's converter writes them: the upstream key names, ``ne`` order,
small and 1-D tensors in F32, other weights block-quantized, tensors whose last dimension is not a multiple of 256
reshaped to rows of 256 with ``comfy.gguf.orig_shape.<name>``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

BLOCK_QUANT = ("Q8_0", "Q4_K", "Q5_K", "Q6_K")


def random_blocks(type_name: str, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    """``(n_blocks, bytes per block)`` uint8 of random quantized values with small positive fp16 scales.

    gguf-py can dequantize but not quantize K-quants, so K-quant test data are random valid blocks."""
    import gguf

    qtype = gguf.GGMLQuantizationType[type_name]
    blocks = rng.integers(0, 256, (n_blocks, gguf.GGML_QUANT_SIZES[qtype][1]), dtype=np.uint8)
    offsets = {"Q8_0": (0,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}[type_name]
    for off in offsets:  # d / dmin: fp16 in [0.0005, 0.005] so the weights stay O(1)
        scales = rng.uniform(0.0005, 0.005, n_blocks).astype(np.float16)
        blocks[:, off:off + 2] = np.frombuffer(scales.tobytes(), np.uint8).reshape(n_blocks, 2)
    return blocks


def write_gguf(path: Path, sd: dict[str, torch.Tensor], quant_of: Callable[[str, torch.Tensor], str],
               seed: int = 0) -> Path:
    """Write ``sd`` to ``path``; ``quant_of(key, tensor)`` names each tensor's type (F32, F16, Q8_0, Q4_K ...).
    Q8_0 is quantized from the tensor's values; K-quants are random blocks (see ``random_blocks``)."""
    import gguf

    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), "wan")
    for key, tensor in sd.items():
        data = tensor.float().numpy()
        kind = quant_of(key, tensor)
        if kind in BLOCK_QUANT and data.shape[-1] % 256:
            writer.add_array(f"comfy.gguf.orig_shape.{key}", list(data.shape))
            data = data.reshape(-1, 256)
        if kind == "F32":
            writer.add_tensor(key, data)
        elif kind == "F16":
            writer.add_tensor(key, data.astype(np.float16))
        elif kind == "Q8_0":
            qtype = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(key, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            qtype = gguf.GGMLQuantizationType[kind]
            per_block = gguf.GGML_QUANT_SIZES[qtype][0]
            blocks = random_blocks(kind, data.size // per_block, rng).reshape(data.shape[0], -1)
            writer.add_tensor(key, blocks, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
