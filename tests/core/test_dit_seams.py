"""The DiT's seams for training and caching: the float32 time path through each layer's own call (hooks and
adapters apply), gradient checkpointing, the block-loop seam a step cache wraps, ``init_weights`` after a meta
build, and ``load_dit(trainable=True)``. Tiny config, 16x16 latents, CPU; tolerances are stated per test."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from phantom_core.loading.fp8 import CastLinear, fp8_ops, quantize_fp8, quantize_state_dict
from phantom_core.wan.dit import PhantomWanDiT, WanDiTConfig, run_fp32
from phantom_core.wan.load import load_dit
from tests.support.weights import random_dit_state_dict
from tests.support.weights import reference_linear_fp32 as linear_fp32

CFG = WanDiTConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=2, text_dim=64)
E4M3 = torch.float8_e4m3fn


def inputs(batch: int = 1, seed: int = 1, t: float = 700.0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Video latents (B, 16, 2, 16, 16), timesteps (B,), text (B, 7, text_dim), one reference (B, 16, 1, 16, 16)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 16, 2, 16, 16, generator=g)
    ctx = torch.randn(batch, 7, CFG.text_dim, generator=g)
    refs = torch.randn(batch, 16, 1, 16, 16, generator=g)
    return x, torch.full((batch,), t), ctx, refs


def assert_close_rel(a: Tensor, b: Tensor, rel: float) -> None:
    """max |a - b| <= rel * max |b| (and b not all zero)."""
    scale = b.detach().abs().max().item()
    assert scale > 0
    err = (a.detach().float() - b.detach().float()).abs().max().item()
    assert err <= rel * scale, f"max abs diff {err:.3g} > {rel:g} x max abs {scale:.3g}"


def max_rel_diff(a: Tensor, b: Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.fixture(scope="module")
def sd() -> dict[str, Tensor]:
    return random_dit_state_dict(CFG)


def loaded(sd: dict[str, Tensor], dtype: torch.dtype) -> PhantomWanDiT:
    """fp32 / bf16 plain layers, or fp8 Linear weights in ``fp8.CastLinear`` (scaled, computing in fp32 on a CPU)."""
    return load_dit({k: v.clone() for k, v in sd.items()}, dtype=dtype)


WEIGHT_DTYPES = [torch.float32, torch.bfloat16, E4M3]


# ------------------------------------------------------------------------------------ 1. fp32 time path


class LowRankAdapter(nn.Module):
    """A LoRA-style wrapper: ``base(x) + up(down(x))``, ``up`` zero-initialised (no change until trained)."""

    def __init__(self, base: nn.Module, rank: int = 4) -> None:
        super().__init__()
        self.base = base
        self.down = nn.Linear(base.in_features, rank, bias=False)
        self.up = nn.Linear(rank, base.out_features, bias=False)
        nn.init.zeros_(self.up.weight)

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.up(self.down(x))


def scaled_fp8_linear(compute_dtype: torch.dtype, seed: int = 0) -> CastLinear:
    g = torch.Generator().manual_seed(seed)
    layer = fp8_ops(compute_dtype).Linear(64, 32)
    q, scale = quantize_fp8(torch.randn(32, 64, generator=g) * 0.1)
    layer.weight = nn.Parameter(q, requires_grad=False)
    layer.bias = nn.Parameter(torch.randn(32, generator=g).to(compute_dtype), requires_grad=False)
    layer.scale_weight = scale
    return layer


@pytest.mark.parametrize("kind", ["bf16-linear", "fp16-linear", "scaled-fp8-cast-bf16", "fp8-cast-fp32"])
def test_run_fp32_is_float32_whatever_the_weight_dtype(kind: str) -> None:
    """Against ``linear_fp32`` (the layer's maths read off its tensors in float32): max abs diff <= 1e-6 relative."""
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(5))
    if kind.endswith("-linear"):
        layer = nn.Linear(64, 32).to(torch.bfloat16 if kind.startswith("bf16") else torch.float16)
    else:
        layer = scaled_fp8_linear(torch.bfloat16 if kind.endswith("bf16") else torch.float32)
        if kind.startswith("fp8-"):
            layer.scale_weight = None
    stored = layer.weight.dtype
    out = run_fp32(layer, x.bfloat16())
    assert out.dtype == torch.float32 and out.shape == (3, 32)
    assert_close_rel(out, linear_fp32(layer, x.bfloat16()), 1e-6)
    assert layer.weight.dtype == stored != torch.float32  # the stored weight is left as it was


def test_cast_linear_still_computes_in_its_compute_dtype_for_other_inputs() -> None:
    layer = scaled_fp8_linear(torch.bfloat16)
    x = torch.randn(3, 64).bfloat16()
    assert layer(x).dtype == torch.bfloat16
    assert layer(x.float()).dtype == torch.float32  # the fp32 time path relies on this
    assert max_rel_diff(layer(x), linear_fp32(layer, x)) < 2e-2  # bf16 rounding, not another function


def test_run_fp32_honours_an_adapter_around_a_bf16_linear() -> None:
    base = nn.Linear(64, 32).to(torch.bfloat16)
    adapter = LowRankAdapter(base)
    x = torch.randn(3, 64)
    assert_close_rel(run_fp32(adapter, x), linear_fp32(base, x), 1e-6)  # zero delta: the base layer
    with torch.no_grad():
        adapter.up.weight.normal_()
    delta = x @ adapter.down.weight.T @ adapter.up.weight.T
    assert_close_rel(run_fp32(adapter, x), linear_fp32(base, x) + delta, 1e-6)
    assert adapter.up.weight.dtype == torch.float32 and base.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", WEIGHT_DTYPES, ids=str)
@torch.no_grad()
def test_forward_hook_on_time_embedding_changes_the_output(sd, dtype) -> None:
    model = loaded(sd, dtype)
    args = inputs()
    base = model(*args)
    seen: list[torch.dtype] = []

    def hook(module: nn.Module, inp: tuple[Tensor, ...], out: Tensor) -> Tensor:
        seen.append(out.dtype)
        return out * 1.5

    handle = model.time_embedding[0].register_forward_hook(hook)
    hooked = model(*args)
    handle.remove()
    assert seen == [torch.float32]  # the hook ran, inside the fp32 time path
    assert max_rel_diff(hooked, base) > 1e-3
    assert_close_rel(model(*args), base, 1e-6)  # removed: back to the plain path


@pytest.mark.parametrize("where", [("time_projection", 1), ("time_embedding", 0)], ids=str)
@pytest.mark.parametrize("dtype", WEIGHT_DTYPES, ids=str)
@torch.no_grad()
def test_adapter_replacing_a_time_layer_is_honoured(sd, dtype, where) -> None:
    model = loaded(sd, dtype)
    args = inputs()
    base, compute_dtype = model(*args), model.compute_dtype
    seq, i = getattr(model, where[0]), where[1]
    seq[i] = adapter = LowRankAdapter(seq[i])
    assert model.compute_dtype == compute_dtype  # unchanged by a wrapper without .weight
    assert_close_rel(model(*args), base, 1e-5)  # zero-init delta: the same model
    adapter.up.weight.normal_(0, 0.1)
    assert max_rel_diff(model(*args), base) > 1e-3


def test_adapter_on_time_projection_trains_through_the_fp32_path(sd) -> None:
    model = loaded(sd, torch.bfloat16).requires_grad_(False)
    adapter = LowRankAdapter(model.time_projection[1])
    model.time_projection[1] = adapter
    with torch.no_grad():
        adapter.up.weight.normal_(0, 0.01)  # so that down gets a gradient too
    model(*inputs()).float().square().mean().backward()
    for p in (adapter.down.weight, adapter.up.weight):
        assert p.grad is not None and p.grad.dtype == torch.float32 and p.grad.abs().max() > 0
    assert adapter.base.weight.grad is None  # frozen base


def test_inference_mode_matches_no_grad(sd) -> None:
    """ComfyUI samples under ``torch.inference_mode``; the swapped fp32 copies must work there too."""
    model = loaded(sd, torch.bfloat16)
    args = inputs()
    with torch.no_grad():
        ref = model(*args)
    with torch.inference_mode():
        out = model(*args)
    assert_close_rel(out, ref, 1e-6)


# ------------------------------------------------------------------------------ 2. gradient checkpointing


def grads(model: PhantomWanDiT, args) -> dict[str, Tensor]:
    model.zero_grad(set_to_none=True)
    out = model(*args)
    target = torch.randn(out.shape, generator=torch.Generator().manual_seed(9))
    (out - target).square().mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_gradient_checkpointing_gives_the_same_gradients(sd) -> None:
    """Every parameter's gradient: max abs diff <= 1e-6 x that gradient's max abs value."""
    model = PhantomWanDiT(CFG)
    model.load_state_dict(sd)
    assert model.gradient_checkpointing is False
    calls = []
    block_forward = model.blocks[0].forward  # counted in forward itself: checkpoint's recompute skips module hooks

    def counting(*args: Tensor) -> Tensor:
        calls.append(1)
        return block_forward(*args)

    model.blocks[0].forward = counting
    args = inputs(batch=2)
    plain = grads(model, args)
    assert len(calls) == 1
    assert model.enable_gradient_checkpointing() is model and model.gradient_checkpointing is True
    ckpt = grads(model, args)
    assert len(calls) == 3  # forward, then recomputed in the backward pass
    assert plain.keys() == ckpt.keys() and len(plain) == len(list(model.parameters()))
    for name, g in plain.items():
        if g.abs().max() > 0:
            assert_close_rel(ckpt[name], g, 1e-6)
        else:
            assert ckpt[name].abs().max() == 0, name
    assert plain["time_embedding.0.weight"].abs().max() > 0  # gradients reach the fp32 time path
    with torch.no_grad():
        model(*args)
    assert len(calls) == 4  # no recomputation without autograd
    model.enable_gradient_checkpointing(False)
    assert model.gradient_checkpointing is False


# ---------------------------------------------------------------------------------- 3. block-loop seam


class ResidualCache:
    """A toy TeaCache: reuses the residual of all blocks while ``e0`` moved by less than ``threshold``
    (relative L1) since the last computed step."""

    def __init__(self, run_blocks, threshold: float) -> None:
        self.run_blocks, self.threshold, self.hits = run_blocks, threshold, 0
        self.e0: Tensor | None = None
        self.residual: Tensor | None = None

    def __call__(self, tokens: Tensor, e0: Tensor, cos: Tensor, sin: Tensor, ctx: Tensor) -> Tensor:
        if self.e0 is not None and ((e0 - self.e0).abs().mean() / self.e0.abs().mean()) < self.threshold:
            self.hits += 1
            return tokens + self.residual
        out = self.run_blocks(tokens, e0, cos, sin, ctx)
        self.e0, self.residual = e0, out - tokens
        return out


@torch.no_grad()
def test_run_blocks_wrapper_sees_the_inputs_and_keeps_the_output(sd) -> None:
    model = loaded(sd, torch.float32)
    args = inputs(batch=2)
    base = model(*args)
    calls = []
    original = model.run_blocks

    def recording(tokens, e0, cos, sin, ctx):
        calls.append((tuple(tokens.shape), tuple(e0.shape), e0.dtype, tuple(cos.shape), tuple(ctx.shape)))
        return original(tokens, e0, cos, sin, ctx)

    model.run_blocks = recording
    assert_close_rel(model(*args), base, 1e-6)
    L = (2 + 1) * 8 * 8  # (video frames + references) x (16 / 2) x (16 / 2) tokens
    assert calls == [((2, L, CFG.dim), (2, 6, CFG.dim), torch.float32, (L, 1, CFG.head_dim // 2),
                      (2, CFG.text_len, CFG.dim))]
    del model.run_blocks  # back to the method
    assert_close_rel(model(*args), base, 1e-6)


@torch.no_grad()
def test_run_blocks_returning_its_input_skips_every_block(sd) -> None:
    model = loaded(sd, torch.float32)
    args = inputs()
    no_blocks = copy.deepcopy(model)
    no_blocks.blocks = nn.ModuleList()
    model.run_blocks = lambda tokens, e0, cos, sin, ctx: tokens
    skipped = model(*args)
    assert_close_rel(skipped, no_blocks(*args), 1e-6)
    del model.run_blocks
    assert max_rel_diff(model(*args), skipped) > 1e-2


@torch.no_grad()
def test_a_residual_cache_around_run_blocks(sd) -> None:
    model = loaded(sd, torch.float32)
    x, _, ctx, refs = inputs()

    def step(t: float) -> Tensor:
        return model(x, torch.tensor([t]), ctx, refs)

    exact = {t: step(t) for t in (700.0, 300.0)}
    model.run_blocks = cache = ResidualCache(model.run_blocks, threshold=0.05)
    assert_close_rel(step(700.0), exact[700.0], 1e-6)
    assert cache.hits == 0
    assert_close_rel(step(700.0), exact[700.0], 1e-6)  # same e0: blocks skipped, their residual reused
    assert cache.hits == 1
    assert_close_rel(step(300.0), exact[300.0], 1e-6)  # e0 moved: computed again
    assert cache.hits == 1


# ------------------------------------------------------------------------------------ 4. init_weights


def initialised(seed: int) -> PhantomWanDiT:
    model = PhantomWanDiT(CFG, device="meta").to_empty(device="cpu")
    model.init_weights(generator=torch.Generator().manual_seed(seed))
    return model


def test_init_weights_after_a_meta_build() -> None:
    model = initialised(0)
    sd = model.state_dict()
    assert all(v.device.type == "cpu" and torch.isfinite(v).all() for v in sd.values())
    assert sd["head.head.weight"].abs().max() == 0 and sd["head.head.bias"].abs().max() == 0
    with torch.no_grad():
        out = model(*inputs())
    assert out.shape == inputs()[0].shape and out.abs().max() == 0  # zero head: the first velocity is 0

    def std_close(key: str, want: float) -> None:
        got = sd[key].std().item()
        assert abs(got - want) < 0.1 * want, f"{key}: std {got:.4g}, expected {want:.4g} +- 10 %"

    D = CFG.dim
    std_close("blocks.0.self_attn.q.weight", (2 / (D + D)) ** 0.5)  # Xavier-uniform
    std_close("blocks.1.ffn.0.weight", (2 / (D + CFG.ffn_dim)) ** 0.5)
    std_close("time_projection.1.weight", (2 / (D + 6 * D)) ** 0.5)
    std_close("patch_embedding.weight", (2 / (D + CFG.in_dim * 4)) ** 0.5)  # on the (D, C * 1 * 2 * 2) view
    std_close("text_embedding.0.weight", 0.02)
    std_close("time_embedding.2.weight", 0.02)
    std_close("blocks.0.modulation", D**-0.5)
    std_close("head.modulation", D**-0.5)
    assert sd["patch_embedding.bias"].abs().max() <= (CFG.in_dim * 4) ** -0.5
    for key, v in sd.items():
        if key.endswith(".bias") and key != "patch_embedding.bias":
            assert v.abs().max() == 0, key
        if "norm" in key and key.endswith(".weight"):
            assert torch.all(v == 1.0), key  # RMSNorm / LayerNorm weights one


def test_init_weights_is_deterministic_under_a_seed() -> None:
    a, b, c = initialised(0).state_dict(), initialised(0).state_dict(), initialised(1).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # same seed, same code path
    assert not torch.equal(a["blocks.0.self_attn.q.weight"], c["blocks.0.self_attn.q.weight"])
    torch.manual_seed(4)
    d = PhantomWanDiT(CFG, device="meta").to_empty(device="cpu")
    d.init_weights()
    torch.manual_seed(4)
    e = PhantomWanDiT(CFG, device="meta").to_empty(device="cpu")
    e.init_weights()
    assert all(torch.equal(v, e.state_dict()[k]) for k, v in d.state_dict().items())


def test_init_weights_refuses_meta_and_fp8(sd) -> None:
    with pytest.raises(ValueError, match="meta device.*to_empty"):
        PhantomWanDiT(CFG, device="meta").init_weights()
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        loaded(sd, E4M3).init_weights()


# -------------------------------------------------------------------------------- 5. load_dit(trainable)


def test_load_dit_is_frozen_by_default_and_trainable_on_request(sd) -> None:
    frozen = loaded(sd, torch.float32)
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
    for dtype in (torch.float32, torch.bfloat16):
        model = load_dit({k: v.clone() for k, v in sd.items()}, dtype=dtype, trainable=True)
        assert model.training and all(p.requires_grad and p.dtype == dtype for p in model.parameters())
        model(*inputs()).float().square().mean().backward()
        for name in ("time_embedding.0.weight", "blocks.0.self_attn.q.weight", "head.head.weight"):
            grad = model.get_parameter(name).grad
            assert grad is not None and grad.dtype == dtype and grad.abs().max() > 0, name


def test_load_dit_trainable_refuses_fp8_weights(sd) -> None:
    with pytest.raises(ValueError, match=r"trainable=True.*float8_e4m3fn.*dtype=torch\.float32"):
        load_dit(dict(sd), dtype=E4M3, trainable=True)
    linears = [k for k in sd if k.endswith(".weight") and sd[k].ndim == 2]
    q = quantize_state_dict(sd, linears, E4M3)
    with pytest.raises(ValueError, match=r"float8_e4m3fn \(dtype=None keeps the checkpoint's own\)"):
        load_dit(dict(q), dtype=None, trainable=True)
    model = load_dit(dict(q), dtype=torch.float32, trainable=True)  # dequantized at load: trainable
    assert model.training and all(p.requires_grad and p.dtype == torch.float32 for p in model.parameters())
