"""The guidance passes of a step batched into one forward or run one at a time (``sampling.loop``,
``batch_passes`` auto / on / off): the same latents to within fp32 rounding, the automatic choice from the memory
model, and the fall-back to one pass at a time after a CUDA out-of-memory error. Tiny DiT, CPU."""

from __future__ import annotations

import pytest
import torch

import phantom_core.wan.memory as memory
from phantom_core.sampling.loop import check_batch_passes, sample_phantom
from phantom_core.wan.dit import WanDiTConfig
from phantom_core.wan.load import load_dit
from tests.support.weights import random_dit_state_dict

CFG = WanDiTConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=2, text_dim=64)


class CountingModel:
    """Wraps the DiT: records each call's batch size; optionally raises CUDA's out-of-memory error on batches > 1."""

    def __init__(self, dit, oom_above: int | None = None) -> None:
        self.dit, self.oom_above, self.batches = dit, oom_above, []
        self.config, self.compute_dtype = dit.config, dit.compute_dtype

    def __call__(self, x, t, context, ref_latents):
        self.batches.append(x.shape[0])
        if self.oom_above is not None and x.shape[0] > self.oom_above:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (test)")
        return self.dit(x, t, context, ref_latents)


@pytest.fixture(scope="module")
def dit():
    return load_dit(random_dit_state_dict(CFG, seed=5), dtype=torch.float32)


def inputs():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(1, 16, 2, 16, 16, generator=g), torch.randn(1, 16, 1, 16, 16, generator=g),
            torch.randn(1, 6, CFG.text_dim, generator=g), torch.randn(1, 4, CFG.text_dim, generator=g))


def run(model, batch_passes):
    return sample_phantom(model, *inputs(), steps=3, solver="euler", w_img=5.0, w_text=7.5, batch_passes=batch_passes)


def test_batched_and_one_at_a_time_agree_and_auto_batches_on_the_cpu(dit):
    outs, calls = {}, {}
    for mode in ("on", "off", "auto", True, False):
        model = CountingModel(dit)
        outs[mode], calls[mode] = run(model, mode), model.batches
    assert calls["on"] == calls[True] == calls["auto"] == [3, 3, 3]  # off CUDA, auto batches
    assert calls["off"] == calls[False] == [1] * 9
    scale = outs["off"].abs().max().item()
    assert (outs["on"] - outs["off"]).abs().max().item() <= 1e-5 * scale  # fp32 rounding of a batched GEMM


def test_auto_runs_one_at_a_time_when_the_batch_does_not_fit(dit, monkeypatch):
    seen = {}

    def no_room(model, video_shape, num_refs, passes, device, headroom=0.9, clip_tokens=0):
        seen.update(shape=video_shape, refs=num_refs, passes=passes, clip_tokens=clip_tokens)
        return False

    monkeypatch.setattr(memory, "batched_passes_fit", no_room)
    model = CountingModel(dit)
    run(model, "auto")
    assert model.batches == [1] * 9 and seen == {"shape": (1, 16, 2, 16, 16), "refs": 1, "passes": 3, "clip_tokens": 0}
    model = CountingModel(dit)
    run(model, "on")  # an explicit choice is not second-guessed
    assert model.batches == [3, 3, 3]


def test_auto_falls_back_after_an_out_of_memory_error(dit):
    reference = run(CountingModel(dit), "off")
    model = CountingModel(dit, oom_above=1)
    out = run(model, "auto")
    assert model.batches == [3] + [1] * 9  # the failed batch, then one at a time to the end
    assert torch.allclose(out, reference, rtol=0, atol=1e-6 * reference.abs().max().item())
    with pytest.raises(torch.cuda.OutOfMemoryError):
        run(CountingModel(dit, oom_above=1), "on")


def test_the_memory_model_decides_only_on_cuda(dit):
    assert memory.batched_passes_fit(dit, (1, 16, 21, 60, 104), 4, 3, torch.device("cpu"))


def test_bad_values_are_refused_by_name():
    assert check_batch_passes("auto") == "auto" and check_batch_passes("on") is True
    for bad in ("yes", "", None, 3):
        with pytest.raises(ValueError, match="batch_passes is .*valid: auto, on, off"):
            check_batch_passes(bad)
