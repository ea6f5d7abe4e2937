"""The world's metrics can fail: ground truth scores perfectly, noise and wrong answers score badly."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from phantom_core.world.baselines import noise_video, paste_video, truth_video
from phantom_core.world.evaluate import evaluate, summarize
from phantom_core.world.metrics import (
    PSNR_CAP,
    classify_background,
    classify_motion,
    is_swapped,
    masked_psnr,
    placement_kept,
    score_video,
)
from phantom_core.world.tracking import FrameSpectrum
from tests.support.world import rerender, small_sample, swapped_motions

CASES = [small_sample(i, count=1) for i in range(4)] + [small_sample(100 + i, count=2) for i in range(4)]


def test_ground_truth_scores_perfectly():
    summary = summarize([score_video(truth_video(s), s) for s in CASES])["all"]
    assert summary["motion_accuracy"] == 100.0 and summary["background_accuracy"] == 100.0
    assert summary["swap_rate"] == 0.0 and summary["copy_paste_rate"] == 0.0 and summary["static_rate"] == 0.0
    assert summary["placement_accuracy"] == 100.0
    assert summary["psnr"] == PSNR_CAP
    assert summary["ssim"] == pytest.approx(1.0, abs=1e-9) and summary["stability"] == pytest.approx(1.0, abs=1e-9)
    assert summary["trajectory_error"] == pytest.approx(0.0, abs=1e-9)
    assert summary["presence_start"] == pytest.approx(100.0, abs=1e-9)
    assert summary["presence_end"] == pytest.approx(100.0, abs=1e-9)


def test_noise_scores_badly():
    summary = summarize([score_video(noise_video(s), s) for s in CASES])["all"]
    assert summary["background_accuracy"] == 0.0  # a noise border is no named colour
    assert summary["psnr"] < 12.0 and summary["ssim"] < 0.2 and summary["stability"] < 0.2
    assert summary["motion_accuracy"] < 70.0 and summary["trajectory_error"] > 10.0
    assert summary["presence_start"] > 200.0 and summary["presence_end"] > 200.0  # noise stands out everywhere


def test_a_subject_that_fades_into_the_background_loses_presence():
    """The failure the presence metric is for: the subject blends into the background colour over the clip."""
    scores = []
    for case in CASES:
        video = truth_video(case).astype(np.float64)
        background = np.array(case.truth.background_rgb, dtype=np.float64)
        fade = np.linspace(0.0, 1.0, len(video))[:, None, None, None]  # 0: the truth, 1: the background alone
        scores.append(score_video(((1 - fade) * video + fade * background).round().astype(np.uint8), case))
    summary = summarize(scores)["all"]
    assert summary["presence_start"] > 85.0 and summary["presence_end"] < 15.0
    assert summary["background_accuracy"] == 100.0  # the border colour alone does not see it


@pytest.mark.parametrize("case", [s for s in CASES if len(s.subjects) == 2], ids=lambda s: str(s.index))
def test_swapped_motions_show_as_a_swap(case):
    video = rerender(case, swapped_motions(case))
    score = score_video(video, case)
    assert score.swapped
    assert [s.measured for s in score.subjects] == [case.truth.motions[1], case.truth.motions[0]]
    assert score.background_correct and not score.copy_paste


@pytest.mark.parametrize("case", [s for s in CASES if len(s.subjects) == 2], ids=lambda s: str(s.index))
def test_looks_drawn_in_each_others_places_fail_placement_not_the_swap(case):
    """The other half of binding: each subject keeps its own motion, but the second one named is drawn where the
    anchored layout puts the first (on top), so the tracked looks are in each other's places."""
    reordered = replace(case.scene, subjects=case.scene.subjects[::-1])
    score = score_video(rerender(case, reordered, cutouts=[s.image() for s in case.subjects][::-1]), case)
    assert score.placed is False and not score.swapped
    assert [s.measured for s in score.subjects] == list(case.truth.motions)
    assert score_video(truth_video(case), case).placed is True


def test_placement_rule():
    truth = np.array([[[30.0, 30.0]] * 3, [[90.0, 90.0]] * 3])  # (S=2, T=3, 2) px in a 128 x 128 frame
    assert placement_kept([truth[0] + 5, truth[1] - 5], truth, 128, 128) is True
    assert placement_kept([truth[1], truth[0]], truth, 128, 128) is False
    assert placement_kept([truth[0]], truth[:1], 128, 128) is None  # one subject: nothing to place
    three = np.concatenate([truth, [[[30.0, 90.0]] * 3]])
    assert placement_kept([three[0], three[2], three[1]], three, 128, 128) is False


def test_wrong_background_is_measured_as_wrong():
    case = CASES[0]
    other = next(c for c in ("red", "blue", "black") if c != case.scene.background)
    score = score_video(rerender(case, replace(case.scene, background=other)), case)
    assert not score.background_correct and score.measured_background == other
    assert score.subjects[0].measured == case.truth.motions[0]


def test_pasted_static_reference_shows_as_copy_paste():
    scores = [score_video(paste_video(s), s) for s in CASES]
    assert all(c.subjects[0].copy_paste for c in scores if len(c.subjects) == 1)
    assert all(s.measured == "still" for c in scores for s in c.subjects)
    assert summarize(scores)["all"]["copy_paste_rate"] >= 75.0


def test_paste_baseline_is_measured_by_evaluate():
    result = evaluate(paste_video, CASES, name="paste", keep=2)
    summary = result.summary()
    assert summary["all"]["cases"] == len(CASES) and summary["multi"]["cases"] == 4
    assert summary["all"]["static_rate"] == 100.0 and summary["all"]["psnr"] < 30.0
    assert len(result.kept) == 2 and {len(s.subjects) for s, _, _ in result.kept} == {1, 2}
    assert len(result.records) == len(CASES) and result.records[0]["prompt"] == CASES[0].prompt


def test_motion_classification():
    t = np.linspace(0, 1, 9)[:, None]
    start = np.array([[32.0, 32.0]])
    assert classify_motion(start + t * [[-20, 0]], 64, 64) == "left"
    assert classify_motion(start + t * [[0, 20]], 64, 64) == "down"
    assert classify_motion(start + t * [[3, -2]], 64, 64) == "still"  # under 10% of the frame


def test_swap_rule():
    assert is_swapped(("left", "up"), ["up", "left"], 0)
    assert is_swapped(("left", "up"), ["up", "right"], 0)  # took the other's motion; the other lost it
    assert not is_swapped(("left", "still"), ["still", "still"], 0)  # static, not swapped
    assert not is_swapped(("left", "up"), ["left", "left"], 1)  # 1 copies 0's motion, but 0 keeps it
    assert not is_swapped(("left", "still"), ["still", "absent"], 0)  # static beside a subject drawn nowhere
    assert is_swapped(("left", "still"), ["still", "left"], 0)  # ... but a drawn one that took its motion: a swap


def test_masked_psnr_and_background_classes():
    a = np.zeros((8, 8, 3), dtype=np.uint8)
    mask = np.ones((8, 8), dtype=bool)
    assert masked_psnr(a, a, mask) == PSNR_CAP
    assert masked_psnr(a, a + 51, mask) == pytest.approx(20 * np.log10(255 / 51), abs=1e-9)
    video = np.zeros((3, 32, 32, 3), dtype=np.uint8) + np.array([40, 80, 200], dtype=np.uint8)
    assert classify_background(video) == "blue"
    assert classify_background(np.full((3, 32, 32, 3), 128, dtype=np.uint8)) == "other"


def test_ncc_agrees_with_skimage():
    from skimage.feature import match_template

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (1, 40, 36, 3)).astype(np.float64)
    template = image[0, 10:22, 5:19] + rng.normal(0, 20, (12, 14, 3))
    ours = FrameSpectrum(image, 0, (0, 0, 0)).ncc(template)[0]  # (29, 23)
    theirs = match_template(image[0], template)[..., 0]
    np.testing.assert_allclose(ours, theirs, atol=1e-6)
    assert np.unravel_index(ours.argmax(), ours.shape) == (10, 5)


def test_the_references_white_surround_as_background_is_copy_paste():
    case = next(c for c in CASES if c.scene.background != "white")
    painted = score_video(rerender(case, replace(case.scene, background="white")), case)
    assert painted.measured_background == "white" and painted.surround_copied and painted.copy_paste
    other = next(c for c in ("red", "blue", "black") if c != case.scene.background)
    wrong = score_video(rerender(case, replace(case.scene, background=other)), case)
    assert not wrong.background_correct and not wrong.surround_copied and not wrong.copy_paste  # wrong, not copied
    told = replace(painted, background="white")  # the same video, had the prompt asked for white
    assert told.background_correct and not told.surround_copied and not told.copy_paste
    assert summarize([painted, wrong])["all"]["surround_rate"] == 50.0
