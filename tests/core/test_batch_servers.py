"""The batch tool over several servers (tools/phantom_batch.py, ``--server`` repeated), against in-process fake
ComfyUI servers (tests/support/fake_comfy.py): one job in flight per server, every server used, a lost server's job
retried on another (bounded), and the manifest saying which server ran each job."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.fake_comfy import FakeComfy
from tools import phantom_batch


@pytest.fixture
def fakes() -> Iterator[list[FakeComfy]]:
    started: list[FakeComfy] = []
    yield started
    for fake in started:
        if fake.die_on is None or len(fake.prompts) < fake.die_on:  # the dead ones closed themselves
            fake.close()


def run(tmp_path: Path, servers: list[FakeComfy], n_jobs: int, *extra: str) -> tuple[int, dict]:
    (tmp_path / "a.png").write_bytes(b"not read by the fake")
    lines = [json.dumps({"id": f"j{k}", "refs": ["a.png"], "prompt": f"job {k}"}) for k in range(n_jobs)]
    (tmp_path / "jobs.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    argv = [str(tmp_path / "jobs.jsonl"), "--out", str(out), "--poll", "0.02", "--request-timeout", "5",
            "--timeout", "30", *extra]
    for fake in servers:
        argv += ["--server", fake.url]
    code = phantom_batch.main(argv)
    return code, json.loads((out / "manifest.json").read_text())


def ran_on(fake: FakeComfy) -> list[str]:
    return [job for _, job in fake.prompts]


def test_jobs_spread_over_both_servers_one_at_a_time(tmp_path: Path, fakes) -> None:
    a, b = FakeComfy(run_s=0.15), FakeComfy(run_s=0.15)
    fakes += [a, b]
    code, manifest = run(tmp_path, [a, b], 6)
    assert code == 0 and (manifest["ok"], manifest["failed"]) == (6, 0)
    assert manifest["servers"] == [a.url, b.url]
    assert a.max_in_flight == 1 and b.max_in_flight == 1
    assert ran_on(a) and ran_on(b) and sorted(ran_on(a) + ran_on(b)) == [f"j{k}" for k in range(6)]
    for record in manifest["jobs"]:
        fake = a if record["server"] == a.url else b
        assert record["id"] in ran_on(fake) and record["retries"] == []
        [video] = map(Path, record["outputs"])
        assert video.name == f"{record['id']}.mp4" and video.read_bytes() == f"{record['id']}_00001_.mp4".encode()
    assert not list((tmp_path / "out").glob(".*"))  # no temp file left behind


@pytest.mark.parametrize("how", ["dies", "forgets"])
def test_a_lost_servers_job_is_retried_on_the_other(tmp_path: Path, fakes, how: str) -> None:
    """b dies (connection refused from then on) or restarts (its prompt vanishes) during its first job: that job
    is run again on a, b takes no more jobs, and the manifest lists the loss."""
    a = FakeComfy(run_s=0.15)
    b = FakeComfy(run_s=0.15, die_on=1) if how == "dies" else FakeComfy(run_s=0.15, forget=True)
    fakes += [a, b]
    code, manifest = run(tmp_path, [a, b], 3)
    assert code == 0 and (manifest["ok"], manifest["failed"]) == (3, 0)
    [(_, lost_job)] = b.prompts  # b received one job, then no other
    record = next(r for r in manifest["jobs"] if r["id"] == lost_job)
    assert record["server"] == a.url and lost_job in ran_on(a)
    [retry] = record["retries"]
    assert retry["server"] == b.url
    assert retry["error"].startswith("ConnectionError" if how == "dies" else "ServerLost: prompt")
    assert all(r["server"] == a.url for r in manifest["jobs"])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["j0.mp4", "j1.mp4", "j2.mp4", "manifest.json"]


def test_retries_are_bounded(tmp_path: Path, fakes) -> None:
    """--retries 0: the job lost with a fails with the loss recorded, although b could have run it; b runs the
    others."""
    a, b = FakeComfy(run_s=0.1, die_on=1), FakeComfy(run_s=0.1)
    fakes += [a, b]
    code, manifest = run(tmp_path, [a, b], 3, "--retries", "0")
    assert code == 1 and (manifest["ok"], manifest["failed"]) == (2, 1)
    [(_, lost_job)] = a.prompts
    record = next(r for r in manifest["jobs"] if r["id"] == lost_job)
    assert record["status"] == "failed" and record["outputs"] == [] and record["server"] is None
    assert [r["server"] for r in record["retries"]] == [a.url]
    assert record["error"].startswith(f"server lost on each of 1 tries: {a.url} (ConnectionError")
    assert lost_job not in ran_on(b) and len(ran_on(b)) == 2


def test_every_server_lost_fails_the_rest_without_hanging(tmp_path: Path, fakes) -> None:
    a, b = FakeComfy(run_s=0.1, die_on=1), FakeComfy(run_s=0.1, die_on=1)
    fakes += [a, b]
    code, manifest = run(tmp_path, [a, b], 3)
    assert code == 1 and (manifest["ok"], manifest["failed"]) == (0, 3)
    never_sent = [r for r in manifest["jobs"] if not r["retries"]]
    assert len(never_sent) == 1 and never_sent[0]["error"] == "not run: no server left"
