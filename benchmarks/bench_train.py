"""Step time and peak memory of a LoRA training step against a full fine-tune step, same model, one run (not a test).

Run: ``.venv/bin/python -m benchmarks.bench_train [--steps 6] [--dim 512 --layers 4] [--frames 9 --size 128]``.

Both modes train the same DiT (random upstream init) through the real loop (``phantom_core.training.train``) on
the same in-memory latent sample, fp32 on the CPU (bf16 autocast on CUDA), gradient checkpointing on. Each mode runs
in a fresh subprocess, so that its peak memory is its own: on the CPU the peak resident set size above the
process's size before training (model and data already built), on CUDA ``torch.cuda.max_memory_allocated``. The
median step time skips the first step (allocator warm-up).

With CUDA, a second table: one LoRA step (rank 32) of a 1.3B-shaped Phantom-Wan (random bf16 weights) at 832x480,
81 frames + 2 references, gradient checkpointing, against the 24 GB target.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from phantom_core.training.cache import InMemoryLatents, LatentSample
from phantom_core.training.config import TrainConfig
from phantom_core.training.loop import train
from phantom_core.wan.dit import DIT_PRESETS, PhantomWanDiT, WanDiTConfig
from phantom_core.wan.latents import latent_shape

TARGET_GB = 24.0


def rss_mb() -> float:
    """The peak resident set size of this process so far (Linux: ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def sample(frames: int, height: int, width: int, refs: int, text_dim: int) -> InMemoryLatents:
    """One random latent sample of a ``frames`` x ``height`` x ``width`` video with ``refs`` references."""
    _, c, f, h, w = latent_shape(frames, height, width)
    gen = torch.Generator().manual_seed(0)
    s = LatentSample("bench", torch.randn(c, f, h, w, generator=gen), torch.randn(c, refs, h, w, generator=gen),
                     torch.randn(64, text_dim, generator=gen))
    return InMemoryLatents([s], torch.randn(2, text_dim, generator=gen))


def one_mode(args: argparse.Namespace) -> dict:
    """Train ``args.steps`` steps in ``args.one`` mode; returns step times and peak memory (run in a subprocess)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = WanDiTConfig(dim=args.dim, ffn_dim=4 * args.dim, num_heads=args.dim // 128, num_layers=args.layers,
                       text_dim=args.text_dim)
    model = PhantomWanDiT(cfg, device="meta").to_empty(device="cpu")
    model.init_weights(torch.Generator().manual_seed(0))
    data = sample(args.frames, args.size, args.size, 2, args.text_dim)
    times: list[float] = []
    last = [time.perf_counter()]

    def on_step(step: int, total: int, loss: float) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    with tempfile.TemporaryDirectory() as tmp:
        config = TrainConfig(out=f"{tmp}/out.safetensors", mode=args.one, steps=args.steps, lora_rank=32,
                             lora_alpha=32.0, checkpoint_every=10**6, gradient_checkpointing=True, device=str(device))
        model.to(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20 if device.type == "cuda" else current_rss_mb()
        last[0] = time.perf_counter()
        train(config, dataset=data, model=model, callback=on_step)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else rss_mb()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"mode": args.one, "step_s": statistics.median(times[1:]) if len(times) > 1 else times[0],
            "peak_mb": peak - base, "trainable": trainable, "device": str(device)}


def big_lora_step() -> dict:
    """One LoRA step of a 1.3B-shaped model at 832x480, 81 frames, 2 references (CUDA only)."""
    model = PhantomWanDiT(DIT_PRESETS["phantom-wan-1.3b"], device="meta").to_empty(device="cuda")
    model.init_weights()
    model.to(torch.bfloat16)
    data = sample(81, 480, 832, 2, 4096)
    with tempfile.TemporaryDirectory() as tmp:
        config = TrainConfig(out=f"{tmp}/lora.safetensors", mode="lora", steps=2, lora_rank=32, lora_alpha=32.0,
                             checkpoint_every=10**6, gradient_checkpointing=True, device="cuda")
        torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        train(config, dataset=data, model=model)
        seconds = (time.perf_counter() - started) / 2
    return {"peak_gb": torch.cuda.max_memory_allocated() / 2**30, "step_s": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--text-dim", type=int, default=256)
    parser.add_argument("--frames", type=int, default=9)
    parser.add_argument("--size", type=int, default=128, help="square video size in px")
    parser.add_argument("--one", choices=["lora", "full"], help=argparse.SUPPRESS)  # the subprocess's mode
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_mode(args)))
        return
    rows = []
    for mode in ("full", "lora"):
        cmd = [sys.executable, "-m", "benchmarks.bench_train", "--one", mode,
               *[f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k != "one"]]
        rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1]))
    full, lora = rows
    print(f"DiT dim {args.dim}, {args.layers} blocks; {args.frames} frames at {args.size}x{args.size} + 2 references; "
          f"gradient checkpointing; {full['device']}, {torch.get_num_threads()} threads")
    print(f"{'mode':<6} {'trainable':>12} {'step (s)':>10} {'peak above model (MB)':>22}")
    for r in rows:
        print(f"{r['mode']:<6} {r['trainable']:>12,} {r['step_s']:>10.3f} {r['peak_mb']:>22.1f}")
    print(f"LoRA / full: step time {lora['step_s'] / full['step_s']:.2f}x, peak memory "
          f"{lora['peak_mb'] / max(full['peak_mb'], 1e-9):.2f}x")
    if torch.cuda.is_available():
        big = big_lora_step()
        verdict = "fits" if big["peak_gb"] <= TARGET_GB else "does NOT fit"
        print(f"1.3B-shaped LoRA step (rank 32, 832x480, 81 frames + 2 refs, bf16, checkpointing): "
              f"{big['step_s']:.2f} s/step, peak {big['peak_gb']:.1f} GB: {verdict} the {TARGET_GB:.0f} GB target")
    else:
        print("no CUDA: the 1.3B-shaped 480p / 81-frame LoRA step (24 GB target) was not measured")


if __name__ == "__main__":
    main()
