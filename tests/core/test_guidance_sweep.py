"""tools.guidance_sweep: its options are checked before any model loads, and it sweeps the shipped MMDiT default
(CLIP tower included) on the cases of a chosen world travel."""

from __future__ import annotations

import json

import pytest

from phantom_core.tiny.default import trained_mmdit_shipped
from tools import guidance_sweep

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("argv, message", [
    (["--model", "default", "--quick", "2", "--cases-single", "2"], "not both"),
    (["--model", "default-mmdit", "--clip-vision", "c.safetensors"], "--clip-vision goes with --dit"),
    (["--model", "default", "--travel", "0.9"], "travel"),
    (["--model", "default", "--w-text", "0,3"], "--w-text"),
    (["--model", "default", "--cases-single", "0", "--cases-multi", "0"], "need >= 1 case"),
    (["--dit", "d.safetensors"], "give --model"),
    (["--model", "default", "--quick", "0"], "quick: got 0"),
])
def test_bad_options_are_refused_by_name(argv, message, capsys):
    with pytest.raises(SystemExit):
        guidance_sweep.main(argv)
    assert message in capsys.readouterr().err


@pytest.mark.skipif(not trained_mmdit_shipped(), reason="the MMDiT default is not shipped in this checkout")
def test_a_sweep_of_the_mmdit_default_scores_each_pair_on_the_same_cases(tmp_path):
    out = tmp_path / "sweep.md"
    assert guidance_sweep.main(["--model", "default-mmdit", "--cases-single", "1", "--cases-multi", "0",
                                "--travel", "0.5", "--steps", "1", "--w-img", "3", "--w-text", "1,5",
                                "--out", str(out)]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["cases"] == 1 and report["travel"] == 0.5
    assert [(r["w_img"], r["w_text"]) for r in report["rows"]] == [(3.0, 1.0), (3.0, 5.0)]
    for row in report["rows"]:
        assert row["all"]["cases"] == 1 and 0.0 <= row["all"]["background_accuracy"] <= 100.0
    first, second = (r["all"] for r in report["rows"])
    assert abs(first["psnr"] - second["psnr"]) > 1e-3  # the text scale reached the sampler
    table = out.read_text()
    assert table.splitlines()[0].startswith("`python -m tools.guidance_sweep --model default-mmdit")
    assert "| 3 | 5 |" in table
