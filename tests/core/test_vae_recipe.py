"""The world VAE's recipes (phantom_core/world/vae_recipe.py): the choice is validated, and the ``subjects`` recipe
runs its phases, calibrates and resumes, on a shrunken configuration."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from phantom_core.wan.latents import normalize_latents
from phantom_core.wan.vae import VAE_PRESETS, load_vae
from phantom_core.world import default_model, vae_recipe
from phantom_core.world.vae_batches import VAEData

SMALL = dict(learning_rate=3e-3, warmup_steps=1, kl_weight=1e-4, checkpoint_every=2)


def test_an_unknown_recipe_is_refused_by_name(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PHANTOM_VAE_RECIPE", "fancy")
    with pytest.raises(ValueError, match=r"PHANTOM_VAE_RECIPE: got 'fancy'; valid recipes are phased, subjects"):
        default_model.stage_vae(tmp_path)
    assert not (tmp_path / default_model.VAE_STAGE_FILE).exists()


def test_the_subjects_recipe_trains_both_phases_calibrates_and_resumes(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PHANTOM_VAE_RECIPE", "subjects")
    world = replace(vae_recipe.WORLD, sources=("photo", "shape"))  # no emoji font needed
    monkeypatch.setattr(vae_recipe, "WORLD", world)
    monkeypatch.setattr(vae_recipe, "SUBJECTS_PRESET", "tiny")
    monkeypatch.setattr(vae_recipe, "CALIBRATION_CLIPS", 2)
    monkeypatch.setattr(vae_recipe, "SUBJECTS_A_DATA", VAEData(clips=1, clip_frames=9, frames=1, crop=32, seed=1))
    monkeypatch.setattr(vae_recipe, "SUBJECTS_B_DATA", VAEData(clips=1, clip_frames=17, frames=1, crop=32, seed=2))
    monkeypatch.setattr(vae_recipe, "SUBJECTS_A_TRAIN", dict(steps=2, seed=3, **SMALL))
    monkeypatch.setattr(vae_recipe, "SUBJECTS_B_TRAIN", dict(steps=2, seed=4, **SMALL))
    path = default_model.stage_vae(tmp_path)
    assert path == tmp_path / default_model.VAE_STAGE_FILE
    phase_a = load_vae(str(tmp_path / vae_recipe.SUBJECTS_A_FILE))
    vae = load_vae(str(path))
    assert vae.config == VAE_PRESETS["tiny"]
    for run in (vae_recipe.SUBJECTS_A_RUN, vae_recipe.SUBJECTS_B_RUN):
        assert len((tmp_path / run / "log.jsonl").read_text().splitlines()) == 2
    # phase B and the calibration changed the weights after phase A
    assert not torch.allclose(vae.conv1.weight, phase_a.conv1.weight)
    # the stage's file is calibrated: its normalized latents of the calibration clips are zero-mean, unit-std
    with torch.no_grad():
        z = torch.cat([normalize_latents(vae.encode_raw(c)).transpose(0, 1).reshape(16, -1)
                       for c in vae_recipe.calibration_clips()], dim=1)
    torch.testing.assert_close(z.mean(dim=1), torch.zeros(16), atol=1e-4, rtol=0)
    torch.testing.assert_close(z.std(dim=1), torch.ones(16), atol=1e-4, rtol=0)
    # run again without the stage's file: phase A's file and phase B's last checkpoint are found, nothing trains,
    # and the same calibration gives the same weights (same code path, same machine)
    path.unlink()
    assert vae_recipe.train_world_vae(tmp_path, path) == path
    assert len((tmp_path / vae_recipe.SUBJECTS_B_RUN / "log.jsonl").read_text().splitlines()) == 2
    torch.testing.assert_close(load_vae(str(path)).conv1.weight, vae.conv1.weight, atol=1e-6, rtol=1e-6)
