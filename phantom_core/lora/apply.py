"""Applying LoRAs to a DiT at a strength: checked against the model, then merged into the weights or kept as
adapters.

Two modes, the same maths (``W' = W + sum_i strength_i * scale_i * up_i @ down_i``, plus any ``.diff`` deltas):

- **merged** (default): each delta is added to the stored weight once, so inference costs nothing extra. Float
  weights (fp32 / bf16 / fp16) get ``(W.float() + delta)`` rounded once to their dtype. fp8 weights
  (``fp8.CastLinear``, scaled or not) are dequantized (times ``scale_weight``), the delta added in float32, and
  the sum re-quantized to the same fp8 format with a fresh per-tensor scale (``fp8.quantize_fp8``): the model keeps
  ~1 byte per weight, at the price of one more fp8 rounding (relative error up to ~6 % per weight for e4m3, of
  the same size as the file's own quantization). Use the unmerged mode to keep fp8 weights exactly as stored.
- **unmerged**: every adapted Linear is wrapped in one ``adapter.LoRALinear`` whose rank is the sum of the LoRAs'
  ranks (their pairs concatenated, each ``up`` pre-multiplied by ``strength * scale``), so the base weights are
  untouched. Full-weight deltas (``.diff`` / ``.diff_b``) and low-rank pairs on non-Linear layers (a conv) are
  merged in both modes (an adapter would hold a second full copy of the layer).

Nothing is changed when any LoRA fails its checks (``check_lora`` runs on every LoRA first).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from phantom_core.loading.fp8 import dequantize, is_fp8, quantize_fp8
from phantom_core.loading.keys import short_listing
from phantom_core.log import logger
from phantom_core.lora.adapter import LoRALinear
from phantom_core.lora.keys import LoraWeights, read_lora

LoraSource = str | os.PathLike | Mapping[str, Tensor]


@dataclass(frozen=True)
class WeightPatch:
    """One addition to one stored parameter of the model: ``param += factor * (up @ down | diff)``, in real units.

    key: the parameter's key in ``model.state_dict()`` (``blocks.0.self_attn.q.weight``; under an unmerged adapter
    ``blocks.0.self_attn.q.base.weight``). stored_scale: the layer's fp8 ``scale_weight`` (the stored tensor times it
    is the real weight), None for float weights: a host patching the stored tensor divides the delta by it.
    """

    key: str
    factor: float
    up: Tensor | None = None
    down: Tensor | None = None
    diff: Tensor | None = None
    stored_scale: float | None = None

    def delta(self, device: torch.device | str, shape: torch.Size) -> Tensor:
        """``factor * (up @ down)`` or ``factor * diff`` as float32 ``shape`` on ``device`` (real units)."""
        if self.diff is not None:
            return self.factor * self.diff.to(device, torch.float32).reshape(shape)
        up, down = self.up.to(device, torch.float32).flatten(1), self.down.to(device, torch.float32).flatten(1)
        return (self.factor * (up @ down)).reshape(shape)


def _layer(model: nn.Module, name: str) -> nn.Module | None:
    """The module called ``name`` (the base layer under an unmerged adapter), or None."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        return None
    return module.base if isinstance(module, LoRALinear) else module


def _param_key(model: nn.Module, name: str, which: str) -> str | None:
    """State-dict key of the weight (``which="weight"``) or bias a LoRA entry ``name`` updates, or None: a
    module's ``.weight`` / ``.bias``, or for a full delta on a bare parameter (``blocks.0.modulation``) the
    parameter itself."""
    layer = _layer(model, name)
    if layer is not None:
        if getattr(layer, which, None) is None:
            return None
        base = name + ".base" if isinstance(model.get_submodule(name), LoRALinear) else name
        return f"{base}.{which}"
    params = dict(model.named_parameters())
    return name if which == "weight" and name in params else None


def _scale_of(model: nn.Module, key: str) -> float | None:
    owner = model.get_submodule(key.rsplit(".", 1)[0]) if "." in key else model
    scale = getattr(owner, "scale_weight", None)
    return None if scale is None else float(scale)


def check_lora(lora: Mapping[str, LoraWeights], model: nn.Module, strength: float = 1.0) -> list[WeightPatch]:
    """The additions ``lora`` at ``strength`` makes to ``model``'s stored parameters, after checking every entry.

    Raises:
        ValueError: listing the LoRA keys that match no module / parameter of the model (a LoRA for another
            network, or the text encoder), and the entries whose shapes differ from the model's, naming the
            module and both shapes (a 14B LoRA on the 1.3B model).
    """
    params = dict(model.named_parameters())
    unmatched: list[str] = []
    wrong: list[str] = []
    patches: list[WeightPatch] = []
    for name, w in lora.items():
        wkey = _param_key(model, name, "weight")
        bkey = _param_key(model, name, "bias") if w.diff_b is not None else None
        if wkey is None or (w.diff_b is not None and bkey is None):
            unmatched += list(w.keys)
            continue
        shape = tuple(params[wkey].shape)
        if w.up is not None and w.diff is not None:
            raise ValueError(f"LoRA {name} has both a low-rank pair and a .diff; one of them is expected")
        if w.up is not None and w.low_rank_shape() != (shape[0], math.prod(shape[1:])):
            wrong.append(f"{name}: the LoRA's up @ down is {w.low_rank_shape()}, the model's {wkey} is {shape}")
        if w.diff is not None and tuple(w.diff.shape) != shape:
            wrong.append(f"{name}: the LoRA's .diff is {tuple(w.diff.shape)}, the model's {wkey} is {shape}")
        if bkey is not None and tuple(w.diff_b.shape) != tuple(params[bkey].shape):
            wrong.append(f"{name}: the LoRA's .diff_b is {tuple(w.diff_b.shape)}, the model's {bkey} is "
                         f"{tuple(params[bkey].shape)}")
        if w.up is not None or w.diff is not None:
            factor = strength * (w.scale if w.up is not None else 1.0)
            patches.append(WeightPatch(wkey, factor, w.up, w.down, w.diff, _scale_of(model, wkey)))
        if bkey is not None:
            patches.append(WeightPatch(bkey, strength, diff=w.diff_b))
    if wrong:
        raise ValueError(f"LoRA shapes do not fit this {type(model).__name__} (a LoRA for another model size, e.g. "
                         f"a 14B LoRA on the 1.3B model?): {short_listing(wrong, 5)}")
    if unmatched:
        raise ValueError(f"{len(unmatched)} LoRA keys match no module of this {type(model).__name__} (a LoRA for "
                         f"another network, or for the text encoder?): {short_listing(sorted(unmatched))}")
    return patches


@torch.no_grad()
def merge_patch(model: nn.Module, patch: WeightPatch) -> None:
    """Add one patch into its stored parameter (fp8: dequantize, add, re-quantize; see the module doc). The sum
    replaces the parameter's tensor rather than being written into it, so a state dict the model was loaded from
    (``load_dit`` may share its storage) is left as it was."""
    owner_name, _, attr = patch.key.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    param = getattr(owner, attr)
    delta = patch.delta(param.device, param.shape)
    if not is_fp8(param.dtype):
        param.data = (param.float() + delta).to(param.dtype)
        return
    if not hasattr(owner, "scale_weight"):
        raise ValueError(f"{patch.key} is stored as {param.dtype} in a {type(owner).__name__}, which has no "
                         "scale_weight to re-quantize with; load the model with phantom_core.load_dit")
    q, scale = quantize_fp8(dequantize(param, owner.scale_weight, torch.float32) + delta, param.dtype)
    param.data = q.to(param.device)
    owner.scale_weight = scale.to(param.device)


def _add_adapters(model: nn.Module, pairs: dict[str, list[tuple[Tensor, Tensor]]]) -> None:
    """Wrap each named Linear in one frozen ``LoRALinear`` holding all its ``(down, up * factor)`` pairs
    (concatenated along the rank; an existing adapter's pair is kept, its scale folded into its up)."""
    for name, parts in pairs.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = getattr(parent, child)
        if isinstance(layer, LoRALinear):
            parts = [(layer.lora_down.weight, layer.lora_up.weight * layer.scale), *parts]
            layer = layer.base
        down = torch.cat([d.to(torch.float32).flatten(1) for d, _ in parts])  # (sum r, in)
        up = torch.cat([u.to(torch.float32).flatten(1) for _, u in parts], dim=1)  # (out, sum r)
        adapter = LoRALinear(layer, rank=down.shape[0], alpha=float(down.shape[0]))  # scale 1: factors are in up
        with torch.no_grad():
            adapter.lora_down.weight.copy_(down)
            adapter.lora_up.weight.copy_(up)
        setattr(parent, child, adapter.requires_grad_(False))


def _check_strength(strength: object, index: int) -> float:
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength):
        raise ValueError(f"LoRA {index} strength is {strength!r}; expected a finite number (1.0 = as trained, "
                         "0 = off, negative inverts)")
    return float(strength)


def apply_loras(model: nn.Module, loras: Sequence[tuple[LoraSource, float]], merge: bool = True) -> nn.Module:
    """Apply LoRAs to ``model`` in place, each at its strength, and return it.

    Args:
        model: a ``PhantomWanDiT`` (any dtype: fp32, bf16, fp16, fp8 / scaled fp8; ``load_dit``'s model).
        loras: ``[(path_or_state_dict, strength), ...]``; any layout ``keys.read_lora`` reads. The update is
            ``strength * alpha / rank * up @ down`` per module (plus ``strength * diff``); several LoRAs add up.
        merge: True: add the updates into the weights (fast inference; fp8 re-quantized). False: keep the base
            weights and add adapters (``LoRALinear``) for the low-rank pairs on Linears (see the module doc).

    Returns:
        ``model`` (the same object), eval-mode state unchanged, no new trainable parameters.

    Raises:
        ValueError: for a bad strength, a file in no LoRA layout, keys matching no module of the model, shapes of
            another model size (each naming the LoRA); the model is left untouched.
    """
    plans: list[list[WeightPatch]] = []
    for i, (source, strength) in enumerate(loras):
        strength = _check_strength(strength, i)
        label = str(source) if isinstance(source, (str, os.PathLike)) else f"LoRA {i} (state dict)"
        try:
            plans.append(check_lora(read_lora(source), model, strength))
        except ValueError as err:
            raise ValueError(f"{label}: {err}" if label not in str(err) else str(err)) from None
    pairs: dict[str, list[tuple[Tensor, Tensor]]] = {}
    for patches in plans:
        for p in patches:
            if p.factor == 0:
                continue
            name = p.key.removesuffix(".base.weight").removesuffix(".weight")
            linear = isinstance(_layer(model, name), nn.Linear) and p.key.endswith(".weight")
            if merge or p.diff is not None or not linear:
                merge_patch(model, p)
            else:
                pairs.setdefault(name, []).append((p.down, p.up.to(torch.float32) * p.factor))
    _add_adapters(model, pairs)
    logger.info("applied %d LoRA(s) (%s): %s", len(loras), "merged" if merge else "unmerged",
                ", ".join(f"{Path(s).name if isinstance(s, (str, os.PathLike)) else 'state dict'} x {st:g}"
                          for s, st in loras))
    return model
