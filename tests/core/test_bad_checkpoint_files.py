"""Bad checkpoint files are refused with a ValueError naming the file and the problem on every path: the
reader, each loader (with any weight dtype), `inspect_checkpoint` / `stored_format` and `python -m phantom_core
inspect`; never a raw safetensors / torch / json / KeyError, and never torch's "weights_only=False" advice."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from phantom_core.__main__ import main
from phantom_core.loading.files import describe_content, read_state_dict
from phantom_core.tiny.default import write_tiny_default
from phantom_core.wan.inspect import inspect_checkpoint, stored_format
from phantom_core.wan.load import load_dit
from phantom_core.wan.umt5 import load_text_encoder
from phantom_core.wan.vae import load_vae

HTML = b"<!DOCTYPE html>\n<html><head><title>403</title></head><body>Access denied</body></html>\n"
LFS = b"version https://git-lfs.github.com/spec/v1\noid sha256:4d7a\nsize 2838000000\n"


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[str, tuple[Path, list[str]]]:
    """name -> (file, words its error must contain besides the path)."""
    root = tmp_path_factory.mktemp("bad")
    tiny = write_tiny_default(root / "models")
    dit = tiny["dit"].read_bytes()
    sd = dict(read_state_dict(tiny["dit"]))
    torch.save(sd, root / "dit.pth")
    zipped = (root / "dit.pth").read_bytes()
    torch.save(sd, root / "legacy.pth", _use_new_zipfile_serialization=False)
    legacy = (root / "legacy.pth").read_bytes()
    files = {
        "truncated.safetensors": (dit[: len(dit) // 2], ["is truncated"]),
        "header_cut.safetensors": (dit[:40], ["is truncated"]),
        "html.safetensors": (HTML, ["not a safetensors file", "HTML"]),
        "lfs_pointer.safetensors": (LFS, ["not a safetensors file", "Git LFS pointer"]),
        "empty.safetensors": (b"", ["not a safetensors file", "empty"]),
        "truncated.pth": (zipped[: len(zipped) // 2], ["is truncated"]),
        "truncated_legacy.pth": (legacy[: len(legacy) // 2], ["truncated or damaged"]),
        "access_denied.pth": (HTML, ["not a PyTorch checkpoint", "HTML"]),
        "random.pth": (bytes((i * 167 + 101) % 256 for i in range(4096)), ["not a PyTorch checkpoint"]),
        "notes.pt": (b"these are not weights\n" * 20, ["not a PyTorch checkpoint", "text file"]),
        "renamed_safetensors.pth": (dit, ["not a PyTorch checkpoint", "looks like a safetensors file"]),
        "no_map.safetensors.index.json": (json.dumps({"metadata": {}}).encode(), ["weight_map", "metadata"]),
        "not_json.safetensors.index.json": (b"{oops", ["not a safetensors index", "not JSON"]),
    }
    out = {}
    for name, (data, words) in files.items():
        (root / name).write_bytes(data)
        out[name] = (root / name, words)
    torch.save({"weights": sd, "args": argparse.Namespace(lr=1)}, root / "full_pickle.pth")
    out["full_pickle.pth"] = (root / "full_pickle.pth", ["holds more than tensors", "argparse.Namespace"])
    (root / "short_shard").mkdir()
    save_file({"patch_embedding.weight": torch.zeros(2)}, root / "short_shard" / "a.safetensors")
    (root / "short_shard" / "m.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"patch_embedding.weight": "a.safetensors", "head.head.weight": "a.safetensors"}}))
    out["short_shard"] = (root / "short_shard", ["a.safetensors", "lacks 1 tensors", "head.head.weight"])
    return out


LOADERS: dict[str, Callable[[Path], object]] = {
    "read_state_dict": read_state_dict,
    "load_dit stored dtype": lambda p: load_dit(p, dtype=None),
    "load_dit fp16": lambda p: load_dit(p, dtype=torch.float16),
    "load_dit fp8": lambda p: load_dit(p, dtype=torch.float8_e4m3fn),
    "load_vae": load_vae,
    "load_vae fp16": lambda p: load_vae(p, dtype=torch.float16),
    "load_text_encoder stored dtype": lambda p: load_text_encoder(p, dtype=None),
    "load_text_encoder bf16": lambda p: load_text_encoder(p, dtype=torch.bfloat16),
    "inspect_checkpoint": inspect_checkpoint,
    "stored_format": stored_format,
}


def check_message(message: str, path: Path, words: list[str], where: str) -> None:
    assert str(path) in message, f"{where}: the error does not name {path}: {message!r}"
    for word in words:
        assert word in message, f"{where}: {message!r} does not say {word!r}"
    assert "weights_only=False" not in message and "weights_only` set to `False" not in message, where


@pytest.mark.parametrize("loader", list(LOADERS))
def test_bad_files_are_named_on_every_core_path(bad_files, loader):
    for name, (path, words) in bad_files.items():
        with pytest.raises(ValueError) as err:  # a raw SafetensorError / RuntimeError / KeyError fails here
            LOADERS[loader](path)
        check_message(str(err.value), path, words, f"{loader}({name})")


def test_bad_files_through_the_inspect_command(bad_files, capsys):
    for name, (path, words) in bad_files.items():
        assert main(["inspect", str(path)]) == 2, name
        check_message(capsys.readouterr().err, path, words, f"inspect {name}")


def test_describe_content():
    assert "HTML" in describe_content(b"  \n<html lang='en'>")
    assert "empty" in describe_content(b"")
    assert "text file" in describe_content(b"model weights, see README")
    assert "00 ff 10" in describe_content(b"\x00\xff\x10\x80\x81\x82\x83\x84\x85")


def test_good_files_still_load(tmp_path):
    """The checks accept the formats they guard: zip and legacy .pth, safetensors, wrapped state dicts."""
    sd = {"a.weight": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2, dtype=torch.bfloat16)}
    torch.save(sd, tmp_path / "zip.pth")
    torch.save({"state_dict": sd}, tmp_path / "wrapped.pt")
    torch.save(sd, tmp_path / "legacy.bin", _use_new_zipfile_serialization=False)
    save_file(sd, tmp_path / "x.safetensors")
    for name in ("zip.pth", "wrapped.pt", "legacy.bin", "x.safetensors"):
        got = read_state_dict(tmp_path / name)
        assert set(got) == set(sd) and all(torch.equal(got[k], sd[k]) for k in sd), name
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "nested.pth")
    with pytest.raises(ValueError, match=r"nested\.pth does not hold a flat .* keys state_dict, epoch"):
        read_state_dict(tmp_path / "nested.pth")
