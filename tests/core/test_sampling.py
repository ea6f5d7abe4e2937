"""Sampling: flow schedule, Euler / UniPC solvers, Phantom guidance, the loop, the noise.

Oracles: upstream's published 50-step timesteps, analytic flows (Gaussian data), ComfyUI's own UniPC
(``comfy/extra_samplers/uni_pc.py``) driven with a flow noise schedule, and a recording stub model.
"""

from __future__ import annotations

import math

import pytest
import torch

from phantom_core.inference.settings import WAN_NEGATIVE_PROMPT
from phantom_core.sampling.guidance import combine_guidance, guidance_weights, phantom_guidance
from phantom_core.sampling.loop import SAMPLER_PRESETS, make_noise, sample_phantom
from phantom_core.sampling.schedule import flow_sigmas, model_timesteps, shift_sigma
from phantom_core.sampling.solvers import UniPCState, euler_step, unipc_step, x0_from_velocity

OFFICIAL_TIMESTEPS_50 = [
    999, 995, 991, 987, 982, 978, 973, 968, 963, 957, 952, 946, 940, 934, 927, 920, 913, 906, 898, 890, 882,
    873, 863, 854, 843, 833, 821, 809, 796, 783, 768, 753, 737, 720, 701, 681, 660, 636, 611, 584, 555, 522,
    487, 448, 405, 356, 302, 241, 172, 92,
]  # upstream FlowUniPCMultistepScheduler(shift=1).set_timesteps(50, shift=5.0).timesteps


class RecordingModel:
    """Stub velocity model: records every call; output depends on x, t, context and references.

    Invariant to zero padding of the context (it sums over tokens), like the Wan DiT.
    """

    def __init__(self, dtype: torch.dtype | None = None):
        self.calls: list[dict[str, torch.Tensor]] = []
        self.dtype = dtype

    def __call__(self, x, t, context, ref_latents):
        self.calls.append(dict(x=x.clone(), t=t.clone(), context=context.clone(), refs=ref_latents.clone()))
        c = context.float().sum(dim=(1, 2)).view(-1, 1, 1, 1, 1)  # (B,1,1,1,1)
        r = ref_latents.float().mean(dim=2, keepdim=True)  # (B,16,1,h,w), broadcast over frames
        s = (t.float() / 1000).view(-1, 1, 1, 1, 1)
        v = torch.tanh(x.float()) * (0.5 + 0.1 * c) + 0.3 * r + s * x.float()
        return v.to(x.dtype)


def _inputs(b=1, c=4, f=3, n=2, h=4, w=6, l1=5, l2=3, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(b, c, f, h, w, generator=g)
    refs = torch.randn(b, c, n, h, w, generator=g)
    ctx = torch.randn(b, l1, d, generator=g) * 0.2
    ctx_neg = torch.randn(b, l2, d, generator=g) * 0.2
    return noise, refs, ctx, ctx_neg


# ----------------------------------------------------------------------------------------------- schedule
def test_official_timesteps_and_sigmas():
    t = model_timesteps(50, 5.0)
    assert t.tolist() == [float(v) for v in OFFICIAL_TIMESTEPS_50]
    sigmas = flow_sigmas(50, 5.0)
    assert sigmas.dtype == torch.float32 and sigmas.shape == (51,)
    assert sigmas[-1].item() == 0.0 and bool((sigmas[1:] < sigmas[:-1]).all())
    # first sigma: shift 5 applied to float32(0.999)
    assert sigmas[0].item() == pytest.approx(5 * 0.999 / (1 + 4 * 0.999), abs=1e-7)
    torch.testing.assert_close(sigmas[:-1] * 1000, t, atol=1.0, rtol=0)  # truncation is below one step
    exact = model_timesteps(50, 5.0, truncate=False)
    assert bool(((exact - t) >= 0).all()) and bool(((exact - t) < 1).all())
    assert shift_sigma(0.5, 1.0) == 0.5 and shift_sigma(0.5, 3.0) == pytest.approx(0.75)


@pytest.mark.parametrize("solver", ["unipc", "euler"])
def test_model_sees_official_timesteps_and_schedule(solver):
    """Constant velocity c: the exact flow is x(sigma) = x(sigma_0) + (sigma - sigma_0) c, which both solvers
    reproduce exactly, so the x the model receives reveals the sigmas the solver walked through."""
    noise, refs, ctx, ctx_neg = _inputs(c=2, f=1, n=1, h=2, w=2)
    const = torch.full_like(noise, 0.7)
    calls = []

    def model(x, t, context, ref_latents):
        calls.append((x.clone(), t.clone()))
        return const.expand_as(x)

    out = sample_phantom(model, noise, refs, ctx, ctx_neg, steps=50, shift=5.0, solver=solver, w_img=1.0,
                         w_text=1.0)
    assert [c[1].item() for c in calls] == [float(v) for v in OFFICIAL_TIMESTEPS_50]
    sigmas = flow_sigmas(50, 5.0)
    seen = torch.stack([((x - noise) / const).mean() for x, _ in calls]) + sigmas[0]
    torch.testing.assert_close(seen, sigmas[:-1], atol=2e-6, rtol=0)
    torch.testing.assert_close(out, noise - sigmas[0] * const, atol=2e-6, rtol=0)


# ----------------------------------------------------------------------------------------------- guidance
def _direct_passes(model, x, t, ctx, ctx_neg, refs):
    tt = torch.full((x.shape[0],), t)
    return dict(text_img=model(x, tt, ctx, refs), img=model(x, tt, ctx_neg, refs),
                neg=model(x, tt, ctx_neg, torch.zeros_like(refs)))


@pytest.mark.parametrize("batch_passes", [True, False])
def test_three_pass_guidance_equals_eq5(batch_passes):
    noise, refs, ctx, ctx_neg = _inputs(b=2)
    ref_model, model = RecordingModel(), RecordingModel()
    v = _direct_passes(ref_model, noise, 700.0, ctx, ctx_neg, refs)
    expected = v["neg"] + 5.0 * (v["img"] - v["neg"]) + 7.5 * (v["text_img"] - v["img"])
    got = phantom_guidance(model, noise, 700.0, ctx, ctx_neg, refs, w_img=5.0, w_text=7.5,
                           batch_passes=batch_passes)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert len(model.calls) == (1 if batch_passes else 3)
    assert sum(c["x"].shape[0] for c in model.calls) == 3 * 2
    if batch_passes:  # contexts of different lengths zero-padded to the longer one
        call = model.calls[0]
        assert call["context"].shape == (6, 5, 8)
        assert bool((call["context"][2:, 3:] == 0).all())


@pytest.mark.parametrize(("w_img", "w_text", "passes"), [
    (1.0, 7.5, ["text_img", "img"]), (1.0, 1.0, ["text_img"]), (3.0, 0.0, ["img", "neg"]),
    (4.0, 4.0, ["text_img", "neg"]), (0.0, 0.0, ["neg"]),
])
@pytest.mark.parametrize("batch_passes", [True, False])
def test_skipped_passes(w_img, w_text, passes, batch_passes):
    noise, refs, ctx, ctx_neg = _inputs()
    assert list(guidance_weights(w_img, w_text)) == passes
    v = _direct_passes(RecordingModel(), noise, 500.0, ctx, ctx_neg, refs)
    expected = v["neg"] + w_img * (v["img"] - v["neg"]) + w_text * (v["text_img"] - v["img"])
    model = RecordingModel()
    got = phantom_guidance(model, noise, 500.0, ctx, ctx_neg, refs, w_img=w_img, w_text=w_text,
                           batch_passes=batch_passes)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert sum(c["x"].shape[0] for c in model.calls) == len(passes)
    assert len(model.calls) == (1 if batch_passes else len(passes))
    assert bool(torch.isfinite(combine_guidance(v, w_img, w_text)).all())


@pytest.mark.parametrize("batch_passes", [True, False])
def test_reference_tail_is_clean_at_every_call(batch_passes):
    noise, refs, ctx, ctx_neg = _inputs(b=1, l1=4, l2=4)
    model = RecordingModel()
    sample_phantom(model, noise, refs, ctx, ctx_neg, steps=4, solver="unipc", batch_passes=batch_passes)
    seen = []  # (is positive prompt, refs are clean, refs are zero) per pass
    for call in model.calls:
        for k in range(call["x"].shape[0]):
            positive = torch.equal(call["context"][k], ctx[0])
            assert positive or torch.equal(call["context"][k], ctx_neg[0])
            seen.append((positive, torch.equal(call["refs"][k], refs[0]), bool((call["refs"][k] == 0).all())))
    assert len(seen) == 3 * 4
    assert seen.count((True, True, False)) == 4  # v_text_img: prompt + clean references, every step
    assert seen.count((False, True, False)) == 4  # v_img: negative prompt + clean references
    assert seen.count((False, False, True)) == 4  # v_neg: negative prompt + zero references


class ClipRecordingModel(RecordingModel):
    """A model that also reads CLIP reference features (as the MMDiT): records them, and they move the output."""

    def __call__(self, x, t, context, ref_latents, ref_clip):
        v = super().__call__(x, t, context, ref_latents)
        self.calls[-1]["clip"] = ref_clip.clone()
        return v + 0.2 * ref_clip.float().mean(dim=(1, 2, 3)).view(-1, 1, 1, 1, 1)


@pytest.mark.parametrize("batch_passes", [True, False])
def test_clip_features_travel_with_the_references_and_are_zero_in_v_neg(batch_passes):
    noise, refs, ctx, ctx_neg = _inputs(b=1, l1=4, l2=4)
    clip = torch.randn(1, refs.shape[2], 3, 5, generator=torch.Generator().manual_seed(3))
    model = ClipRecordingModel()
    sample_phantom(model, noise, refs, ctx, ctx_neg, steps=3, solver="euler", batch_passes=batch_passes,
                   ref_clip=clip)
    seen = []  # (refs clean, clip given, refs zero, clip zero) per pass
    for call in model.calls:
        for k in range(call["x"].shape[0]):
            seen.append((torch.equal(call["refs"][k], refs[0]), torch.equal(call["clip"][k], clip[0]),
                         bool((call["refs"][k] == 0).all()), bool((call["clip"][k] == 0).all())))
    assert seen.count((True, True, False, False)) == 2 * 3  # v_text_img and v_img, every step
    assert seen.count((False, False, True, True)) == 3  # v_neg: both encodings of the references zeroed
    plain = sample_phantom(ClipRecordingModel(), noise, refs, ctx, ctx_neg, steps=3, solver="euler",
                           ref_clip=torch.zeros_like(clip))
    with_clip = sample_phantom(ClipRecordingModel(), noise, refs, ctx, ctx_neg, steps=3, solver="euler",
                               ref_clip=clip)
    assert (with_clip - plain).abs().max() > 1e-3
    with pytest.raises(ValueError, match="ref_clip must be"):
        sample_phantom(model, noise, refs, ctx, ctx_neg, steps=1, ref_clip=clip[:, :1])


def test_batched_and_unbatched_sampling_agree():
    noise, refs, ctx, ctx_neg = _inputs(b=2)
    outs = [sample_phantom(RecordingModel(), noise, refs, ctx, ctx_neg, steps=6, batch_passes=bp)
            for bp in (True, False)]
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    single = sample_phantom(RecordingModel(), noise[1:], refs[1:], ctx[1:], ctx_neg[1:], steps=6)
    torch.testing.assert_close(outs[0][1:], single, atol=1e-5, rtol=1e-5)


def test_model_dtype_cast_and_fp32_latents():
    noise, refs, ctx, ctx_neg = _inputs()
    model = RecordingModel(dtype=torch.bfloat16)
    out = sample_phantom(model, noise, refs, ctx, ctx_neg, steps=3)
    assert out.dtype == torch.float32
    for call in model.calls:
        assert call["x"].dtype == call["refs"].dtype == call["context"].dtype == torch.bfloat16
        assert call["t"].dtype == torch.float32
    ref = sample_phantom(RecordingModel(), noise, refs, ctx, ctx_neg, steps=3)
    assert (out - ref).abs().max().item() < 0.1 and not torch.equal(out, ref)


# ----------------------------------------------------------------------------------------------- solvers
MU, STD = 1.3, 0.5  # data x0 ~ N(MU, STD^2) element-wise: the exact velocity field is analytic


def _gaussian_velocity(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Exact rectified-flow velocity for Gaussian data: v = (x - E[x0 | x]) / sigma."""
    a = 1.0 - sigma
    x0_hat = MU + a * STD**2 / (a * a * STD**2 + sigma**2) * (x - a * MU)
    return (x - x0_hat) / sigma


def _gaussian_exact_x0(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Endpoint of the exact ODE from x at sigma: the flow maps N(a MU, a^2 STD^2 + sigma^2) affinely."""
    a = 1.0 - sigma
    return MU + STD * (x - a * MU) / math.sqrt(a * a * STD**2 + sigma**2)


def _solve(solver: str, x: torch.Tensor, steps: int, shift: float) -> torch.Tensor:
    sigmas = flow_sigmas(steps, shift).tolist()
    state = UniPCState()
    for i in range(steps):
        v = _gaussian_velocity(x, sigmas[i])
        if solver == "euler":
            x = euler_step(x, v, sigmas[i], sigmas[i + 1])
        else:
            x, state = unipc_step(x, x0_from_velocity(x, v, sigmas[i]), sigmas, i, state)
    return x


def _errors(solver: str, steps: list[int], shift: float) -> list[float]:
    x1 = torch.linspace(-2.5, 2.5, 11, dtype=torch.float64)
    exact = _gaussian_exact_x0(x1, flow_sigmas(1, shift)[0].item())
    return [(_solve(solver, x1, n, shift) - exact).abs().max().item() for n in steps]


def test_solvers_converge_on_gaussian_flow():
    """Doubling the steps divides UniPC's error by ~4 (second order, first-order final step) and Euler's by ~2."""
    steps = [20, 40, 80, 160]
    unipc, euler = _errors("unipc", steps, 1.0), _errors("euler", steps, 1.0)
    for k in range(1, len(steps)):
        assert unipc[k - 1] / unipc[k] > 3.0, unipc
        assert 1.7 < euler[k - 1] / euler[k] < 2.3, euler
        assert unipc[k] < euler[k] / 10, (unipc, euler)
    assert unipc[-1] < 2e-4
    # shift 5 puts most steps at high noise (slower pre-asymptotic phase); measured 40 -> 320 steps:
    # UniPC 1.4e-2 -> 7.8e-4 (18x), Euler 0.13 -> 0.017 (7.7x, first order: 8x)
    unipc, euler = _errors("unipc", [40, 320], 5.0), _errors("euler", [40, 320], 5.0)
    assert unipc[0] / unipc[1] > 12 and 6 < euler[0] / euler[1] < 10, (unipc, euler)
    assert unipc[1] < euler[1] / 10 and unipc[1] < 2e-3


def test_sample_phantom_reaches_gaussian_x0():
    noise = make_noise(3, (1, 2, 2, 3, 3), 1)
    sigma0 = flow_sigmas(50, 5.0)[0].item()
    exact = _gaussian_exact_x0(noise, sigma0)
    refs, ctx = torch.zeros(1, 2, 1, 3, 3), torch.zeros(1, 1, 4)

    def model(x, t, context, ref_latents):
        return _gaussian_velocity(x, t[0].item() / 1000)

    for solver, tol in (("unipc", 5e-3), ("euler", 0.15)):  # measured: ~1.7e-3 and ~0.11
        out = sample_phantom(model, noise, refs, ctx, ctx, steps=50, solver=solver, integer_timesteps=False)
        assert (out - exact).abs().max().item() < tol, solver


def test_unipc_matches_comfyui_unipc_bh2(comfy_import):
    """ComfyUI's UniPC (order 2, bh2, predict-x0, lower_order_final) on a flow noise schedule."""
    uni_pc = comfy_import("comfy.extra_samplers.uni_pc")

    class FlowSchedule:  # alpha = 1 - t, sigma = t for the flow, t in [0, 1]
        def marginal_log_mean_coeff(self, t):
            return torch.log(1 - t)

        def marginal_alpha(self, t):
            return 1 - t

        def marginal_std(self, t):
            return t

        def marginal_lambda(self, t):
            return torch.log(1 - t) - torch.log(t)

    def velocity(x, sigma):  # nonlinear in x and sigma
        return torch.tanh(1.5 * x) * (1 + sigma) - 0.4 * x + 0.3 * (1 - sigma) ** 2

    def eps_fn(x, t):  # eps = x + (1 - sigma) v, so that ComfyUI's x0 = (x - sigma eps) / alpha = x - sigma v
        s = t.view(-1, *([1] * (x.ndim - 1)))
        return x + (1 - s) * velocity(x, s)

    steps = 12
    sigmas = flow_sigmas(steps, 5.0).double()
    x1 = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    comfy = uni_pc.UniPC(eps_fn, FlowSchedule(), predict_x0=True, thresholding=False, variant="bh2")
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # ComfyUI builds its rho vectors with the default dtype
    try:
        oracle = comfy.sample(x1.clone(), timesteps=sigmas.clone(), method="multistep", order=2,
                              lower_order_final=True, disable_pbar=True)
    finally:
        torch.set_default_dtype(default_dtype)
    x, state = x1.clone(), UniPCState()
    for i in range(steps):
        v = velocity(x, sigmas[i].item())
        x, state = unipc_step(x, x0_from_velocity(x, v, sigmas[i].item()), sigmas.tolist(), i, state)
    torch.testing.assert_close(x, oracle, atol=1e-9, rtol=1e-9)
    no_corrector = _run_unipc_without_corrector(velocity, x1, sigmas)
    assert (no_corrector - oracle).abs().max().item() > 1e-6  # the corrector is really exercised


def _run_unipc_without_corrector(velocity, x, sigmas):
    state = UniPCState()
    for i in range(len(sigmas) - 1):
        v = velocity(x, sigmas[i].item())
        x, state = unipc_step(x, x0_from_velocity(x, v, sigmas[i].item()), sigmas.tolist(), i, state,
                              corrector=False)
    return x


# ----------------------------------------------------------------------------------------------- the loop
@pytest.mark.parametrize("solver", ["unipc", "euler"])
def test_callback_progress_and_abort(solver):
    noise, refs, ctx, ctx_neg = _inputs()
    seen = []
    out = sample_phantom(RecordingModel(), noise, refs, ctx, ctx_neg, steps=5, solver=solver,
                         callback=lambda i, n, x0: seen.append((i, n, x0.clone())))
    assert [(i, n) for i, n, _ in seen] == [(i, 5) for i in range(5)]
    torch.testing.assert_close(seen[-1][2], out)  # the last step lands on the last data prediction

    class Interrupted(Exception):
        pass

    def abort(i, n, x0):
        if i == 1:
            raise Interrupted

    model = RecordingModel()
    with pytest.raises(Interrupted):
        sample_phantom(model, noise, refs, ctx, ctx_neg, steps=5, solver=solver, callback=abort)
    assert len(model.calls) == 2


def test_input_validation_messages():
    noise, refs, ctx, ctx_neg = _inputs(h=4, w=6)
    m = RecordingModel()
    with pytest.raises(ValueError, match="steps"):
        sample_phantom(m, noise, refs, ctx, ctx_neg, steps=0)
    with pytest.raises(ValueError, match="shift"):
        sample_phantom(m, noise, refs, ctx, ctx_neg, shift=0.0)
    with pytest.raises(ValueError, match="solver"):
        sample_phantom(m, noise, refs, ctx, ctx_neg, solver="ddim")
    with pytest.raises(ValueError, match=r"8x8.*4x6"):
        sample_phantom(m, noise, torch.zeros(1, 4, 1, 8, 8), ctx, ctx_neg)
    with pytest.raises(ValueError, match="context_neg"):
        sample_phantom(m, noise, refs, ctx, torch.zeros(1, 3, 7))
    with pytest.raises(ValueError, match="batch"):
        sample_phantom(m, noise, refs, torch.zeros(3, 5, 8), ctx_neg)
    assert m.calls == []


def test_presets_and_negative_prompt():
    assert SAMPLER_PRESETS["official"] == dict(solver="unipc", steps=50, shift=5.0, w_img=5.0, w_text=7.5)
    assert SAMPLER_PRESETS["paper"] == dict(solver="euler", steps=50, shift=5.0, w_img=3.0, w_text=7.5)
    assert WAN_NEGATIVE_PROMPT.startswith("色调艳丽，过曝") and WAN_NEGATIVE_PROMPT.endswith("倒着走")
    assert "\n" not in WAN_NEGATIVE_PROMPT and len(WAN_NEGATIVE_PROMPT) > 100


# ----------------------------------------------------------------------------------------------- noise
def test_make_noise():
    a = make_noise(42, (1, 16, 3, 4, 5), 2)
    assert a.shape == (1, 16, 3, 4, 5) and a.dtype == torch.float32
    assert torch.equal(a, make_noise(42, (1, 16, 3, 4, 5), 2))
    full = torch.randn(16, 3 + 2, 4, 5, generator=torch.Generator().manual_seed(42))  # upstream's layout
    assert torch.equal(a[0], full[:, :3])
    assert not torch.allclose(a, make_noise(43, (1, 16, 3, 4, 5), 2))
    assert not torch.equal(a, make_noise(42, (1, 16, 3, 4, 5), 1))  # the draw spans video + references
    with pytest.raises(ValueError, match="seed"):
        make_noise(-1, (1, 16, 3, 4, 5), 1)
    with pytest.raises(ValueError, match="num_refs"):
        make_noise(0, (1, 16, 3, 4, 5), -1)
