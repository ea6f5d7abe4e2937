"""tools.pair_experiment: in-pair and cross-pair runs differ only in their references, and the table is written."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from phantom_core.tiny.default import TRAINED_DIR
from phantom_core.world import default_model as recipe
from phantom_core.world.subjects import available_sources
from tools import pair_experiment

pytestmark = pytest.mark.skipif("emoji" not in available_sources(),
                                reason="the recipe's subjects include emoji: `make emoji-font`")


def test_pair_experiment_trains_both_and_only_the_references_differ(tmp_path, monkeypatch) -> None:
    source = tmp_path / "default"
    source.mkdir()
    shutil.copyfile(TRAINED_DIR / "phantom_world_vae.safetensors", source / recipe.VAE_STAGE_FILE)
    shutil.copyfile(TRAINED_DIR / "phantom_world_umt5.safetensors", source / recipe.TEXT_STAGE_FILE)
    monkeypatch.setattr(recipe, "DIT_TRAIN", {**recipe.DIT_TRAIN, "batch_size": 2, "checkpoint_every": 1})
    out = tmp_path / "pairs.md"
    code = pair_experiment.main(["--from", str(source), "--work", str(tmp_path / "work"), "--samples", "8",
                                 "--steps", "2", "--quick", "1", "--sampling-steps", "2", "--out", str(out)])
    assert code == 0
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [r["mode"] for r in rows] == ["in", "cross"]
    assert all(0.0 <= r["all"]["background_accuracy"] <= 100.0 for r in rows)
    assert "| in-pair |" in out.read_text() and "| cross-pair |" in out.read_text()
    inpair, cross = (recipe.cached_latents(tmp_path / "work" / m) for m in ("in", "cross"))
    assert len(inpair) == len(cross) == 8
    for mode in ("in", "cross"):  # each cache records its world and its pair mode
        index = json.loads((tmp_path / "work" / mode / recipe.LATENT_INDEX).read_text())
        assert index["world"] == {"travel": recipe.WORLD.travel, "pairs": mode}
    # the same seeds: the same videos and prompts; only the references are in-pair or cross-pair
    torch.testing.assert_close(inpair[0].latents, cross[0].latents, atol=1e-5, rtol=0)
    torch.testing.assert_close(inpair[0].context, cross[0].context, atol=0, rtol=0)
    assert (inpair[0].ref_latents - cross[0].ref_latents).abs().mean() > 0.1
