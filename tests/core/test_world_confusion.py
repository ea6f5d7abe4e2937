"""The motion confusion table counts what each prompted motion was measured as, and can show a model that fails."""

from __future__ import annotations

from phantom_core.world.baselines import paste_video, truth_video
from phantom_core.world.evaluate import evaluate, format_confusion, motion_confusion, report_dict
from tests.support.world import small_sample

CASES = [small_sample(i, count=1) for i in range(5)] + [small_sample(100 + i, count=2) for i in range(3)]


def _subjects(group: str) -> list[str]:
    return [s.motion for c in CASES if (len(c.subjects) > 1) == (group == "multi") for s in c.scene.subjects]


def test_ground_truth_fills_only_the_diagonal():
    result = evaluate(truth_video, CASES, name="truth", keep=0)
    confusion = motion_confusion(result.scores)
    for group in ("single", "multi"):
        prompted = _subjects(group)
        assert {p: {p: prompted.count(p)} for p in set(prompted)} == confusion[group]
    text = format_confusion(result)
    rows = [line for line in text.splitlines() if line.endswith("%")]
    assert len(rows) == len(set(_subjects("single"))) + len(set(_subjects("multi")))
    assert all(row.endswith(" 100%") for row in rows)


def test_a_static_paste_is_measured_still_for_every_prompt():
    result = evaluate(paste_video, CASES, name="paste", keep=0)
    confusion = motion_confusion(result.scores)
    single = confusion["single"]
    assert sum(sum(row.values()) for row in single.values()) == 5
    assert all(set(row) == {"still"} for row in single.values())  # the pasted reference never moves
    moving = [line for line in format_confusion(result).splitlines()
              if line.endswith("%") and line.split()[0] in ("left", "right", "up", "down")]
    assert moving and all(line.endswith(" 0%") for line in moving)
    assert report_dict(result, {})["motion_confusion"] == confusion  # the JSON report keeps it


def test_no_cases_no_table():
    result = evaluate(truth_video, [], name="none")
    assert motion_confusion(result.scores) == {"single": {}, "multi": {}} and format_confusion(result) == ""
