"""Tiny training data for the trainer's tests: MP4 clips + PNG references on disk, random latent datasets, and a
DiT small enough to take many optimizer steps in a second on the CPU."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from phantom_core.training.cache import InMemoryLatents, LatentSample
from phantom_core.video_io import write_mp4
from phantom_core.wan.dit import PhantomWanDiT, WanDiTConfig

MICRO_DIT = WanDiTConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_dim=32, text_len=16, freq_dim=32)
"""2 blocks, head_dim 32, contexts padded to 16 tokens: ~0.1 M parameters, a few ms per step."""


def micro_dit(seed: int = 0, config: WanDiTConfig = MICRO_DIT) -> PhantomWanDiT:
    """``config`` initialised as upstream Wan2.1 from ``seed`` (the head too: a random, not zero, init so that
    gradients reach every block from the first step)."""
    model = PhantomWanDiT(config, device="meta").to_empty(device="cpu")
    gen = torch.Generator().manual_seed(seed)
    model.init_weights(gen)
    torch.nn.init.normal_(model.head.head.weight, std=0.02, generator=gen)
    return model


def random_latents(n: int, seed: int = 0, frames: int = 2, size: int = 4, refs: int = 1, text_dim: int = 32,
                   ) -> InMemoryLatents:
    """``n`` random latent samples ``[16, frames, size, size]`` with ``refs`` reference latents and contexts of
    3 to 6 tokens (different lengths: padding is exercised), plus a 2-token dropped context."""
    gen = torch.Generator().manual_seed(seed)
    samples = [LatentSample(f"s{k}", torch.randn(16, frames, size, size, generator=gen),
                            torch.randn(16, refs, size, size, generator=gen),
                            torch.randn(3 + k % 4, text_dim, generator=gen)) for k in range(n)]
    return InMemoryLatents(samples, torch.randn(2, text_dim, generator=gen))


def write_clip(path: Path, frames: int, size: tuple[int, int], seed: int) -> Path:
    """A moving colour gradient, ``frames`` frames of ``size`` = (width, height), as an MP4."""
    w, h = size
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    video = np.stack([np.roll(base, 2 * t, axis=1) for t in range(frames)])
    return write_mp4(video, path, fps=16)


def write_reference(path: Path, size: tuple[int, int], seed: int) -> Path:
    """A random RGB PNG of ``size`` = (width, height)."""
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def write_dataset(root: Path, samples: int = 3, frames: int = 9, size: tuple[int, int] = (48, 40)) -> Path:
    """A dataset folder of ``samples`` samples (``<name>/video.mp4``, ``ref_1.png`` (+ ``ref_2.png`` for odd
    samples), ``caption.txt``); returns ``root``."""
    for k in range(samples):
        folder = root / f"clip_{k:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        write_clip(folder / "video.mp4", frames, size, seed=k)
        for r in range(1 + k % 2):
            write_reference(folder / f"ref_{r + 1}.png", (32 + 8 * r, 40), seed=100 + 10 * k + r)
        (folder / "caption.txt").write_text(f"a subject number {k} moves left", encoding="utf-8")
    return root


def write_manifest(path: Path, entries: list[dict]) -> Path:
    """A JSONL manifest of ``entries``."""
    path.write_text("".join(json.dumps(e) + "\n" for e in entries), encoding="utf-8")
    return path


def distributed_worker(rank: int, world_size: int, port: int, root: str, runs: dict[str, dict]) -> None:
    """One rank of a gloo process group on 127.0.0.1:``port`` training each of ``runs`` (name -> TrainConfig
    fields; ``run_dir`` = ``root/<name>``) on ``random_latents(6)`` from ``micro_dit(seed=2)``; spawned by the
    distributed tests with ``torch.multiprocessing``."""
    import gc
    import os

    import torch.distributed as dist

    from phantom_core.training.config import TrainConfig
    from phantom_core.training.loop import train

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        for name, fields in runs.items():
            config = TrainConfig(**fields, out=f"{root}/{name}.safetensors", run_dir=f"{root}/{name}", device="cpu")
            train(config, dataset=random_latents(6, seed=1), model=micro_dit(seed=2))
    finally:
        dist.destroy_process_group()
        gc.collect()  # gloo's threads end here, not in interpreter shutdown (a SIGABRT seen once in CI)
