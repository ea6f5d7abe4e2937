"""Reading, checking, building on the meta device and assigning: the sequence every DiT loader shares.

A network's loader (``wan.load.load_dit``, ``mmdit.load.load_mmdit``) gives :func:`load_network` its own shape
inference, key check and constructor; this module reads the file (``files.read_state_dict``), drops the host's
key prefixes, resolves the weight and compute dtypes (``fp8.plan_load``), converts the tensors one at a time (so a
checkpoint is never held twice), assigns them (``load_state_dict(assign=True)``) and sets train / eval mode.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from phantom_core.loading.files import read_state_dict
from phantom_core.loading.fp8 import (
    attach_scales,
    cast_layer_weights,
    convert_state_dict,
    detect_fp8_format,
    fp8_ops,
    is_fp8,
    plan_load,
    weight_bytes,
)
from phantom_core.loading.keys import errors_name_file, keep_prefixed
from phantom_core.log import logger


def load_network(source: str | Path | dict[str, Tensor], prefixes: tuple[str, ...], *,
                 infer: Callable[[dict[str, Tensor]], Any], validate: Callable[[dict[str, Tensor], Any], None],
                 build: Callable[[Any, Any, torch.dtype], nn.Module], describe: Callable[[Any], str],
                 **options: Any) -> nn.Module:
    """Load a network from a checkpoint path or an in-memory state dict (never mutated).

    Args:
        source: a path ``read_state_dict`` reads, or a state dict.
        prefixes: host key prefixes to drop (the first one the keys carry, ``keep_prefixed``).
        infer: ``sd -> config`` from the shapes; validate: ``(sd, config) -> None`` raising on a key mismatch
            (both raise ValueError, which gets the file's path in front).
        build: ``(config, ops, dtype) -> module`` built on ``torch.device("meta")``.
        describe: ``config -> str`` for the log line.
        options: ``dtype``, ``device``, ``ops``, ``compute_dtype``, ``trainable`` of :func:`build_and_assign`.
    """
    sd = keep_prefixed(read_state_dict(source) if not isinstance(source, dict) else source, prefixes)
    sd = dict(sd) if sd is source else sd
    with errors_name_file(source):
        config = infer(sd)
        validate(sd, config)
    return build_and_assign(lambda ops, dtype: build(config, ops, dtype), sd, describe(config), **options)


def build_and_assign(build: Callable[[Any, torch.dtype], nn.Module], sd: dict[str, Tensor], name: str, *,
                     dtype: torch.dtype | None, device: torch.device | str, ops: Any,
                     compute_dtype: torch.dtype | None, trainable: bool) -> nn.Module:
    """Build with ``build(ops, dtype)`` on the meta device and assign ``sd`` (already checked) into it.

    Args:
        build: ``(ops, dtype) -> module`` built on ``torch.device("meta")``.
        sd: the checked state dict; converted in place, tensor by tensor.
        name: what is loaded, for the log line (``"DiT phantom-wan-1.3b (30 layers, dim 1536)"``).
        dtype, device, ops, compute_dtype, trainable: as ``wan.load.load_dit`` documents them (None keeps the
            stored dtype; fp8 weights or a compute dtype other than the weights' use ``fp8_ops(compute_dtype)``).

    Returns:
        The module in eval mode with ``requires_grad`` off, or in train mode with it on (``trainable``).

    Raises:
        ValueError: an unusable ``dtype`` / ``compute_dtype``, a scaled fp8 file missing a ``scale_weight``, or fp8
            weights with ``trainable=True``.
    """
    stored = detect_fp8_format(sd)
    plan = plan_load(stored, dtype, compute_dtype, device)
    if trainable and is_fp8(plan.weight_dtype):
        kept = " (dtype=None keeps the checkpoint's own)" if dtype is None else ""
        raise ValueError(f"trainable=True needs float weights, but the weight dtype is {plan.weight_dtype}{kept}; "
                         "pass dtype=torch.float32, torch.bfloat16 or torch.float16 (an fp8 file is dequantized)")
    if plan.cast_ops:
        if ops is not nn:
            logger.info("%s weights computed in %s need cast-on-forward layers: using phantom fp8_ops, not %s",
                        plan.weight_dtype, plan.compute_dtype, getattr(ops, "__name__", ops))
        ops = fp8_ops(plan.compute_dtype)
    logger.info("loading %s stored as %s%s: weights %s, compute %s, on %s", name, stored.stored_dtype,
                " (scaled)" if stored.scaled else "", plan.weight_dtype, plan.compute_dtype, device)
    model = build(ops, plan.compute_dtype if plan.cast_ops else plan.weight_dtype)
    # one tensor at a time, each source reference dropped as we go; {} kinds with plain layers: all weight dtype
    scales = convert_state_dict(sd, cast_layer_weights(model), plan, device)
    model.load_state_dict(sd, strict=True, assign=True)
    attach_scales(model, scales)
    logger.debug("%s weights by dtype (bytes): %s", name, weight_bytes(model))
    return model.train().requires_grad_(True) if trainable else model.eval().requires_grad_(False)
