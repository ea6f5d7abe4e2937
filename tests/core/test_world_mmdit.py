"""The world MMDiT recipe (phantom_core.world.mmdit_default): its preset's size and windows, the variants' settings,
and the CLIP features of cached world triplets regenerated from their indices."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from phantom_core.mmdit.clip import encode_clip_references, load_clip_vision
from phantom_core.mmdit.config import MMDIT_PRESETS
from phantom_core.mmdit.windows import window_plan
from phantom_core.world import default_model
from phantom_core.world.clip_model import ClipTrainConfig, build_clip, save_vision_tower
from phantom_core.world.mmdit_default import (
    MMDIT_VARIANTS,
    check_variant,
    mmdit_dataset,
    mmdit_settings,
    parameter_counts,
    stage_clip_features,
)
from phantom_core.world.subjects import available_sources

pytestmark = pytest.mark.usefixtures("single_thread")


def test_the_world_preset_matches_the_phantom_wan_world_dit_in_size_and_windows_the_video():
    counts = parameter_counts()
    wan = counts["phantom-wan-world"]
    assert abs(counts["mmdit-world"] - wan) / wan < 0.01  # within 1% of the Phantom-Wan "world" DiT
    assert counts["mmdit-world-vae"] < counts["mmdit-world"] and MMDIT_PRESETS["world-vae"].clip_dim == 0
    plan = window_plan((5, 8, 8), MMDIT_PRESETS["world"].window, shifted=False)  # 17 x 128 x 128 px: 5 x 8 x 8 tokens
    assert plan.count == 4 and plan.n_video == 320
    assert window_plan((5, 8, 8), MMDIT_PRESETS["world"].window, shifted=True).count > 4


def test_the_variants_keep_the_phantom_wan_recipes_steps_batch_and_learning_rate():
    from phantom_core.world.mmdit_default import MMDIT_LONG_STEPS

    for variant in MMDIT_VARIANTS:
        for phase, base in ((1, default_model.DIT_TRAIN), (2, default_model.DIT_LONG_TRAIN)):
            s = mmdit_settings(variant, phase, "clip.safetensors")
            assert all(s[k] == base[k] for k in ("batch_size", "learning_rate", "shift", "reference_dropout"))
            assert s["steps"] == (base["steps"] if phase == 1 else MMDIT_LONG_STEPS)  # the shipped default's 2,000
    assert mmdit_settings("vae", 1, "c")["dit"] == "scratch:mmdit-world-vae" and not mmdit_settings("vae", 1, "c")[
        "clip_vision"]
    assert mmdit_settings("clip", 1, "c")["vae_references"] is False
    assert mmdit_settings("both", 1, "c", vae_dropout=0.7)["vae_reference_dropout"] == 0.7
    with pytest.raises(ValueError, match="both, vae, clip"):
        check_variant("clip-only")


@pytest.mark.skipif("emoji" not in available_sources(), reason="the recipe's subjects need the emoji font")
def test_clip_features_of_cached_triplets_are_those_of_their_regenerated_references(tmp_path):
    raws = list(default_model._raw_samples(range(2)))
    folder = tmp_path / default_model.LATENT_DIR
    folder.mkdir()
    names = []
    for raw in raws:
        n = len(raw.references)
        name = f"{raw.name}-0123456789abcdef.safetensors"
        save_file({"latents": torch.zeros(16, 5, 16, 16), "ref_latents": torch.zeros(16, n, 16, 16),
                   "context": torch.zeros(3, 64)}, str(folder / name), metadata={"name": raw.name})
        names.append(name)
    save_file({"context": torch.zeros(2, 64)}, str(folder / "dropped-x.safetensors"))
    (tmp_path / default_model.LATENT_INDEX).write_text(json.dumps({"files": names, "dropped": "dropped-x.safetensors"}))
    clip = save_vision_tower(build_clip(ClipTrainConfig(), seed=0), tmp_path / "clip_vision.safetensors")
    stage_clip_features(tmp_path)
    data = mmdit_dataset(tmp_path, "both")
    want = encode_clip_references(load_clip_vision(clip), list(raws[1].references))[0]
    assert data[1].ref_clip.shape == (len(raws[1].references), 17, 128)
    torch.testing.assert_close(data[1].ref_clip, want, rtol=0, atol=0)  # float32 stored exactly
    assert mmdit_dataset(tmp_path, "vae")[0].ref_clip is None


def test_pooled_vectors_start_as_the_model_and_then_train():
    from dataclasses import replace

    from phantom_core.world.mmdit_default import with_pooled_vectors
    from tests.support.weights import trained_like_mmdit

    model = trained_like_mmdit(replace(MMDIT_PRESETS["world"], num_layers=2))  # adaLN and final layer off zero
    g = torch.Generator().manual_seed(2)
    x, t, context = torch.randn(2, 16, 5, 16, 16, generator=g), torch.tensor([900.0, 300.0]), torch.randn(2, 7, 64)
    refs, clip = torch.randn(2, 16, 1, 16, 16, generator=g), torch.randn(2, 1, 17, 128, generator=g)
    pooled = with_pooled_vectors(model, seed=3)
    assert pooled.config.pooled_text and pooled.config.pooled_reference
    with torch.no_grad():
        want, got = model(x, t, context, refs, ref_clip=clip), pooled(x, t, context, refs, ref_clip=clip)
    assert float(want.abs().mean()) > 1e-2
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)  # zero last Linears: the same velocity
    loss = pooled(x, t, context, refs, ref_clip=clip).square().mean()
    loss.backward()
    assert float(pooled.y_embedder.mlp[2].weight.grad.abs().sum()) > 0  # the new vectors do learn
    assert float(pooled.r_embedder.mlp[2].weight.grad.abs().sum()) > 0
    with pytest.raises(ValueError, match="already has pooled vectors"):
        with_pooled_vectors(pooled)
    with pytest.raises(ValueError, match="pooled vectors are an MMDiT's"):
        with_pooled_vectors(torch.nn.Linear(2, 2))
