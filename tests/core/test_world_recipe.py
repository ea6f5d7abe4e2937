"""The world recipe's latents record the world they were made in, and a folder of another world is refused."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from phantom_core.world import default_model as recipe
from phantom_core.world.render import TRAVEL_FRACTION


def _index(folder, world=None):
    path = folder / recipe.LATENT_INDEX
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"files": [], "dropped": "dropped-x.safetensors",
                                **({"world": world} if world is not None else {})}))
    return path


def test_latents_of_another_travel_are_refused_and_old_folders_are_the_default_world(tmp_path, monkeypatch):
    fast = _index(tmp_path / "fast", {"travel": 0.5})
    old = _index(tmp_path / "old")  # written before the index recorded its world: the default travel
    assert recipe.WORLD.travel == TRAVEL_FRACTION
    assert recipe.stage_latents(tmp_path / "old") == old
    with pytest.raises(ValueError, match=r"travel 0\.5 of the frame, but PHANTOM_WORLD_TRAVEL asks for 0\.3"):
        recipe.stage_latents(tmp_path / "fast")
    monkeypatch.setattr(recipe, "WORLD", replace(recipe.WORLD, travel=0.5))
    assert recipe.stage_latents(tmp_path / "fast") == fast
    with pytest.raises(ValueError, match="use another --work folder"):
        recipe.stage_latents(tmp_path / "old")


def test_latents_of_another_pair_mode_are_refused_and_unrecorded_ones_are_cross_pair(tmp_path, capsys, monkeypatch):
    from tools import train_default

    monkeypatch.setattr(train_default.torch, "set_num_threads", lambda n: None)  # the tool's; not this process's

    inpair = _index(tmp_path / "in", {"travel": TRAVEL_FRACTION, "pairs": "in"})
    old = _index(tmp_path / "old", {"travel": TRAVEL_FRACTION})  # before the index recorded its pair mode
    assert recipe.stage_latents(tmp_path / "in", pair_mode="in") == inpair
    assert recipe.stage_latents(tmp_path / "old") == old
    with pytest.raises(ValueError, match="cross-pair latents, but in-pair ones were asked for"):
        recipe.stage_latents(tmp_path / "old", pair_mode="in")
    with pytest.raises(ValueError, match="pair mode is 'both'; valid: cross, in"):
        recipe.stage_latents(tmp_path / "old", pair_mode="both")
    before = inpair.read_text()  # the tool says so by name, and the folder is left as it was
    assert train_default.main(["--work", str(tmp_path / "in"), "--stages", "latents"]) == 2
    err = capsys.readouterr().err
    assert "train_default: stage latents: " in err and "in-pair latents, but cross-pair ones were asked for" in err
    assert inpair.read_text() == before


def test_an_index_records_its_pair_mode(tmp_path):
    folder = tmp_path / "latents"
    folder.mkdir()
    (folder / "dropped-0.safetensors").write_bytes(b"")
    index = recipe.write_latent_index(folder, ["a.safetensors"], 0.3, pairs="in")
    assert json.loads(index.read_text())["world"] == {"travel": 0.3, "pairs": "in"}
    plain = recipe.write_latent_index(folder, ["a.safetensors"], 0.3, subjects=2)
    assert json.loads(plain.read_text())["world"] == {"travel": 0.3, "subjects": 2}
