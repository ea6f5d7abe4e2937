"""tools.compare_evals: real `evaluate` reports of two baselines side by side; reports of other cases refused."""

from __future__ import annotations

import json

import pytest

from phantom_core.__main__ import main as phantom_main
from tools import compare_evals

SMALL_CLI = ["--size", "64", "--frames", "9", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    root = tmp_path_factory.mktemp("evals")
    for baseline, quick in (("truth", "2"), ("paste", "2"), ("noise", "1")):
        assert phantom_main(["evaluate", "--baseline", baseline, "--quick", quick, *SMALL_CLI,
                             "--out", str(root / baseline)]) == 0
    return root


def test_two_baselines_in_one_table_with_their_own_figures(reports, tmp_path):
    out = tmp_path / "t.md"
    assert compare_evals.main([f"truth={reports / 'truth'}", f"paste={reports / 'paste' / 'metrics.json'}",
                               "--title", "baselines", "--out", str(out)]) == 0
    table = out.read_text()
    truth = json.loads((reports / "truth" / "metrics.json").read_text())["summary"]["all"]
    paste = json.loads((reports / "paste" / "metrics.json").read_text())["summary"]["all"]
    assert truth["motion_accuracy"] == 100.0 and paste["static_rate"] == 100.0
    motion = next(line for line in table.splitlines() if line.startswith("| motion direction accuracy"))
    assert motion.split("|")[2].strip() == "100.0"  # truth's column
    assert motion.split("|")[3].strip() == f"{paste['motion_accuracy']:.1f}"
    assert "## baselines" in table and "2 one-subject and 1 two-subject" in table
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [r["label"] for r in rows] == ["truth", "paste"]
    assert rows[1]["all"]["psnr"] == pytest.approx(paste["psnr"], rel=1e-9)


def test_reports_of_other_cases_are_refused_by_field(reports, capsys):
    assert compare_evals.main([f"truth={reports / 'truth'}", f"noise={reports / 'noise'}"]) == 2
    assert "case_set" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["nolabel"], "LABEL=PATH"),
    (["a=x", "a=y"], "labels must differ"),
])
def test_bad_arguments_are_named(argv, message, capsys):
    with pytest.raises(SystemExit):
        compare_evals.main(argv)
    assert message in capsys.readouterr().err


def test_a_missing_report_is_named(tmp_path, capsys):
    assert compare_evals.main([f"x={tmp_path / 'none'}"]) == 2
    assert "no evaluate report" in capsys.readouterr().err


def _report(psnrs: list[list[float | None]]) -> dict:
    cases = [{"index": i, "subjects": [{"psnr": p, "ssim": None if p is None else p / 100} for p in case]}
             for i, case in enumerate(psnrs)]
    return {"summary": {"all": {}}, "cases": cases}


def test_paired_differences_are_case_by_case_with_a_95_interval():
    import statistics

    base = _report([[10.0], [12.0], [8.0, 9.0], [7.0]])
    other = _report([[11.0], [12.5], [9.0, None], [None]])  # case 3 has no value: left out of the pairs
    _, rows = compare_evals.paired_differences({"base": base, "other": other})
    diffs = [1.0, 0.5, 9.0 - 8.5]
    psnr = rows[0]["psnr"]
    assert psnr["cases"] == 3 and psnr["mean"] == pytest.approx(statistics.mean(diffs), abs=1e-12)
    assert psnr["half_width_95"] == pytest.approx(1.96 * statistics.stdev(diffs) / 3 ** 0.5, abs=1e-12)
    _, single = compare_evals.paired_differences({"base": base, "other": other}, "single")
    assert single[0]["psnr"]["cases"] == 2  # the two-subject case is not in the single group


def test_paired_table_marks_a_real_gap(reports, tmp_path):
    out = tmp_path / "p.md"
    assert compare_evals.main([f"paste={reports / 'paste'}", f"truth={reports / 'truth'}", "--out", str(out)]) == 0
    line = next(row for row in out.read_text().splitlines() if row.startswith("| truth |"))
    assert line.split("|")[2].strip().endswith("*")  # the truth is far above the pasted reference in PSNR
    paired = json.loads(out.with_suffix(".json").read_text())["paired"]
    assert paired[0]["psnr"]["mean"] > 10.0 and paired[0]["psnr"]["cases"] == 3


def test_paired_rows_of_one_case_have_no_interval_and_stay_json():
    base, other = _report([[10.0], [8.0]]), _report([[11.0], [None]])  # one case in common
    table, rows = compare_evals.paired_differences({"base": base, "other": other})
    psnr = rows[0]["psnr"]
    assert psnr["cases"] == 1 and psnr["mean"] == pytest.approx(1.0, abs=1e-12) and psnr["half_width_95"] is None
    assert json.loads(json.dumps(rows, allow_nan=False))[0]["psnr"]["half_width_95"] is None
    assert "nan" in table and "*" not in table.splitlines()[-1]  # no interval: no gap is claimed
