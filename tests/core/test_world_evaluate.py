"""`python -m phantom_core evaluate`: the command runs end to end on the baselines and writes its report."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from phantom_core.__main__ import main
from phantom_core.world.cases import CaseSet
from phantom_core.world.sample import WorldConfig
from tests.support.world import SMALL

SMALL_CLI = ["--size", "64", "--frames", "9", "--no-progress"]


@pytest.mark.slow  # ~40 s on two CPU cores: the tiny VAE decodes and reconstructs 6 clips
def test_untrained_baseline_runs_two_steps_on_four_cases(tmp_path, capsys):
    out = tmp_path / "untrained"
    assert main(["evaluate", "--baseline", "untrained", "--quick", "4", "--steps", "2", "--device", "cpu",
                 "--size", "64", "--frames", "5", "--no-progress", "--out", str(out)]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["case_set"] == {"single": 4, "multi": 2, "seed": 11079}
    assert report["summary"]["all"]["cases"] == 6 and len(report["cases"]) == 6
    assert report["ceiling"]["all"]["psnr"] is not None  # the untrained VAE's own reconstruction
    assert report["sampling"]["steps"] == 2
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.width > 5 * 64 and sheet.height > 2 * 64
    table = capsys.readouterr().out
    assert "motion direction accuracy (%)" in table and "VAE ceiling" in table


def test_truth_baseline_table_is_perfect(tmp_path, capsys):
    assert main(["evaluate", "--baseline", "truth", "--quick", "2", *SMALL_CLI, "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "metrics.json").read_text())
    summary = report["summary"]["all"]
    assert summary["motion_accuracy"] == 100.0 and summary["copy_paste_rate"] == 0.0 and summary["psnr"] == 100.0
    assert report["pool"]["held_out_subjects"] > 50 and len(report["pool"]["signature"]) == 16
    assert "100.00" in capsys.readouterr().out


def test_travel_option_makes_faster_cases_and_is_recorded(tmp_path, capsys):
    assert main(["evaluate", "--baseline", "truth", "--quick", "1", "--travel", "0.5", *SMALL_CLI,
                 "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert report["world"]["travel"] == 0.5 and report["summary"]["all"]["motion_accuracy"] == 100.0
    assert main(["evaluate", "--baseline", "truth", "--travel", "0.8", *SMALL_CLI]) == 2
    assert "travel: got 0.8; expected a fraction of the frame in (0, 0.75]" in capsys.readouterr().err


def test_empty_scene_baseline_gets_the_background_and_nothing_else(tmp_path):
    """The background alone: every background right, and nothing else: every subject absent (no motion right, a
    prompted 'stays still' included; no placement), and a subject PSNR that is the floor a model must clear."""
    assert main(["evaluate", "--baseline", "empty", "--quick", "4", *SMALL_CLI, "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "metrics.json").read_text())
    summary = report["summary"]["all"]
    assert summary["background_accuracy"] == 100.0 and summary["copy_paste_rate"] == 0.0
    assert summary["motion_accuracy"] == 0.0 and summary["placement_accuracy"] == 0.0
    assert summary["static_rate"] == 100.0 and summary["psnr"] < 30.0
    subjects = [s for case in report["cases"] for s in case["subjects"]]
    assert {s["measured"] for s in subjects} == {"absent"} and any(s["prompted"] == "still" for s in subjects)


def test_bad_options_fail_with_a_message(capsys):
    assert main(["evaluate", *SMALL_CLI]) == 2
    assert "exactly one of" in capsys.readouterr().err
    assert main(["evaluate", "--dit", "x.safetensors", *SMALL_CLI]) == 2
    assert "--dit needs --vae and --text-encoder" in capsys.readouterr().err
    assert main(["evaluate", "--baseline", "paste", "--size", "72", "--no-progress"]) == 2
    assert "width" in capsys.readouterr().err


def test_case_set_is_fixed_and_quick_is_its_start():
    full = CaseSet(single=6, multi=4, config=SMALL)
    quick = full.quick(3)
    assert (quick.single, quick.multi) == (3, 2) and len(quick) == 5
    a = [s.prompt for s in quick]
    b = [s.prompt for s in full]
    assert a == b[:3] + b[6:8]
    assert all(s.split == "test" for case in full for s in case.subjects)
    assert all(len(c.subjects) == 2 for c in list(full)[6:])
    np.testing.assert_array_equal(next(iter(quick)).video, next(iter(full)).video)
    try:
        CaseSet(config=WorldConfig(pair_mode="in"))
    except ValueError as err:
        assert "cross-pair" in str(err)
    else:
        raise AssertionError("an in-pair case set was accepted")


def test_comparison_table_has_a_row_per_run_and_dashes_for_nothing_measured(tmp_path) -> None:
    from phantom_core.world.evaluate import COMPARISON_COLUMNS, comparison_markdown, write_comparison

    full = {key: 12.5 for key, _, _ in COMPARISON_COLUMNS}
    table = comparison_markdown(["w_img", "w_text"], [(["1", "3"], full), (["5", "7.5"], {**full, "swap_rate": None})],
                                "python -m tools.guidance_sweep")
    lines = table.splitlines()
    assert lines[0] == "`python -m tools.guidance_sweep`"
    assert lines[2].startswith("| w_img | w_text | subject PSNR (dB) |")
    assert lines[4].startswith("| 1 | 3 | 12.50 | 12.5 |") and lines[5].count(" - ") == 1
    out = write_comparison(tmp_path / "t.md", table, {"rows": 2})
    assert out.read_text() == table and (tmp_path / "t.json").read_text().startswith("{")


def test_model_producer_sends_the_prompt_in_the_chosen_form(monkeypatch):
    import phantom_core.inference.pipeline as pipeline
    from phantom_core.world.baselines import model_producer
    from tests.support.world import small_sample

    prompts = []

    def fake_generate(dit, vae, text_encoder, references, run, **kw):  # records what the pipeline would get
        prompts.append(run.prompt)
        return torch.zeros(1, 3, run.frames, run.height, run.width)

    monkeypatch.setattr(pipeline, "generate", fake_generate)
    monkeypatch.setattr(pipeline, "check_clip_vision", lambda *a: None)
    sample = small_sample(0, count=2)
    for form in ("named", "generic"):
        model_producer(None, None, None, prompt_form=form, steps=1)(sample)
    assert prompts[0] == sample.prompt
    assert prompts[1].count("thing") == 2 and prompts[1].split(" on ")[-1] == sample.prompt.split(" on ")[-1]
    with pytest.raises(ValueError, match="prompt form"):
        model_producer(None, None, None, prompt_form="described")
