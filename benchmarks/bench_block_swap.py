"""Peak GPU memory of one Phantom sampling step of a 14B-shaped fp8 DiT with block swap, under a memory cap.

A 24 GB card is emulated on a larger one with ``torch.cuda.set_per_process_memory_fraction``: the caching allocator
refuses anything past the cap (``torch.OutOfMemoryError``, reported as a result, not a crash). Random weights with
the preset's keys and shapes (bf16) are loaded by ``load_dit`` with ``dtype=float8_e4m3fn`` (the Linear weights
quantized per tensor, as the loader node's ``fp8_e4m3fn`` choice does) and the block-swap option; one Euler step
runs the three guidance passes one at a time (batched, they need more than 24 GiB at 832x480x81 with 4
references: ``tests/core/test_memory_model.py``). Printed: the peak ``torch.cuda.max_memory_allocated``, the step's
seconds, and what ``wan.memory.peak_bytes`` predicts.

Block swap is ``load_dit(..., block_swap=N)`` (``phantom_core/wan/block_swap.py``: the last N blocks rest in pinned
CPU memory and are streamed in per forward, the next one prefetched on a side stream); ``load_with_block_swap`` is
the one place that calls it. On the CPU (``--device cpu``) the same flow runs without a cap or a peak (a smoke run).

    python3 -m benchmarks.bench_block_swap --device cuda        # 14B, 832x480x81, 4 refs, 30 blocks swapped, 24 GB
    .venv/bin/python -m benchmarks.bench_block_swap --preset tiny --size 64x48x5 --block-swap 1   # CPU smoke run
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.bench_sampling import parse_size
from phantom_core.sampling.loop import sample_phantom
from phantom_core.wan.dit import DIT_PRESETS, PhantomWanDiT, WanDiTConfig
from phantom_core.wan.latents import latent_shape
from phantom_core.wan.load import expected_shapes, load_dit
from phantom_core.wan.memory import peak_bytes, smallest_block_swap

GIB = 2**30


def random_state_dict(config: WanDiTConfig, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """bf16 random weights (std 0.02) with the preset's keys and shapes, on the CPU; drawn tensor by tensor on
    ``device`` (fast on a GPU), so at most one tensor is there at a time."""
    g = torch.Generator(device=device).manual_seed(seed)
    return {key: torch.empty(shape, dtype=torch.bfloat16, device=device).normal_(0, 0.02, generator=g).cpu()
            for key, shape in expected_shapes(config).items()}


def load_with_block_swap(sd: dict[str, torch.Tensor], blocks: int, device: torch.device) -> PhantomWanDiT:
    """The fp8 DiT with ``blocks`` of its blocks swapped out of ``device`` (the one call of the block-swap option)."""
    return load_dit(sd, dtype=torch.float8_e4m3fn, device=device, block_swap=blocks)


def cap_memory(device: torch.device, cap_gb: float) -> None:
    """Let the caching allocator use at most ``cap_gb`` GB (1e9 bytes) of ``device``; ValueError beyond the card."""
    total = torch.cuda.get_device_properties(device).total_memory
    if cap_gb * 1e9 > total:
        raise ValueError(f"--cap-gb is {cap_gb}; this GPU has {total / 1e9:.1f} GB")
    index = device.index if device.index is not None else torch.cuda.current_device()
    torch.cuda.set_per_process_memory_fraction(cap_gb * 1e9 / total, index)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(DIT_PRESETS), default="phantom-wan-14b")
    p.add_argument("--size", type=parse_size, default=(832, 480, 81), help="WIDTHxHEIGHTxFRAMES")
    p.add_argument("--refs", type=int, default=4)
    p.add_argument("--block-swap", type=int, default=30, help="blocks kept off the GPU (14B: 40 blocks)")
    p.add_argument("--cap-gb", type=float, default=24.0, help="GPU memory cap in GB (CUDA only)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--batch-passes", action="store_true",
                   help="run the guidance passes as one batched forward (the sampler's default) instead of one by one")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    device, cfg = torch.device(args.device), DIT_PRESETS[args.preset]
    (w, h, frames), cuda = args.size, device.type == "cuda"
    passes = "batched" if args.batch_passes else "one at a time"
    print(f"setting: {args.preset} (random weights) in fp8, {w}x{h}x{frames}, {args.refs} references, "
          f"--block-swap {args.block_swap}, one Euler step, 3 passes {passes}, on {device}", flush=True)
    start = time.perf_counter()
    sd = random_state_dict(cfg, device)
    model = load_with_block_swap(sd, args.block_swap, device)
    del sd
    print(f"weights drawn and loaded in {time.perf_counter() - start:.1f} s", flush=True)
    bytes_per_value = model.compute_dtype.itemsize
    rows = 3 if args.batch_passes else 1
    predicted = peak_bytes(cfg, frames, h, w, args.refs, batch=rows, bytes_per_weight=1,
                           bytes_per_value=bytes_per_value, block_swap=args.block_swap)
    fits = smallest_block_swap(cfg, frames, h, w, args.refs, int(args.cap_gb * 1e9) - GIB, batch=rows,
                               bytes_per_weight=1, bytes_per_value=bytes_per_value)
    if cuda:
        cap_memory(device, args.cap_gb)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    g = torch.Generator().manual_seed(1)
    shape = latent_shape(frames, h, w)
    noise = torch.randn(shape, generator=g).to(device)
    refs = torch.randn(1, 16, args.refs, *shape[-2:], generator=g).to(device)
    context = torch.randn(1, 20, cfg.text_dim, generator=g).to(device)
    start = time.perf_counter()
    try:
        sample_phantom(model, noise, refs, context, context[:, :10], steps=1, solver="euler",
                       batch_passes=args.batch_passes, model_dtype=model.compute_dtype)
        if cuda:
            torch.cuda.synchronize(device)
        outcome = f"one step in {time.perf_counter() - start:.1f} s"
    except torch.OutOfMemoryError as e:
        outcome = f"OUT OF MEMORY under the {args.cap_gb:g} GB cap ({str(e).splitlines()[0]})"
    peak = f"{torch.cuda.max_memory_allocated(device) / GIB:.2f} GiB" if cuda else "n/a (CPU)"
    print(f"{outcome}; peak {peak}; memory model (wan.memory.peak_bytes, block_swap {args.block_swap}, "
          f"{cfg.num_layers - args.block_swap} blocks resident): {predicted / GIB:.2f} GiB; smallest block_swap "
          f"under the {args.cap_gb:g} GB cap less 1 GiB: {fits}", flush=True)


if __name__ == "__main__":
    main()
