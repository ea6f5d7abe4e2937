"""The VAE trainer (phantom_core/training/vae.py): its objective's parts, the exact latent calibration, the
training init, resume, and the world's VAE batches (phantom_core/world/default_model.py)."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from phantom_core.training.vae import (
    VAETrainConfig,
    calibrate_latents,
    init_for_training,
    posterior,
    prior_kl,
    train_vae,
)
from phantom_core.wan.latents import WAN21_LATENT_MEAN, WAN21_LATENT_STD, normalize_latents
from phantom_core.wan.vae import VAE_PRESETS, WanVAE
from phantom_core.wan.vae_blocks import ResidualBlock
from phantom_core.world.default_model import WORLD
from phantom_core.world.vae_batches import VAEData, subject_clip_batches, vae_batches


def small_vae(seed: int = 0) -> WanVAE:
    torch.manual_seed(seed)
    return WanVAE(replace(VAE_PRESETS["tiny"], dim=4))


def test_prior_kl_is_zero_at_the_normalisation_and_positive_elsewhere() -> None:
    m = torch.tensor(WAN21_LATENT_MEAN).view(1, 16, 1, 1, 1).expand(2, 16, 1, 3, 3)
    logvar = (2 * torch.log(torch.tensor(WAN21_LATENT_STD))).view(1, 16, 1, 1, 1).expand(2, 16, 1, 3, 3)
    assert abs(float(prior_kl(m, logvar))) < 1e-6
    # N(m + std, std^2) against N(m, std^2): KL = 1/2 per element
    s = torch.tensor(WAN21_LATENT_STD).view(1, 16, 1, 1, 1)
    assert math.isclose(float(prior_kl(m + s, logvar)), 0.5, rel_tol=1e-5)


def test_posterior_mean_is_what_encode_raw_returns() -> None:
    vae = small_vae()
    x = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    mean, logvar = posterior(vae, x)
    torch.testing.assert_close(mean, vae.encode_raw(x), atol=1e-5, rtol=1e-5)
    assert logvar.shape == mean.shape == (1, 16, 2, 2, 2)


def test_calibration_normalises_the_latents_and_keeps_every_decoded_pixel() -> None:
    vae = small_vae().eval()
    clips = [torch.rand(2, 3, 5, 16, 16) * 2 - 1, torch.rand(3, 3, 1, 16, 16) * 2 - 1]
    with torch.no_grad():
        before = [vae.decode(vae.encode(c)) for c in clips]
    calibrate_latents(vae, clips)
    with torch.no_grad():
        z = torch.cat([normalize_latents(vae.encode_raw(c)).transpose(0, 1).reshape(16, -1) for c in clips], 1)
        after = [vae.decode(vae.encode(c)) for c in clips]
    torch.testing.assert_close(z.mean(dim=1), torch.zeros(16), atol=1e-4, rtol=0)
    torch.testing.assert_close(z.std(dim=1), torch.ones(16), atol=1e-4, rtol=0)
    for b, a in zip(before, after):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_training_init_makes_every_residual_block_the_identity() -> None:
    vae = small_vae()
    init_for_training(vae, seed=3)
    x = torch.randn(1, 8, 1, 4, 4)
    blocks = [m for m in vae.modules() if isinstance(m, ResidualBlock) and isinstance(m.shortcut, torch.nn.Identity)]
    assert blocks
    block = blocks[0]
    c = block.residual[0].gamma.shape[0]
    torch.testing.assert_close(block(x[:, :c].clone()), x[:, :c], atol=0, rtol=0)
    assert float(vae.conv1.bias[16:].detach().min()) == float(vae.conv1.bias[16:].detach().max()) == -6.0


def _batches(step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return [torch.rand(2, 3, 5, 16, 16, generator=g) * 2 - 1, torch.rand(2, 3, 1, 16, 16, generator=g) * 2 - 1]


class Interrupt(Exception):
    pass


def _stop_at(step: int):
    def on_step(done: int, total: int, parts: dict) -> None:
        if done == step:
            raise Interrupt
    return on_step


def test_training_lowers_the_loss_and_resume_repeats_the_run(tmp_path) -> None:
    config = VAETrainConfig(steps=6, learning_rate=3e-3, warmup_steps=1, checkpoint_every=3, seed=5)
    whole = small_vae(1)
    init_for_training(whole, 1)
    losses = train_vae(whole, _batches, config, tmp_path / "whole")
    assert (tmp_path / "whole" / "loss.png").is_file()
    first = small_vae(1)
    init_for_training(first, 1)
    try:  # interrupted during step 5: the step-3 checkpoint is the last one
        train_vae(first, _batches, config, tmp_path / "split", _stop_at(5))
    except Interrupt:
        pass
    second = small_vae(7)  # a new process: other weights, replaced by the checkpoint's
    tail = train_vae(second, _batches, config, tmp_path / "split")
    assert len(tail) == 3
    # same code path on the same machine: the resumed run repeats the uninterrupted one (tolerance for libm)
    torch.testing.assert_close(torch.tensor(tail), torch.tensor(losses[3:]), atol=1e-6, rtol=1e-6)
    log = [json.loads(line) for line in (tmp_path / "split" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert losses[-1] < losses[0]


def test_world_vae_batches_are_a_pure_function_of_the_step() -> None:
    config = replace(WORLD, sources=("photo", "shape"))  # the emoji font is not needed here
    batch = vae_batches(VAEData(clips=2, frames=2, crop=32), config)
    a, b = batch(4), batch(4)
    assert a[0].shape == (2, 3, 5, 32, 32) and a[1].shape == (2, 3, 1, 32, 32)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=0, rtol=0)
    assert not torch.equal(batch(5)[0], a[0])
    assert float(a[0].min()) >= -1.0 and float(a[0].max()) <= 1.0


def test_decoder_only_training_keeps_every_encoded_latent(tmp_path) -> None:
    vae = small_vae(2)
    init_for_training(vae, 2)
    video = _batches(0)[0]
    before = vae.encode_raw(video).detach()
    decoder = {k: v.clone() for k, v in vae.decoder.state_dict().items()}
    config = VAETrainConfig(steps=3, learning_rate=3e-3, warmup_steps=1, checkpoint_every=3, seed=3,
                            decoder_only=True, latent_noise=0.1)
    train_vae(vae, _batches, config, tmp_path / "dec")
    # the encoder and conv1 are frozen: the latents a DiT was trained on stay exactly valid
    torch.testing.assert_close(vae.encode_raw(video), before, atol=0, rtol=0)
    assert any(not torch.equal(v, decoder[k]) for k, v in vae.decoder.state_dict().items())


def test_latent_noise_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="latent_noise"):
        VAETrainConfig(latent_noise=-0.1)


def test_subject_clip_batches_show_a_subject_in_every_clip() -> None:
    """Phase 4's crops are centred on a subject: the middle frame's centre (16 x 16 px) differs from the crop's
    border colour in every clip (a background-only crop would not), and the batches are a function of the step."""
    config = replace(WORLD, sources=("photo", "shape"))
    batch = subject_clip_batches(VAEData(clips=4, clip_frames=9, frames=2, crop=48, seed=3), config)
    clips, refs = batch(0)
    assert clips.shape == (4, 3, 9, 48, 48) and refs.shape == (2, 3, 1, 48, 48)
    torch.testing.assert_close(batch(0)[0], clips, atol=0, rtol=0)
    for clip in clips:
        middle = clip[:, 4]  # (3, 48, 48)
        border = middle[:, 0].median(dim=1).values  # the top row's colour
        centre = middle[:, 16:32, 16:32]
        assert (centre - border[:, None, None]).abs().amax(dim=0).gt(0.2).float().mean() > 0.1
