"""The world's generator: deterministic from (seed, index), and its ground truth is right (render, track, recover)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from phantom_core.world.grammar import BACKGROUND_COLOURS
from phantom_core.world.metrics import classify_motion, prepared_references, subject_templates
from phantom_core.world.render import MAX_TRAVEL, SIZE_FRACTIONS, TRAVEL_FRACTION, VideoFormat, travel_px
from phantom_core.world.sample import WorldConfig, make_sample
from phantom_core.world.tracking import FrameSpectrum, track, tracking_pad
from tests.support.world import SMALL, small_sample


def test_same_seed_and_index_give_the_same_sample_in_any_order():
    later = small_sample(5)
    for i in range(5):
        small_sample(i)
    again = small_sample(5)
    assert later.prompt == again.prompt
    np.testing.assert_array_equal(later.video, again.video)
    np.testing.assert_array_equal(later.truth.masks, again.truth.masks)
    for a, b in zip(later.references, again.references):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert small_sample(6).prompt != later.prompt or not np.array_equal(small_sample(6).video, later.video)
    assert small_sample(5, seed=4).prompt != later.prompt or not np.array_equal(small_sample(5, seed=4).video,
                                                                                later.video)


@pytest.mark.parametrize("index", range(8))
def test_ground_truth_masks_boxes_and_background_match_the_pixels(index):
    sample = small_sample(index)
    truth, video = sample.truth, sample.video.astype(int)
    background = np.array(BACKGROUND_COLOURS[truth.background])
    outside = ~truth.masks.any(axis=0)  # (T, H, W)
    boxes_cover = np.zeros_like(outside)
    for k in range(len(truth.names)):
        for t in range(len(video)):
            x0, y0, x1, y1 = truth.boxes[k, t]
            assert 0 <= x0 < x1 <= video.shape[2] and 0 <= y0 < y1 <= video.shape[1]
            boxes_cover[t, y0:y1, x0:x1] = True
            assert not truth.masks[k, t][~_box_mask(truth.boxes[k, t], video.shape[1:3])].any()
    assert (video[~boxes_cover] == background).all()  # outside every box: exactly the background colour
    assert (np.abs(video[outside] - background).sum(axis=1) <= 3 * 255).all()
    assert truth.masks.sum(axis=(2, 3)).min() > 0  # every subject is visible in every frame
    for i in range(len(truth.names)):
        for j in range(i + 1, len(truth.names)):
            assert not (truth.masks[i] & truth.masks[j]).any()


def _box_mask(box, shape):
    mask = np.zeros(shape, dtype=bool)
    mask[box[1]:box[3], box[0]:box[2]] = True
    return mask


@pytest.mark.parametrize("index, travel", [(i, TRAVEL_FRACTION) for i in range(8)] + [(i, MAX_TRAVEL) for i in range(3)])
def test_render_track_and_recover_the_prompted_motion(index, travel):
    sample = make_sample("test", 3, index, replace(SMALL, travel=travel))
    fmt, truth = sample.config.video, sample.truth
    pairs = [(cut.over(truth.background_rgb), ref_t) for cut, ref_t in subject_templates(sample)]
    spectrum = FrameSpectrum(sample.video, tracking_pad([t for p in pairs for t in p]), truth.background_rgb)
    for k, (truth_t, ref_t) in enumerate(pairs):
        tracked = track(spectrum, truth_t, ref_t)
        np.testing.assert_allclose(tracked.centres, truth.centres[k], atol=1e-9)
        np.testing.assert_allclose(tracked.truth_peak, 1.0, atol=1e-6)
        assert classify_motion(truth.centres[k], fmt.width, fmt.height) == truth.motions[k]
        shift = truth.centres[k, -1] - truth.centres[k, 0]
        expected = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "still": (0, 0)}[truth.motions[k]]
        box = truth.boxes[k, 0, 2:] - truth.boxes[k, 0, :2]  # (w, h) px
        room = np.array([fmt.width, fmt.height]) - box  # a path longer than this would leave the frame
        path = np.minimum(travel * np.array([fmt.width, fmt.height]), room)
        np.testing.assert_allclose(shift, np.array(expected) * path, atol=1.0)
        assert (truth.boxes[k, :, :2] >= 0).all() and (truth.boxes[k, :, 2] <= fmt.width).all()
        assert (truth.boxes[k, :, 3] <= fmt.height).all()
        side = max(box)
        assert abs(side - SIZE_FRACTIONS[truth.sizes[k]] * min(fmt.width, fmt.height)) <= 1.0


def test_a_path_longer_than_fits_goes_as_far_as_the_subject_fits():
    fmt = VideoFormat()
    assert travel_px("left", fmt, 0.5, (54, 40)) == (-64.0, 0.0)  # up to 0.5 every subject's path fits
    assert travel_px("left", fmt, 0.75, (54, 40)) == (-74.0, 0.0)  # 0.75 x 128 = 96 px, the room is 128 - 54
    assert travel_px("down", fmt, 0.75, (20, 38)) == (0.0, 90.0)
    assert travel_px("up", fmt, 0.75) == (0.0, -96.0)  # no box: the fraction alone


@pytest.mark.parametrize("travel", [0, -0.1, MAX_TRAVEL + 0.01, True, "0.3"])
def test_a_travel_outside_its_range_is_refused_with_the_range(travel):
    with pytest.raises(ValueError, match=rf"travel: got .*\(0, {MAX_TRAVEL}\]"):
        replace(SMALL, travel=travel)


def test_scenes_of_several_subjects_have_distinct_motions():
    for i in range(6):
        sample = small_sample(i, count=3)
        assert len(set(sample.truth.motions)) == 3


@pytest.mark.parametrize("index", range(4))
def test_cross_pair_reference_shows_another_context(index):
    sample = small_sample(index)
    fmt = sample.config.video
    for k, (image, prepared) in enumerate(zip(sample.references, prepared_references(sample))):
        assert image.mode == "RGBA" and image.size == (fmt.width, fmt.height)
        x0, y0, x1, y1 = sample.ref_boxes[k]
        video_side = max(sample.truth.boxes[k, 0, 2:] - sample.truth.boxes[k, 0, :2])
        assert max(x1 - x0, y1 - y0) >= 1.3 * video_side  # another scale
        outside = ~_box_mask(sample.ref_boxes[k], prepared.shape[:2])
        assert (prepared[outside] == 255).all()  # letterboxed on white


def test_in_pair_reference_is_a_crop_of_a_frame():
    config = WorldConfig(video=SMALL.video, sources=SMALL.sources, pair_mode="in")
    sample = make_sample("train", 1, 2, config)
    assert sample.ref_variants == ("in-pair",) * len(sample.subjects)
    frames = sample.video
    for image in sample.references:
        crop = np.asarray(image)
        h, w = crop.shape[:2]
        found = any((frames[t, y:y + h, x:x + w] == crop).all() for t in range(len(frames))
                    for y in range(frames.shape[1] - h + 1) for x in range(frames.shape[2] - w + 1))
        assert found and isinstance(image, Image.Image)


def test_bad_formats_and_modes_are_refused():
    with pytest.raises(ValueError, match="frames"):
        VideoFormat(frames=16)
    with pytest.raises(ValueError, match="width"):
        VideoFormat(width=48)
    with pytest.raises(ValueError, match="pair_mode"):
        WorldConfig(pair_mode="mixed")
    with pytest.raises(ValueError, match="count"):
        make_sample("test", 0, 0, SMALL, count=4)


def test_anchored_layout_centres_each_path_on_its_anchor_and_free_does_not():
    """The default layout puts the middle of each subject's path within ANCHOR_JITTER of its anchor (one subject:
    the frame's centre; two: a diagonal, the first subject named in the upper half); ``"free"`` spreads them."""
    from phantom_core.world.render import ANCHOR_JITTER, ANCHORS

    size = np.array([SMALL.video.width, SMALL.video.height])
    mids = []
    for i in range(12):
        truth = small_sample(i, count=1).truth
        mid = truth.centres[0].mean(axis=0) / size  # (2,) the path's middle, fraction of the frame
        boxes = truth.boxes[0]  # (T, 4) px
        at_edge = (boxes[:, :2] == 0).any() or (boxes[:, 2:] == size).any()  # shifted back inside the frame
        assert at_edge or np.all(np.abs(mid - 0.5) <= ANCHOR_JITTER + 1.0 / size), (i, mid)
        mids.append(mid)
    assert np.abs(np.array(mids) - 0.5).max() <= 0.3
    for i in range(8):
        truth = small_sample(i, count=2).truth
        first, second = truth.centres[0].mean(axis=0) / size, truth.centres[1].mean(axis=0) / size
        sets = np.array(ANCHORS[2])  # (sets, 2 subjects, 2)
        near = np.abs(np.stack([first, second])[None] - sets).max(axis=(1, 2)).min()
        if near <= ANCHOR_JITTER + 0.2:  # anchored (not the free fallback): the first subject is the higher one
            assert first[1] < second[1]
    free = WorldConfig(video=SMALL.video, sources=SMALL.sources, layout="free")
    spread = [make_sample("test", 3, i, free, count=1).truth.centres[0].mean(axis=0) / size for i in range(12)]
    assert np.abs(np.array(spread) - 0.5).max() > ANCHOR_JITTER + 0.05
    with pytest.raises(ValueError, match="layout"):
        WorldConfig(layout="grid")
