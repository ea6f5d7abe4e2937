"""The JSON sidecar written next to each generated video, from which it can be regenerated bit for bit.

Format (``"format": "phantom-generation"``, ``"format_version": 1``), UTF-8 JSON, one object::

    {"format", "format_version", "created": ISO-8601 UTC time,
     "output": {"path", "bytes", "sha256"} of the MP4,
     "seed": the seed actually used (never -1), "settings": GenerationSettings.to_json(),
     "runtime": {"dtype", "compute_dtype", "device", "text_encoder_device", "attention", "compiled", "batch_passes",
                 "threads": torch's CPU thread count,
                 "resolved": {role: precision, "attention": the back-end the DiT's attention ran with}},
     "models": {"dit" | "vae" | "text_encoder" | "tokenizer": {"path", "files": [{"path", "bytes", "sha256"}]},
                "clip_vision": {"path", "files", "clip_output": "tokens" | "pooled"}},  (the last: an MMDiT's only)
     "references": [{"path", "bytes", "sha256"}], "loras": [{"path", "bytes", "sha256", "strength"}],
     "versions": {"phantom", "torch", ...},
     "generation_seconds"}

A sharded checkpoint is recorded as its index followed by every shard. Paths are absolute; sha256 digests are of
the whole file, streamed. Other tools may add their own top-level keys (the CLI adds ``"rephrase"``).

Errors: :func:`read_sidecar` raises ``ValueError`` naming the file when it is not JSON, not a Phantom sidecar, of
another format version or with invalid settings; :func:`build_sidecar` refuses an unresolved seed (-1).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from phantom_core.inference.settings import RANDOM_SEED, GenerationSettings
from phantom_core.loading.disk import atomic_write
from phantom_core.loading.files import INDEX_SUFFIX, find_index, read_index
from phantom_core.loading.fp8 import weight_bytes
from phantom_core.log import logger

SIDECAR_FORMAT = "phantom-generation"
SIDECAR_VERSION = 1
_HASH_CHUNK = 8 << 20  # bytes read per hashing step: the file is streamed, never held in memory


def default_sidecar_path(out_path: str | os.PathLike) -> Path:
    """``video.mp4`` -> ``video.json`` (the sidecar lies next to the MP4)."""
    return Path(out_path).with_suffix(".json")


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 hex digest of a file, streamed in 8 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_files(path: str | os.PathLike) -> list[Path]:
    """The files a checkpoint consists of: the file itself, or a sharded index followed by its shards (sorted).

    A directory stands for the one ``*.safetensors.index.json`` inside it. Raises ``ValueError`` when the
    directory holds no single index or the index is not valid JSON with a ``weight_map``.
    """
    path = Path(path)
    if path.is_dir():
        path = find_index(path)
    if not path.name.lower().endswith(INDEX_SUFFIX):
        return [path]
    shards = sorted(set(read_index(path).values()))
    return [path, *(path.parent / shard for shard in shards)]


def describe_files(paths: Sequence[str | os.PathLike]) -> list[dict[str, Any]]:
    """``[{"path": absolute path, "bytes": size, "sha256": hex}]`` for each file (logged, it can take a while)."""
    out = []
    for p in paths:
        p = Path(p).resolve()
        logger.info("hashing %s (%.1f MB)", p, p.stat().st_size / 1e6)
        out.append({"path": str(p), "bytes": p.stat().st_size, "sha256": file_sha256(p)})
    return out


def _versions() -> dict[str, str]:
    import numpy

    import phantom_core

    return {"phantom": str(getattr(phantom_core, "__version__", "unknown")), "torch": torch.__version__,
            "numpy": numpy.__version__, "python": platform.python_version(), "platform": platform.platform()}


def model_precision(model: torch.nn.Module) -> dict[str, str]:
    """``{"weights": dtype holding most of the bytes, "compute": activation dtype, "device"}`` (sidecar, logs)."""
    by_bytes = weight_bytes(model)
    compute = getattr(model, "compute_dtype", None) or next(model.parameters()).dtype
    return {"weights": max(by_bytes, key=by_bytes.get), "compute": str(compute).removeprefix("torch."),
            "device": str(next(model.parameters()).device)}


def dtype_name(dtype: torch.dtype | None) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``; None (stored dtype / automatic) -> ``"auto"``."""
    return "auto" if dtype is None else str(dtype).removeprefix("torch.")


def runtime_record(dtype: torch.dtype | None, compute_dtype: torch.dtype | None, device: torch.device | str,
                   text_encoder_device: torch.device | str | None, models: Sequence[Any] = (),
                   attention: str = "auto", compiled: bool = False,
                   attention_used: str | None = None, batch_passes: str = "auto",
                   threads: int | None = None) -> dict[str, Any]:
    """The sidecar's ``"runtime"``: the choices as given (``"auto"`` / null for the defaults, so a regeneration
    decides the same way; ``attention`` the back-end choice in effect, ``compiled`` whether the DiT's blocks were
    compiled, ``batch_passes`` auto / on / off) and, with ``models`` (DiT, VAE, text encoder), what they resolved
    to, plus ``attention_used`` (the back-end ``attention`` meant on that device) when given; ``threads``: torch's
    CPU thread count (a CPU video is the same bit for bit only with the same count), recorded when given."""
    record = {"dtype": dtype_name(dtype), "compute_dtype": dtype_name(compute_dtype), "device": str(device),
              "text_encoder_device": None if text_encoder_device is None else str(text_encoder_device),
              "attention": attention, "compiled": bool(compiled), "batch_passes": batch_passes}
    if threads is not None:
        record["threads"] = int(threads)
    if models:
        record["resolved"] = {role: model_precision(m) for role, m in zip(("dit", "vae", "text_encoder"), models)}
        if attention_used is not None:
            record["resolved"]["attention"] = attention_used
    return record


def build_sidecar(settings: GenerationSettings, *, dit_path: str | os.PathLike, vae_path: str | os.PathLike,
                  text_encoder_path: str | os.PathLike, ref_paths: Sequence[str | os.PathLike],
                  out_path: str | os.PathLike, runtime: dict[str, Any] | None = None,
                  dtype: torch.dtype | None = None, device: torch.device | str = "cpu",
                  seconds: float | None = None, tokenizer_path: str | os.PathLike | None = None,
                  loras: Sequence[tuple[str | os.PathLike, float]] = (),
                  clip_vision_path: str | os.PathLike | None = None, clip_output: str = "tokens") -> dict[str, Any]:
    """The sidecar record of one generation (JSON-ready). ``settings.seed`` must be resolved (not -1);
    ``runtime``: :func:`runtime_record`; without it, one is made from ``dtype`` and ``device`` alone; ``loras``:
    ``[(LoRA file, strength)]`` applied to the DiT, in order; ``clip_vision_path``: an MMDiT's CLIP vision tower,
    recorded with the ``clip_output`` features it gave."""

    if settings.seed == RANDOM_SEED:
        raise ValueError("sidecar: the seed is still -1; resolve it (resolve_seed) before generating")
    models = {role: {"path": str(Path(p).resolve()), "files": describe_files(checkpoint_files(p))}
              for role, p in (("dit", dit_path), ("vae", vae_path), ("text_encoder", text_encoder_path),
                              ("tokenizer", tokenizer_path), ("clip_vision", clip_vision_path)) if p is not None}
    if clip_vision_path is not None:
        models["clip_vision"]["clip_output"] = clip_output
    return {
        "format": SIDECAR_FORMAT, "format_version": SIDECAR_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "output": describe_files([out_path])[0],
        "seed": settings.seed,
        "settings": settings.to_json(),
        "runtime": runtime if runtime is not None else runtime_record(dtype, None, device, None),
        "models": models,
        "references": describe_files(ref_paths),
        "loras": [entry | {"strength": float(strength)}
                  for entry, (_, strength) in zip(describe_files([p for p, _ in loras]), loras)],
        "versions": _versions(),
        "generation_seconds": None if seconds is None else round(seconds, 3),
    }


def write_sidecar(record: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write the record as indented UTF-8 JSON, atomically with ordinary permissions (`atomic_write`)."""
    path = Path(path)
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(record, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    logger.info("wrote sidecar %s", path)
    return path


def read_sidecar(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check a sidecar written by :func:`write_sidecar`; ``record["settings"]`` becomes a
    :class:`GenerationSettings`. Raises ``ValueError`` naming the file when it is not a Phantom sidecar."""

    path = Path(path)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"sidecar {path} cannot be read as JSON: {err}") from err
    if not isinstance(record, dict) or record.get("format") != SIDECAR_FORMAT:
        raise ValueError(f"sidecar {path} is not a Phantom generation sidecar (no \"format\": \"{SIDECAR_FORMAT}\")")
    if record.get("format_version") != SIDECAR_VERSION:
        raise ValueError(f"sidecar {path} has format_version {record.get('format_version')!r}; this version of "
                         f"phantom_core reads {SIDECAR_VERSION}")
    try:
        record["settings"] = GenerationSettings.from_json(record["settings"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"sidecar {path}: invalid settings: {err}") from err
    return record


def changed_files(record: dict[str, Any]) -> list[str]:
    """Model and reference files of a sidecar whose size or sha256 now differ (or that are gone), described."""
    entries = [f for m in record["models"].values() for f in m["files"]] + list(record["references"])
    entries += list(record.get("loras", []))  # sidecars written before LoRAs existed have none
    problems = []
    for entry in entries:
        p = Path(entry["path"])
        if not p.is_file():
            problems.append(f"{p} is missing")
        elif p.stat().st_size != entry["bytes"] or file_sha256(p) != entry["sha256"]:
            problems.append(f"{p} has changed (sha256 differs from the sidecar's {entry['sha256'][:12]}...)")
    return problems
