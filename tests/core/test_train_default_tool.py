"""tools/train_default.py: several stages run one fresh process each, in the recipe's order, stopping at a failure."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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


# ---------------------------------------------------------------------------------------------- motion stages


def motion_folder(tmp_path):
    """A work folder with what the MMDiT default's motion stages start from (stand-in bytes: motion_run is faked)."""
    from phantom_core.world.clip_model import CLIP_STAGE_FILE
    from phantom_core.world.default_model import TEXT_STAGE_FILE, VAE_STAGE_FILE

    for name in (VAE_STAGE_FILE, TEXT_STAGE_FILE, CLIP_STAGE_FILE, "mmdit_both.safetensors",
                 f"{train_default.NEXT_DIR}/{VAE_STAGE_FILE}"):  # the next_vae stage's file
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(name.encode())
    return tmp_path


CACHE_AND_RUN_STAGES = [s for s in train_default.MOTION_STAGES if s != "next_vae"]  # those run_motion runs


def fake_motion_run(monkeypatch: pytest.MonkeyPatch, status: int = 0) -> list[list[str]]:
    from tools import motion_run

    calls: list[list[str]] = []

    def main(argv: list[str]) -> int:
        calls.append(argv)
        if argv[0] == "train" and status == 0:  # a finished run leaves its file
            Path(argv[argv.index("--out") + 1] + ".safetensors").write_bytes(b"run")
        return status

    monkeypatch.setattr(motion_run, "main", main)
    return calls


def test_motion_stages_chain_their_runs_and_the_pairs_mix_in_the_two_subject_cache(tmp_path, monkeypatch):
    work, calls = motion_folder(tmp_path), fake_motion_run(monkeypatch)
    for stage in CACHE_AND_RUN_STAGES:
        assert train_default.run_motion(work, stage) == 0
    motion, pairs = work / train_default.MOTION_DIR, work / train_default.PAIRS_DIR
    next_motion, next_pairs = (work / train_default.NEXT_DIR / d for d in (train_default.MOTION_DIR,
                                                                          train_default.PAIRS_DIR))
    assert [c[:3] for c in calls if c[0] == "cache"] == [["cache", "--work", str(f)] for f in
                                                         (motion, pairs, next_motion, next_pairs)]
    from phantom_core.world.default_model import TEXT_STAGE_FILE, VAE_STAGE_FILE

    for folder, vae_folder in ((motion, work), (pairs, work), (next_motion, work / "next"), (next_pairs, work / "next")):
        assert (folder / VAE_STAGE_FILE).read_bytes() == (vae_folder / VAE_STAGE_FILE).read_bytes()
        assert (folder / TEXT_STAGE_FILE).read_bytes() == (work / TEXT_STAGE_FILE).read_bytes()  # one umT5 always
        assert (folder / "cache_done.json").is_file()
    assert (next_motion / VAE_STAGE_FILE).read_bytes() != (motion / VAE_STAGE_FILE).read_bytes()
    trains = {c[c.index("--out") + 1].rsplit("/", 1)[-1]: c for c in calls if c[0] == "train"}
    assert sorted(trains) == ["b", "c", "d", "e", "f", "g"]
    assert trains["b"][trains["b"].index("--init") + 1] == str(work / "mmdit_both.safetensors")
    for run, start, folder in (("c", "b", motion), ("d", "c", motion), ("e", "d", motion), ("f", "e", motion),
                               ("g", "f", next_motion)):  # each run starts from the one before
        assert trains[run][trains[run].index("--init") + 1] == str(folder / f"{start}.safetensors")
    assert all("--mix" not in trains[r] for r in "bc")
    assert all(trains[r][trains[r].index("--mix") + 1] == str(pairs) for r in "de")
    assert all(trains[r][trains[r].index("--mix") + 1] == str(next_pairs) for r in "fg")
    assert all(trains[r][trains[r].index("--work") + 1] == str(next_motion) for r in "fg")
    assert all("--resume" in c and "--clip-vision" in c for c in trains.values())
    assert train_default.motion_output(work, train_default.SHIPPED_RUN) == next_motion / "g.safetensors"
    assert train_default.cache_vae(work, "next_cache") == work / "next" / VAE_STAGE_FILE
    count = len(calls)
    for stage in CACHE_AND_RUN_STAGES:  # every output is there: nothing runs again
        assert train_default.run_motion(work, stage) == 0
    assert len(calls) == count


def test_a_failed_cache_is_not_marked_done_and_a_missing_input_is_named(tmp_path, monkeypatch):
    work, calls = motion_folder(tmp_path), fake_motion_run(monkeypatch, status=2)
    assert train_default.run_motion(work, "pairs_cache") == 2
    assert not (work / train_default.PAIRS_DIR / "cache_done.json").exists()
    with pytest.raises(FileNotFoundError, match="cache_done.json is missing: run the stages before pairs first"):
        train_default.run_motion(work, "pairs")
    assert len(calls) == 1


def test_next_vae_trains_the_subjects_recipe_in_the_next_folder(tmp_path, monkeypatch):
    from phantom_core.world import default_model

    calls = []

    def stage_vae(work, progress=None, recipe=None):
        calls.append((work, recipe))

    monkeypatch.setattr(default_model, "stage_vae", stage_vae)
    argv = ["--work", str(tmp_path), "--model", "mmdit", "--stages", "next_vae", "--threads", "1"]
    assert train_default.main(argv) == 0
    assert calls == [(tmp_path / train_default.NEXT_DIR, "subjects")]  # no PHANTOM_VAE_RECIPE needed
    with pytest.raises(SystemExit):  # the MMDiT default's stage, not a variant's
        train_default.main([*argv, "--variant", "vae"])


def test_an_unknown_vae_recipe_is_refused_naming_the_valid_ones(tmp_path):
    from phantom_core.world.vae_recipe import train_world_vae

    with pytest.raises(ValueError, match="recipe: got 'sharp'; valid recipes are phased, subjects"):
        train_world_vae(tmp_path, tmp_path / "vae.safetensors", recipe="sharp")
    assert list(tmp_path.iterdir()) == []
