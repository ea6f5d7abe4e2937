"""Precision and placement of the standalone pipeline (issue: "a 5.7 B-parameter encoder is loaded in its stored
dtype (bf16/fp8), never upcast wholesale, and can run on the CPU while the DiT holds the GPU"): `--dtype auto`
keeps the stored weight dtypes, a forced `--dtype` still casts, `--text-encoder-device` places umT5 apart from
the DiT, the sidecar records the choices and regenerating from it stays bit-exact."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from phantom_core.__main__ import build_parser, main
from phantom_core.inference.cli import resolve_generate_args
from phantom_core.inference.pipeline import load_models, resolve_compute_dtype
from phantom_core.loading.files import read_state_dict
from phantom_core.loading.fp8 import quantize_state_dict
from phantom_core.tiny.default import write_tiny_default
from phantom_core.video_io import read_mp4_frames
from phantom_core.wan.umt5 import SPIECE_KEY

TINY = ["--width", "32", "--height", "32", "--frames", "1", "--steps", "2", "--seed", "11", "--no-progress"]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """The tiny default, plus its DiT as scaled fp8 and its umT5 in bf16 (as the real files people have)."""
    root = tmp_path_factory.mktemp("precision")
    paths = dict(write_tiny_default(root / "models"))
    dit = dict(read_state_dict(paths["dit"]))
    linears = [k for k, v in dit.items() if k.startswith("blocks.") and k.endswith(".weight") and v.ndim == 2]
    save_file(quantize_state_dict(dit, linears), root / "dit_fp8_scaled.safetensors")
    te = dict(read_state_dict(paths["text_encoder"]))
    bf16 = {k: v if k == SPIECE_KEY else v.to(torch.bfloat16) for k, v in te.items()}
    save_file(bf16, root / "umt5_bf16.safetensors")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(root / "ref.png")
    return {**paths, "dit_fp8": root / "dit_fp8_scaled.safetensors", "te_bf16": root / "umt5_bf16.safetensors",
            "ref": root / "ref.png", "root": root}


def args_for(files: dict[str, Path], out: Path) -> list[str]:
    return ["generate", "--dit", str(files["dit_fp8"]), "--vae", str(files["vae"]), "--text-encoder",
            str(files["te_bf16"]), "--ref", str(files["ref"]), "--prompt", "a red ball", *TINY, "--out", str(out)]


def test_compute_dtype_rule():
    assert resolve_compute_dtype(None, None, "cpu") == torch.float32  # stored dtype kept: fp32 on the CPU
    assert resolve_compute_dtype(torch.float8_e5m2, None, "cpu") == torch.float32
    assert resolve_compute_dtype(torch.float16, None, "cpu") == torch.float16  # a forced float dtype computes in it
    assert resolve_compute_dtype(None, torch.bfloat16, "cpu") == torch.bfloat16  # an explicit compute dtype wins


def test_models_keep_their_stored_dtype_by_default(files):
    dit, vae, te = load_models(files["dit_fp8"], files["vae"], files["te_bf16"])
    assert dit.blocks[0].self_attn.q.weight.dtype == torch.float8_e4m3fn and dit.compute_dtype == torch.float32
    assert te.dtype == torch.bfloat16 and te.compute_dtype == torch.float32  # never upcast wholesale
    assert all(p.dtype == torch.float32 for p in vae.parameters())  # the VAE always runs in fp32
    dit, _, te = load_models(files["dit_fp8"], files["vae"], files["te_bf16"], dtype=torch.float32)
    assert dit.blocks[0].self_attn.q.weight.dtype == torch.float32 and te.dtype == torch.float32  # forced


def test_text_encoder_device_is_separate(files):
    # the meta device stands in for "another device than the DiT's" on a CPU-only machine
    dit, vae, te = load_models(files["dit"], files["vae"], files["te_bf16"], text_encoder_device="meta")
    assert te.device.type == "meta" and next(dit.parameters()).device.type == "cpu"
    assert next(vae.parameters()).device.type == "cpu"
    parse = build_parser().parse_args
    base = ["generate", "--dit", "d", "--vae", "v", "--text-encoder", "t", "--ref", "r", "--prompt", "p",
            "--out", "o.mp4"]
    kw = resolve_generate_args(parse([*base, "--device", "cuda:1", "--text-encoder-device", "cpu"]))
    assert (kw["device"], kw["text_encoder_device"], kw["dtype"], kw["compute_dtype"]) == ("cuda:1", "cpu", None, None)
    kw = resolve_generate_args(parse([*base, "--device", "cpu", "--dtype", "bfloat16", "--compute-dtype", "fp32"]))
    assert (kw["text_encoder_device"], kw["dtype"], kw["compute_dtype"]) == (None, torch.bfloat16, torch.float32)
    with pytest.raises(ValueError, match="--text-encoder-device: got 'gpu0'"):
        resolve_generate_args(parse([*base, "--text-encoder-device", "gpu0"]))


def test_cli_auto_dtype_sidecar_and_bit_exact_regeneration(files, capsys):
    out = files["root"] / "auto" / "v.mp4"
    assert main(args_for(files, out)) == 0, capsys.readouterr().err
    assert "weights auto, compute auto" in capsys.readouterr().err
    runtime = json.loads(out.with_suffix(".json").read_text())["runtime"]
    assert (runtime["dtype"], runtime["compute_dtype"], runtime["text_encoder_device"]) == ("auto", "auto", None)
    resolved = runtime["resolved"]
    assert resolved["dit"] == {"weights": "float8_e4m3fn", "compute": "float32", "device": "cpu"}
    assert resolved["text_encoder"] == {"weights": "bfloat16", "compute": "float32", "device": "cpu"}
    assert resolved["vae"]["weights"] == "float32"
    again = files["root"] / "auto_again" / "v.mp4"
    assert main(["generate", "--from-sidecar", str(out.with_suffix(".json")), "--out", str(again),
                 "--no-progress"]) == 0, capsys.readouterr().err
    assert np.array_equal(read_mp4_frames(out), read_mp4_frames(again))
    # --dtype still forces one dtype, and the forced choice is what the sidecar records
    forced = files["root"] / "forced" / "v.mp4"
    assert main(["generate", "--from-sidecar", str(out.with_suffix(".json")), "--out", str(forced),
                 "--dtype", "bf16", "--text-encoder-device", "cpu", "--no-progress"]) == 0, capsys.readouterr().err
    runtime = json.loads(forced.with_suffix(".json").read_text())["runtime"]
    assert (runtime["dtype"], runtime["text_encoder_device"]) == ("bfloat16", "cpu")
    assert runtime["resolved"]["dit"]["weights"] == runtime["resolved"]["text_encoder"]["weights"] == "bfloat16"
    assert runtime["resolved"]["dit"]["compute"] == "bfloat16"
