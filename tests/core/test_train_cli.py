"""`python -m phantom_core train`: a TOML config with flags on top, from a dataset folder and model files (the
latents cached once), LoRA to the file named by --out (which changes the sampler's output once applied), full
training from scratch with a validation video, clear errors; and the Python API through the facade."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import phantom_core
from phantom_core.__main__ import main
from phantom_core.lora.apply import apply_loras
from phantom_core.sampling.loop import sample_from_seed
from phantom_core.training.runlog import read_log
from phantom_core.video_io import probe_mp4
from phantom_core.wan.load import load_dit
from tests.support.files import make_tiny_files
from tests.support.training import write_dataset

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("train_cli")
    paths = make_tiny_files(root, 0, [(40, 32)])
    write_dataset(root / "data", samples=2, frames=5)
    return paths


def write_toml(path, **values) -> str:
    lines = [f"{k} = {json.dumps(v)}" for k, v in values.items()]  # JSON strings / numbers / bools are TOML too
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def test_train_lora_from_a_toml_file_with_flag_overrides(files, tmp_path, capsys):
    root = files["root"]
    toml = write_toml(tmp_path / "run.toml", dataset=str(root / "data"), dit=str(files["dit"]), vae=str(files["vae"]),
                      text_encoder=str(files["text_encoder"]), width=32, height=32, frames=5, mode="lora",
                      lora_rank=4, lora_alpha=4, steps=50, learning_rate=0.01, checkpoint_every=2,
                      cache_dir=str(root / "cache"))
    out = tmp_path / "loras" / "subject.safetensors"
    assert main(["train", "--config", toml, "--steps", "3", "--out", str(out), "--seed", "7"]) == 0
    err = capsys.readouterr().err
    assert "training [" in err and "3/3" in err and "loss " in err and f"wrote {out} after 3 steps" in err
    with safe_open(str(out), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert "diffusion_model.blocks.0.self_attn.q.lora_up.weight" in keys
    assert "diffusion_model.blocks.1.ffn.2.alpha" in keys and len(keys) == 2 * 10 * 3  # 2 blocks x 10 Linears
    assert (meta["rank"], meta["steps"], meta["base_model"]) == ("4", "3", "tiny")
    assert json.loads(meta["settings"])["seed"] == 7
    run = tmp_path / "loras" / "subject.run"
    assert [r["step"] for r in read_log(run / "log.jsonl")] == [1, 2, 3]
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000002", "step_000003"]

    # the trained LoRA changes what the sampler makes
    gen = torch.Generator().manual_seed(0)
    refs, ctx = torch.randn(1, 16, 1, 4, 4, generator=gen), torch.randn(1, 4, 64, generator=gen)
    def sample(model):
        return sample_from_seed(model, 3, (1, 16, 2, 4, 4), refs, ctx, ctx[:, :2], steps=2, w_img=1.0, w_text=1.0)
    base = sample(load_dit(files["dit"]))
    with_lora = sample(apply_loras(load_dit(files["dit"]), [(out, 1.0)]))
    assert (with_lora - base).abs().max() > 1e-3


def test_train_full_from_scratch_writes_a_dit_checkpoint(files, tmp_path, capsys):
    root = files["root"]
    out = tmp_path / "scratch.safetensors"
    args = ["train", "--dataset", str(root / "data"), "--dit", "scratch:tiny", "--vae", str(files["vae"]),
            "--text-encoder", str(files["text_encoder"]), "--width", "32", "--height", "32", "--frames", "5",
            "--mode", "full", "--steps", "2", "--out", str(out), "--cache-dir", str(root / "cache"),
            "--no-gradient-checkpointing", "--no-progress", "--validate-every", "2", "--validation-prompt",
            "a dog runs", "--validation-references", str(files["ref0"]), "--validation-steps", "2"]
    assert main(args) == 0
    assert "training [" not in capsys.readouterr().err
    video = tmp_path / "scratch.run" / "validation" / "step_000002.mp4"
    meta = probe_mp4(video)  # sampled by our sampler from the step-2 weights, decoded by the VAE
    assert (meta["frames"], meta["width"], meta["height"]) == (5, 32, 32)
    model = load_dit(out)  # upstream keys: loads as a Phantom-Wan DiT
    assert model.config == phantom_core.DIT_PRESETS["tiny"]
    assert float(model.head.head.weight.abs().max()) > 0  # zero-initialised (upstream), moved by training


@pytest.mark.parametrize(("args", "message"), [
    (["--steps", "0"], "steps: got 0; expected an integer from 1 to"),
    (["--frames", "6"], "frames: got 6; expected an integer from 1 to 4097, 1 + a multiple of 4"),
    (["--out", "x.pt"], "out is 'x.pt'; valid: a path ending in .safetensors"),
    (["--mode", "dora"], "mode is 'dora'; valid: lora | full"),
])
def test_bad_settings_exit_2_naming_the_setting(tmp_path, capsys, args, message):
    assert main(["train", "--out", str(tmp_path / "a.safetensors"), *args]) == 2
    assert message in capsys.readouterr().err


def test_unknown_toml_keys_and_missing_inputs_are_errors(tmp_path, capsys):
    toml = write_toml(tmp_path / "bad.toml", learning_rte=0.1)
    assert main(["train", "--config", toml]) == 2
    assert "unknown keys ['learning_rte']" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "a.safetensors"), "--dataset", str(tmp_path)]) == 2
    assert "dit is empty" in capsys.readouterr().err  # checked before any data is read
    assert main(["train", "--out", str(tmp_path / "a.safetensors"), "--dit", "scratch:tiny"]) == 2
    assert "dataset is empty" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "a.safetensors"), "--dit", "scratch:huge", "--dataset", "d"]) == 2
    assert "dit is scratch:huge; valid presets: phantom-wan-1.3b, phantom-wan-14b, tiny" in capsys.readouterr().err


def test_the_python_api_is_in_the_facade():
    from phantom_core.training.config import TrainConfig, load_config
    from phantom_core.training.loop import TrainResult, train

    assert (phantom_core.train, phantom_core.TrainConfig, phantom_core.TrainResult, phantom_core.load_config) == \
        (train, TrainConfig, TrainResult, load_config)
