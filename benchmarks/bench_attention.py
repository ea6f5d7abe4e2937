"""Forward time of the Phantom-Wan DiT under each attention back-end, and with its blocks compiled (not a test).

Run: ``.venv/bin/python -m benchmarks.bench_attention [--device cuda] [--blocks 2] [--repeats 5] [--latent 60 104]
[--compile]``.
One process, random weights, the 1.3B geometry (1536 wide, 12 heads of 128) cut to ``--blocks`` blocks, 5 video
latent frames plus 2 reference frames at 30x52 latents (832x480), a 512-token context; bf16 on CUDA, fp32 on the
CPU. For every back-end this machine has (``sdpa`` first: the baseline; ``math`` left out, its fp32 score matrix
alone is ~5 GB per block at this size) prints the median time, the ratio to ``sdpa`` and the largest difference
from ``sdpa``'s velocity relative to its largest magnitude. ``--compile`` adds ``sdpa`` with the blocks compiled
(inductor; the first call, which compiles, is timed on its own).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from phantom_core.wan.attention import available_attention, resolve_attention, use_attention
from phantom_core.wan.block_compile import compile_blocks
from phantom_core.wan.dit import DIT_PRESETS, PhantomWanDiT


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def timed(model, inputs, device: torch.device, repeats: int) -> tuple[float, torch.Tensor]:
    """(median seconds of ``repeats`` forwards after one warm-up, the velocity)."""
    out = model(*inputs)
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        out = model(*inputs)
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--latent", type=int, nargs=2, default=(60, 104), metavar=("H", "W"),
                   help="latent height and width (default 60 104: 480x832 px)")
    p.add_argument("--compile", action="store_true", help="also time sdpa with the blocks compiled (inductor)")
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = dataclasses.replace(DIT_PRESETS["phantom-wan-1.3b"], num_layers=args.blocks)
    torch.manual_seed(0)
    model = PhantomWanDiT(cfg, device=device, dtype=dtype).eval()
    model.init_weights()
    torch.nn.init.normal_(model.head.head.weight, std=0.02)  # init_weights zeroes the head: a real output
    g = torch.Generator().manual_seed(1)
    h, w = args.latent
    x = torch.randn(1, 16, 5, h, w, generator=g).to(device)
    inputs = (x, torch.tensor([700.0], device=device), torch.randn(1, 512, cfg.text_dim, generator=g).to(device),
              torch.randn(1, 16, 2, h, w, generator=g).to(device))
    print(f"{args.blocks} blocks of the 1.3B, {dtype}, {device}; auto means "
          f"{resolve_attention('auto', device.type, dtype, cfg.head_dim)} here")
    names = [n for n in available_attention() if n not in ("auto", "math")]
    base = None  # (seconds, velocity) of sdpa, the first of the names
    for name in names:
        try:
            with use_attention(name):
                seconds, out = timed(model, inputs, device, args.repeats)
        except ValueError as err:
            print(f"{name:>6}: skipped ({err})")
            continue
        base = base or (seconds, out)
        diff = ((out.float() - base[1].float()).abs().max() / base[1].float().abs().max()).item()
        print(f"{name:>6}: {seconds * 1e3:8.1f} ms  x{seconds / base[0]:.2f} of sdpa  max rel diff {diff:.1e}")
    if args.compile:
        compile_blocks(model)
        sync(device)
        t0 = time.perf_counter()
        with use_attention("sdpa"), torch.no_grad():
            model(*inputs)
        sync(device)
        first = time.perf_counter() - t0
        with use_attention("sdpa"):
            seconds, out = timed(model, inputs, device, args.repeats)
        diff = ((out.float() - base[1].float()).abs().max() / base[1].float().abs().max()).item()
        print(f"compiled sdpa: {seconds * 1e3:8.1f} ms  x{seconds / base[0]:.2f} of sdpa  max rel diff {diff:.1e}  "
              f"(first call, compiling: {first:.1f} s)")


if __name__ == "__main__":
    main()
