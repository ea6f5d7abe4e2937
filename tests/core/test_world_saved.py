"""``evaluate --save-outputs`` and ``--rescore``: saved videos scored again, from the files, on the same cases."""

from __future__ import annotations

import json

import numpy as np
import pytest

from phantom_core.__main__ import main
from phantom_core.world.cases import CaseSet
from phantom_core.world.sample import WorldConfig
from phantom_core.world.saved import case_file, load_case, report_world, run_identity, save_case
from tests.support.world import SMALL

SMALL_CLI = ["--size", "64", "--frames", "9", "--no-progress"]


def _saved_paste_run(folder) -> dict:
    assert main(["evaluate", "--baseline", "paste", "--quick", "2", *SMALL_CLI, "--save-outputs",
                 "--out", str(folder)]) == 0
    return json.loads((folder / "metrics.json").read_text())


def _cases(report: dict) -> list:
    counts = report["case_set"]
    return list(CaseSet(single=counts["single"], multi=counts["multi"], seed=counts["seed"],
                        config=report_world(report)))


def test_rescore_reproduces_the_run_and_reads_the_saved_files(tmp_path):
    run = tmp_path / "paste"
    report = _saved_paste_run(run)
    cases = _cases(report)
    saved = sorted(p.name for p in (run / "outputs").glob("case_*"))
    assert saved == sorted(case_file(run, s.index).name for s in cases)
    assert main(["evaluate", "--rescore", str(run), "--out", str(tmp_path / "again"), "--no-progress"]) == 0
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())
    for key, value in report["summary"]["all"].items():  # same videos, same metrics: equal to float rounding
        assert again["summary"]["all"][key] == pytest.approx(value, abs=1e-9), key
    assert again["options"] == report["options"] and again["rescored"]["from"] == str(run)
    assert again["case_set"] == report["case_set"] and again["name"] == "paste"

    # the rescore scores what the files hold: put the ground truth in their place and it scores perfectly
    for sample in cases:
        save_case(run, sample, sample.video, None)
    assert main(["evaluate", "--rescore", str(run), "--no-progress"]) == 0  # default --out: the run's folder
    in_place = json.loads((run / "metrics.json").read_text())
    assert main(["evaluate", "--rescore", str(run), "--no-progress"]) == 0  # a rescore of a rescore
    twice = json.loads((run / "metrics.json").read_text())
    assert twice["rescored"]["sampling_seconds"] == in_place["rescored"]["sampling_seconds"] == report["seconds"]
    truth = twice["summary"]["all"]
    assert report["summary"]["all"]["motion_accuracy"] < 100.0
    assert truth["motion_accuracy"] == 100.0 and truth["psnr"] == pytest.approx(100.0)


def test_rescore_scores_a_saved_ceiling_and_quick_takes_a_subset(tmp_path):
    run = tmp_path / "paste"
    report = _saved_paste_run(run)
    cases = _cases(report)
    for sample in cases:  # a "ceiling" that is the truth itself, saved beside each output
        save_case(run, sample, load_case(run, sample), sample.video)
    report["ceiling"] = report["summary"]  # the run had a ceiling
    (run / "metrics.json").write_text(json.dumps(report))
    assert main(["evaluate", "--rescore", str(run), "--quick", "1", "--out", str(tmp_path / "q"),
                 "--no-progress"]) == 0
    quick = json.loads((tmp_path / "q" / "metrics.json").read_text())
    assert quick["case_set"] == {"single": 1, "multi": 1, "seed": report["case_set"]["seed"]}
    assert quick["summary"]["all"]["cases"] == 2 and quick["ceiling"]["all"]["motion_accuracy"] == 100.0


def test_rescore_refuses_what_it_cannot_score(tmp_path, capsys):
    plain = tmp_path / "plain"
    assert main(["evaluate", "--baseline", "paste", "--quick", "1", *SMALL_CLI, "--out", str(plain)]) == 0
    assert main(["evaluate", "--rescore", str(plain), "--no-progress"]) == 2
    assert "did not use --save-outputs" in capsys.readouterr().err
    assert main(["evaluate", "--rescore", str(tmp_path / "nothing"), "--no-progress"]) == 2
    assert "no " in capsys.readouterr().err
    run = tmp_path / "paste"
    report = _saved_paste_run(run)
    assert main(["evaluate", "--rescore", str(run), "--baseline", "truth", "--no-progress"]) == 2
    assert "takes no --baseline" in capsys.readouterr().err
    case_file(run, _cases(report)[-1].index).unlink()
    assert main(["evaluate", "--rescore", str(run), "--no-progress"]) == 2
    assert "case_1000000.npz is missing" in capsys.readouterr().err
    report["pool"]["signature"] = "0" * 16
    (run / "metrics.json").write_text(json.dumps(report))
    assert main(["evaluate", "--rescore", str(run), "--no-progress"]) == 2
    assert "another held-out subject pool" in capsys.readouterr().err


def test_save_case_takes_uint8_videos_only(tmp_path):
    sample = next(iter(CaseSet(single=1, multi=0, config=WorldConfig(video=SMALL.video))))
    with pytest.raises(ValueError, match="uint8"):
        save_case(tmp_path, sample, sample.video.astype(np.float32), None)
    with pytest.raises(ValueError, match="no 'ceiling'"):
        save_case(tmp_path, sample, sample.video, None)
        load_case(tmp_path, sample, "ceiling")
    assert not list((tmp_path / "outputs").glob(".*"))  # no temporary file left behind


def test_resume_reuses_saved_cases_of_the_same_run_only(tmp_path, capsys):
    run = tmp_path / "paste"
    report = _saved_paste_run(run)  # --quick 2: 2 single-subject cases and 1 two-subject case
    first = _cases(report)[0]
    save_case(run, first, first.video, None)  # a saved case that a resumed run must reuse, not make again
    again = ["evaluate", "--baseline", "paste", "--quick", "4", *SMALL_CLI, "--save-outputs", "--out", str(run)]
    assert main(again) == 2
    assert "add --resume to continue it" in capsys.readouterr().err
    assert main([*again, "--travel", "0.5", "--resume"]) == 2
    assert "was made with other travel" in capsys.readouterr().err
    assert main([*again, "--resume"]) == 0  # extended from 3 cases to 6
    resumed = json.loads((run / "metrics.json").read_text())
    assert resumed["summary"]["all"]["cases"] == 6 and len(list((run / "outputs").glob("case_*.npz"))) == 6
    assert resumed["cases"][0]["subjects"][0]["psnr"] == pytest.approx(100.0)  # the reused truth
    assert resumed["cases"][1]["subjects"][0]["psnr"] == pytest.approx(report["cases"][1]["subjects"][0]["psnr"])
    assert main(["evaluate", "--baseline", "paste", "--quick", "1", *SMALL_CLI, "--resume"]) == 2
    assert "add --save-outputs" in capsys.readouterr().err


def test_run_identity_names_model_files_by_content_and_ignores_counts(tmp_path):
    dit = tmp_path / "dit.safetensors"
    dit.write_bytes(b"first")
    options = {"dit": str(dit), "steps": 50, "cases_single": 48, "quick": None, "out": "x"}
    before = run_identity(options, "cpu")
    assert "cases_single" not in before and "out" not in before and before["steps"] == 50
    assert run_identity({**options, "cases_single": 200, "out": "y"}, "cpu") == before
    dit.write_bytes(b"retrained")  # same path, another file: not the same run
    assert run_identity(options, "cpu")["files"]["dit"] != before["files"]["dit"]


def test_saved_cases_of_an_unknown_run_are_never_reused(tmp_path, capsys):
    run = tmp_path / "paste"
    _saved_paste_run(run)
    (run / "outputs" / "run.json").unlink()
    assert main(["evaluate", "--baseline", "paste", "--quick", "2", *SMALL_CLI, "--save-outputs", "--resume",
                 "--out", str(run)]) == 2
    assert "no run.json" in capsys.readouterr().err
