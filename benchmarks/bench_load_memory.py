"""Peak resident memory while loading a 1.3B-sized DiT checkpoint: ours against the official-style path (not a test).

Run: ``.venv/bin/python benchmarks/bench_load_memory.py [--dir /tmp] [--keep] [--preset tiny]``.

1. Writes a synthetic ``phantom-wan-1.3b`` checkpoint (upstream key names and shapes, random fp16 values, ~2.8 GB)
   into a temporary folder, streamed tensor by tensor so the writer never holds more than one tensor.
2. Loads it in two fresh subprocesses, one after the other, each reporting its own peak resident set
   (``VmHWM``: anonymous plus file-backed pages it touched, i.e. what ``ru_maxrss`` reports):
   - ours: ``load_dit(path, dtype=torch.float16)`` (meta build, memory-mapped safetensors, ``assign=True``);
     then it touches every weight once (a sum over each parameter, like a first forward) and reports the peak
     again, so the cost of pages mapped lazily during load is counted too;
   - official-style: ``safetensors.torch.load_file`` (the whole file into memory), the model built normally in
     fp32 on the CPU (random init), ``load_state_dict(strict=False)``, then ``.half()`` (the upstream loaders'
     sequence, in our model class).
3. Prints each peak divided by the file size, gross and net of the child's resident set before loading (the
   interpreter + torch + transformers imports, ~0.75 GiB, paid by any loader), and the ratio ours / official.
   Target: ours <= 1.15 x the file size, net. The file is deleted afterwards unless --keep.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SAFETENSORS_TAG = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}


def _status_mb(field: str) -> float:
    """``VmRSS`` / ``VmHWM`` of this process in MiB (Linux ``/proc/self/status``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def write_synthetic_checkpoint(path: Path, preset: str = "phantom-wan-1.3b", dtype_name: str = "float16") -> int:
    """Stream a safetensors file with the preset's upstream keys and shapes and random values; returns its size.

    The safetensors layout (8-byte little-endian header length, JSON header padded to 8 bytes with spaces,
    then the tensors' bytes back to back in header order) is written by hand so that only one tensor is
    ever in memory.
    """
    import torch

    from phantom_core.wan.dit import DIT_PRESETS
    from phantom_core.wan.load import expected_shapes

    dtype = getattr(torch, dtype_name)
    shapes = dict(sorted(expected_shapes(DIT_PRESETS[preset]).items()))
    itemsize = torch.empty((), dtype=dtype).element_size()
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for key, shape in shapes.items():
        nbytes = math.prod(shape) * itemsize
        header[key] = {"dtype": SAFETENSORS_TAG[dtype_name], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    g = torch.Generator().manual_seed(0)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for shape in shapes.values():
            f.write((torch.randn(shape, generator=g) * 0.02).to(dtype).numpy().tobytes())
    return path.stat().st_size


# ---------------------------------------------------------------------------------------------- children


def child_ours(path: str) -> dict:
    import torch

    from phantom_core.wan.load import load_dit

    base = _status_mb("VmRSS")
    t0 = time.perf_counter()
    model = load_dit(path, dtype=torch.float16)
    load_s = time.perf_counter() - t0
    peak_load = _status_mb("VmHWM")
    with torch.no_grad():
        checksum = sum(float(p.float().sum()) for p in model.parameters())  # touch every page once
    return {"base_mb": base, "peak_load_mb": peak_load, "peak_touched_mb": _status_mb("VmHWM"),
            "load_s": load_s, "dtypes": sorted({str(p.dtype) for p in model.parameters()}),
            "params": sum(p.numel() for p in model.parameters()), "checksum": checksum}


def child_official(path: str) -> dict:
    import torch
    from safetensors.torch import load_file

    from phantom_core.wan.dit import PhantomWanDiT
    from phantom_core.wan.load import infer_dit_config

    base = _status_mb("VmRSS")
    t0 = time.perf_counter()
    sd = load_file(path)  # everything in memory
    model = PhantomWanDiT(infer_dit_config(sd))  # fp32, random init, on the CPU
    missing, unexpected = model.load_state_dict(sd, strict=False)
    del sd
    model = model.half().eval().requires_grad_(False)
    load_s = time.perf_counter() - t0
    with torch.no_grad():
        checksum = sum(float(p.float().sum()) for p in model.parameters())
    return {"base_mb": base, "peak_load_mb": _status_mb("VmHWM"), "peak_touched_mb": _status_mb("VmHWM"),
            "load_s": load_s, "dtypes": sorted({str(p.dtype) for p in model.parameters()}),
            "params": sum(p.numel() for p in model.parameters()), "checksum": checksum,
            "missing": len(missing), "unexpected": len(unexpected)}


def run_child(which: str, path: Path) -> dict:
    """Run one loader in a fresh interpreter (its peak is its own) and return its JSON report."""
    out = subprocess.run([sys.executable, "-m", "benchmarks.bench_load_memory", "--child", which, str(path)],
                         capture_output=True, text=True, check=False, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"{which} loader failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="phantom-wan-1.3b", help="DIT_PRESETS name (tiny: a quick smoke run)")
    parser.add_argument("--dir", default=None, help="folder for the temporary ~2.8 GB file (default: system temp)")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint")
    parser.add_argument("--child", nargs=2, metavar=("WHICH", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        which, path = args.child
        print(json.dumps({"ours": child_ours, "official": child_official}[which](path)))
        return

    folder = Path(tempfile.mkdtemp(prefix="phantom_bench_", dir=args.dir))
    path = folder / f"{args.preset}_synthetic_fp16.safetensors"
    try:
        t0 = time.perf_counter()
        size = write_synthetic_checkpoint(path, args.preset)
        gb = size / 2**30
        print(f"wrote {path.name}: {size:,} bytes ({gb:.2f} GiB) in {time.perf_counter() - t0:.0f} s")
        results = {which: run_child(which, path) for which in ("ours", "official")}
    finally:
        if not args.keep:
            path.unlink(missing_ok=True)
            folder.rmdir()
    report(results, size)


def report(results: dict[str, dict], size: int) -> None:
    """The table and the verdict. "net" subtracts the child's resident set before loading (interpreter, torch,
    transformers: ~0.75 GiB, paid by any loader), so the ratio is the memory the load itself adds."""
    size_mb = size / 2**20
    print(f"\n{'loader':<9} {'load s':>6} {'base MiB':>9} | {'peak during load / file':>23} | "
          f"{'peak after touching every weight / file':>39}")
    print(f"{'':<9} {'':>6} {'':>9} | {'gross':>11} {'net':>11} | {'gross':>19} {'net':>19}")
    net: dict[str, tuple[float, float]] = {}
    for which, r in results.items():
        net[which] = ((r["peak_load_mb"] - r["base_mb"]) / size_mb, (r["peak_touched_mb"] - r["base_mb"]) / size_mb)
        print(f"{which:<9} {r['load_s']:6.1f} {r['base_mb']:9.0f} | {r['peak_load_mb'] / size_mb:11.2f} "
              f"{net[which][0]:11.2f} | {r['peak_touched_mb'] / size_mb:19.2f} {net[which][1]:19.2f}")
    ours, official = results["ours"], results["official"]
    assert ours["params"] == official["params"] and ours["dtypes"] == official["dtypes"] == ["torch.float16"]
    print(f"\nsame model both ways: {ours['params']:,} fp16 parameters, checksums {ours['checksum']:.3f} / "
          f"{official['checksum']:.3f}")
    print(f"ours / official, net peak: during load {net['ours'][0] / net['official'][0]:.2f}, "
          f"after touching every weight {net['ours'][1] / net['official'][1]:.2f}")
    worst = max(net["ours"])
    print(f"target: ours <= 1.15 x file size (net, worst of the two): {'met' if worst <= 1.15 else 'MISSED'} "
          f"({worst:.2f})")


if __name__ == "__main__":
    main()
