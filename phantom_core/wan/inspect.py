"""Say what a checkpoint is without loading it: architecture, preset, dtypes, size, key and parameter counts.

Only metadata is read (``phantom_core.loading.headers``). The architecture is recognised by running the
loaders' own shape inference (``infer_dit_config``, ``infer_vae_config``, ``infer_text_encoder_spec``) on
shape-only ``meta`` tensors.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any

from torch import Tensor

from phantom_core.loading.files import TensorInfo
from phantom_core.loading.fp8 import SCALED_FP8_KEY, Fp8Format, detect_fp8_format, is_scale_key, split_scales
from phantom_core.loading.headers import read_tensor_infos, stand_ins
from phantom_core.wan.load import infer_dit_config, preset_name, strip_prefixes, validate_dit_state_dict
from phantom_core.wan.umt5 import (
    SPIECE_KEY,
    TEXT_ENCODER_PRESETS,
    convert_wan_t5_state_dict,
    infer_text_encoder_spec,
)
from phantom_core.wan.vae import VAE_PRESETS, infer_vae_config, strip_vae_prefix

# ---------------------------------------------------------------------------------------------- classification


def _scale_problems(sd: dict[str, Tensor]) -> list[str]:
    """The loaders' fp8 check (every fp8 weight of a scaled file has its ``scale_weight``), as a problem list."""
    try:
        split_scales(dict(sd), [k for k in sd if k.endswith(".weight")])
    except ValueError as err:
        return [str(err)]
    return []


def _config_dict(config: Any) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def classify(infos: dict[str, TensorInfo]) -> dict[str, Any]:
    """``{"kind", "architecture", "preset", "config", "problems"}`` for a checkpoint's tensor shapes.

    kind: ``"dit"`` (Phantom-Wan / Wan2.1 T2V DiT), ``"wan_i2v_dit"``, ``"vae"`` (Wan2.1 VAE), ``"umt5"``
    (umT5 text encoder) or ``"unknown"``.
    """
    sd = stand_ins(infos)
    dit_sd = strip_prefixes(sd)
    try:
        config = infer_dit_config(dit_sd)
    except ValueError as err:
        dit_error = str(err)
    else:
        problems = []
        try:
            validate_dit_state_dict(dit_sd, config)
        except ValueError as err:
            problems.append(str(err))
        problems += _scale_problems(dit_sd)
        return {"kind": "dit", "architecture": "Phantom-Wan / Wan2.1 text-to-video DiT", "preset": preset_name(config),
                "config": _config_dict(config), "problems": problems}
    if "image-to-video" in dit_error:
        return {"kind": "wan_i2v_dit", "architecture": "Wan2.1 image-to-video DiT (not usable by Phantom)",
                "preset": None, "config": None, "problems": [dit_error]}
    try:
        vae_config = infer_vae_config(strip_vae_prefix(sd))
    except (ValueError, IndexError, ZeroDivisionError):
        pass
    else:
        preset = next((n for n, c in VAE_PRESETS.items() if c == vae_config), None)
        return {"kind": "vae", "architecture": "Wan2.1 video VAE", "preset": preset,
                "config": _config_dict(vae_config), "problems": []}
    t5 = {k: v for k, v in sd.items() if k != SPIECE_KEY}
    try:
        spec = infer_text_encoder_spec(convert_wan_t5_state_dict(t5) if "token_embedding.weight" in t5 else t5)
    except (ValueError, IndexError):
        pass
    else:
        preset = next((n for n, s in TEXT_ENCODER_PRESETS.items() if s == spec), None)
        arch = "umT5 text encoder" + (" (tokenizer embedded)" if SPIECE_KEY in sd else "")
        return {"kind": "umt5", "architecture": arch, "preset": preset, "config": _config_dict(spec),
                "problems": _scale_problems(t5)}
    return {"kind": "unknown", "architecture": "not a Phantom-Wan DiT, Wan VAE or umT5 encoder", "preset": None,
            "config": None, "problems": [dit_error]}


def stored_format(path: str | os.PathLike) -> Fp8Format:
    """How a checkpoint stores its weights (fp8 / scaled fp8 / a float dtype), from its metadata only.

    Raises FileNotFoundError / ValueError as ``inspect_checkpoint``.
    """
    _, infos, _, _ = read_tensor_infos(path)
    return detect_fp8_format(strip_prefixes(stand_ins(infos)))


def _gguf_label(dtypes: dict[str, int]) -> str:
    """``"GGUF Q4_K (+ Q6_K, F32)"``: the most frequent block quantization first, then the others."""
    quant = sorted((d for d in dtypes if d.startswith("Q")), key=lambda d: -dtypes[d])
    rest = sorted(set(dtypes) - set(quant[:1]), key=lambda d: -dtypes[d])
    return f"GGUF {quant[0] if quant else 'unquantized'}" + (f" (+ {', '.join(rest)})" if rest else "")


def inspect_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Describe a checkpoint from its metadata only (nothing is loaded into memory).

    Args:
        path: ``.safetensors``, ``.pth``/``.pt``/``.bin``/``.ckpt``, a ``*.safetensors.index.json`` or a folder
            holding one.
    Returns:
        ``{"path", "format", "files", "file_size" (bytes, all files), "key_count", "parameter_count"
        (elements of floating-point tensors), "dtypes" ({dtype name: tensor count}), "kind", "architecture",
        "preset", "config", "problems", "metadata", "weight_format" (``"scaled fp8 (float8_e4m3fn)"``,
        ``"fp8 (float8_e5m2)"``, ``"GGUF Q4_K (+ Q6_K, F32)"`` or the stored dtype, e.g. ``"bfloat16"``)}``.
    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: naming the file when it is not a readable checkpoint (truncated, not safetensors, ...).
    """
    fmt, infos, metadata, files = read_tensor_infos(path)
    dtypes: dict[str, int] = {}
    for _, dtype in infos.values():
        dtypes[dtype] = dtypes.get(dtype, 0) + 1
    floating = ("float", "bfloat") if fmt != "gguf" else ("F", "BF", "Q")  # GGUF: ggml type names
    params = sum(math.prod(shape) for key, (shape, dtype) in infos.items()  # fp8 scales are not parameters
                 if dtype.startswith(floating) and not is_scale_key(key) and not key.endswith(SCALED_FP8_KEY))
    weight_format = _gguf_label(dtypes) if fmt == "gguf" else detect_fp8_format(strip_prefixes(stand_ins(infos))).label
    return {"path": str(Path(path)), "format": fmt, "files": [str(f) for f in files],
            "file_size": sum(f.stat().st_size for f in files), "key_count": len(infos), "parameter_count": params,
            "dtypes": dict(sorted(dtypes.items(), key=lambda kv: -kv[1])), "weight_format": weight_format,
            **classify(infos), "metadata": metadata}


def _human_size(size: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.2f} {unit}"
    return f"{size} B"


def format_report(report: dict[str, Any]) -> str:
    """A few human-readable lines for one :func:`inspect_checkpoint` report."""
    files = len(report["files"])
    lines = [
        report["path"],
        f"  kind:         {report['kind']} ({report['architecture']})",
        f"  preset:       {report['preset'] or '-'}",
        f"  format:       {report['format']}" + (f", {files} files" if files > 1 else ""),
        f"  size:         {_human_size(report['file_size'])} ({report['file_size']:,} bytes)",
        f"  keys:         {report['key_count']}",
        f"  parameters:   {report['parameter_count']:,}",
        "  dtypes:       " + ", ".join(f"{d} x{n}" for d, n in report["dtypes"].items()),
        f"  weights:      {report['weight_format']}",
    ]
    lines += [f"  problem:      {p}" for p in report["problems"] if report["kind"] != "unknown"]
    if report["kind"] == "unknown" and report["problems"]:
        lines.append(f"  why:          {report['problems'][0]}")
    return "\n".join(lines)
