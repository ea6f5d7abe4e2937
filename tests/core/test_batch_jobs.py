"""The batch tool's job lines (tools/phantom_batch.py, no server): every field type-checked, a repeated id refused,
and each bad line failing alone with its line number while the rest of the run goes on to a manifest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tools import phantom_batch

GOOD = {"refs": ["a.png"], "prompt": "a cat"}


@pytest.fixture
def jobs_file(tmp_path: Path):
    (tmp_path / "a.png").write_bytes(b"not read here")

    def write(*lines: object) -> Path:
        path = tmp_path / "jobs.jsonl"
        path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
        return path

    return write


def test_each_bad_field_fails_its_own_line(jobs_file) -> None:
    cases = {  # line content -> words the error must hold
        "refs_string": ({**GOOD, "id": "s", "refs": "a.png"}, 'refs: got str \'a.png\'; expected a list of 1 to 4'),
        "refs_null": ({**GOOD, "id": "n", "refs": None}, "refs: got NoneType None"),
        "refs_number": ({**GOOD, "id": "k", "refs": 3}, "refs: got int 3"),
        "refs_empty": ({**GOOD, "id": "e", "refs": []}, "refs: got []"),
        "refs_of_numbers": ({**GOOD, "id": "m", "refs": [1]}, "refs: got [1]"),
        "width_text": ({**GOOD, "id": "w", "width": "64"}, "width: got str '64'; expected an integer"),
        "fps_bool": ({**GOOD, "id": "f", "fps": True}, "fps: got bool True; expected a number"),
        "seed_float": ({**GOOD, "id": "d", "seed": 1.5}, "seed: got float 1.5; expected an integer"),
        "solver_list": ({**GOOD, "id": "o", "solver": ["euler"]}, "solver: got list"),
        "prompt_empty": ({**GOOD, "id": "p", "prompt": " "}, "prompt: a non-empty string is required"),
        "prompt_missing": ({"id": "q", "refs": ["a.png"]}, "prompt: a non-empty string is required"),
        "id_number": ({**GOOD, "id": 7}, "id: got int 7"),
        "id_path": ({**GOOD, "id": "../x"}, "id: got '../x'"),
        "unknown_key": ({**GOOD, "id": "u", "cfg": 3}, "unknown job keys ['cfg']"),
        "missing_file": ({**GOOD, "id": "x", "refs": ["nope.png"]}, "refs: file(s) not found"),
        "not_object": ("[1, 2]", "expected a JSON object, got list"),
        "not_json": ('{"refs": ', "not valid JSON"),
    }
    path = jobs_file({**GOOD, "id": "first"}, *[line for line, _ in cases.values()], {**GOOD, "id": "last"})
    jobs = phantom_batch.read_jobs(path)
    assert [j["line"] for j in jobs] == list(range(1, len(cases) + 3))
    assert "error" not in jobs[0] and "error" not in jobs[-1]
    assert jobs[0]["refs"] == [str(path.parent / "a.png")]  # resolved against the JSONL's folder
    for number, (case, (_, words)) in enumerate(cases.items(), start=2):
        error = jobs[number - 1].get("error", "")
        assert error.startswith(f"jobs.jsonl:{number}: ") and words in error, (case, error)


def test_a_repeated_id_fails_the_later_line(jobs_file) -> None:
    path = jobs_file({**GOOD, "id": "same"}, {**GOOD, "id": "other"}, {**GOOD, "id": "same", "prompt": "a dog"})
    first, other, again = phantom_batch.read_jobs(path)
    assert "error" not in first and "error" not in other
    assert again["id"] == "same" and again["error"] == (
        "jobs.jsonl:3: id 'same' is already used by line 1; each job needs its own id (it names the output file)")


def test_bad_lines_do_not_stop_the_run_and_the_manifest_is_written(jobs_file, tmp_path: Path) -> None:
    """The lines that crashed the whole run before any job (refs null / a number) now fail alone; the good line
    goes on to the server (unreachable here, so it fails too, on its own), and manifest.json is written."""
    path = jobs_file({**GOOD, "id": "a", "refs": None}, {**GOOD, "id": "b", "refs": 5}, {**GOOD, "id": "c"})
    out = tmp_path / "out"
    code = phantom_batch.main([str(path), "--out", str(out), "--server", "http://127.0.0.1:9", "--timeout", "5"])
    assert code == 1
    manifest = json.loads((out / "manifest.json").read_text())
    by_id = {r["id"]: r for r in manifest["jobs"]}
    assert (manifest["ok"], manifest["failed"]) == (0, 3) and [r["line"] for r in manifest["jobs"]] == [1, 2, 3]
    assert by_id["a"]["error"].startswith("jobs.jsonl:1: refs: got NoneType")
    assert by_id["b"]["error"].startswith("jobs.jsonl:2: refs: got int 5")
    assert "jobs.jsonl" not in by_id["c"]["error"] and by_id["c"]["status"] == "failed"  # reached the network
