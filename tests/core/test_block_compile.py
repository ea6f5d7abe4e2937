"""Regional torch.compile (phantom_core/wan/block_compile.py) on both networks, on the CPU with tracing back-ends
(``aot_eager`` / ``eager`` and a counting custom back-end: no C++ compiler needed, seconds per test).

Off by default; compiled blocks give the plain model's output within 1e-5 of its largest magnitude, and keep doing so
through what wraps or changes the blocks: a step-cached sampling run (with the text-context reuse scope), LoRA
adapters injected after compilation, weights changed in place (a merged LoRA), gradient checkpointing (gradients
within 1e-5), and a change of attention back-end. Dynamo's caches are reset before each test, so each test sees
its own compilations.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch._dynamo
from torch import Tensor, nn

from phantom_core.__main__ import build_parser
from phantom_core.lora.adapter import DEFAULT_TARGETS, inject_lora
from phantom_core.mmdit.config import MMDIT_PRESETS
from phantom_core.mmdit.model import MMDIT_LORA_TARGETS, PhantomMMDiT
from phantom_core.sampling.cache import StepCache
from phantom_core.sampling.loop import sample_phantom
from phantom_core.wan.attention import ATTENTION_BACKENDS, use_attention
from phantom_core.wan.block_compile import (
    blocks_compiled,
    compile_blocks,
    set_compiled,
    transformer_blocks,
    uncompile_blocks,
)
from phantom_core.wan.dit import DIT_PRESETS, PhantomWanDiT
from phantom_core.wan.load import load_dit
from tests.support.weights import random_state_dict

NETWORKS = {"phantom-wan": (lambda: PhantomWanDiT(DIT_PRESETS["tiny"]), DEFAULT_TARGETS),
            "mmdit": (lambda: PhantomMMDiT(MMDIT_PRESETS["tiny"]), MMDIT_LORA_TARGETS)}
TOL = 1e-5


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(params=list(NETWORKS))
def name(request) -> str:
    return request.param


def build(name: str) -> nn.Module:
    model = NETWORKS[name][0]()
    model.load_state_dict(random_state_dict(model, seed=3))
    return model.eval()


def inputs(model: nn.Module, batch: int = 1) -> tuple[Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 16, 2, 16, 16, generator=g)
    ctx = torch.randn(batch, 7, model.config.text_dim, generator=g)
    return x, torch.full((batch,), 700.0), ctx, torch.randn(batch, 16, 1, 16, 16, generator=g)


def rel_err(a: Tensor, b: Tensor) -> float:
    scale = b.detach().float().abs().max().item()
    assert scale > 0
    return (a.detach().float() - b.detach().float()).abs().max().item() / scale


class CountingBackend:
    """A ``torch.compile`` back-end that records each graph it is given and runs it as traced (eager kernels)."""

    def __init__(self) -> None:
        self.graphs: list[torch.fx.GraphModule] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs) -> object:
        self.graphs.append(gm)
        return gm.forward


def test_off_by_default():
    model = load_dit(random_state_dict(PhantomWanDiT(DIT_PRESETS["tiny"], device="meta")))
    assert not blocks_compiled(model)
    assert not blocks_compiled(PhantomMMDiT(MMDIT_PRESETS["tiny"], device="meta"))
    args = build_parser().parse_args(["generate", "--prompt", "p", "--ref", "r", "--out", "o.mp4"])
    assert args.compiled is None  # neither --compile nor --no-compile: the sidecar's choice, else off


@torch.no_grad()
def test_compiled_blocks_equal_the_plain_model(name):
    plain = build(name)
    backend = "aot_eager" if name == "phantom-wan" else "eager"  # aot_eager traces the MMDiT's windows for ~8 s
    compiled = compile_blocks(copy.deepcopy(plain), backend=backend)
    assert blocks_compiled(compiled) and not blocks_compiled(plain)
    assert set(compiled.state_dict()) == set(plain.state_dict())  # in place: no "_orig_mod." in the keys
    for batch in (1, 3):  # the sampler's batch of guidance passes changes size
        assert rel_err(compiled(*inputs(plain, batch)), plain(*inputs(plain, batch))) < TOL


@torch.no_grad()
def test_blocks_of_one_shape_share_a_graph_and_uncompile_restores_eager():
    model = build("phantom-wan")
    backend = CountingBackend()
    compile_blocks(model, backend=backend)
    reference = model(*inputs(model))
    assert len(backend.graphs) == 1 < len(transformer_blocks(model))  # traced once, reused by every block
    assert rel_err(model(*inputs(model)), reference) < TOL and len(backend.graphs) == 1  # no recompilation
    uncompile_blocks(model)
    assert not blocks_compiled(model)
    model(*inputs(model, batch=2))  # a new shape: would compile if the blocks still were
    assert len(backend.graphs) == 1
    assert set_compiled(model, True, backend=backend) is model and blocks_compiled(model)
    set_compiled(model, True, backend="eager")  # already compiled: kept as it is
    model(*inputs(model, batch=2))
    assert len(backend.graphs) == 2  # compiled again, for the new shape, by the counting back-end
    assert not blocks_compiled(set_compiled(model, False))


@torch.no_grad()
def test_step_cached_sampling_on_compiled_blocks(name):
    """sample_phantom opens the text-context reuse scope and the step cache reuses passes: same latents."""
    plain = build(name)
    compiled = compile_blocks(copy.deepcopy(plain), backend="eager")
    x, _, ctx, refs = inputs(plain)
    ctx_neg = ctx[:, :5].flip(1)
    runs = []
    for model in (plain, compiled):
        cache = StepCache(threshold=1.0, warmup_steps=2)  # reuses 3 of 30 (Wan), 18 of 30 passes
        runs.append(sample_phantom(model, x, refs, ctx, ctx_neg, steps=10, cache=cache))
        assert cache.reused > 0
    assert rel_err(runs[1], runs[0]) < TOL


@torch.no_grad()
def test_lora_adapters_and_in_place_weights_after_compilation(name):
    plain = build(name)
    compiled = compile_blocks(copy.deepcopy(plain), backend="eager")
    before = compiled(*inputs(plain))  # compiled with plain Linears
    targets = NETWORKS[name][1]
    for model in (plain, compiled):
        inject_lora(model, rank=4, alpha=4.0, targets=targets, generator=torch.Generator().manual_seed(0))
        for key, p in model.named_parameters():
            if key.endswith("lora_up.weight"):
                p.copy_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(key))))
    adapted = compiled(*inputs(plain))
    assert rel_err(adapted, before) > 1e-3  # the adapters took effect (recompiled, not the stale graph)
    assert rel_err(adapted, plain(*inputs(plain))) < TOL
    for model in (plain, compiled):  # a merged LoRA or ComfyUI's weight patch: weights changed in place
        for p in transformer_blocks(model)[0].parameters():
            p.mul_(1.1)
    assert rel_err(compiled(*inputs(plain)), plain(*inputs(plain))) < TOL


def test_gradient_checkpointing_through_compiled_blocks(name):
    plain = build(name)
    compiled = compile_blocks(copy.deepcopy(plain), backend="aot_eager" if name == "phantom-wan" else "eager")
    grads = []
    for model in (plain, compiled):
        model.train().requires_grad_(True).enable_gradient_checkpointing()
        model(*inputs(plain)).square().mean().backward()
        grads.append({k: p.grad for k, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any(k.startswith(("blocks.", "joint_")) for k in grads[0])
    flat = [torch.cat([g[k].flatten() for k in sorted(g)]) for g in grads]
    assert rel_err(flat[1], flat[0]) < TOL


@torch.no_grad()
def test_attention_backend_change_reaches_compiled_blocks(name, monkeypatch):
    model = compile_blocks(build(name), backend="eager")
    calls = []

    def math_kernel(q, k, v):
        calls.append(q.shape)
        return reference(q, k, v)

    reference = ATTENTION_BACKENDS["math"].kernel
    monkeypatch.setitem(ATTENTION_BACKENDS, "math", dataclasses.replace(ATTENTION_BACKENDS["math"], kernel=math_kernel))
    with use_attention("sdpa"):
        sdpa = model(*inputs(model))
    assert calls == []
    with use_attention("math"):  # guarded: the blocks recompile with the other back-end
        math = model(*inputs(model))
    assert calls and rel_err(math, sdpa) < TOL


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="Linear has no transformer block list"):
        compile_blocks(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="compile backend: got 'fast'; registered back-ends: .*inductor"):
        compile_blocks(build("phantom-wan"), backend="fast")
