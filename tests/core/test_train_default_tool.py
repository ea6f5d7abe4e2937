"""tools/train_default.py: several stages run one fresh process each, in the recipe's order, stopping at a failure."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tools import train_default


class FakeRun:
    def __init__(self, fail_on: str | None = None) -> None:
        self.commands: list[list[str]] = []
        self.fail_on = fail_on

    def __call__(self, command: list[str], check: bool = False) -> subprocess.CompletedProcess:
        self.commands.append(command)
        stage = command[command.index("--stages") + 1]
        return subprocess.CompletedProcess(command, 3 if stage == self.fail_on else 0)


def stages_of(commands: list[list[str]]) -> list[str]:
    return [c[c.index("--stages") + 1] for c in commands]


def test_stages_run_apart_in_recipe_order(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeRun()
    monkeypatch.setattr(train_default.subprocess, "run", fake)
    assert train_default.main(["--work", "w", "--stages", "dit,latents", "--threads", "1"]) == 0
    assert stages_of(fake.commands) == ["latents", "dit"]
    assert all(c[:3] == [sys.executable, "-m", "tools.train_default"] for c in fake.commands)
    assert all(c[c.index("--threads") + 1] == "1" and c[c.index("--work") + 1] == "w" for c in fake.commands)


def test_a_failed_stage_stops_the_run_with_its_status(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeRun(fail_on="clip_features")
    monkeypatch.setattr(train_default.subprocess, "run", fake)
    assert train_default.main(["--work", "w", "--model", "mmdit"]) == 3
    assert stages_of(fake.commands) == ["clip", "clip_features"]


def test_unknown_stage_is_refused_before_anything_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeRun()
    monkeypatch.setattr(train_default.subprocess, "run", fake)
    with pytest.raises(SystemExit):
        train_default.main(["--stages", "latents,nope"])
    assert fake.commands == []
