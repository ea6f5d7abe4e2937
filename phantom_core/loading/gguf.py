"""GGUF checkpoints (the files ComfyUI-GGUF users have: Q8_0, Q6_K, Q5_K_M, Q4_K_M ...), read with the ``gguf``
package and kept packed in memory; each layer dequantizes its weight on the forward (``gguf_quants``).

File layout (GGUF spec, ggml ``docs/gguf.md``): a header, key/value metadata, tensor infos (name, ggml type, ``ne``
dimensions innermost first) and the aligned tensor data. ``gguf.GGUFReader`` memory-maps it. The logical (torch)
shape is ``ne`` reversed, except where ComfyUI-GGUF's converter reshaped a tensor to rows of 256 (5-D patch
embeddings) and stored the original shape as ``comfy.gguf.orig_shape.<name>`` (an int32 array).

A state dict read here maps each name to a torch tensor (F32 / F16 / BF16 data, memory-mapped, logical shape) or
to a ``PackedTensor`` (block-quantized bytes + ggml type + logical shape). ``attach_packed`` puts the packed ones
into a model built from cast-on-forward layers (``fp8.fp8_ops``): such a layer keeps its weight as raw bytes and
``fp8._cast_weight`` dequantizes it per forward; a packed tensor that is no layer's weight is dequantized at load.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from phantom_core.loading.fp8 import GGUF_SHAPE_ATTR, GGUF_TYPE_ATTR
from phantom_core.loading.gguf_quants import GGML_TYPES, SUPPORTED, dequantize_ggml
from phantom_core.log import logger

ORIG_SHAPE_KEY = "comfy.gguf.orig_shape."  # ComfyUI-GGUF's converter: original shape of a reshaped tensor
_FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


@dataclass(frozen=True)
class PackedTensor:
    """A block-quantized tensor as stored: ``raw`` uint8 bytes (rows of whole blocks), its ggml type id and the
    logical torch-order ``shape``."""

    raw: Tensor
    ggml_type: int
    shape: tuple[int, ...]

    @property
    def type_name(self) -> str:
        return GGML_TYPES[self.ggml_type][0]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize_ggml(self.raw, self.ggml_type, self.shape, dtype)


def _reader(path: str | os.PathLike):
    """``gguf.GGUFReader`` of ``path``; ValueError naming the file when it is not a readable GGUF file."""
    import gguf

    try:
        return gguf.GGUFReader(path)
    except (ValueError, OSError, IndexError, KeyError) as err:
        raise ValueError(f"{path} is not a readable GGUF file ({err})") from err


def _logical_shapes(reader) -> dict[str, tuple[int, ...]]:
    """Torch-order shape of every tensor: ``comfy.gguf.orig_shape.<name>`` where present, else ``ne`` reversed."""
    shapes = {}
    for t in reader.tensors:
        field = reader.get_field(ORIG_SHAPE_KEY + t.name)
        orig = tuple(int(field.parts[i][0]) for i in field.data) if field is not None else None
        shapes[t.name] = orig or tuple(int(n) for n in reversed(t.shape))
    return shapes


def gguf_tensor_infos(path: str | os.PathLike) -> tuple[dict[str, tuple[tuple[int, ...], str]], dict[str, str]]:
    """``({name: (logical shape, ggml type name)}, {"architecture": ...})`` from a GGUF file's header only."""
    reader = _reader(path)
    shapes = _logical_shapes(reader)
    infos = {t.name: (shapes[t.name], GGML_TYPES.get(int(t.tensor_type), (t.tensor_type.name,))[0])
             for t in reader.tensors}
    arch = reader.get_field("general.architecture")
    return infos, ({"architecture": str(arch.contents())} if arch is not None else {})


def read_gguf(path: str | os.PathLike) -> dict[str, Tensor | PackedTensor]:
    """A GGUF file as a state dict: float tensors (memory-mapped) and ``PackedTensor`` for quantized ones.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: naming the file when it is not GGUF, or the tensors that use a type not supported here.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    reader = _reader(path)
    shapes = _logical_shapes(reader)
    unsupported = sorted(f"{t.name} ({t.tensor_type.name})" for t in reader.tensors
                         if int(t.tensor_type) not in GGML_TYPES)
    if unsupported:
        raise ValueError(f"{path} uses GGML types not supported here ({len(unsupported)} tensors, e.g. "
                         f"{', '.join(unsupported[:3])}); supported: {', '.join(SUPPORTED)}")
    sd: dict[str, Tensor | PackedTensor] = {}
    for t in reader.tensors:
        name = GGML_TYPES[int(t.tensor_type)][0]
        with warnings.catch_warnings():  # the memory map is read-only; nothing here ever writes to it
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            data = torch.from_numpy(np.asarray(t.data))  # shares the memory map
        if name in _FLOAT_TYPES:
            sd[t.name] = data.view(_FLOAT_TYPES[name]).reshape(shapes[t.name])
        else:
            sd[t.name] = PackedTensor(data, int(t.tensor_type), shapes[t.name])
    logger.info("read GGUF %s: %d tensors, %d block-quantized", path.name, len(sd),
                sum(isinstance(v, PackedTensor) for v in sd.values()))
    return sd


def split_packed(sd: dict[str, Tensor | PackedTensor]) -> tuple[dict[str, Tensor], dict[str, PackedTensor]]:
    """``(float tensors, packed tensors)`` of a state dict read by ``read_gguf``."""
    packed = {k: v for k, v in sd.items() if isinstance(v, PackedTensor)}
    return {k: v for k, v in sd.items() if k not in packed}, packed


def shape_stand_ins(packed: dict[str, PackedTensor]) -> dict[str, Tensor]:
    """Meta-device float tensors of the packed tensors' logical shapes (for shape inference and key checks)."""
    return {k: torch.empty(p.shape, device="meta") for k, p in packed.items()}


def attach_packed(model: nn.Module, packed: dict[str, PackedTensor], dtype: torch.dtype,
                  device: torch.device | str) -> None:
    """Put packed tensors into ``model`` (its other tensors already loaded).

    ``<layer>.weight`` of a cast-on-forward layer (it has ``compute_dtype``, see ``fp8._CastLayer``) stays packed
    on ``device`` and is dequantized per forward; any other packed tensor is dequantized now to ``dtype``.
    """
    modules = dict(model.named_modules())
    for key, p in packed.items():
        owner_name, _, attr = key.rpartition(".")
        owner = modules[owner_name]
        if attr == "weight" and hasattr(owner, "compute_dtype"):
            owner.weight = nn.Parameter(p.raw.to(device), requires_grad=False)
            setattr(owner, GGUF_TYPE_ATTR, p.ggml_type)
            setattr(owner, GGUF_SHAPE_ATTR, p.shape)
        else:
            setattr(owner, attr, nn.Parameter(p.dequantize(dtype).to(device), requires_grad=False))
