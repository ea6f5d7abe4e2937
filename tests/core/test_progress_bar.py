"""TextProgressBar: the rate is measured between callbacks, and a count that starts again (a training stage's next
phase) restarts it, so a phase is not charged for the one before."""

from __future__ import annotations

import io

import pytest

from phantom_core.inference import cli


def test_rate_per_phase_with_a_fake_clock(monkeypatch):
    clock = iter([0.0, 1.0, 2.0, 3.0,  # phase 1: 1 s a step
                  100.0, 100.5, 101.0])  # phase 2, after a pause: 0.5 s a step
    monkeypatch.setattr(cli.time, "perf_counter", lambda: next(clock))
    stream = io.StringIO()
    bar = cli.TextProgressBar(stream, width=4, label="dit", unit="step")
    for step in range(4):
        bar(step, 4, note="loss 1")
    lines = stream.getvalue().split("\r")
    assert lines[1] == "dit [#---] 1/4 loss 1"  # no rate before a second callback
    assert lines[4] == "dit [####] 4/4 1.00 s/step loss 1\n"
    for step in range(3):
        bar(step, 6)
    last = stream.getvalue().split("\r")[-1]
    assert last.startswith("dit [##--] 3/6 ") and float(last.split()[3]) == pytest.approx(0.5)


def test_the_same_total_counted_again_restarts_too(monkeypatch):
    clock = iter([0.0, 2.0, 50.0, 51.0])
    monkeypatch.setattr(cli.time, "perf_counter", lambda: next(clock))
    stream = io.StringIO()
    bar = cli.TextProgressBar(stream, width=2)
    bar(0, 2), bar(1, 2), bar(0, 2), bar(1, 2)
    assert stream.getvalue().split("\r")[-1] == "sampling [##] 2/2 1.00 s/step\n"
