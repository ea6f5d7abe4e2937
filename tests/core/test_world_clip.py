"""The world's tiny CLIP (phantom_core.world.clip_model): its contrastive loss falls, a run resumes exactly, and its
image tower round-trips through the MMDiT's CLIP loader (mmdit.clip.load_clip_vision)."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from phantom_core.mmdit.clip import load_clip_vision
from phantom_core.mmdit.clip_keys import CLIP_VISION_PRESETS
from phantom_core.world.clip_model import (
    ClipTrainConfig,
    build_clip,
    normalise,
    reference_pixels,
    retrieval_accuracy,
    save_vision_tower,
    tokenize,
    train_clip,
)
from phantom_core.world.subjects import split_subjects

pytestmark = pytest.mark.usefixtures("single_thread")
TINY = ClipTrainConfig(vision="tiny", steps=30, batch_size=16, learning_rate=1e-3, warmup_steps=10, variants=2,
                       checkpoint_every=5)


@pytest.fixture(scope="module")
def shapes():
    """16 training shape subjects (no font needed), 2 cross-pair references each at 32 px, and their captions."""
    subjects = split_subjects("train", ("shape",))[:16]
    return reference_pixels(subjects, 2, 0, 32), tokenize([s.name for s in subjects], TINY)


def test_the_references_are_white_letterboxed_uint8_images(shapes):
    pixels, tokens = shapes
    assert pixels.shape == (16, 2, 3, 32, 32) and pixels.dtype == torch.uint8
    assert tokens.shape == (16, TINY.context_length) and tokens.dtype == torch.int64
    assert (pixels[:, :, :, 0, 0] == 255).all()  # the corners are the white background


def test_the_contrastive_loss_falls_in_a_few_steps(shapes):
    pixels, tokens = shapes
    _, losses = train_clip(TINY, pixels, tokens)
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert len(losses) == 30 and last < first - 0.3, losses  # from ~ln 16 (chance); measured ~0.5 lower at 20 steps


def test_a_resumed_run_equals_an_uninterrupted_one(shapes, tmp_path):
    pixels, tokens = shapes
    config = ClipTrainConfig(**{**TINY.__dict__, "steps": 8, "checkpoint_every": 4})
    _, whole = train_clip(config, pixels, tokens, tmp_path / "a")
    train_clip(ClipTrainConfig(**{**config.__dict__, "steps": 4}), pixels, tokens, tmp_path / "b")
    _, resumed = train_clip(config, pixels, tokens, tmp_path / "b")
    assert resumed == pytest.approx(whole, rel=1e-6)  # same code path on one CPU; tolerance for float reordering


def test_the_world_tower_round_trips_through_the_mmdit_loader(shapes, tmp_path):
    config = ClipTrainConfig(vision="world")
    model = build_clip(config, seed=3).eval()
    path = save_vision_tower(model, tmp_path / "clip_vision.safetensors", {"note": "test"})
    with safe_open(str(path), framework="pt") as st:
        assert all(k.startswith("visual.") for k in st.keys()) and st.metadata()["note"] == "test"
    tower = load_clip_vision(path)
    assert tower.config == CLIP_VISION_PRESETS["world"] and tower.config.tokens == 17
    pixels = torch.nn.functional.interpolate(shapes[0][:4, 0].float(), size=64).round().to(torch.uint8)
    x = normalise(pixels)
    with torch.no_grad():
        want = model.encode_image(x)  # (4, 128)
        torch.testing.assert_close(tower.encode_images(x, "pooled")[:, 0], want, rtol=1e-5, atol=1e-5)
        assert tower.encode_images(x, "tokens").shape == (4, 17, 128)


def test_retrieval_accuracy_is_a_fraction_and_perfect_for_a_matching_model(shapes):
    pixels, tokens = shapes
    model = build_clip(TINY, seed=0)
    result = retrieval_accuracy(model, pixels[:, 0], tokens)
    assert result["n"] == 16 and 0 <= result["top1"] <= result["top5"] <= 1
