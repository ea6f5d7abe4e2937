"""The DiT loader node's ``block_swap`` (nodes/loaders.add_block_swap) under ComfyUI's real ModelPatcher, in process on
the CPU: each time ComfyUI loads the model (a LoRA patch applied by ComfyUI included), the last N blocks are swapped
and the patched weights are what the swapped blocks compute with; a bad value is named with the model's range."""

from __future__ import annotations

import pytest
import torch

from phantom_core.wan.dit import DIT_PRESETS, PhantomWanDiT
from phantom_core.wan.load import load_dit


@pytest.fixture(scope="module")
def loaders(comfy_import):
    comfy_import("comfy.model_patcher")
    import nodes.loaders  # noqa: PLC0415  (needs ComfyUI on the path)

    return nodes.loaders


def tiny_dit() -> PhantomWanDiT:
    torch.manual_seed(0)
    model = PhantomWanDiT(DIT_PRESETS["tiny"])
    torch.nn.init.normal_(model.head.head.weight, std=0.05)
    return load_dit(model.state_dict())


def run(model: PhantomWanDiT) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        return model(torch.randn(1, 16, 2, 4, 6, generator=g), torch.tensor([600.0]), torch.randn(1, 5, 64, generator=g),
                     torch.randn(1, 16, 1, 4, 6, generator=g))


def test_swapped_on_every_load_with_comfyui_patches(loaders) -> None:
    from nodes.types import core, manage  # noqa: PLC0415

    patcher = manage(tiny_dit(), torch.device("cpu"), torch.device("cpu"))
    loaders.add_block_swap(patcher, 1)
    patched = patcher.clone()  # as Phantom Load LoRA does; the callback travels with the clone
    delta = torch.randn(256, 256, generator=torch.Generator().manual_seed(2)) * 0.05
    patched.add_patches({"inner.blocks.1.self_attn.q.weight": ("diff", (delta,))}, 1.0)
    want = tiny_dit()
    with torch.no_grad():
        want.blocks[1].self_attn.q.weight += delta
    patched.patch_model(torch.device("cpu"))
    dit = core(patched)
    assert dit.block_swap is not None and dit.block_swap.swapped == (1,)
    got = run(dit)
    assert (got - run(want)).abs().max() <= 1e-6 * run(want).abs().max()
    patched.unpatch_model(torch.device("cpu"))


@pytest.mark.parametrize("bad", [-1, 3, 1.5])
def test_bad_block_swap_is_named(loaders, bad) -> None:
    from nodes.types import manage  # noqa: PLC0415

    with pytest.raises(ValueError, match=rf"block_swap is {bad}; expected an integer from 0 \(off\) to 2"):
        loaders.add_block_swap(manage(tiny_dit(), torch.device("cpu"), torch.device("cpu")), bad)
