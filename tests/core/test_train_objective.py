"""The training objective (paper Sec. 3.3, Eq. 3-4): x_t, the velocity target, timestep sampling, condition
dropout, a loss on the video frames only, and a loss that goes down when a tiny model overfits one batch."""

from __future__ import annotations

import math

import pytest
import torch

from phantom_core.sampling.schedule import shift_sigma
from phantom_core.training.config import TrainConfig
from phantom_core.training.loop import train
from phantom_core.training.objective import (
    TimestepSampling,
    draw_sample,
    drop_conditions,
    flow_matching_loss,
    noisy_latents,
    temporal_mse,
    velocity_target,
    video_mse,
)
from tests.support.training import micro_dit, random_latents

pytestmark = pytest.mark.usefixtures("single_thread")


def test_x_t_interpolates_data_and_noise_and_the_target_is_its_time_derivative():
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 16, 2, 4, 4, generator=gen), torch.randn(2, 16, 2, 4, 4, generator=gen)
    torch.testing.assert_close(noisy_latents(x0, eps, torch.zeros(2)), x0)
    torch.testing.assert_close(noisy_latents(x0, eps, torch.ones(2)), eps)
    s, h = torch.tensor([0.3, 0.7], dtype=torch.float64), 1e-6
    x0d, epsd = x0.double(), eps.double()
    derivative = (noisy_latents(x0d, epsd, s + h) - noisy_latents(x0d, epsd, s)) / h
    torch.testing.assert_close(derivative, velocity_target(x0d, epsd), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("how", ["uniform", "logit_normal", "shifted"])
def test_timestep_sampling_by_name_has_the_named_distribution(how):
    sampling = TimestepSampling(how, shift=3.0, logit_mean=0.0, logit_std=1.0)
    gen = torch.Generator().manual_seed(1)
    t = torch.tensor([sampling.draw(gen) for _ in range(4000)], dtype=torch.float64)
    assert float(t.min()) >= 0.0 and float(t.max()) <= 1.0
    # reference quantiles, each computed from the definition (tolerance: ~4 sigma of a 4000-sample quantile)
    median = {"uniform": 0.5, "logit_normal": 0.5, "shifted": float(shift_sigma(0.5, 3.0))}[how]
    assert abs(float(t.median()) - median) < 0.035
    if how == "logit_normal":  # P(t < sigmoid(1)) = Phi(1)
        assert abs(float((t < 1 / (1 + math.exp(-1))).double().mean()) - 0.8413) < 0.03
    if how == "shifted":  # the sampler's shift function of a uniform draw: same generator stream
        g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
        u = float(torch.rand((), generator=g2, dtype=torch.float64))
        assert sampling.draw(g1) == pytest.approx(float(shift_sigma(u, 3.0)), abs=1e-12)


def test_unknown_timestep_sampling_is_refused_by_name():
    with pytest.raises(ValueError, match="timestep sampling is 'cosine'"):
        TimestepSampling("cosine").draw(torch.Generator())
    with pytest.raises(ValueError, match="timesteps is 'cosine'; valid: uniform | logit_normal | shifted"):
        TrainConfig(timesteps="cosine")


def test_draws_depend_only_on_seed_micro_step_and_position():
    sampling = TimestepSampling("uniform")
    a = draw_sample(7, 3, 1, (16, 2, 4, 4), sampling)
    b = draw_sample(7, 3, 1, (16, 2, 4, 4), sampling)
    assert (a.sigma, a.drop_u) == (b.sigma, b.drop_u) and torch.equal(a.noise, b.noise)  # same draw, same stream
    others = [draw_sample(7, 3, 2, (16, 2, 4, 4), sampling), draw_sample(7, 4, 1, (16, 2, 4, 4), sampling),
              draw_sample(8, 3, 1, (16, 2, 4, 4), sampling)]
    assert all(o.sigma != a.sigma and not torch.equal(o.noise, a.noise) for o in others)


def test_condition_dropout_is_nested_so_eq5s_three_passes_are_trained():
    gen = torch.Generator().manual_seed(2)
    context, refs = torch.randn(4, 5, 8, generator=gen), torch.randn(4, 16, 2, 4, 4, generator=gen)
    dropped = torch.randn(3, 8, generator=gen)
    u = torch.tensor([0.05, 0.15, 0.5, 0.99], dtype=torch.float64)
    ctx, r = drop_conditions(context, refs, dropped, u, text_dropout=0.2, reference_dropout=0.1)
    assert ctx.shape == (4, 5, 8)
    for i in (0, 1):  # text dropped: the dropped prompt's context, zero-padded
        torch.testing.assert_close(ctx[i, :3], dropped, rtol=0, atol=0)
        assert not ctx[i, 3:].any()
    for i in (2, 3):
        torch.testing.assert_close(ctx[i], context[i], rtol=0, atol=0)
    assert not r[0].any()  # references dropped only with the text (the v_neg pass's input)
    for i in (1, 2, 3):
        torch.testing.assert_close(r[i], refs[i], rtol=0, atol=0)


def test_the_reference_tail_carries_no_loss():
    """A target carrying the reference tail (upstream's layout) loses nothing from it: perturbing the tail of the
    target changes the loss not at all, perturbing a video frame changes it."""
    gen = torch.Generator().manual_seed(3)
    prediction = torch.randn(2, 16, 3, 4, 4, generator=gen)  # the DiT's output: video frames only
    target = torch.randn(2, 16, 3 + 2, 4, 4, generator=gen)  # video frames, then 2 reference frames
    base = video_mse(prediction, target)
    tail = target.clone()
    tail[:, :, 3:] += 100.0
    assert float(video_mse(prediction, tail)) == float(base)  # the same slice of the same tensors: exact
    frame = target.clone()
    frame[:, :, 2] += 3.0  # one of 3 frames moved by 3: the MSE grows by ~9 / 3 (up to the cross term)
    assert float(video_mse(prediction, frame)) > float(base) + 1.5


def test_the_model_sees_the_references_clean_and_the_loss_covers_the_video_frames():
    model = micro_dit()
    seen = {}
    model.register_forward_pre_hook(lambda m, args: seen.update(x=args[0], refs=args[3]))
    gen = torch.Generator().manual_seed(4)
    x0, refs = torch.randn(1, 16, 2, 4, 4, generator=gen), torch.randn(1, 16, 2, 4, 4, generator=gen)
    context, noise = torch.randn(1, 3, 32, generator=gen), torch.randn(1, 16, 2, 4, 4, generator=gen)
    sigma = torch.tensor([0.6])
    refs_in = refs.clone().requires_grad_(True)
    loss = flow_matching_loss(model, x0, refs_in, context, sigma, noise)
    assert torch.equal(seen["refs"], refs_in)  # the very tensor: never noised
    assert seen["x"].shape == x0.shape  # only the video is noised, and only the video has a velocity
    with torch.no_grad():
        v = model(noisy_latents(x0, noise, sigma), sigma * 1000, context, refs)
    torch.testing.assert_close(loss, torch.mean((v - (noise - x0)) ** 2), rtol=1e-6, atol=1e-7)
    loss.backward()
    assert refs_in.grad is not None and refs_in.grad.abs().sum() > 0  # the references condition the video


def test_loss_decreases_when_overfitting_one_tiny_batch():
    """One fixed batch (latents, references, context, noise, timesteps): AdamW on the flow-matching loss must fit
    it (the loss falls to a fifth within 40 steps)."""
    model = micro_dit(seed=6).train()
    gen = torch.Generator().manual_seed(6)
    x0, refs = torch.randn(2, 16, 2, 4, 4, generator=gen), torch.randn(2, 16, 1, 4, 4, generator=gen)
    context, noise = torch.randn(2, 4, 32, generator=gen), torch.randn(2, 16, 2, 4, 4, generator=gen)
    sigma = torch.tensor([0.3, 0.8])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = flow_matching_loss(model, x0, refs, context, sigma, noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.2 * losses[0], losses[::5]


def test_a_training_run_records_every_step(tmp_path):
    data = random_latents(3, seed=5)
    config = TrainConfig(out=str(tmp_path / "m.safetensors"), mode="full", steps=3, checkpoint_every=3,
                         gradient_checkpointing=True, seed=1)
    result = train(config, dataset=data, model=micro_dit())
    assert len(result.losses) == 3 and all(math.isfinite(v) and v > 0 for v in result.losses)
    assert result.out.is_file() and (result.run_dir / "loss.png").is_file()


def test_bf16_autocast_leaves_the_time_path_in_float32():
    """Training autocasts to bf16 on CUDA; the DiT's time MLP (run_fp32) must stay float32 under it (CPU autocast
    stands in for CUDA's: a plain Linear under it computes in bf16)."""
    from phantom_core.wan.dit import run_fp32

    gen = torch.Generator().manual_seed(7)
    layer = torch.nn.Linear(64, 32)
    x = torch.randn(3, 64, generator=gen)
    exact = torch.nn.functional.linear(x.double(), layer.weight.double(), layer.bias.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, plain = run_fp32(layer, x), layer(x)
    assert ours.dtype == torch.float32 and plain.dtype == torch.bfloat16
    assert (ours.double() - exact).abs().max() < 1e-5 < (plain.double() - exact).abs().max()


def test_cpu_bf16_training_keeps_float32_weights_and_follows_the_fp32_run(tmp_path):
    """precision = "bf16" on the CPU autocasts the forward to bf16 (the recipe's speed-up where the CPU has
    AVX512-BF16): the saved weights stay float32 and its losses follow the fp32 run of the same seed within bf16
    rounding (a relative 5e-2 per step over 3 steps)."""
    from safetensors.torch import load_file

    losses = {}
    for precision in ("fp32", "bf16"):
        config = TrainConfig(out=str(tmp_path / f"{precision}.safetensors"), mode="full", steps=3,
                             checkpoint_every=3, gradient_checkpointing=False, seed=2, precision=precision,
                             run_dir=str(tmp_path / precision))
        result = train(config, dataset=random_latents(3, seed=4), model=micro_dit(seed=3))
        losses[precision] = result.losses
        assert {v.dtype for v in load_file(str(result.out)).values()} == {torch.float32}
    for a, b in zip(losses["fp32"], losses["bf16"]):
        assert abs(a - b) <= 5e-2 * abs(a), losses


def test_training_works_after_sampling_under_inference_mode():
    """ComfyUI samples under torch.inference_mode; tables the DiT caches there (RoPE) must not break a later
    training step of the same shape (inference tensors cannot be saved for backward)."""
    model = micro_dit(seed=8)
    gen = torch.Generator().manual_seed(8)
    x0, refs = torch.randn(1, 16, 2, 6, 6, generator=gen), torch.randn(1, 16, 1, 6, 6, generator=gen)
    context, noise = torch.randn(1, 3, 32, generator=gen), torch.randn(1, 16, 2, 6, 6, generator=gen)
    with torch.inference_mode():
        model(x0, torch.tensor([500.0]), context, refs)
    model.enable_gradient_checkpointing()
    flow_matching_loss(model, x0, refs, context, torch.tensor([0.5]), noise).backward()
    assert model.blocks[0].self_attn.q.weight.grad is not None


def test_the_temporal_term_is_the_clean_estimates_frame_to_frame_error_and_ignores_a_static_error():
    """``temporal_mse`` against its definition: ``x0_hat = x_t - sigma v`` (Eq. 3-4), the MSE of the difference
    between consecutive latent frames of ``x0_hat - x0``; an error that is the same in every frame costs nothing,
    one that moves between frames does; a reference tail in the target is cut; one frame gives 0."""
    gen = torch.Generator().manual_seed(8)
    x0, noise = torch.randn(2, 16, 4, 3, 3, generator=gen), torch.randn(2, 16, 4, 3, 3, generator=gen)
    sigma = torch.tensor([0.9, 0.4])
    x_t, target = noisy_latents(x0, noise, sigma), velocity_target(x0, noise)
    prediction = target + 0.3 * torch.randn(target.shape, generator=gen)
    x0_hat = x_t - sigma.view(-1, 1, 1, 1, 1) * prediction
    by_definition = torch.mean((x0_hat[:, :, 1:] - x0_hat[:, :, :-1] - (x0[:, :, 1:] - x0[:, :, :-1])) ** 2)
    torch.testing.assert_close(temporal_mse(prediction, target, sigma), by_definition, rtol=1e-5, atol=1e-7)
    tail = torch.cat([target, 50 * torch.ones(2, 16, 2, 3, 3)], dim=2)  # the reference tail, upstream's layout
    torch.testing.assert_close(temporal_mse(prediction, tail, sigma), by_definition, rtol=1e-5, atol=1e-7)
    static = target + torch.randn(2, 16, 1, 3, 3, generator=gen)  # the same error in every frame
    assert float(temporal_mse(static, target, sigma)) < 1e-10
    assert float(video_mse(static, target)) > 0.5  # while the plain MSE sees it
    assert float(temporal_mse(prediction[:, :, :1], target[:, :, :1], sigma)) == 0.0


def test_the_temporal_weight_adds_its_term_to_the_loss_and_is_validated():
    model = micro_dit(seed=2)
    gen = torch.Generator().manual_seed(9)
    x0, refs = torch.randn(2, 16, 3, 4, 4, generator=gen), torch.randn(2, 16, 1, 4, 4, generator=gen)
    context, noise = torch.randn(2, 3, 32, generator=gen), torch.randn(2, 16, 3, 4, 4, generator=gen)
    sigma = torch.tensor([0.7, 0.95])
    with torch.no_grad():
        v = model(noisy_latents(x0, noise, sigma), sigma * 1000, context, refs)
        plain = flow_matching_loss(model, x0, refs, context, sigma, noise)
        weighted = flow_matching_loss(model, x0, refs, context, sigma, noise, temporal_weight=2.5)
    target = velocity_target(x0, noise)
    torch.testing.assert_close(weighted, video_mse(v, target) + 2.5 * temporal_mse(v, target, sigma), rtol=1e-5,
                               atol=1e-7)
    assert float(weighted) > float(plain) * 1.01
    assert TrainConfig(temporal_weight=1.0).temporal_weight == 1.0
    with pytest.raises(ValueError, match="temporal_weight"):
        TrainConfig(temporal_weight=-1.0)
