"""Training checkpoints: everything a resumed run needs to continue exactly where an interrupted one stopped.

    <run_dir>/checkpoints/step_000500/
        trainable.safetensors   the trainable parameters by name (full fine-tune: every weight; LoRA: the adapter)
        optimizer.pt            the optimizer state (AdamW moments and step counts), keyed by parameter name
        state.pt                step, LR scheduler, data position, every RNG state of every rank, extra values
        config.json             the run's TrainConfig (for people; ``resume`` compares it)

Written atomically: the files go to a hidden temporary folder which is renamed to ``step_NNNNNN`` only when
complete, so a crash (or Cancel) mid-write leaves the previous checkpoints intact and no half-written one. Files
get normal permissions (0666 minus the umask; the safetensors file through ``loading.disk.atomic_write``). Model
and optimizer states go through ``torch.distributed.checkpoint.state_dict``'s full-state-dict API, which is the
same call for a plain module, DDP and FSDP (it gathers the shards; rank 0 writes). Loading uses
``torch.load(weights_only=True)``.

Nothing here knows the DiT or the flow objective: another model or objective (e.g. the VAE of the miniature
world) reuses it with its own modules, optimizer and extra values.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from phantom_core.loading.disk import atomic_write
from phantom_core.log import logger

CHECKPOINT_PATTERN = re.compile(r"step_(\d{6,})")
WEIGHTS_FILE, OPTIMIZER_FILE, STATE_FILE, CONFIG_FILE = "trainable.safetensors", "optimizer.pt", "state.pt", \
    "config.json"


def checkpoint_name(step: int) -> str:
    """``step_000500`` (zero-padded so that names sort by step)."""
    return f"step_{step:06d}"


def list_checkpoints(folder: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``folder`` as ``(step, path)``, oldest first (temporary folders are ignored)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT_PATTERN.fullmatch(p.name))]
    return sorted(found)


def rng_states() -> dict[str, Any]:
    """This process's global RNG states (torch CPU, every CUDA device, numpy, python), as tensors and ints that
    ``torch.load(weights_only=True)`` reads back."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what ``rng_states`` captured (CUDA states only when CUDA is available)."""
    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = states["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def trainable_names(model: nn.Module) -> list[str]:
    """Names of the parameters with ``requires_grad`` (what a checkpoint stores), as in the unwrapped module
    (DDP's ``module.`` prefix dropped, as ``get_model_state_dict`` does)."""
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return [name for name, p in inner.named_parameters() if p.requires_grad]


def buffer_names(model: nn.Module) -> set[str]:
    """Names of the persistent buffers (what ``state_dict`` holds besides parameters, e.g. the MMDiT's
    ``window_size`` / ``text_len`` / ``pos_embed``), as in the unwrapped module. A checkpoint carries them with the
    trainable parameters (``get_model_state_dict`` keeps buffers) and resuming loads them back."""
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return {f"{prefix}.{name}" if prefix else name for prefix, module in inner.named_modules()
            for name, value in module._buffers.items()
            if value is not None and name not in module._non_persistent_buffers_set}


_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)


def save_checkpoint(folder: str | os.PathLike, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, state: dict[str, Any], config: dict[str, Any], *, rank: int = 0,
                    keep: int = 0) -> Path | None:
    """Write ``<folder>/step_NNNNNN`` atomically. Every rank must call it (FSDP gathers); rank 0 writes.

    Args:
        model: the trained module (plain, DDP or FSDP): its trainable parameters are saved by name.
        optimizer, scheduler: their states (``scheduler.state_dict()``).
        state: the caller's values (data position, the RNG states of every rank, ...), saved as they are.
        config: JSON-ready run settings.
        keep: after writing, delete all but the ``keep`` latest checkpoints (0 keeps all).
    Returns:
        The checkpoint folder on rank 0, None elsewhere.
    """
    weights = get_model_state_dict(model, options=_FULL)  # {name: full CPU tensor} on rank 0
    optim = get_optimizer_state_dict(model, optimizer, options=_FULL)
    if rank != 0:
        return None
    folder = Path(folder)
    final = folder / checkpoint_name(step)
    tmp = folder / f".{final.name}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir(parents=True)
    try:
        with atomic_write(tmp / WEIGHTS_FILE) as part:  # safetensors makes its files 0o600: normal mode back
            save_file({k: v.contiguous() for k, v in weights.items()}, str(part), metadata={"step": str(step)})
        torch.save(optim, tmp / OPTIMIZER_FILE)
        torch.save({"step": step, "scheduler": scheduler.state_dict(), **state}, tmp / STATE_FILE)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=1), encoding="utf-8")
        if final.exists():  # a resumed run writing a step again: the new one replaces it
            shutil.rmtree(final)
        os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if keep:
        for _, old in list_checkpoints(folder)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    logger.info("checkpoint %s written", final)
    return final


def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any) -> dict[str, Any]:
    """Load a checkpoint into ``model`` (its trainable parameters), ``optimizer`` and ``scheduler``; every rank
    reads the files itself (a shared file system) and takes its shard.

    Returns:
        The ``state`` dict given to ``save_checkpoint``, plus ``"step"``.
    Raises:
        ValueError: the checkpoint's parameters are not exactly the model's trainable ones (names listed); the
            model's persistent buffers may be there too (they are loaded), nothing else.
    """
    path = Path(path)
    weights = load_file(str(path / WEIGHTS_FILE))
    want = set(trainable_names(model))
    missing, extra = sorted(want - set(weights)), sorted(set(weights) - want - buffer_names(model))
    if missing or extra:
        raise ValueError(f"checkpoint {path} does not fit this model: missing {missing[:10]} "
                         f"({len(missing)}), unexpected {extra[:10]} ({len(extra)})")
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=False))
    optim = torch.load(path / OPTIMIZER_FILE, weights_only=True)
    set_optimizer_state_dict(model, optimizer, optim, options=StateDictOptions(full_state_dict=True))
    state = torch.load(path / STATE_FILE, weights_only=True)
    scheduler.load_state_dict(state["scheduler"])
    return state


def read_checkpoint_config(path: str | os.PathLike) -> dict[str, Any]:
    """The ``config.json`` a checkpoint was written with."""
    return json.loads((Path(path) / CONFIG_FILE).read_text(encoding="utf-8"))
