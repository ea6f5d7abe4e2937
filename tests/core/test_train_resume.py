"""Checkpoints and resume: an interrupted run resumed from its last checkpoint gives the same loss curve and the
same weights as an uninterrupted one. Both runs execute the same code path on the same machine with the same
thread count, so their floats are compared bit for bit (``==``), which is legitimate here and nowhere else."""

from __future__ import annotations

import os
import stat

import pytest
import torch
from safetensors.torch import load_file

from phantom_core.training import checkpoint as checkpoint_module
from phantom_core.training.checkpoint import list_checkpoints
from phantom_core.training.config import TrainConfig
from phantom_core.training.loop import train
from phantom_core.training.runlog import read_log
from tests.support.training import micro_dit, random_latents

pytestmark = pytest.mark.usefixtures("single_thread")


class Stop(Exception):
    """Raised by the step callback: the run is interrupted (as by Ctrl-C or ComfyUI's Cancel)."""


def config_for(tmp_path, name: str, mode: str, **kw) -> TrainConfig:
    settings = dict(out=str(tmp_path / f"{name}.safetensors"), mode=mode, steps=6, batch_size=2, grad_accum=2,
                    checkpoint_every=2, keep_checkpoints=2, text_dropout=0.3, reference_dropout=0.2,
                    lora_rank=4, lora_alpha=4.0, lora_dropout=0.1 if mode == "lora" else 0.0, warmup_steps=2,
                    lr_schedule="cosine", learning_rate=1e-3, seed=3, timesteps="logit_normal")
    return TrainConfig(**{**settings, **kw})


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_resume_after_an_interruption_equals_the_uninterrupted_run(tmp_path, mode):
    data = random_latents(5, seed=1)  # 5 samples, global batch 2: epochs turn over, a sample is left out
    whole = train(config_for(tmp_path, "whole", mode), dataset=data, model=micro_dit(seed=2))

    def interrupt(step, total, loss):
        if step == 5:  # after the step-4 checkpoint, before the step-6 one
            raise Stop
    with pytest.raises(Stop):
        train(config_for(tmp_path, "cut", mode), dataset=data, model=micro_dit(seed=2), callback=interrupt)
    run_dir = config_for(tmp_path, "cut", mode).run_path
    assert [s for s, _ in list_checkpoints(run_dir / "checkpoints")] == [2, 4]
    assert [r["step"] for r in read_log(run_dir / "log.jsonl")] == [1, 2, 3, 4, 5]
    resumed = train(config_for(tmp_path, "cut", mode, resume=True), dataset=data, model=micro_dit(seed=2))

    assert resumed.losses == whole.losses  # bitwise: same code path, same machine (see the module docstring)
    assert [r["step"] for r in read_log(run_dir / "log.jsonl")] == [1, 2, 3, 4, 5, 6]
    assert len(set(whole.losses)) == 6  # the curve is not trivially constant
    a, b = load_file(str(whole.out)), load_file(str(resumed.out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [s for s, _ in list_checkpoints(run_dir / "checkpoints")] == [4, 6]  # keep_checkpoints = 2


def test_a_fixed_seed_gives_the_same_run_and_another_seed_another(tmp_path):
    data = random_latents(4, seed=1)
    first = train(config_for(tmp_path, "a", "full", steps=2), dataset=data, model=micro_dit(seed=2))
    second = train(config_for(tmp_path, "b", "full", steps=2), dataset=data, model=micro_dit(seed=2))
    other = train(config_for(tmp_path, "c", "full", steps=2, seed=4), dataset=data, model=micro_dit(seed=2))
    assert first.losses == second.losses and other.losses != first.losses


def test_a_failed_checkpoint_write_leaves_the_previous_one_and_no_partial_files(tmp_path, monkeypatch):
    data = random_latents(4, seed=1)
    config = config_for(tmp_path, "x", "full", steps=4)
    real_save = torch.save

    def fail_at_step_4(obj, path, *args, **kwargs):
        if "step_000004" in str(path):
            raise OSError("disk full")
        return real_save(obj, path, *args, **kwargs)
    monkeypatch.setattr(checkpoint_module.torch, "save", fail_at_step_4)
    old_umask = os.umask(0o027)  # the files must follow the umask, not a fixed mode
    try:
        with pytest.raises(OSError, match="disk full"):
            train(config, dataset=data, model=micro_dit(seed=2))
    finally:
        os.umask(old_umask)
    folder = config.run_path / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["step_000002"]  # no step_000004, no hidden temporary
    for f in (folder / "step_000002").iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o640, f
    assert stat.S_IMODE((config.run_path / "loss.png").stat().st_mode) == 0o640
    assert not config.run_path.joinpath("..", "x.safetensors").exists()


def test_resume_refuses_changed_settings_and_a_finished_run_only_rewrites_its_file(tmp_path):
    data = random_latents(4, seed=1)
    done = train(config_for(tmp_path, "r", "full", steps=2), dataset=data, model=micro_dit(seed=2))
    with pytest.raises(ValueError, match=r"settings changed \(batch_size: 2 -> 1\)"):
        train(config_for(tmp_path, "r", "full", steps=2, batch_size=1, resume=True), dataset=data,
              model=micro_dit(seed=2))
    again = train(config_for(tmp_path, "r", "full", steps=2, resume=True), dataset=data, model=micro_dit(seed=2))
    assert again.losses == done.losses and again.steps == 2
