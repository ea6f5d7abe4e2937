"""Guidance- and sequence-parallel sampling on the CPU (gloo, 2 to 4 processes spawned with torch.multiprocessing)
against one process: the latents agree to 1e-5 (absolute, plus 1e-5 relative: latents reach 4; observed at most
7e-6 for guidance-parallel, whose passes run in smaller batches than one process's batch of three, and 0 for
sequence-parallel), and every rank of a run holds the same latents, bit for bit (they all combine the same gathered
velocities, so the step cache decides alike on every rank: a divergence would deadlock or differ)."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from phantom_core.inference.parallel import ParallelLayout, plan_layout
from phantom_core.sampling.guidance_parallel import GuidanceParallel, assign_passes
from phantom_core.wan.ulysses import check_sequence_size, sequence_parallel
from tests.support.parallel import CASES, parallel_worker, sample_case, tiny_dit
from tools.comfy_launcher import free_port

pytestmark = pytest.mark.usefixtures("single_thread")
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def single() -> dict[str, tuple[torch.Tensor, tuple[int, int] | None]]:
    """Each case sampled by one process: latents and (computed, reused) cache counters."""
    model, out = tiny_dit(), {}
    for name in CASES:
        latents, cache = sample_case(name, model)
        out[name] = latents, (cache.computed, cache.reused) if cache is not None else None
    return out


def run_ranks(tmp_path, world_size: int, runs: list[tuple[str, str]]) -> dict[tuple[str, str], list[dict]]:
    """Spawn ``world_size`` ranks sampling each ``(mode, case)``; returns what each rank saved, in rank order."""
    mp.spawn(parallel_worker, args=(world_size, free_port(), str(tmp_path), runs), nprocs=world_size, join=True)
    return {(mode, name): [torch.load(tmp_path / f"{mode}-{name}-{r}.pt") for r in range(world_size)]
            for mode, name in runs}


def check_run(saved: list[dict], single: tuple[torch.Tensor, tuple[int, int] | None], layout: tuple[int, int]) -> None:
    reference, counts = single
    for rank in saved:
        assert rank["layout"] == layout
        assert torch.equal(rank["latents"], saved[0]["latents"])  # every rank holds the same latents
        assert rank["cache"] == counts  # the same passes computed and reused as one process
    torch.testing.assert_close(saved[0]["latents"], reference, rtol=TOLERANCE, atol=TOLERANCE)


def test_two_ranks_guidance_and_sequence_parallel_sample_like_one_process(tmp_path, single):
    assert single["cache_window"][1][1] > 0  # the cache did reuse passes, so the case tests something
    runs = [("guidance", "plain"), ("guidance", "cache_window"), ("sequence", "plain"), ("sequence", "cache_window")]
    saved = run_ranks(tmp_path, 2, runs)
    for mode, name in runs:
        check_run(saved[mode, name], single[name], (2, 1) if mode == "guidance" else (1, 2))


def test_three_ranks_guidance_parallel_samples_like_one_process(tmp_path, single):
    runs = [("guidance", "plain"), ("guidance", "cache_window")]
    saved = run_ranks(tmp_path, 3, runs)
    for mode, name in runs:
        check_run(saved[mode, name], single[name], (3, 1))


def test_four_ranks_guidance_times_sequence_sample_like_one_process(tmp_path, single):
    runs = [("guidance,sequence", "cache_window")]
    saved = run_ranks(tmp_path, 4, runs)
    check_run(saved["guidance,sequence", "cache_window"], single["cache_window"], (2, 2))


def test_passes_are_shared_round_robin():
    three = ["text_img", "img", "neg"]
    assert assign_passes(three, 2) == [["text_img", "neg"], ["img"]]
    assert assign_passes(three, 3) == [["text_img"], ["img"], ["neg"]]
    assert assign_passes(["text_img", "img"], 3) == [["text_img"], ["img"], []]
    with pytest.raises(ValueError, match="1 to 3 guidance groups"):
        GuidanceParallel(0, 4)


def test_layouts_and_their_errors():
    assert plan_layout("auto", 2, 12) == ParallelLayout(guidance=2)
    assert plan_layout("auto", 3, 12) == ParallelLayout(guidance=3)
    assert plan_layout("auto", 6, 12) == ParallelLayout(3, 2)
    assert plan_layout("auto", 8, 40) == ParallelLayout(2, 4)
    assert plan_layout("auto", 5, 40) == ParallelLayout(sequence=5)
    assert plan_layout("sequence", 4, 12) == ParallelLayout(sequence=4)
    assert plan_layout("guidance,sequence", 4, 2) == ParallelLayout(2, 2)
    assert ParallelLayout(3, 2).position(5) == (2, 1)
    with pytest.raises(ValueError, match=r"world size 5 does not divide the DiT's 12 attention heads.*1, 2, 3, 4, 6, 12"):
        plan_layout("sequence", 5, 12)
    with pytest.raises(ValueError, match="WORLD_SIZE is 4: use --parallel guidance,sequence or sequence"):
        plan_layout("guidance", 4, 12)
    with pytest.raises(ValueError, match=r"WORLD_SIZE 5 is not 2 or 3 guidance groups.*valid world sizes: 4, 6, 8"):
        plan_layout("guidance,sequence", 5, 12)
    with pytest.raises(ValueError, match="needs several processes"):
        plan_layout("guidance", 1, 12)
    with pytest.raises(ValueError, match="valid sizes: 1, 2, 4, 5, 8, 10, 20, 40"):
        check_sequence_size(3, 40)


def test_sequence_parallel_takes_only_the_wan_dit():
    with pytest.raises(ValueError, match=r"\(PhantomWanDiT\); got Linear"):
        with sequence_parallel(torch.nn.Linear(2, 2)):
            pass
