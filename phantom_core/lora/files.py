"""LoRA files on disk: writing ours (safetensors, ComfyUI's key layout, with metadata), atomically, and full
fine-tunes as ComfyUI's full-weight deltas (``.diff`` / ``.diff_b``).

The key layout is ``adapter.lora_state_dict``'s; reading the layouts other trainers write is ``keys.read_lora``.
"""

from __future__ import annotations

import json
import math
import os
import stat
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from phantom_core.log import logger

LORA_FORMAT = "comfyui-lora"  # metadata "format": ComfyUI's own key layout (see adapter.lora_state_dict)


def lora_metadata(rank: int, alpha: float, base_model: str, steps: int,
                  settings: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The safetensors metadata we write beside a LoRA (every value a string, as safetensors requires):
    ``format`` (``"comfyui-lora"``), ``rank``, ``alpha``, ``base_model`` (e.g. ``"phantom-wan-1.3b"``), ``steps``
    (optimizer steps trained) and ``settings`` (the training settings as a JSON object).

    Raises ``ValueError`` for a non-positive rank / alpha, negative steps or settings JSON cannot encode.
    """
    if rank < 1 or not math.isfinite(alpha) or alpha <= 0 or steps < 0:
        raise ValueError(f"LoRA metadata: rank {rank!r} must be >= 1, alpha {alpha!r} > 0 and steps {steps!r} >= 0")
    try:
        settings_json = json.dumps(dict(settings or {}), sort_keys=True)
    except TypeError as e:
        raise ValueError(f"LoRA metadata: settings cannot be written as JSON ({e})") from None
    return {"format": LORA_FORMAT, "rank": str(int(rank)), "alpha": repr(float(alpha)), "base_model": base_model,
            "steps": str(int(steps)), "settings": settings_json}


def diff_state_dict(base: Mapping[str, Tensor], tuned: Mapping[str, Tensor], prefix: str = "diffusion_model.",
                    dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """A full fine-tune as full-weight deltas in ComfyUI's layout (what ``comfy.lora.load_lora`` reads):
    ``<prefix><module>.diff`` for ``<module>.weight``, ``<prefix><module>.diff_b`` for ``<module>.bias`` and
    ``<prefix><parameter>.diff`` for any other parameter (e.g. ``blocks.0.modulation``), each ``tuned - base``
    computed in float32 and stored as ``dtype``; unchanged tensors are left out.

    base, tuned: state dicts with the same keys and shapes (e.g. before and after training; fp8 scales are not
    handled: pass float weights). Raises ``ValueError`` naming keys that differ between the two, or when nothing
    changed.
    """
    if base.keys() != tuned.keys():
        odd = sorted(set(base) ^ set(tuned))
        raise ValueError(f"diff_state_dict: base and tuned have different keys: {odd[:5]}")
    out: dict[str, Tensor] = {}
    for key, after in tuned.items():
        before = base[key]
        if before.shape != after.shape:
            raise ValueError(f"diff_state_dict: {key} is {tuple(before.shape)} in base, {tuple(after.shape)} in tuned")
        if not after.is_floating_point() or torch.equal(before, after):
            continue
        module, _, leaf = key.rpartition(".")
        name = {"weight": f"{module}.diff", "bias": f"{module}.diff_b"}.get(leaf, f"{key}.diff")
        delta = after.detach().to("cpu", torch.float32) - before.detach().to("cpu", torch.float32)
        out[prefix + name] = delta.to(dtype).contiguous()
    if not out:
        raise ValueError("diff_state_dict: tuned equals base; there is no delta to write")
    return out


def save_lora(path: str | os.PathLike, state_dict: Mapping[str, Tensor], metadata: Mapping[str, str]) -> Path:
    """Write ``state_dict`` (e.g. ``adapter.lora_state_dict(model)``) as safetensors with ``metadata``.

    Written atomically: to a temporary file beside ``path``, renamed over it only when complete (``os.replace``),
    so a crash never leaves a half-written LoRA; the file gets normal permissions (``0o666`` minus the umask).
    Missing parent folders are created.

    Raises:
        ValueError: for an empty state dict, a value that is not a tensor, or metadata that is not ``str -> str``.
    """
    if not state_dict:
        raise ValueError("save_lora: the state dict is empty (no LoRA weights to write)")
    bad = [k for k, v in state_dict.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise ValueError(f"save_lora: {bad[:5]} are not str -> torch.Tensor entries")
    bad_meta = {k: v for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)}
    if bad_meta:
        raise ValueError(f"save_lora: metadata values must be strings (JSON-encode numbers and dicts); got "
                         f"{ {k: type(v).__name__ for k, v in bad_meta.items()} }")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the umask applies, as for any new file
    try:
        mode = stat.S_IMODE(tmp.stat().st_mode)  # 0o666 minus the umask, read without touching the process umask
        tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
        save_file(tensors, tmp, metadata=dict(metadata))  # may recreate the file (0o600): the mode is set again
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    logger.info("wrote LoRA %s (%d tensors)", path, len(state_dict))
    return path
