"""`generate --lora FILE[:STRENGTH]`: the LoRA changes the video, the sidecar records it (hash, strength) and
`--from-sidecar` applies it again; bad LoRAs fail before sampling with the file named."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from phantom_core.__main__ import build_parser, main
from phantom_core.inference.cli import lora_choice, resolve_generate_args
from phantom_core.inference.pipeline import apply_dit_loras
from phantom_core.inference.sidecar import file_sha256
from phantom_core.lora.adapter import lora_modules
from phantom_core.lora.files import lora_metadata, save_lora
from phantom_core.video_io import read_mp4_frames
from phantom_core.wan.load import load_dit
from tests.support.files import make_tiny_files, model_args
from tests.support.lora import random_lora

SMALL = ["--width", "32", "--height", "32", "--frames", "5", "--steps", "2", "--solver", "euler", "--seed", "3",
         "--prompt", "two things", "--no-progress"]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    files = make_tiny_files(tmp_path_factory.mktemp("lora_cli"), seed=0, sizes=[(40, 56), (64, 30)])
    lora = random_lora(load_dit(files["dit"]), rank=4, alpha=4.0, seed=1, std=0.5)
    files["lora"] = save_lora(files["root"] / "style.safetensors", lora, lora_metadata(4, 4.0, "tiny", 0))
    return files


def test_lora_choice_parses_strength_and_paths():
    assert lora_choice("a.safetensors") == ("a.safetensors", 1.0)
    assert lora_choice("dir/a.safetensors:0.75") == ("dir/a.safetensors", 0.75)
    assert lora_choice("a.safetensors:-1") == ("a.safetensors", -1.0)
    assert lora_choice(r"C:\loras\a.safetensors") == (r"C:\loras\a.safetensors", 1.0)
    assert lora_choice(r"C:\loras\a.safetensors:2") == (r"C:\loras\a.safetensors", 2.0)


def test_lora_changes_the_video_is_recorded_and_reapplied(files, capsys):
    root = files["root"]
    plain, styled, again = root / "plain.mp4", root / "styled.mp4", root / "again.mp4"
    assert main(["generate", *model_args(files), *SMALL, "--out", str(plain)]) == 0
    assert main(["generate", *model_args(files), *SMALL, "--lora", f"{files['lora']}:0.8", "--out", str(styled)]) == 0
    assert f"LoRA {files['lora']} x 0.8" in capsys.readouterr().err
    a, b = read_mp4_frames(plain).astype(float), read_mp4_frames(styled).astype(float)
    assert np.abs(a - b).mean() > 1.0  # the LoRA changes the video (8-bit pixel levels)
    record = json.loads(styled.with_suffix(".json").read_text())
    (entry,) = record["loras"]
    assert entry == {"path": str(files["lora"].resolve()), "bytes": files["lora"].stat().st_size,
                     "sha256": file_sha256(files["lora"]), "strength": 0.8}
    assert json.loads(plain.with_suffix(".json").read_text())["loras"] == []
    assert main(["generate", "--from-sidecar", str(styled.with_suffix(".json")), "--out", str(again),
                 "--no-progress"]) == 0
    assert np.array_equal(read_mp4_frames(again), read_mp4_frames(styled))  # same code path, same machine
    assert json.loads(again.with_suffix(".json").read_text())["loras"][0]["strength"] == 0.8


def test_bad_loras_fail_before_sampling(files, tmp_path, capsys):
    out = tmp_path / "x.mp4"
    assert main(["generate", *model_args(files), *SMALL, "--lora", str(tmp_path / "missing.safetensors"),
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "LoRA file" in err and "missing.safetensors" in err and "does not exist" in err
    text_encoder_lora = {"lora_te1_x.lora_up.weight": torch.zeros(4, 2), "lora_te1_x.lora_down.weight": torch.zeros(2, 4)}
    bad = save_lora(tmp_path / "other.safetensors", text_encoder_lora, {})
    assert main(["generate", *model_args(files), *SMALL, "--lora", f"{bad}:0.5", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "match no module" in err and "lora_te1_x.lora_down.weight" in err
    assert not out.exists()


def test_from_sidecar_refuses_a_lora_that_changed(files, tmp_path):
    lora = tmp_path / "changing.safetensors"
    lora.write_bytes(files["lora"].read_bytes())
    out = tmp_path / "v.mp4"
    assert main(["generate", *model_args(files), *SMALL, "--lora", str(lora), "--out", str(out)]) == 0
    save_lora(lora, random_lora(load_dit(files["dit"]), rank=2, seed=5), {})  # another LoRA under the same name
    with pytest.raises(ValueError, match="changing.safetensors has changed"):
        resolve_generate_args(build_parser().parse_args(["generate", "--from-sidecar", str(out.with_suffix(".json")),
                                                         "--out", str(tmp_path / "w.mp4")]))


def test_pipeline_merges_into_float_weights_and_wraps_fp8_ones(files):
    merged = apply_dit_loras(load_dit(files["dit"]), [(files["lora"], 1.0)])
    assert not lora_modules(merged)
    fp8 = apply_dit_loras(load_dit(files["dit"], dtype=torch.float8_e4m3fn), [(files["lora"], 1.0)])
    assert lora_modules(fp8) and fp8.blocks[0].self_attn.q.base.weight.dtype == torch.float8_e4m3fn
