"""Sampling cases for the parallel tests: the ``tiny`` DiT, inputs whose token count does not divide by 2 or 3, and
one rank of a gloo process group spawned with ``torch.multiprocessing`` that samples each case."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from phantom_core.sampling.cache import StepCache
from phantom_core.sampling.guidance import run_passes
from phantom_core.sampling.loop import sample_phantom
from phantom_core.wan.dit import DIT_PRESETS, PhantomWanDiT

# video latents 2 x 6 x 6 -> 2 * 3 * 3 = 18 video tokens + 9 for the reference: 27 tokens, which 2 sequence ranks
# split as 14 + 13 plus one padding row
SHAPE = (1, 16, 2, 6, 6)
CASES: dict[str, dict[str, Any]] = {
    "plain": dict(steps=4, solver="unipc"),
    # v_neg skipped in the second half (a rank with no pass still joins the all-gather) and passes reused by the cache
    "cache_window": dict(steps=8, solver="euler", image_guidance_window=(0.0, 0.5), cache_threshold=0.3),
}


def tiny_dit() -> PhantomWanDiT:
    """The ``tiny`` preset (2 heads, 2 blocks) with weights drawn from seed 0: the same on every rank."""
    torch.manual_seed(0)
    return PhantomWanDiT(DIT_PRESETS["tiny"]).eval()


def inputs() -> dict[str, torch.Tensor]:
    """Noise, one reference latent and two contexts of different lengths, from seed 1."""
    gen = torch.Generator().manual_seed(1)
    b, c, _, h, w = SHAPE
    return {"noise": torch.randn(SHAPE, generator=gen), "ref_latents": torch.randn(b, c, 1, h, w, generator=gen),
            "context": torch.randn(b, 5, 64, generator=gen), "context_neg": torch.randn(b, 7, 64, generator=gen)}


def sample_case(name: str, model: Any, pass_runner: Any = run_passes) -> tuple[torch.Tensor, StepCache | None]:
    """Sample case ``name`` of ``CASES``: the latents and the step cache (None when the case has none)."""
    case = dict(CASES[name])
    threshold = case.pop("cache_threshold", 0.0)
    cache = StepCache(threshold, warmup_steps=2) if threshold else None
    latents = sample_phantom(model, **inputs(), cache=cache, pass_runner=pass_runner, **case)
    return latents, cache


def parallel_worker(rank: int, world_size: int, port: int, root: str, runs: list[tuple[str, str]]) -> None:
    """One rank of a gloo group on 127.0.0.1:``port``: for each ``(mode, case)`` of ``runs``, plan ``mode``
    (``inference.parallel.plan_layout``), sample the case and save this rank's latents and cache counters to
    ``root/<mode>-<case>-<rank>.pt``."""
    import torch.distributed as dist

    from phantom_core.inference.parallel import build_sampling, plan_layout

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        model = tiny_dit()
        for mode, name in runs:
            plan = build_sampling(plan_layout(mode, world_size, model.config.num_heads), rank)
            with plan.parallel_model(model) as split:
                latents, cache = sample_case(name, split, plan.pass_runner)
            counts = (cache.computed, cache.reused) if cache is not None else None
            torch.save({"latents": latents, "cache": counts, "layout": (plan.layout.guidance, plan.layout.sequence)},
                       Path(root) / f"{mode}-{name}-{rank}.pt")
    finally:
        dist.destroy_process_group()
