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
