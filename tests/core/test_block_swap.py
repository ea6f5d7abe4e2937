"""Block swap (phantom_core/wan/block_swap.py): a swapped model computes what the plain one does (with the step cache,
LoRA adapters, a merged LoRA and fp8 weights), its weights rest on the CPU between forwards, the blocks really travel
to the compute device ("meta" stands in for the GPU, so a block left behind shows as a device mismatch on a CPU),
at most two swapped blocks are on the device at once (measured), and bad values are named.

Tolerances: the swapped path runs the same ops on copies of the same weights, so outputs agree to 1e-6 (relative to
the output's scale); sampled latents through 6 steps with the cache and LoRA to 1e-5.
"""

from __future__ import annotations

import pytest
import torch

from phantom_core.lora.adapter import inject_lora, lora_state_dict
from phantom_core.lora.apply import apply_loras
from phantom_core.sampling.cache import StepCache
from phantom_core.sampling.loop import sample_phantom
from phantom_core.wan.block_swap import disable_block_swap, enable_block_swap, swapped_blocks
from phantom_core.wan.dit import PhantomWanDiT, WanDiTConfig
from phantom_core.wan.load import load_dit
from tests.support.memory import LiveBytes

CFG = WanDiTConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=3, text_dim=64)


@pytest.fixture(scope="module")
def sd() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = PhantomWanDiT(CFG)
    torch.nn.init.normal_(model.head.head.weight, std=0.05)  # a non-trivial velocity
    return {k: v.clone() for k, v in model.state_dict().items()}


def inputs(batch: int = 1, refs: int = 2, device: str = "cpu"):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 16, 2, 6, 8, generator=g)
    r = torch.randn(batch, 16, refs, 6, 8, generator=g)
    ctx = torch.randn(batch, 7, 64, generator=g)
    return x.to(device), torch.full((batch,), 700.0, device=device), ctx.to(device), r.to(device)


def close(a: torch.Tensor, b: torch.Tensor, rtol: float) -> bool:
    return (a - b).abs().max().item() <= rtol * b.abs().max().item()


def test_swapped_model_equals_the_plain_one_and_rests_on_the_cpu(sd) -> None:
    plain = load_dit(dict(sd))
    swapped = enable_block_swap(load_dit(dict(sd)), 2, always_copy=True)
    resting = {n: p for n, p in swapped.named_parameters()}
    seen: list[bool] = []  # inside block 2: is its q weight a copy, not the resting Parameter?
    swapped.blocks[2].self_attn.q.register_forward_pre_hook(
        lambda m, _a: seen.append(m.weight is not resting["blocks.2.self_attn.q.weight"]))
    with torch.no_grad():
        want, got = plain(*inputs()), swapped(*inputs())
    assert close(got, want, 1e-6)
    assert seen == [True]
    assert all(p is resting[n] for n, p in swapped.named_parameters()), "resting Parameters not put back"
    state = swapped.block_swap
    assert state.swapped == (1, 2) and state.fetches == 2 and state.prefetched == 2  # 1 ahead of 0, 2 ahead of 1
    assert swapped_blocks(swapped) == 2 and swapped_blocks(disable_block_swap(swapped)) == 0


def test_blocks_travel_to_the_compute_device(sd) -> None:
    """Everything but the swapped blocks on "meta", the swapped ones on the CPU: the forward runs on meta only if
    every swapped block is moved in; without block swap the same placement fails."""
    model = load_dit(dict(sd))
    enable_block_swap(model, 2, device="meta")
    assert {p.device.type for n, p in model.named_parameters() if not n.startswith(("blocks.1.", "blocks.2."))} \
        == {"meta"}
    assert {p.device.type for n, p in model.named_parameters() if n.startswith(("blocks.1.", "blocks.2."))} \
        == {"cpu"}
    with torch.no_grad():
        out = model(*inputs(device="meta"))
    assert out.shape == (1, 16, 2, 6, 8) and out.device.type == "meta"
    disable_block_swap(model)
    with pytest.raises(RuntimeError), torch.no_grad():
        model(*inputs(device="meta"))


def test_step_cache_and_lora_adapters_on_a_swapped_model_equal_the_plain_model(sd) -> None:
    def build(block_swap: int) -> PhantomWanDiT:
        model = load_dit(dict(sd))
        inject_lora(model, rank=4, alpha=4.0, generator=torch.Generator().manual_seed(2))
        g = torch.Generator().manual_seed(3)
        for name, p in model.named_parameters():
            if name.endswith("lora_up.weight"):
                p.data.normal_(0, 0.02, generator=g)
        return enable_block_swap(model, block_swap, always_copy=True)

    def sample(model: PhantomWanDiT) -> tuple[torch.Tensor, StepCache]:
        x, _, ctx, refs = inputs()
        cache = StepCache(threshold=0.3, warmup_steps=2)
        out = sample_phantom(model, x, refs, ctx, ctx[:, :3], steps=6, solver="euler", cache=cache)
        return out, cache

    (want, cache_plain), (got, cache_swapped) = sample(build(0)), sample(build(3))
    assert close(got, want, 1e-5)
    assert cache_swapped.reused == cache_plain.reused > 0, "the cache must skip the same passes (and some)"


def test_a_lora_merged_into_a_swapped_model_reaches_the_swapped_blocks(sd) -> None:
    donor = load_dit(dict(sd))
    inject_lora(donor, rank=4, alpha=4.0, generator=torch.Generator().manual_seed(4))
    for name, p in donor.named_parameters():
        if name.endswith("lora_up.weight"):
            p.data.normal_(0, 0.05, generator=torch.Generator().manual_seed(5))
    lora = lora_state_dict(donor)
    plain = apply_loras(load_dit(dict(sd)), [(lora, 1.0)])
    swapped = apply_loras(load_dit(dict(sd), block_swap=2), [(lora, 1.0)])  # merged after the swap was set up
    untouched = load_dit(dict(sd), block_swap=2)
    with torch.no_grad():
        want, got, base = plain(*inputs()), swapped(*inputs()), untouched(*inputs())
    assert close(got, want, 1e-6) and not close(base, want, 1e-3)


def test_fp8_weights_with_block_swap_equal_fp8_without(sd) -> None:
    plain = load_dit(dict(sd), dtype=torch.float8_e4m3fn)
    swapped = load_dit(dict(sd), dtype=torch.float8_e4m3fn, block_swap=3)
    assert swapped.blocks[0].ffn[0].weight.dtype == torch.float8_e4m3fn
    enable_block_swap(swapped, 3, always_copy=True)
    with torch.no_grad():
        assert close(swapped(*inputs()), plain(*inputs()), 1e-6)


def test_at_most_two_swapped_blocks_are_on_the_device_at_once(sd) -> None:
    """Measured (op outputs alive, ``tests/support/memory.LiveBytes``): the device copies add between one and two
    blocks' bytes to the peak of the plain forward, never more: the ``2 block buffers`` of the memory model."""
    block_bytes = sum(p.numel() * p.element_size() for p in PhantomWanDiT(CFG, device="meta").blocks[0].parameters())
    peaks = []
    for swap in (0, 3):
        model = enable_block_swap(load_dit(dict(sd)), swap, always_copy=True)
        with torch.no_grad(), LiveBytes() as live:
            model(*inputs(batch=1, refs=1))
        peaks.append(live.peak)
    extra = peaks[1] - peaks[0]
    assert block_bytes <= extra <= 2 * block_bytes * 1.01, (extra / block_bytes, peaks)


def test_an_interrupted_forward_leaves_the_resting_weights(sd) -> None:
    model = enable_block_swap(load_dit(dict(sd)), 2, always_copy=True)
    resting = dict(model.named_parameters())

    def fail(_m, _a):  # as ComfyUI's interrupt (an Exception) or an out-of-memory error inside the block
        raise RuntimeError("interrupted")

    handle = model.blocks[2].ffn.register_forward_pre_hook(fail)
    with pytest.raises(RuntimeError, match="interrupted"), torch.no_grad():
        model(*inputs())
    handle.remove()
    assert all(p is resting[n] for n, p in model.named_parameters())
    with torch.no_grad():
        assert close(model(*inputs()), load_dit(dict(sd))(*inputs()), 1e-6)


def test_autograd_is_refused(sd) -> None:
    model = load_dit(dict(sd), block_swap=1)
    with pytest.raises(RuntimeError, match="block swap is for inference"):
        model(*inputs())


@pytest.mark.parametrize("bad", [-1, 4, 1.5, True, "2"])
def test_bad_block_swap_is_named_with_the_valid_range(sd, bad) -> None:
    with pytest.raises(ValueError, match=r"block_swap is .*from 0 \(off\) to 3"):
        load_dit(dict(sd), block_swap=bad)
    with pytest.raises(ValueError, match=r"block_swap is .*from 0 \(off\) to 3"):
        enable_block_swap(load_dit(dict(sd)), bad)


def test_block_swap_with_trainable_is_refused(sd) -> None:
    with pytest.raises(ValueError, match="block_swap is 1 with trainable=True"):
        load_dit(dict(sd), block_swap=1, trainable=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the side stream, events and pinned memory")
def test_on_cuda_prefetch_matches_and_the_swapped_blocks_rest_pinned(sd) -> None:
    plain = load_dit(dict(sd), device="cuda")
    swapped = load_dit(dict(sd), device="cuda", block_swap=2)
    assert all(p.is_pinned() for p in swapped.blocks[2].parameters())
    with torch.no_grad():
        for _ in range(2):  # a second forward reuses the stream and the freed copies
            assert close(swapped(*inputs(device="cuda")), plain(*inputs(device="cuda")), 1e-5)
    assert swapped.block_swap.prefetched == 4
