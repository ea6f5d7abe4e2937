"""The subject pool: three sources, names the grammar can carry, a held-out split fixed by rule."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from phantom_core.world.emoji import EMOJI_FONT_ENV, emoji_font_path, read_cmap
from phantom_core.world.grammar import subject_words_problem
from phantom_core.world.photos import PHOTO_CROPS
from phantom_core.world.shapes import SHAPE_COLOURS, render_shape
from phantom_core.world.subjects import Subject, is_held_out, pool_signature, split_subjects, subject_pool
from tests.support.world import SMALL, small_sample

NO_FONT = ("photo", "shape")


def test_split_is_disjoint_and_covers_the_pool():
    pool = subject_pool(NO_FONT)
    train, test = split_subjects("train", NO_FONT), split_subjects("test", NO_FONT)
    assert {s.name for s in train}.isdisjoint({s.name for s in test})
    assert len(train) + len(test) == len(pool) == len({s.name for s in pool})
    assert all(s.source == "photo" for s in test[:len(PHOTO_CROPS)])  # every photo is held out
    assert 0.08 < sum(s.source == "shape" for s in test) / sum(s.source == "shape" for s in pool) < 0.18


def test_held_out_rule_depends_only_on_the_name():
    for subject in subject_pool(NO_FONT):
        first_byte = hashlib.sha256(subject.name.encode()).digest()[0]
        assert is_held_out(subject) == (subject.source == "photo" or first_byte < 32)
    # the same shape is held out or not whatever else the pool holds, and whatever the source is called
    shape = Subject("red checked diamond", "shape", "red checked diamond")
    assert is_held_out(shape) and is_held_out(Subject(shape.name, "emoji", 0))
    assert not is_held_out(Subject("red star", "shape", "red star"))


def test_held_out_split_is_stable():
    """Pinned: changing the rule or the names would silently mix test subjects into training."""
    test = [s.name for s in split_subjects("test", NO_FONT) if s.source == "shape"]
    assert len(test) == 50
    assert test[:4] == ["red checked diamond", "red checked heart", "red checked crescent", "orange triangle"]


@pytest.mark.parametrize("index", range(6))
def test_training_samples_never_show_a_held_out_subject(index):
    assert all(s.split == "train" for s in small_sample(index, split="train").subjects)
    assert all(s.split == "test" for s in small_sample(index, split="test").subjects)


def test_every_subject_renders_a_cutout_with_alpha():
    for subject in [s for s in subject_pool(NO_FONT) if s.source == "photo"] + subject_pool(NO_FONT)[13:400:37]:
        image = subject.image()
        alpha = np.asarray(image.getchannel("A"))
        assert image.mode == "RGBA" and min(image.size) >= 16, subject.name
        assert alpha.max() == 255 and (alpha > 127).mean() > 0.2, subject.name
        assert subject_words_problem(subject.name) is None


def test_pool_signature_tells_pools_apart():
    assert pool_signature(subject_pool(NO_FONT)) == pool_signature(subject_pool(NO_FONT))
    assert pool_signature(subject_pool(("shape",))) != pool_signature(subject_pool(NO_FONT))


def test_unknown_source_and_split_are_refused():
    with pytest.raises(ValueError, match="source"):
        subject_pool(("clipart",))
    with pytest.raises(ValueError, match="split"):
        split_subjects("validation", NO_FONT)


def test_font_override_must_exist(monkeypatch, tmp_path):
    monkeypatch.setenv(EMOJI_FONT_ENV, str(tmp_path / "missing.ttf"))
    with pytest.raises(ValueError, match=EMOJI_FONT_ENV):
        emoji_font_path()
    not_a_font = tmp_path / "x.ttf"
    not_a_font.write_bytes(b"\0\1\0\0" + bytes(64))
    with pytest.raises(ValueError, match="cmap"):
        read_cmap(not_a_font)


@pytest.mark.skipif(emoji_font_path() is None, reason="fonts-noto-color-emoji is not installed (make train-default)")
def test_emoji_subjects_when_the_font_is_installed():
    pool = subject_pool(("photo", "shape", "emoji"))
    emoji = {s.name: s for s in pool if s.source == "emoji"}
    assert len(emoji) > 1000
    cat = emoji["cat face"]
    assert cat.key == 0x1F431
    image = cat.image()
    assert image.mode == "RGBA" and 100 <= max(image.size) <= 136
    assert np.asarray(image)[..., :3][np.asarray(image)[..., 3] > 200].std() > 20  # colour, not a flat mask
    held_out = [s for s in emoji.values() if s.split == "test"]
    assert 0.09 < len(held_out) / len(emoji) < 0.16
    assert SMALL.sources == ("photo", "shape")  # the other tests do not depend on the font


@pytest.mark.parametrize("colour", sorted(SHAPE_COLOURS))
def test_every_shape_colour_stands_out_on_white(colour):
    """References are letterboxed on white: a shape must differ visibly from white there (a white one by its
    border). Over white, at least 15% of the cut-out's opaque pixels differ from white by more than 40 (0..255)."""
    cut = np.asarray(render_shape(f"{colour} circle"), dtype=np.float64)  # (96, 96, 4)
    opaque = cut[..., 3] > 250
    distinct = (255.0 - cut[..., :3]).max(axis=-1) > 40
    assert (distinct & opaque).sum() >= 0.15 * opaque.sum()
