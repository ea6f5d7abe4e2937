"""Reading DiT checkpoints, recognising what they are, and loading them into ``PhantomWanDiT``.

Keys stay exactly those of the upstream Wan2.1 / Phantom-Wan checkpoints; the only conversion is
``strip_prefixes`` (ComfyUI's ``model.diffusion_model.`` / ``diffusion_model.``). The architecture is inferred
from tensor shapes alone (``infer_dit_config``); the model is then built on the meta device and the tensors are
assigned into it, so a checkpoint is never held in memory twice.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import struct
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from phantom_core.fp8 import (
    SCALED_FP8_KEY,
    attach_scales,
    cast_layer_weights,
    convert_state_dict,
    detect_fp8_format,
    fp8_ops,
    is_scale_key,
    plan_load,
    weight_bytes,
)
from phantom_core.log import logger
from phantom_core.wan_dit import DIT_PRESETS, HEAD_DIM, PhantomWanDiT, WanDiTConfig

DIT_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
INDEX_SUFFIX = ".safetensors.index.json"
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
_MAX_HEADER = 100 << 20  # bytes; the safetensors reference implementation refuses larger headers too
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default format is a zip archive
# legacy (pre-1.6, non-zip) torch.save files open with torch's magic number pickled at protocol 2 (STOP dropped)
_LEGACY_TORCH_MAGIC = pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=2)[:-1]
SAFETENSORS_DTYPES = {  # safetensors dtype tag -> torch dtype name
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
    "U16": "uint16", "U32": "uint32", "U64": "uint64", "BOOL": "bool",
}
TensorInfo = tuple[tuple[int, ...], str]  # (shape, dtype name)


# ---------------------------------------------------------------------------------------------- reading files


def describe_content(head: bytes) -> str:
    """What a file that is not a checkpoint looks like, from its first bytes (for error messages)."""
    text = head.lstrip()
    if not head:
        return "it is empty (0 bytes)"
    if text[:1] == b"<":
        kind = "an HTML page" if b"html" in text[:300].lower() else "an XML/markup document"
        return f"it is {kind}, typically a failed download (a log-in, 'access denied' or error page)"
    if text.startswith(b"version https://git-lfs"):
        return "it is a Git LFS pointer, not the weights (fetch the real file, e.g. `git lfs pull`)"
    sample = head[:64].decode("utf-8", errors="replace").rstrip("\ufffd")  # a character cut at byte 64 is fine
    if "\ufffd" not in sample and all(c.isprintable() or c in "\r\n\t" for c in sample):
        return f"it is a text file (starting {sample[:40]!r})"
    return f"its first bytes ({head[:8].hex(' ')}) match no known checkpoint format"


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """``({name: (shape, dtype)}, metadata)`` from a safetensors header, checked against the file size.

    Layout (safetensors format spec): 8-byte little-endian header length N, N bytes of JSON
    ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``, then the data.

    Raises:
        ValueError: naming the file when it is too short, is not safetensors (saying what it looks like), has a
            malformed header, or is truncated (the tensors' data would run past the end of the file).
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        (n,) = struct.unpack("<Q", head) if len(head) == 8 else (-1,)
        raw = f.read(n) if 0 < n <= min(size - 8, _MAX_HEADER) else b""
        if size - 8 < n <= _MAX_HEADER and f.read(1) == b"{":
            raise ValueError(f"{path} is truncated: its JSON header alone is {n} bytes but the file has {size} "
                             "(an interrupted download? download it again)")
    try:
        header = json.loads(raw) if raw[:1] == b"{" else None
    except (UnicodeDecodeError, ValueError):
        header = None
    if not isinstance(header, dict):
        with open(path, "rb") as f:
            what = describe_content(f.read(512))
        raise ValueError(f"{path} is not a safetensors file: {what} ({size} bytes); expected an 8-byte header "
                         "length followed by a JSON header")
    metadata = header.pop("__metadata__", None) or {}
    tensors, data_end = {}, 0
    for name, info in header.items():
        try:
            tensors[name] = (tuple(int(s) for s in info["shape"]), SAFETENSORS_DTYPES.get(info["dtype"], info["dtype"]))
            data_end = max(data_end, int(info["data_offsets"][1]))
        except (TypeError, KeyError, IndexError, ValueError) as err:
            raise ValueError(f"{path}: malformed safetensors header entry {name!r}: {err}") from err
    if 8 + n + data_end > size:
        raise ValueError(f"{path} is truncated: its header places tensor data up to byte {8 + n + data_end} "
                         f"but the file has {size} bytes (an interrupted download? download it again)")
    return tensors, metadata


def check_shard_keys(path: Path, infos: dict[str, TensorInfo], keys: list[str]) -> None:
    """ValueError naming shard ``path`` when its header (``infos``) lacks some of the ``keys`` its index lists."""
    if absent := sorted(set(keys) - set(infos)):
        raise ValueError(f"{path} lacks {len(absent)} tensors that its index assigns to it: {_listing(absent)}")


def _read_safetensors(path: Path, keys: list[str] | None = None) -> dict[str, Tensor]:
    infos, _ = read_safetensors_header(path)  # a truncated / foreign file is named here, not a SafetensorError
    if keys is not None:
        check_shard_keys(path, infos, keys)
    try:  # safe_open memory-maps the file: tensors are read when first touched, not all up front
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in (keys if keys is not None else f.keys())}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} cannot be read as safetensors: {err}") from err


def _torch_reason(err: Exception) -> str:
    """torch's own explanation without its advice (never re-run with ``weights_only=False``: it runs code)."""
    text = str(err)
    found = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", text, re.S)
    reason = (found.group(1) if found else text).strip().splitlines()[0] if text.strip() else type(err).__name__
    return reason if "weights_only" not in reason else type(err).__name__


def read_torch_checkpoint(path: str | os.PathLike) -> dict[str, Tensor]:
    """A flat ``{name: tensor}`` from a torch ``.pth``/``.pt``/``.bin``/``.ckpt``, never running pickled code.

    Zip-format files (``torch.save`` since 1.6) are memory-mapped; legacy non-zip ones are read fully. Loaded with
    ``weights_only=True``: tensors, numbers, strings and containers only. A state dict wrapped in one
    ``state_dict`` / ``model`` / ``module`` key is unwrapped.

    Raises:
        ValueError: naming the file: not a torch checkpoint (saying what it looks like: an HTML page, text, ...),
            truncated, damaged, holding objects beyond tensors, or not a flat state dict.
    """
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(512)
    if head.startswith(_ZIP_MAGIC):
        if not zipfile.is_zipfile(path):
            raise ValueError(f"{path} is truncated or damaged: a zip-format torch checkpoint without its end-of-"
                             "archive directory (an interrupted download? download it again)")
        mmap = True
    elif head.startswith(_LEGACY_TORCH_MAGIC):
        logger.warning("%s is a legacy (non-zip) torch file: it is read fully, not memory-mapped", path)
        mmap = False
    elif head[8:10] in (b'{"', b"{}"):  # an 8-byte length then JSON: the safetensors layout
        raise ValueError(f"{path} is not a PyTorch checkpoint but looks like a safetensors file; give it the "
                         ".safetensors extension")
    else:
        raise ValueError(f"{path} is not a PyTorch checkpoint: {describe_content(head)}; expected a torch.save "
                         "file (zip archive or legacy pickle)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        needs = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
        if needs is None:
            raise ValueError(f"{path} is damaged: its contents cannot be read ({_torch_reason(err)})") from None
        raise ValueError(
            f"{path} holds more than tensors (an object of type {needs.group(1)}, which only full unpickling can "
            "rebuild, and that can run arbitrary code); only weights-only checkpoints are accepted: convert it to "
            ".safetensors with a tool you trust") from None
    except Exception as err:  # torch raises RuntimeError, EOFError, KeyError, ... for damaged files
        raise ValueError(f"{path} is truncated or damaged: torch cannot read it ({type(err).__name__}: "
                         f"{_torch_reason(err)})") from None
    if isinstance(obj, dict) and len(obj) == 1 and next(iter(obj)) in ("state_dict", "model", "module"):
        obj = next(iter(obj.values()))  # a state dict wrapped in one container key
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        keys = f" with keys {_listing([str(k) for k in obj][:10])}" if isinstance(obj, dict) else ""
        raise ValueError(f"{path} does not hold a flat {{name: tensor}} state dict (it holds a "
                         f"{type(obj).__name__}{keys})")
    return obj


def find_index(path: Path) -> Path:
    """The one ``*.safetensors.index.json`` in directory ``path``; ValueError naming it otherwise."""
    found = sorted(path.glob(f"*{INDEX_SUFFIX}"))
    if len(found) != 1:
        raise ValueError(f"directory {path} holds {len(found)} '*{INDEX_SUFFIX}' files; expected exactly one "
                         "(or pass a .safetensors / .pth file)")
    return found[0]


def read_index(index_path: Path) -> dict[str, str]:
    """The ``weight_map`` ({tensor name: shard file name}) of a sharded safetensors index.

    Raises:
        ValueError: naming the file when it is not JSON or has no ``{"weight_map": {name: shard}}``.
    """
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"{index_path} is not a safetensors index: not JSON ({err})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        found = f"keys {sorted(index)}" if isinstance(index, dict) else f"a JSON {type(index).__name__}"
        raise ValueError(f"{index_path} is not a safetensors index: it has no \"weight_map\" of tensor names to "
                         f"shard files (found {found}); expected {{\"metadata\": ..., \"weight_map\": {{...}}}}")
    return weight_map


def _read_sharded(index_path: Path) -> dict[str, Tensor]:
    by_shard: dict[str, list[str]] = {}
    for key, shard in read_index(index_path).items():
        by_shard.setdefault(shard, []).append(key)
    sd: dict[str, Tensor] = {}
    for shard, keys in by_shard.items():
        shard_path = index_path.parent / shard
        if not shard_path.is_file():
            raise ValueError(f"shard {shard} listed in {index_path} is missing ({len(keys)} tensors)")
        sd.update(_read_safetensors(shard_path, keys))
    logger.info("read %d tensors from %d shards of %s", len(sd), len(by_shard), index_path.name)
    return sd


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read a state dict from ``.safetensors``, ``.pth``/``.pt``/``.bin``/``.ckpt`` or a sharded safetensors index.

    Every file is checked before its tensors are read (safetensors header against the file size, torch file
    format), so a bad file fails here with the reason, never with a raw safetensors / torch / json error.

    Args:
        path: a file, a ``*.safetensors.index.json`` (official ``{"metadata", "weight_map"}`` format), or a
            directory holding exactly one such index.

    Returns:
        ``{name: tensor}`` on the CPU; safetensors and zip-format torch files are memory-mapped (lazy).

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: naming the file and the problem: unknown extension, truncated or foreign file (an HTML page,
            text, ...), a pickle that needs more than ``weights_only``, an index without a ``weight_map``, a
            missing shard.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        return _read_sharded(find_index(path))
    name = path.name.lower()
    if name.endswith(INDEX_SUFFIX):
        return _read_sharded(path)
    if name.endswith(".safetensors"):
        return _read_safetensors(path)
    if name.endswith(TORCH_SUFFIXES):
        return read_torch_checkpoint(path)
    raise ValueError(f"checkpoint {path} has an unknown extension; expected .safetensors, .pth, .pt, .bin, .ckpt "
                     f"or a *{INDEX_SUFFIX} / a directory with one")


def keep_prefixed(sd: dict[str, Tensor], prefixes: tuple[str, ...]) -> dict[str, Tensor]:
    """The tensors under the first of ``prefixes`` that any key carries, prefix dropped; ``sd`` itself if none.

    A bundle (e.g. a full ComfyUI checkpoint: DiT, VAE and text encoder under their own prefixes) keeps only the
    part asked for; how many tensors were ignored is logged.
    """
    for prefix in prefixes:
        kept = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        if kept:
            if len(kept) < len(sd):
                logger.info("kept %d '%s*' tensors, ignored %d others", len(kept), prefix, len(sd) - len(kept))
            return kept
    return sd


def strip_prefixes(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Drop ComfyUI's ``model.diffusion_model.`` / ``diffusion_model.`` key prefixes (see ``keep_prefixed``)."""
    return keep_prefixed(sd, DIT_PREFIXES)


def key_problems(expected: dict[str, tuple[int, ...]], sd: dict[str, Tensor], allowed_extra: set[str] = frozenset()
                 ) -> list[str]:
    """Missing keys, unexpected keys (less ``allowed_extra``) and wrong shapes of ``sd`` against ``expected``
    (key -> shape), each as "N what: up to 10 names"; [] when ``sd`` matches."""
    missing = sorted(set(expected) - set(sd))
    extra = sorted(set(sd) - set(expected) - allowed_extra)
    wrong = sorted(f"{k} {tuple(sd[k].shape)} (expected {tuple(expected[k])})"
                   for k in set(expected) & set(sd) if tuple(sd[k].shape) != tuple(expected[k]))
    return [f"{len(v)} {what}: {_listing(v)}"
            for what, v in (("missing keys", missing), ("unexpected keys", extra), ("wrong shapes", wrong)) if v]


def _describe_non_dit(sd: dict[str, Tensor]) -> str | None:
    """What a state dict that is not a Wan T2V DiT looks like, or None when it may be one."""
    keys = sd.keys()

    def has(pattern: str) -> bool:
        return any(re.match(pattern, k) for k in keys)

    if "shared.weight" in sd or has(r"encoder\.block\.\d+\."):
        return "a T5/umT5 text encoder (shared.weight / encoder.block.* keys)"
    if "token_embedding.weight" in sd and has(r"blocks\.\d+\.attn\."):
        return "a Wan umT5 text encoder (token_embedding.weight / blocks.*.attn.* keys)"
    if "encoder.conv1.weight" in sd or has(r"decoder\.") or has(r"encoder\.downsamples\."):
        return "a VAE (encoder.conv1.weight / decoder.* keys)"
    if has(r"(visual|textual|log_scale)") and "patch_embedding.weight" not in sd:
        return "a CLIP image/text encoder (visual.* / textual.* keys)"
    if has(r"img_emb\."):
        return "a Wan2.1 image-to-video (I2V/FLF2V) DiT (img_emb.* keys)"
    if has(r"vace_"):
        return "a Wan VACE DiT (vace_* keys)"
    pe = sd.get("patch_embedding.weight")
    if pe is not None and pe.ndim == 5 and pe.shape[1] == 36:
        return "a Wan2.1 image-to-video DiT (36 input channels)"
    if pe is not None and pe.ndim == 5 and pe.shape[1] == 48:
        return "a Wan2.2 TI2V-5B DiT (48 latent channels)"
    if pe is None or pe.ndim != 5:
        return f"not a Wan DiT (no 5-D patch_embedding.weight; first keys: {sorted(keys)[:5]})"
    return None


def _shape(sd: dict[str, Tensor], key: str, ndim: int) -> tuple[int, ...]:
    if key not in sd or sd[key].ndim != ndim:
        got = tuple(sd[key].shape) if key in sd else "missing"
        raise ValueError(f"Wan DiT state dict: {key} is {got}; expected a {ndim}-D tensor")
    return tuple(sd[key].shape)


def infer_dit_config(sd: dict[str, Tensor]) -> WanDiTConfig:
    """Recover the architecture of a Wan2.1 T2V / Phantom-Wan DiT from tensor shapes alone.

    ``num_heads = dim // 128``: heads are not stored, and every Wan2.1 model uses 128 channels per head.
    A plain Wan2.1 T2V checkpoint has the same shapes as the Phantom-Wan one of its size (Phantom adds no
    parameters), so it is recognised as that preset too. Returns the preset object when one matches.

    Raises:
        ValueError: naming what the state dict looks like (I2V DiT, VAE, text encoder, ...) when it is not a
            T2V DiT, or which key has an unexpected shape.
    """
    what = _describe_non_dit(sd)
    if what is not None:
        raise ValueError(f"this checkpoint is {what}; expected a Phantom-Wan (Wan2.1 T2V) DiT")
    dim, in_dim, *patch = _shape(sd, "patch_embedding.weight", 5)
    if dim % HEAD_DIM:
        raise ValueError(f"patch_embedding.weight gives dim {dim}; Wan DiTs have a multiple of {HEAD_DIM}")
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    if not layers:
        raise ValueError("Wan DiT state dict has no blocks.N.* keys")
    head_out = _shape(sd, "head.head.weight", 2)[0]
    config = WanDiTConfig(
        dim=dim,
        ffn_dim=_shape(sd, "blocks.0.ffn.0.weight", 2)[0],
        num_heads=dim // HEAD_DIM,
        num_layers=max(layers) + 1,
        in_dim=in_dim,
        out_dim=head_out // math.prod(patch),
        patch_size=tuple(patch),
        text_dim=_shape(sd, "text_embedding.0.weight", 2)[1],
        freq_dim=_shape(sd, "time_embedding.0.weight", 2)[1],
    )
    name = preset_name(config)
    return DIT_PRESETS[name] if name else config


def preset_name(config: WanDiTConfig) -> str | None:
    """The ``DIT_PRESETS`` name equal to ``config``, or None."""
    return next((name for name, preset in DIT_PRESETS.items() if preset == config), None)


def expected_shapes(config: WanDiTConfig) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` of a ``PhantomWanDiT(config)`` state dict (built on the meta device, no memory)."""
    return {k: tuple(v.shape) for k, v in PhantomWanDiT(config, device="meta").state_dict().items()}


def _listing(items: list[str], limit: int = 10) -> str:
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _fp8_extras(sd: dict[str, Tensor], want: dict[str, tuple[int, ...]]) -> set[str]:
    """Keys a scaled-fp8 file adds: the ``scaled_fp8`` marker and ``<layer>.scale_weight`` / ``.scale_input``
    beside an expected ``<layer>.weight`` (a scale for any other key stays unexpected)."""
    return {k for k in sd if k == SCALED_FP8_KEY or (is_scale_key(k) and k.rsplit(".", 1)[0] + ".weight" in want)}


def validate_dit_state_dict(sd: dict[str, Tensor], config: WanDiTConfig) -> None:
    """Check that ``sd`` has exactly the keys and shapes of ``PhantomWanDiT(config)``.

    The extra keys of a scaled-fp8 file (``scaled_fp8`` marker, per-layer ``scale_weight`` / ``scale_input``)
    are accepted; whether every fp8 weight has its scale is checked at load (``fp8.split_scales``).

    Raises:
        ValueError: listing (up to 10 of each, with counts) missing keys, unexpected keys and wrong shapes.
    """
    want = expected_shapes(config)
    if problems := key_problems(want, sd, _fp8_extras(sd, want)):
        raise ValueError(f"DiT state dict does not match {preset_name(config) or config}: " + "; ".join(problems))


@contextmanager
def errors_name_file(source: object) -> Iterator[None]:
    """Put the checkpoint's path in front of a ValueError raised inside (when ``source`` is a path), so a
    message like "this checkpoint is a VAE ..." says which file it is about."""
    try:
        yield
    except ValueError as err:
        if isinstance(source, (str, os.PathLike)) and str(source) not in str(err):
            raise ValueError(f"{source}: {err}") from err
        raise


def load_dit(
    path_or_state_dict: str | Path | dict[str, Tensor],
    dtype: torch.dtype | None = torch.float32,
    device: torch.device | str = "cpu",
    ops: Any = nn,
    compute_dtype: torch.dtype | None = None,
) -> PhantomWanDiT:
    """Load a Phantom-Wan DiT for inference, tensor by tensor (never the whole checkpoint twice).

    Args:
        path_or_state_dict: a checkpoint path (see ``read_state_dict``) or an in-memory state dict; fp32 / fp16 /
            bf16, fp8 (``float8_e4m3fn`` / ``float8_e5m2``) or ComfyUI's scaled fp8 (see ``phantom_core.fp8``).
        dtype: weight dtype. None keeps the stored one (an fp8 file stays fp8). fp32 / fp16 / bf16: every tensor
            is cast to it (fp8 weights dequantized with their scales). An fp8 dtype: the Linear weights are
            stored in it (float weights quantized with a per-tensor scale), everything else in ``compute_dtype``.
        device: where the parameters go.
        ops: layer namespace (``torch.nn`` or e.g. ComfyUI's ``comfy.ops.disable_weight_init``). When the weights
            must be cast per forward (fp8, or ``compute_dtype`` != weight dtype), ``fp8_ops(compute_dtype)`` is
            used instead, logged.
        compute_dtype: activation dtype. None: the weight dtype for float weights; for fp8 weights bf16 on a
            CUDA device and fp32 elsewhere (``fp8.default_compute_dtype``).

    Returns:
        ``PhantomWanDiT`` in eval mode with ``requires_grad`` off; ``model.compute_dtype`` is the activation dtype.

    Raises:
        ValueError: for a file that is not a T2V Wan DiT, missing / unexpected / mis-shaped keys, a scaled fp8
            file missing a ``scale_weight``, or an unusable ``dtype`` / ``compute_dtype``.
    """
    owned = not isinstance(path_or_state_dict, dict)
    sd = read_state_dict(path_or_state_dict) if owned else path_or_state_dict
    sd = strip_prefixes(sd)
    if sd is path_or_state_dict:
        sd = dict(sd)  # never mutate the caller's dict
    with errors_name_file(path_or_state_dict):
        config = infer_dit_config(sd)
        validate_dit_state_dict(sd, config)
    stored = detect_fp8_format(sd)
    plan = plan_load(stored, dtype, compute_dtype, device)
    if plan.cast_ops:
        if ops is not nn:
            logger.info("%s weights computed in %s need cast-on-forward layers: using phantom fp8_ops, not %s",
                        plan.weight_dtype, plan.compute_dtype, getattr(ops, "__name__", ops))
        ops = fp8_ops(plan.compute_dtype)
    logger.info("loading DiT %s (%d layers, dim %d) stored as %s%s: weights %s, compute %s, on %s",
                preset_name(config) or "custom config", config.num_layers, config.dim, stored.stored_dtype,
                " (scaled)" if stored.scaled else "", plan.weight_dtype, plan.compute_dtype, device)
    model = PhantomWanDiT(config, ops=ops, dtype=plan.compute_dtype if plan.cast_ops else plan.weight_dtype,
                          device="meta")
    # one tensor at a time, each source reference dropped as we go; {} kinds with plain layers: all weight dtype
    scales = convert_state_dict(sd, cast_layer_weights(model), plan, device)
    model.load_state_dict(sd, strict=True, assign=True)
    attach_scales(model, scales)
    logger.debug("DiT weights by dtype (bytes): %s", weight_bytes(model))
    return model.eval().requires_grad_(False)
