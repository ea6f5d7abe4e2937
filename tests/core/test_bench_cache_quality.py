"""The cache benchmark's comparison of motion tracks with the uncached videos (benchmarks/bench_cache_quality.py):
it counts every track whose measured motion changed, whichever way, where the accuracy only shows the net change."""

from __future__ import annotations

import pytest

from benchmarks.bench_cache_quality import changed_percent, markdown, measured_motions
from phantom_core.world.metrics import CaseScore, SubjectScore


def case(*measured: str, prompted: str = "left") -> CaseScore:
    subjects = tuple(SubjectScore(prompted, m, 10.0, 0.5, 1.0, 0.9, False) for m in measured)
    return CaseScore(subjects, "blue", "blue")


def test_changed_tracks_count_both_ways_where_the_accuracy_nets_them_out() -> None:
    uncached = measured_motions([case("left"), case("right", "up"), case("still")])
    assert uncached == ["left", "right", "up", "still"]  # every subject of every case, in order
    cached = measured_motions([case("right"), case("left", "up"), case("still")])
    # every track was told "left": one right track lost (left -> right), one gained (right -> left), so the accuracy
    # is 1 of 4 both times while 2 tracks changed
    accuracy = [sum(m == "left" for m in tracks) for tracks in (uncached, cached)]
    assert accuracy[0] == accuracy[1] == 1
    assert changed_percent(cached, uncached) == pytest.approx(50.0)
    assert changed_percent(uncached, uncached) == 0.0


def test_changed_tracks_refuse_other_cases() -> None:
    with pytest.raises(ValueError, match="tracks: 3 against 4"):
        changed_percent(["left"] * 3, ["left"] * 4)
    with pytest.raises(ValueError, match="at least one"):
        changed_percent([], [])


def test_the_table_shows_the_changed_tracks() -> None:
    row = {"evaluations_per_video": 100.0, "speedup": 1.0, "psnr_vs_uncached": 100.0, "motion_accuracy": 42.7,
           "motion_changed": 0.0, "background_accuracy": 93.1, "subject_psnr": 8.5, "seconds_per_video": 2.0}
    text = markdown({"uncached": row, "cache 0.2": {**row, "psnr_vs_uncached": 36.1, "motion_changed": 6.25}}, 2,
                    "cmd")
    assert "tracks changed %" in text and "| cache 0.2 | 100.0 | 1.00x | 36.1 | 42.7 | 6.2 |" in text
