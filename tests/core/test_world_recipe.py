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
