"""The velocity-model contract shared by the Phantom-Wan DiT and the paper's MMDiT, one suite for both networks.

``model(x [B,16,F,h,w], t [B] in [0, 1000], context [B,L,text_dim], ref_latents [B,16,N,h,w]) -> v`` like x, plus
the seams (docs/DESIGN.md): meta build + ``init_weights``, ``run_blocks``, gradient checkpointing, the fp32 time
path, ``trainable`` loading, adapters on the blocks' Linears, and sampling through ``sample_phantom``. Tiny
configs, 16x16 latents (8x8 tokens), CPU; every float comparison states its tolerance.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from phantom_core.mmdit.config import MMDIT_PRESETS
from phantom_core.mmdit.load import load_any_dit, load_mmdit
from phantom_core.mmdit.model import PhantomMMDiT
from phantom_core.sampling.loop import make_noise, sample_phantom
from phantom_core.wan.dit import DIT_PRESETS, PhantomWanDiT
from phantom_core.wan.load import load_dit
from tests.support.networks import save_safetensors
from tests.support.weights import random_state_dict


@dataclass(frozen=True)
class Network:
    """How the suite builds, loads and inspects one network."""

    name: str
    build: Callable[..., nn.Module]  # (device=..., ...) -> model of the tiny config
    load: Callable[..., nn.Module]  # the network's own loader
    time_layer: str  # the first Linear of the fp32 time path
    block_linears: str  # a name fragment of the Linears inside the blocks (where LoRA goes)

    @property
    def text_dim(self) -> int:
        return self.build(device="meta").config.text_dim


NETWORKS = [
    Network("phantom-wan", lambda **kw: PhantomWanDiT(DIT_PRESETS["tiny"], **kw), load_dit, "time_embedding.0",
            "blocks."),
    Network("mmdit", lambda **kw: PhantomMMDiT(MMDIT_PRESETS["tiny"], **kw), load_mmdit, "t_embedder.mlp.0",
            "joint_blocks."),
]


@pytest.fixture(scope="module", params=NETWORKS, ids=lambda n: n.name)
def net(request) -> Network:
    return request.param


@pytest.fixture(scope="module")
def sd(net: Network) -> dict[str, Tensor]:
    return random_state_dict(net.build(device="meta"), seed=3)


def loaded(net: Network, sd: dict[str, Tensor], **kw) -> nn.Module:
    return net.load({k: v.clone() for k, v in sd.items()}, **kw)


def inputs(net: Network, batch: int = 1, refs: int = 1, size: tuple[int, int, int] = (2, 16, 16), length: int = 7,
           seed: int = 1) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 16, *size, generator=g)
    ctx = torch.randn(batch, length, net.text_dim, generator=g)
    ref = torch.randn(batch, 16, refs, *size[1:], generator=g) if refs else None
    return x, torch.linspace(900.0, 300.0, batch), ctx, ref


def rel_err(a: Tensor, b: Tensor) -> float:
    """max |a - b| / max |b| (b not all zero)."""
    scale = b.detach().float().abs().max().item()
    assert scale > 0
    return (a.detach().float() - b.detach().float()).abs().max().item() / scale


# ------------------------------------------------------------------------------------------ the forward


@pytest.mark.parametrize(("size", "refs"), [((2, 16, 16), 0), ((1, 16, 16), 1), ((3, 10, 14), 2), ((2, 9, 13), 4)],
                         ids=str)
@torch.no_grad()
def test_velocity_has_the_shape_and_dtype_of_x(net, sd, size, refs):
    model = loaded(net, sd)
    x, t, ctx, ref = inputs(net, refs=refs, size=size)
    v = model(x, t, ctx, ref)
    assert v.shape == x.shape and v.dtype == x.dtype and torch.isfinite(v).all()
    assert v.abs().max() > 1e-3  # random weights: a real output, not the zero-init one


@torch.no_grad()
def test_deterministic_and_batch_consistent(net, sd):
    """Same call twice: identical (same code path). Each sample of a batch of 2 against it alone: <= 1e-5 rel."""
    model = loaded(net, sd)
    x, t, ctx, ref = inputs(net, batch=2, refs=2)
    a, b = model(x, t, ctx, ref), model(x, t, ctx, ref)
    assert torch.equal(a, b)
    for i in range(2):
        alone = model(x[i:i + 1], t[i:i + 1], ctx[i:i + 1], ref[i:i + 1])
        assert rel_err(a[i:i + 1], alone) < 1e-5


@torch.no_grad()
def test_zero_references_equal_none_and_references_matter(net, sd):
    model = loaded(net, sd)
    x, t, ctx, ref = inputs(net, refs=2)
    none = model(x, t, ctx, None)
    assert rel_err(model(x, t, ctx, ref[:, :, :0]), none) < 1e-6
    assert rel_err(model(x, t, ctx, ref), none) > 1e-3


@torch.no_grad()
def test_invariant_to_zero_padding_of_the_context(net, sd):
    """The guidance pads the shorter prompt when it batches passes: the model must not see the padding (<= 1e-5)."""
    model = loaded(net, sd)
    x, t, ctx, ref = inputs(net, refs=1, length=5)
    padded = torch.nn.functional.pad(ctx, (0, 0, 0, 9))
    assert rel_err(model(x, t, padded, ref), model(x, t, ctx, ref)) < 1e-5


@torch.no_grad()
def test_state_dict_round_trip_through_a_file(net, sd, tmp_path: Path):
    """Saved as safetensors, recognised by its keys (``load_any_dit``) and loaded: same keys, same output (1e-5: the
    memory-mapped tensors may take other kernels)."""
    model = loaded(net, sd)
    path = save_safetensors(model.state_dict(), tmp_path / f"{net.name}.safetensors")
    again = load_any_dit(path)
    assert type(again) is type(model) and again.config == model.config
    assert again.state_dict().keys() == model.state_dict().keys()
    args = inputs(net, refs=2)
    assert rel_err(again(*args), model(*args)) < 1e-5


def test_bad_inputs_are_named(net, sd):
    model = loaded(net, sd)
    x, t, ctx, ref = inputs(net, refs=1)
    with pytest.raises(ValueError, match="x has shape"):
        model(x[:, :8], t, ctx, ref)
    with pytest.raises(ValueError, match="context has shape"):
        model(x, t, ctx[..., :3], ref)
    with pytest.raises(ValueError, match="ref_latents has shape"):
        model(x, t, ctx, ref[..., :8])


# ------------------------------------------------------------------------------------------ the seams


def test_init_weights_after_a_meta_build_gives_zero_velocity(net):
    a = net.build(device="meta").to_empty(device="cpu")
    a.init_weights(generator=torch.Generator().manual_seed(0))
    b = net.build(device="meta").to_empty(device="cpu")
    b.init_weights(generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())  # same seed, same path
    assert all(torch.isfinite(v.float()).all() for v in a.state_dict().values())
    with torch.no_grad():
        v = a(*inputs(net, refs=1))
    assert v.abs().max() == 0  # zero-initialised output layer: the first velocity is 0


def test_gradient_checkpointing_gives_the_same_gradients(net, sd):
    """Every parameter's gradient: max abs diff <= 1e-5 x its max abs value."""
    model = net.build()
    model.load_state_dict(sd)
    args = inputs(net, batch=2, refs=1, size=(1, 16, 16))

    def grads() -> dict[str, Tensor]:
        model.zero_grad(set_to_none=True)
        model(*args).square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    ckpt = grads() if model.enable_gradient_checkpointing() is model else None
    assert model.gradient_checkpointing and plain.keys() == ckpt.keys()
    assert plain[f"{net.time_layer}.weight"].abs().max() > 0  # gradients reach the fp32 time path
    for name, g in plain.items():
        assert (ckpt[name] - g).abs().max() <= 1e-5 * max(g.abs().max().item(), 1e-12), name


@torch.no_grad()
def test_run_blocks_seam(net, sd):
    """A wrapper that calls the original is transparent (1e-6); one returning its input skips every block."""
    model = loaded(net, sd)
    args = inputs(net, refs=2)
    base = model(*args)
    original, seen = model.run_blocks, []

    def wrapper(tokens, *rest):
        seen.append(tokens.shape)
        return original(tokens, *rest)

    model.run_blocks = wrapper
    assert rel_err(model(*args), base) < 1e-6 and len(seen) == 1
    model.run_blocks = lambda tokens, *rest: tokens
    skipped = model(*args)
    no_blocks = copy.deepcopy(model)
    del no_blocks.run_blocks
    setattr(no_blocks, "joint_blocks" if net.name == "mmdit" else "blocks", nn.ModuleList())
    assert rel_err(skipped, no_blocks(*args)) < 1e-6
    del model.run_blocks
    assert rel_err(model(*args), base) < 1e-6


@torch.no_grad()
def test_time_path_runs_in_fp32_through_the_layers_own_call(net, sd):
    model = loaded(net, sd, dtype=torch.bfloat16)
    seen = []
    handle = model.get_submodule(net.time_layer).register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    model(*inputs(net, refs=1))
    handle.remove()
    assert seen == [torch.float32]


class ZeroAdapter(nn.Module):
    """LoRA-shaped: ``base(x) + up(down(x))`` with ``up`` zero-initialised."""

    def __init__(self, base: nn.Linear, rank: int = 2) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.down = nn.Linear(base.in_features, rank, bias=False)
        self.up = nn.Linear(rank, base.out_features, bias=False)
        nn.init.zeros_(self.up.weight)

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.up(self.down(x))


def test_adapters_on_the_block_linears_and_trainable_loading(net, sd):
    """Zero-initialised adapters on every Linear of the blocks leave the output as it was (1e-6) and train; a
    ``trainable=True`` load has gradients on every parameter."""
    model = loaded(net, sd)
    args = inputs(net, refs=1)
    base = model(*args).detach()
    names = [n for n, m in model.named_modules() if n.startswith(net.block_linears) and isinstance(m, nn.Linear)]
    assert len(names) >= 8
    for name in names:
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, ZeroAdapter(model.get_submodule(name)))
    assert rel_err(model(*args), base) < 1e-6
    model(*args).square().mean().backward()
    ups = [m.up.weight.grad for m in model.modules() if isinstance(m, ZeroAdapter)]
    assert all(g is not None for g in ups) and max(g.abs().max().item() for g in ups) > 0
    trainable = loaded(net, sd, trainable=True)
    assert trainable.training and all(p.requires_grad for p in trainable.parameters())
    with pytest.raises(ValueError, match="trainable=True needs float weights"):
        loaded(net, sd, dtype=torch.float8_e4m3fn, trainable=True)


# ------------------------------------------------------------------------------------------ sampling


def test_sampling_through_sample_phantom(net, sd):
    """Two Euler steps of the three-pass guidance: finite, shaped like the noise; batched passes equal one call
    per pass (<= 1e-4 rel)."""
    model = loaded(net, sd)
    _, _, ctx, ref = inputs(net, refs=2)
    ctx_neg = inputs(net, length=3, seed=5)[2]
    noise = make_noise(7, (1, 16, 1, 16, 16), num_refs=2)
    run = lambda batched: sample_phantom(model, noise, ref, ctx, ctx_neg, steps=2, solver="euler",  # noqa: E731
                                         batch_passes=batched)
    batched, single = run(True), run(False)
    assert batched.shape == noise.shape and torch.isfinite(batched).all()
    assert rel_err(batched, single) < 1e-4
