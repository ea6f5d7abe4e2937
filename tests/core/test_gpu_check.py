"""benchmarks/gpu_check.sh cannot rot while no GPU is lent: its --dry-run (tiny shapes, CPU) runs both parts, the
native side with PyAV and torchsde hidden as on the GPU machines (import stand-ins); the block-swap part runs its
CPU path (load_dit(..., block_swap=N), one step, the memory model's figures)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import bench_block_swap
from benchmarks.import_standins import install_standins

ROOT = Path(__file__).resolve().parents[2]


def test_dry_run_prints_both_parts(tmp_path: Path) -> None:
    hidden = tmp_path / "hidden"  # what the GPU image lacks: importing these fails, as there
    hidden.mkdir()
    for name in ("av", "torchsde"):
        (hidden / f"{name}.py").write_text('raise ImportError("not installed on the GPU machines")\n')
    env = os.environ | {"PYTHON": sys.executable, "PYTHONPATH": str(hidden), "OMP_NUM_THREADS": "1",
                        "MKL_NUM_THREADS": "1"}
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=240)
    out = run.stdout
    assert run.returncode == 0, out + run.stderr[-3000:]
    for line in ("note: av is not installed", "note: torchsde is not installed",
                 "ComfyUI native (DualCFGGuider + SamplerCustomAdvanced)", "ours (sample_phantom, passes batched)",
                 "ratio", "s/step", "ours + StepCache(threshold 0.1), 5 steps", "evaluations 15 of 15",
                 "== 2. 14B-shaped fp8 + block swap"):
        assert line in out, (line, out)
    assert "memory model (wan.memory.peak_bytes, block_swap 1, 1 blocks resident)" in out, out


def test_block_swap_part_runs_on_the_cpu(capsys) -> None:
    """Its flow (random weights -> fp8 load with block swap -> one step -> report), passes one by one and batched."""
    for extra in ([], ["--batch-passes"]):
        bench_block_swap.main(["--preset", "tiny", "--size", "64x48x5", "--refs", "4", "--block-swap", "1", *extra])
        out = capsys.readouterr().out
        assert "one step in" in out and "peak n/a (CPU)" in out, out
        assert "(wan.memory.peak_bytes, block_swap 1, 1 blocks resident)" in out and "smallest block_swap" in out


def test_a_stand_in_imports_but_never_computes(monkeypatch) -> None:
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    assert install_standins(("os", "phantom_no_such_package")) == ["phantom_no_such_package"]
    from phantom_no_such_package.sub import Thing  # noqa: PLC0415  (a submodule, as `from av.container import ...`)

    class Derived(Thing):  # subclassing and annotations work, as ComfyUI's class definitions need
        pass

    with pytest.raises(RuntimeError, match="phantom_no_such_package is not installed"):
        Derived()
    sys.modules.pop("phantom_no_such_package.sub")
    sys.modules.pop("phantom_no_such_package")


@pytest.mark.parametrize(("device", "index"), [("cuda", 0), ("cuda:1", 1)])
def test_the_memory_cap_names_the_device_by_index(monkeypatch, device: str, index: int) -> None:
    """``torch.cuda.set_per_process_memory_fraction`` refuses a device without an index ("cuda"), which failed part 2
    on the first H200 run; the cap passes the index (the current device for plain "cuda") and the fraction of the
    card. The CUDA calls are replaced, so this runs on the CPU."""
    import torch

    calls = []
    props = type("Props", (), {"total_memory": 100e9})()
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: props)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, d: calls.append((f, d)))
    bench_block_swap.cap_memory(torch.device(device), 24.0)
    assert calls == [(pytest.approx(0.24), index)]
    with pytest.raises(ValueError, match="--cap-gb is 200"):
        bench_block_swap.cap_memory(torch.device(device), 200.0)
