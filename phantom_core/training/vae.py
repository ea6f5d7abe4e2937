"""Training a Wan2.1-architecture VAE: pixel reconstruction + a KL term towards the latent normalisation.

The DiT trainer (``loop.py``) trains velocity models; a VAE needs its own objective, so it has this small loop,
which shares the run machinery (atomic checkpoints with optimizer, scheduler and RNG states; the JSON step log;
the loss plot). Used by the miniature world's default (``phantom_core.world.train_default``), usable for any
frame source.

Objective, per batch of clips ``x [B, 3, T, H, W]`` in [-1, 1] (T = 1 or 4k + 1):

    moments = conv1(encoder(x))              posterior mean mu and log-variance (clamped to [-30, 20], upstream)
    z = mu + exp(logvar / 2) * eps           reparameterised sample (Kingma & Welling 2014)
    x' = decoder(conv2(z))
    loss = |x' - x|_1 + mse(x', x) + kl_weight * KL(N(mu, s^2) || N(m, std^2))

with ``m`` / ``std`` Wan2.1's published per-channel latent statistics (``wan.latents``): the prior is the very
normalisation the DiT sees, so the normalized latents come out near unit scale. ``calibrate_latents`` then fixes
their first two moments exactly by folding a per-channel affine map into ``conv1`` and ``conv2`` (both 1x1
convolutions), which changes no decoded pixel.

Determinism: the batch of step ``s`` comes from ``batch_fn(s)`` (the caller draws it from its seed and ``s``), the
posterior noise from a generator seeded by (seed, s); a resumed run repeats the uninterrupted one bit for bit on
the CPU.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from phantom_core.log import logger
from phantom_core.training.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from phantom_core.training.runlog import RunLog, write_loss_plot
from phantom_core.wan.latents import WAN21_LATENT_MEAN, WAN21_LATENT_STD, normalize_latents
from phantom_core.wan.vae import WanVAE
from phantom_core.wan.vae_blocks import CausalCache

LOGVAR_RANGE = (-30.0, 20.0)  # upstream Wan2.1 / LDM DiagonalGaussianDistribution clamp


@dataclass(frozen=True)
class VAETrainConfig:
    """Settings of a VAE run (steps are optimizer steps; ``learning_rate`` after a linear warm-up, cosine to 10%).

    ``decoder_only``: train ``conv2`` and the decoder only; the encoder and ``conv1`` stay frozen, so latents already
    encoded (a DiT's training cache) stay valid. ``latent_noise``: extra Gaussian noise on the decoder's input, as a
    fraction of each channel's normalisation std (0: none), so that the decoder learns to forgive latents a sampler
    leaves slightly off the encoder's manifold.

    Raises:
        ValueError: a non-positive steps / learning_rate / checkpoint_every, or a negative kl_weight.
    """

    steps: int = 3000
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.0
    kl_weight: float = 1e-4
    max_grad_norm: float = 1.0
    seed: int = 0
    checkpoint_every: int = 250
    keep_checkpoints: int = 2
    decoder_only: bool = False
    latent_noise: float = 0.0

    def __post_init__(self) -> None:
        for name in ("steps", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: got {getattr(self, name)!r}; expected an integer >= 1")
        if not self.learning_rate > 0 or self.kl_weight < 0 or self.warmup_steps < 0 or self.latent_noise < 0:
            raise ValueError(f"learning_rate must be > 0, kl_weight, warmup_steps and latent_noise >= 0; got {self}")


@torch.no_grad()
def init_for_training(vae: WanVAE, seed: int, logvar: float = -6.0) -> None:
    """Initialise a VAE for training from scratch (after PyTorch's default init), in place.

    Measured on the miniature world (tiny preset, dim 8, 8 crops of 32 x 32 px, Adam 1e-3, 100 steps; the
    per-image mean colour scores MSE 0.194): the default init stays at MSE 0.59, i.e. a constant output. Wan's
    RMSNorm normalises every pixel's channel vector, so with PyTorch's small biases a colour and a darker shade of
    it reach the same direction and brightness is lost; deep residual stacks also start far from identity.
    So: every residual block's last convolution and the attention output projection start at zero (each block
    is the identity at first; upstream zero-initialises the attention projection too), every convolution bias is
    drawn from U(-1, 1) so the normalisations keep magnitudes, and the posterior log-variance starts at
    ``logvar`` everywhere (with a log-variance near 0 the decoder would see noise of std 1 on latents near 0.1).
    Together: MSE 0.11 after 100 steps, still falling.
    """
    from phantom_core.wan.vae_blocks import AttentionBlock, ResidualBlock

    gen = torch.Generator().manual_seed(seed)
    for module in vae.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Conv3d)) and module.bias is not None:
            module.bias.copy_(torch.rand(module.bias.shape, generator=gen) * 2 - 1)
    for module in vae.modules():
        if isinstance(module, ResidualBlock):
            module.residual[6].weight.zero_()
            module.residual[6].bias.zero_()
        elif isinstance(module, AttentionBlock):
            module.proj.weight.zero_()
    z = vae.config.z_dim
    vae.conv1.weight[z:] = 0.0
    vae.conv1.bias[z:] = logvar


def posterior(vae: WanVAE, video: Tensor) -> tuple[Tensor, Tensor]:
    """Posterior mean and log-variance of ``video [B, 3, T, H, W]`` (T = 1 + 4k), chunked causally as
    ``WanVAE.encode_raw``: each ``[B, 16, 1 + (T - 1) // 4, H / 8, W / 8]`` float32, differentiable."""
    cfg = vae.config
    cache, means, logvars = CausalCache(), [], []
    n_latent = 1 + (video.shape[2] - 1) // cfg.temporal_stride
    for i in range(n_latent):
        start, stop = (0, 1) if i == 0 else (1 + cfg.temporal_stride * (i - 1), 1 + cfg.temporal_stride * i)
        moments = vae.conv1(vae.encoder(video[:, :, start:stop], cache))  # (B, 32, 1, h, w)
        means.append(moments[:, : cfg.z_dim])
        logvars.append(moments[:, cfg.z_dim :].clamp(*LOGVAR_RANGE))
    return torch.cat(means, dim=2), torch.cat(logvars, dim=2)


def decode_train(vae: WanVAE, raw: Tensor) -> Tensor:
    """Raw latents ``[B, 16, F, h, w]`` -> pixels ``[B, 3, 1 + 4(F - 1), 8h, 8w]``, differentiable (no clamp)."""
    cache, frames = CausalCache(), []
    for i in range(raw.shape[2]):
        frames.append(vae.decoder(vae.conv2(raw[:, :, i : i + 1]), cache))
    return torch.cat(frames, dim=2)


def prior_kl(mean: Tensor, logvar: Tensor) -> Tensor:
    """Mean over elements of KL(N(mean, exp(logvar)) || N(m_c, std_c^2)), Wan2.1's per-channel statistics."""
    kw = {"dtype": mean.dtype, "device": mean.device}
    m = torch.tensor(WAN21_LATENT_MEAN, **kw).view(1, -1, 1, 1, 1)
    log_s2 = 2 * torch.log(torch.tensor(WAN21_LATENT_STD, **kw)).view(1, -1, 1, 1, 1)
    z = (mean - m) ** 2 / log_s2.exp()
    return 0.5 * torch.mean(z + (logvar - log_s2).exp() - 1.0 - (logvar - log_s2))


def vae_loss(vae: WanVAE, video: Tensor, generator: torch.Generator, kl_weight: float,
             latent_noise: float = 0.0) -> tuple[Tensor, dict]:
    """The loss of one batch (module docstring) and its parts as floats (``l1``, ``mse``, ``kl``, ``psnr`` dB);
    ``latent_noise``: see ``VAETrainConfig``."""
    mean, logvar = posterior(vae, video)
    eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
    z = mean + torch.exp(0.5 * logvar) * eps  # (B, 16, F, h, w) raw latents
    if latent_noise > 0:
        std = torch.tensor(WAN21_LATENT_STD, dtype=z.dtype, device=z.device).view(1, -1, 1, 1, 1)
        z = z + latent_noise * std * torch.randn(z.shape, generator=generator, dtype=z.dtype).to(z.device)
    recon = decode_train(vae, z)
    l1 = (recon - video).abs().mean()
    mse = torch.mean((recon - video) ** 2)
    kl = prior_kl(mean, logvar)
    psnr = 10 * math.log10(4.0 / max(mse.item(), 1e-12))  # pixel range [-1, 1] -> peak-to-peak 2
    return l1 + mse + kl_weight * kl, {"l1": l1.item(), "mse": mse.item(), "kl": kl.item(), "psnr": psnr}


def _lr_factor(step: int, c: VAETrainConfig) -> float:
    if step < c.warmup_steps:
        return (step + 1) / c.warmup_steps
    progress = (step - c.warmup_steps) / max(1, c.steps - c.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train_vae(vae: WanVAE, batch_fn: Callable[[int], list[Tensor]], config: VAETrainConfig,
              run_dir: str | Path, on_step: Callable[[int, int, dict], None] | None = None) -> list[float]:
    """Train ``vae`` in place (float32, CPU or its device); resume from ``run_dir``'s latest checkpoint if any.

    Args:
        batch_fn: ``batch_fn(step) -> [clips, ...]``, each ``[B, 3, T, H, W]`` in [-1, 1]; their losses are
            summed (so clips of several lengths train in one step). Must depend only on ``step``.
        run_dir: ``checkpoints/``, ``log.jsonl`` and ``loss.png`` go here.
        on_step: ``on_step(step, total, parts)`` after each step (1-based).
    Returns:
        The loss of every step run in this call.
    """
    run_dir = Path(run_dir)
    if config.decoder_only:
        vae.encoder.requires_grad_(False)
        vae.conv1.requires_grad_(False)
    params = [p for p in vae.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, config))
    start = 0
    saved = list_checkpoints(run_dir / "checkpoints")
    if saved:
        start = int(load_checkpoint(saved[-1][1], vae, optimizer, scheduler)["step"])
        logger.info("VAE training resumes at step %d from %s", start, saved[-1][1])
    log = RunLog(run_dir / "log.jsonl", resume_step=start)
    losses: list[float] = []
    vae.train()
    for step in range(start, config.steps):
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(int(np.random.SeedSequence([config.seed, step]).generate_state(1)[0]))
        total, parts = torch.zeros(()), {}
        optimizer.zero_grad(set_to_none=True)
        for k, clips in enumerate(batch_fn(step)):
            loss, p = vae_loss(vae, clips, gen, config.kl_weight, config.latent_noise)
            loss.backward()
            total = total + loss.detach()
            parts.update({f"{name}_{k}": v for name, v in p.items()})
        if config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        losses.append(float(total))
        log.write({"step": step + 1, "loss": float(total), "lr": scheduler.get_last_lr()[0],
                   "seconds": round(time.perf_counter() - t0, 3), **parts})
        if on_step is not None:
            on_step(step + 1, config.steps, {"loss": float(total), **parts})
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
            save_checkpoint(run_dir / "checkpoints", step + 1, vae, optimizer, scheduler, {},
                            asdict(config), keep=config.keep_checkpoints)
    vae.eval()
    write_loss_plot(log.losses(), run_dir / "loss.png", title="VAE loss")
    return losses


@torch.no_grad()
def calibrate_latents(vae: WanVAE, videos: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Make the normalized latents of ``videos`` zero-mean, unit-std per channel, exactly, without changing
    any decoded pixel: ``conv1``'s mean rows become ``a * mu + b`` and ``conv2`` absorbs the inverse map.

    Args:
        videos: clips ``[B, 3, T, H, W]`` in [-1, 1] representative of the data.
    Returns:
        The per-channel mean and std ``[16]`` of the normalized latents before calibration.
    """
    z = torch.cat([normalize_latents(vae.encode_raw(v)).transpose(0, 1).reshape(16, -1) for v in videos], dim=1)
    mean, std = z.mean(dim=1), z.std(dim=1).clamp_min(1e-6)
    m = torch.tensor(WAN21_LATENT_MEAN)
    s = torch.tensor(WAN21_LATENT_STD)
    # normalized n = (raw - m) / s; want n' = (n - mean) / std  =>  raw' = a raw + b with
    a = 1.0 / std
    b = m * (1.0 - a) - s * mean / std
    zd = vae.config.z_dim
    w1, b1 = vae.conv1.weight, vae.conv1.bias  # (32, 32, 1, 1, 1), (32,)
    w1[:zd] *= a.view(-1, 1, 1, 1, 1)
    b1[:zd] = a * b1[:zd] + b
    b1[zd:] += 2 * torch.log(a)  # the log-variance of a * z
    w2, b2 = vae.conv2.weight, vae.conv2.bias  # (16, 16, 1, 1, 1): conv2(raw) must equal old conv2((raw' - b) / a)
    b2 -= (w2[:, :, 0, 0, 0] * (b / a).view(1, -1)).sum(dim=1)
    w2 /= a.view(1, -1, 1, 1, 1)
    return mean, std
