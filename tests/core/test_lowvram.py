"""The DiT under ComfyUI's partial (low-VRAM) loading, and the float32 time path.

ComfyUI's ModelPatcher moves only some modules to the load device when a model does not fit; modules that
own parameters *and* have submodules (our blocks' and head's ``modulation``) stay on the offload device. The
forward must still run. The "meta" device stands in for the GPU, so the device mismatch shows on a CPU.
"""

from __future__ import annotations

import torch
from torch import nn

from phantom_core.loading.fp8 import fp8_ops, quantize_fp8
from phantom_core.wan.dit import DIT_PRESETS, PhantomWanDiT, run_fp32


def test_dit_runs_when_comfyui_loads_it_partially(comfy_import) -> None:
    ops = comfy_import("comfy.ops")
    patcher_mod = comfy_import("comfy.model_patcher")
    model = PhantomWanDiT(DIT_PRESETS["tiny"], ops=ops.disable_weight_init).eval().requires_grad_(False)
    patcher = patcher_mod.ModelPatcher(model, load_device=torch.device("meta"), offload_device=torch.device("cpu"))
    patcher.partially_load(torch.device("meta"), extra_memory=patcher.model_size() // 2)
    assert patcher.model.model_lowvram, "the model was loaded fully: the test needs a partial load"
    left = sorted(n for n, p in model.named_parameters() if p.device.type == "cpu" and "modulation" in n)
    assert left, "no modulation stayed on the offload device: the test no longer exercises the partial load"
    x = torch.randn(1, 16, 2, 4, 6, device="meta")
    out = model(x, torch.tensor([500.0], device="meta"), torch.randn(1, 5, 64, device="meta"),
                torch.randn(1, 16, 2, 4, 6, device="meta"))
    assert out.shape == x.shape and out.device.type == "meta"


def test_run_fp32_computes_in_float32_with_the_scale() -> None:
    """The time path's layers compute in float32 whatever their stored dtype (bf16; scaled fp8 with its scale)."""
    gen = torch.Generator().manual_seed(0)
    layer = nn.Linear(64, 32).to(torch.bfloat16)
    x = torch.randn(3, 64, generator=gen)
    exact = torch.nn.functional.linear(x.double(), layer.weight.double(), layer.bias.double())
    ours = run_fp32(layer, x)
    assert ours.dtype == torch.float32
    assert (ours.double() - exact).abs().max() < 1e-4
    in_bf16 = layer(x.bfloat16()).double()  # what running the time MLP in the weight dtype would give
    assert (in_bf16 - exact).abs().max() > 10 * (ours.double() - exact).abs().max()
    q, scale = quantize_fp8(layer.weight.float())
    fp8 = fp8_ops(torch.bfloat16).Linear(64, 32)  # the cast layer a scaled-fp8 DiT is built from
    fp8.weight = nn.Parameter(q, requires_grad=False)
    fp8.bias = nn.Parameter(layer.bias.float(), requires_grad=False)
    fp8.register_buffer("scale_weight", scale)
    dequant = torch.nn.functional.linear(x, q.float() * scale, layer.bias.float())
    assert torch.allclose(run_fp32(fp8, x), dequant, atol=1e-6)


def test_mmdit_runs_when_comfyui_loads_it_partially(comfy_import) -> None:
    """The MMDiT built from ComfyUI's layers, half loaded on the "meta" stand-in GPU: every weight is in a ComfyUI
    layer that casts it to the input's device, so the forward (windows, references, CLIP tokens) runs."""
    from phantom_core.mmdit.config import MMDIT_PRESETS
    from phantom_core.mmdit.model import PhantomMMDiT

    ops = comfy_import("comfy.ops")
    patcher_mod = comfy_import("comfy.model_patcher")
    model = PhantomMMDiT(MMDIT_PRESETS["tiny"], ops=ops.disable_weight_init).eval().requires_grad_(False)
    patcher = patcher_mod.ModelPatcher(model, load_device=torch.device("meta"), offload_device=torch.device("cpu"))
    patcher.partially_load(torch.device("meta"), extra_memory=patcher.model_size() // 2)
    assert patcher.model.model_lowvram, "the model was loaded fully: the test needs a partial load"
    assert any(p.device.type == "cpu" for p in model.parameters()), "nothing stayed on the offload device"
    x = torch.randn(1, 16, 3, 16, 16, device="meta")
    out = model(x, torch.tensor([500.0], device="meta"), torch.randn(1, 5, 64, device="meta"),
                torch.randn(1, 16, 2, 16, 16, device="meta"), torch.randn(1, 2, 17, 128, device="meta"))
    assert out.shape == x.shape and out.device.type == "meta"
