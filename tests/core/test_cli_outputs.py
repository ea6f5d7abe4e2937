"""The CLI's outputs: `--out` checked before any model loads (a directory, an existing file without
`--overwrite`), and Ctrl-C answered with one line and exit status 130, leaving no partial file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import phantom_core.inference.cli as cli
from phantom_core.__main__ import EXIT_INTERRUPTED, main
from tests.support.files import make_tiny_files, model_args

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--width", "32", "--height", "32", "--frames", "1", "--steps", "2"]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    return make_tiny_files(tmp_path_factory.mktemp("cli_outputs"), seed=3, sizes=[(40, 40), (48, 32)])


@pytest.fixture
def no_work(monkeypatch) -> list:
    """generate_to_file replaced by a recorder: any call means the checks let the run through."""
    calls: list = []

    def record(**kwargs):
        calls.append(kwargs)
        return Path(kwargs["out_path"]), Path(kwargs["sidecar_path"])

    monkeypatch.setattr(cli, "generate_to_file", record)
    return calls


def generate(files: dict[str, Path], out: Path, *extra: str) -> int:
    return main(["generate", *model_args(files), "--prompt", "x", *SMALL, "--out", str(out), *extra])


def test_a_directory_as_out_is_refused_before_any_work(files, tmp_path, no_work, capsys):
    assert generate(files, tmp_path) == 2
    err = capsys.readouterr().err
    assert f"--out: {tmp_path} is a directory" in err and "video.mp4" in err and not no_work


def test_an_existing_out_or_sidecar_needs_overwrite(files, tmp_path, no_work, capsys):
    out = tmp_path / "v.mp4"
    out.write_bytes(b"an earlier video")
    assert generate(files, out) == 2
    assert f"--out: {out} already exists; pass --overwrite" in capsys.readouterr().err and not no_work
    assert out.read_bytes() == b"an earlier video"
    other = tmp_path / "w.mp4"
    other.with_suffix(".json").write_text("{}")  # only the sidecar exists
    assert generate(files, other) == 2
    assert f"--sidecar: {other.with_suffix('.json')} already exists" in capsys.readouterr().err and not no_work
    assert generate(files, out, "--overwrite") == 0 and len(no_work) == 1


def test_an_out_below_a_file_is_refused(files, tmp_path, no_work, capsys):
    (tmp_path / "file").write_text("x")
    assert generate(files, tmp_path / "file" / "v.mp4") == 2
    assert "is a file, not a folder" in capsys.readouterr().err and not no_work


def test_ctrl_c_in_process_is_one_line_and_130(files, tmp_path, monkeypatch, capsys):
    def interrupted(**kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "generate_to_file", interrupted)
    assert generate(files, tmp_path / "v.mp4") == EXIT_INTERRUPTED == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == "interrupted (Ctrl-C)" and "Traceback" not in err


def test_sigint_while_sampling_exits_130_without_a_traceback_or_a_file(files, tmp_path):
    out = tmp_path / "v.mp4"
    cmd = [sys.executable, "-m", "phantom_core", "generate", *model_args(files), "--prompt", "x", "--width", "32",
           "--height", "32", "--frames", "1", "--steps", "1000", "--out", str(out)]
    # SIGINT back to its default in the child: a shell that starts the tests in the background (`cmd &`) ignores it,
    # the ignored disposition survives exec, and Python then installs no KeyboardInterrupt handler
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    err = bytearray()

    def read() -> None:
        while chunk := os.read(proc.stderr.fileno(), 4096):
            err.extend(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while b"sampling [" not in err:  # the progress bar: models loaded, the loop running
            assert proc.poll() is None and time.monotonic() < deadline, bytes(err).decode(errors="replace")
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(timeout=10)
    text = bytes(err).decode(errors="replace")
    assert "Traceback" not in text and text.rstrip().endswith("interrupted (Ctrl-C)"), text
    assert list(tmp_path.iterdir()) == []  # no MP4, no sidecar, no temporary file
