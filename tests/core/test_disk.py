"""The disk rules (`phantom_core.loading.disk`): user-given names stay inside their folder; every writer is
atomic and gives its file the permissions a plain `open(path, "w")` gives under the current umask."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from phantom_core.inference.sidecar import write_sidecar
from phantom_core.loading.disk import atomic_write, resolve_inside
from phantom_core.rephrase.cache import RephraseCache
from phantom_core.rephrase.types import RephraseResult
from phantom_core.video_io import write_mp4
from phantom_core.wan.umt5 import write_text_encoder_checkpoint

# ----------------------------------------------------------------------------------------- resolve_inside


@pytest.fixture
def models(tmp_path: Path) -> Path:
    """models/LLM with a model folder and a file, a secret folder beside models/, and a second base folder."""
    (tmp_path / "models" / "LLM" / "qwen").mkdir(parents=True)
    (tmp_path / "models" / "LLM" / "qwen" / "config.json").write_text("{}")
    (tmp_path / "models" / "LLM" / "sub").mkdir()
    (tmp_path / "models" / "LLM" / "sub" / "m.safetensors").write_bytes(b"x")
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "config.json").write_text("{}")
    (tmp_path / "extra").mkdir()
    (tmp_path / "extra" / "other.safetensors").write_bytes(b"y")
    return tmp_path


def resolve(models: Path, name, bases: list[Path] | None = None) -> Path | None:
    bases = bases if bases is not None else [models / "models" / "LLM"]
    return resolve_inside(bases, name, "local_model", where="models/LLM", valid="qwen")


def test_names_inside_resolve_and_missing_ones_are_none(models: Path) -> None:
    llm = models / "models" / "LLM"
    assert resolve(models, "qwen") == llm.resolve() / "qwen"
    assert resolve(models, "sub/m.safetensors") == llm.resolve() / "sub" / "m.safetensors"
    assert resolve(models, "nothing_here") is None
    assert resolve(models, "other.safetensors", [llm, models / "extra"]) == (models / "extra").resolve() / \
        "other.safetensors"  # the second base folder is searched too


@pytest.mark.parametrize(("name", "phrase"), [
    ("/tmp/x", "absolute path"), ("../../secret", "'..' part"), ("qwen/../../secret", "'..' part"),
    ("", "empty"), ("a\x00b", "NUL"), (3, "int, not a file name"), (None, "NoneType"),
])
def test_escaping_or_malformed_names_are_refused(models: Path, name, phrase: str) -> None:
    with pytest.raises(ValueError) as err:
        resolve(models, name)
    message = str(err.value)
    assert message.startswith(f"local_model is {name!r}") and phrase in message and "models/LLM" in message
    assert "(valid: qwen)" in message


def test_a_symlink_leading_outside_is_refused_one_inside_is_followed(models: Path) -> None:
    llm = models / "models" / "LLM"
    (llm / "escape").symlink_to(models / "secret", target_is_directory=True)
    (llm / "alias").symlink_to(llm / "qwen", target_is_directory=True)
    (llm / "linked.safetensors").symlink_to(models / "extra" / "other.safetensors")
    with pytest.raises(ValueError, match=r"local_model is 'escape', a symbolic link that leads outside models/LLM"):
        resolve(models, "escape")
    with pytest.raises(ValueError, match="extra_model_paths.yaml"):
        resolve(models, "escape/config.json")  # a path through the link
    assert resolve(models, "alias") == (llm / "qwen").resolve()
    # a link into another configured base folder stays inside the folders the user configured
    assert resolve(models, "linked.safetensors", [llm, models / "extra"]) == \
        (models / "extra" / "other.safetensors").resolve()


# ------------------------------------------------------------------------------------------- atomic_write


@pytest.fixture(params=[0o022, 0o077], ids=["umask022", "umask077"])
def umask(request) -> Iterator[int]:
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def plain_mode(folder: Path, umask: int) -> int:
    """The mode a plain open(path, "w") gives under the current umask (checked, not assumed)."""
    with open(folder / "plain.txt", "w") as f:
        f.write("x")
    mode = (folder / "plain.txt").stat().st_mode & 0o777
    (folder / "plain.txt").unlink()
    assert mode == 0o666 & ~umask
    return mode


WRITERS: dict[str, Callable[[Path], Path]] = {
    "atomic_write": lambda d: _write_plain(d / "a.bin"),
    "write_mp4": lambda d: write_mp4(np.zeros((1, 16, 16, 3), np.uint8), d / "v.mp4", fps=16),
    "write_sidecar": lambda d: write_sidecar({"format": "phantom-generation"}, d / "v.json"),
    "write_text_encoder_checkpoint": lambda d: write_text_encoder_checkpoint(d / "t.safetensors",
                                                                             {"w": torch.zeros(2)}),
    "rephrase_cache": lambda d: _cache_entry(d / "cache"),
}


def _write_plain(path: Path) -> Path:
    with atomic_write(path) as tmp:
        tmp.write_bytes(b"data")
    return path


def _cache_entry(folder: Path) -> Path:
    RephraseCache(directory=folder).put("k", RephraseResult("p", ("d",), "en", "raw", True))
    return folder / "k.json"


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_written_files_get_the_mode_a_plain_write_gives(tmp_path: Path, umask: int, writer: str) -> None:
    expected = plain_mode(tmp_path, umask)  # 0o644 under umask 022, 0o600 under 077
    path = WRITERS[writer](tmp_path)
    assert path.stat().st_mode & 0o777 == expected, f"{writer}: {oct(path.stat().st_mode & 0o777)}"
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")], "a temporary file was left behind"


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_write(path) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("writer failed")
    assert path.read_bytes() == b"old" and list(tmp_path.iterdir()) == [path]
