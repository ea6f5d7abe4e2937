"""Tensor names, shapes and dtypes of a checkpoint file, read from its metadata only (no tensor data).

A safetensors file's header (8-byte little-endian length + JSON, per the safetensors format spec:
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``), each shard header of a
sharded index, or a ``.pth`` opened with ``torch.load(mmap=True, weights_only=True)`` (tensors stay on disk
behind a memory map). ``stand_ins`` turns the result into shape-only ``meta`` tensors, on which the loaders' own
shape inference runs without memory.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

from phantom_core.loading.files import (
    INDEX_SUFFIX,
    TORCH_SUFFIXES,
    TensorInfo,
    check_shard_keys,
    find_index,
    read_index,
    read_safetensors_header,
    read_torch_checkpoint,
)
from phantom_core.loading.gguf import gguf_tensor_infos


def read_torch_shapes(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """``{name: (shape, dtype)}`` of a ``.pth`` via a memory map (legacy non-zip files are read fully, warned).

    Raises ``ValueError`` naming the file and the problem, as ``files.read_torch_checkpoint``.
    """
    obj = read_torch_checkpoint(path)
    return {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in obj.items()}


def _read_index(index: Path) -> tuple[dict[str, TensorInfo], dict[str, str], list[Path]]:
    by_shard: dict[str, list[str]] = {}
    for key, shard in read_index(index).items():
        by_shard.setdefault(shard, []).append(key)
    shards = [index.parent / s for s in sorted(by_shard)]
    tensors: dict[str, TensorInfo] = {}
    for shard, keys in zip(shards, [by_shard[s] for s in sorted(by_shard)]):
        if not shard.is_file():
            raise ValueError(f"shard {shard.name} listed in {index} is missing")
        infos = read_safetensors_header(shard)[0]
        check_shard_keys(shard, infos, keys)
        tensors.update(infos)
    return tensors, {}, [index, *shards]


def read_tensor_infos(path: str | os.PathLike) -> tuple[str, dict[str, TensorInfo], dict[str, str], list[Path]]:
    """``(format, {name: (shape, dtype)}, metadata, files)`` of any checkpoint ``read_state_dict`` accepts, and
    of GGUF files (``loading.gguf``; dtype names are then ggml type names such as ``Q4_K``).

    Raises the same ``FileNotFoundError`` / ``ValueError`` (naming the file and the problem) as ``read_state_dict``.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        path = find_index(path)
    name = path.name.lower()
    if name.endswith(INDEX_SUFFIX):
        return ("sharded safetensors", *_read_index(path))
    if name.endswith(".safetensors"):
        return ("safetensors", *read_safetensors_header(path), [path])
    if name.endswith(TORCH_SUFFIXES):
        return "pytorch", read_torch_shapes(path), {}, [path]
    if name.endswith(".gguf"):  # dtype names are ggml's: F32, F16, BF16, Q8_0, Q4_K, ...
        return ("gguf", *gguf_tensor_infos(path), [path])
    raise ValueError(f"{path} has an unknown extension; expected .safetensors, .pth, .pt, .bin, .ckpt, .gguf or a "
                     f"*{INDEX_SUFFIX} / a directory with one")


def stand_ins(infos: dict[str, TensorInfo]) -> dict[str, Tensor]:
    """Shape-and-dtype-only tensors (meta device: no memory) for the loaders' shape inference."""
    def dtype(name: str) -> torch.dtype:
        found = getattr(torch, name, None)
        return found if isinstance(found, torch.dtype) else torch.float32

    return {k: torch.empty(shape, device="meta", dtype=dtype(name)) for k, (shape, name) in infos.items()}
