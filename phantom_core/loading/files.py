"""Reading checkpoint files into ``{name: tensor}`` state dicts, checking each file before trusting it.

Formats read (``read_state_dict`` picks by extension):

- ``.safetensors``: 8-byte little-endian header length N, N bytes of JSON ``{name: {"dtype", "shape",
  "data_offsets"}, "__metadata__": {...}}``, then the raw data (safetensors format spec). The header is checked
  against the file size first; the tensors are then memory-mapped.
- ``.pth`` / ``.pt`` / ``.bin`` / ``.ckpt``: ``torch.save`` files, zip (memory-mapped) or legacy pickle (read
  fully), always loaded with ``weights_only=True`` so that no pickled code runs.
- ``*.safetensors.index.json`` (or a directory holding exactly one): the sharded format
  ``{"metadata": ..., "weight_map": {tensor name: shard file name}}``; every shard is read with its key list.

Errors: every problem is a ``ValueError`` naming the file and what is wrong (truncated download, an HTML / text /
Git LFS pointer file instead of weights, a pickle needing more than ``weights_only``, an index without a
``weight_map``, a missing shard or shard key), never a raw safetensors / torch / json exception; a path that does
not exist is a ``FileNotFoundError``. Nothing here knows what the tensors are: recognising and loading models is
``phantom_core.wan.load`` (DiT), ``wan_vae`` and ``text_encoder``.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import struct
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from phantom_core.loading.keys import short_listing
from phantom_core.log import logger

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
        raise ValueError(f"{path} lacks {len(absent)} tensors that its index assigns to it: {short_listing(absent)}")


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
        keys = f" with keys {short_listing([str(k) for k in obj][:10])}" if isinstance(obj, dict) else ""
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
    if name.endswith(".gguf"):
        raise ValueError(f"{path} is a GGUF file: only the DiT loader reads GGUF (load_dit, Phantom DiT Loader)")
    raise ValueError(f"checkpoint {path} has an unknown extension; expected .safetensors, .pth, .pt, .bin, .ckpt "
                     f"or a *{INDEX_SUFFIX} / a directory with one")
