"""Phantom's training objective: rectified flow on the video latents, the references appended clean.

Paper Sec. 3.3 (Eq. 3-4; Liu et al. 2022, Esser et al. 2024 arXiv 2403.03206):

    x_t = (1 - t) x0 + t eps,      target velocity  v = eps - x0,      loss = || v_theta(x_t, t, c, refs) - v ||^2

with ``t`` (sigma) in [0, 1] and the model fed ``1000 * t`` exactly as sampling does (``schedule.py``:
``NUM_TRAIN_TIMESTEPS``; no integer truncation in training). The reference latents are appended after the video
latents on the time axis, clean (never noised), exactly as in sampling: the DiT's forward takes them separately
and returns the velocity of the video frames only, so the loss covers the video frames and never the reference
tail (``video_mse`` also cuts a target carrying the tail, the upstream layout).

Randomness is drawn per sample from a generator seeded by (run seed, micro-step, position in the global batch)
(``sample_seed``), on the CPU: a sample's timestep, dropout and noise do not depend on the number of ranks, on
how the global batch is split, on the device, or on whether the run was resumed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from phantom_core.sampling.guidance import VelocityModel, pad_context
from phantom_core.sampling.schedule import NUM_TRAIN_TIMESTEPS, shift_sigma


@dataclass(frozen=True)
class TimestepSampling:
    """How training timesteps (sigmas in [0, 1]) are drawn.

    ``uniform``: t ~ U[0, 1). ``logit_normal``: t = sigmoid(n), n ~ N(mean, std^2) (SD3, Esser et al. 2024,
    Sec. 3.1; mean 0, std 1 there). ``shifted``: t = shift_sigma(u, shift), u ~ U[0, 1): the sampler's time shift
    (``schedule.shift_sigma``), so training spends its steps where sampling at that shift does.
    """

    how: str = "shifted"
    shift: float = 5.0
    logit_mean: float = 0.0
    logit_std: float = 1.0

    def draw(self, generator: torch.Generator) -> float:
        """One sigma in [0, 1] from ``generator`` (CPU). Raises ``ValueError`` for an unknown ``how``."""
        if self.how == "uniform":
            return float(torch.rand((), generator=generator, dtype=torch.float64))
        if self.how == "logit_normal":
            n = torch.randn((), generator=generator, dtype=torch.float64) * self.logit_std + self.logit_mean
            return float(torch.sigmoid(n))
        if self.how == "shifted":
            return float(shift_sigma(torch.rand((), generator=generator, dtype=torch.float64), self.shift))
        raise ValueError(f"timestep sampling is {self.how!r}; valid: uniform, logit_normal, shifted")


@dataclass(frozen=True)
class SampleDraw:
    """The random choices for one training sample: its sigma, its dropout draw ``u`` in [0, 1), its noise, and the
    separate draw of the VAE-reference dropout (``vae_drop_u``, in [0, 1), drawn last: the others do not move)."""

    sigma: float
    drop_u: float
    noise: Tensor  # like the sample's video latents, float32, CPU
    vae_drop_u: float = 1.0


def sample_seed(seed: int, micro_step: int, index: int) -> int:
    """The generator seed of sample ``index`` of the global batch at ``micro_step`` (0-based, counted over the
    whole run: ``step * grad_accum + micro``), mixed by numpy's ``SeedSequence`` (no correlated streams)."""
    return int(np.random.SeedSequence([seed, micro_step, index]).generate_state(1, dtype=np.uint64)[0])


def draw_sample(seed: int, micro_step: int, index: int, latent_shape: tuple[int, ...],
                timesteps: TimestepSampling) -> SampleDraw:
    """Sigma, dropout draw, noise ``[16, F, h, w]`` (float32, CPU) and the VAE-reference dropout draw for one
    sample, in that order from one generator (``sample_seed``)."""
    gen = torch.Generator().manual_seed(sample_seed(seed, micro_step, index))
    sigma = timesteps.draw(gen)
    drop_u = float(torch.rand((), generator=gen, dtype=torch.float64))
    noise = torch.randn(latent_shape, generator=gen, dtype=torch.float32)  # (16, F, h, w)
    vae_drop_u = float(torch.rand((), generator=gen, dtype=torch.float64))
    return SampleDraw(sigma, drop_u, noise, vae_drop_u)


def noisy_latents(x0: Tensor, noise: Tensor, sigma: Tensor) -> Tensor:
    """``x_t = (1 - sigma) x0 + sigma eps`` (paper Eq. 3). ``x0, noise [B, 16, F, h, w]``, ``sigma [B]`` -> like x0."""
    s = sigma.to(x0.dtype).view(-1, *([1] * (x0.ndim - 1)))  # (B, 1, 1, 1, 1)
    return (1 - s) * x0 + s * noise


def velocity_target(x0: Tensor, noise: Tensor) -> Tensor:
    """The rectified-flow velocity ``d x_t / d t = eps - x0`` (paper Eq. 4), like ``x0``."""
    return noise - x0


def drop_conditions(context: Tensor, ref_latents: Tensor, dropped_context: Tensor, drop_u: Tensor,
                    text_dropout: float, reference_dropout: float) -> tuple[Tensor, Tensor]:
    """Condition dropout, nested on one draw per sample so that Eq. 5's three passes are all trained.

    Sample ``i`` gets ``dropped_context`` instead of its text when ``drop_u[i] < text_dropout``, and all-zero
    reference latents (the ``v_neg`` pass's input, upstream ``zeros_like(ref_latents)``) when
    ``drop_u[i] < reference_dropout``. With ``reference_dropout <= text_dropout`` every sample without
    references is also without text: exactly the (negative prompt, no references) condition of ``v_neg``.

    Args:
        context: ``[B, L, D]`` text contexts (zero-padded; the DiT pads to 512 itself, so padding is exact).
        ref_latents: ``[B, 16, N, h, w]`` clean reference latents.
        dropped_context: ``[L', D]`` the context of the dropped prompt.
        drop_u: ``[B]`` uniform draws in [0, 1).
        text_dropout, reference_dropout: probabilities in [0, 1].
    Returns:
        ``(context [B, max(L, L'), D], ref_latents [B, 16, N, h, w])``, new tensors.
    """
    length = max(context.shape[1], dropped_context.shape[0])
    context = pad_context(context, length)  # (B, L*, D)
    dropped = pad_context(dropped_context[None].to(context), length)  # (1, L*, D)
    drop_text = (drop_u < text_dropout).to(context.device).view(-1, 1, 1)  # (B, 1, 1)
    drop_refs = (drop_u < reference_dropout).to(ref_latents.device).view(-1, 1, 1, 1, 1)  # (B, 1, 1, 1, 1)
    return torch.where(drop_text, dropped, context), torch.where(drop_refs, 0.0, ref_latents)


def reference_inputs(ref_latents: Tensor, ref_clip: Tensor | None, drop_u: Tensor, vae_drop_u: Tensor,
                     reference_dropout: float, vae_reference_dropout: float = 0.0, vae_references: bool = True,
                     clip_reference_dropout: float = 0.0) -> tuple[Tensor | None, Tensor | None]:
    """The references a model with CLIP features sees, after ``drop_conditions`` dropped the VAE latents.

    - ``ref_clip`` is zeroed for the samples whose VAE latents ``drop_conditions`` zeroed (``drop_u <
      reference_dropout``): the ``v_neg`` pass's input, both encodings zero, as the sampler gives it;
    - the VAE latents alone are zeroed where ``vae_drop_u < vae_reference_dropout`` (the paper's 0.7; a draw of
      its own), the CLIP features kept;
    - the CLIP features alone are zeroed where ``vae_drop_u >= 1 - clip_reference_dropout`` (the same draw's other
      end, so no sample loses both encodings to these two: their sum must be at most 1), the VAE latents kept (not
      the paper's: a model that can read a reference's look from CLIP tokens alone need never learn the VAE
      tokens, which are the ones whose order RoPE tells apart; docs/WORLD.md, fifteenth session);
    - ``vae_references=False`` (the CLIP-only ablation) gives the model no VAE latents (None).

    Args:
        ref_latents: ``[B, 16, N, h, w]`` (after ``drop_conditions``). ref_clip: ``[B, N, T, C]`` or None.
        drop_u, vae_drop_u: ``[B]`` uniform draws in [0, 1) (``SampleDraw``).
    Returns:
        ``(ref_latents or None, ref_clip or None)``, new tensors.
    Raises:
        ValueError: ``vae_reference_dropout > 0`` or ``vae_references=False`` without CLIP features: the model
            would see no reference at all; ``clip_reference_dropout > 0`` without CLIP features or without VAE
            latents, or with ``vae_reference_dropout + clip_reference_dropout > 1``.
    """
    if ref_clip is None and (vae_reference_dropout > 0 or not vae_references):
        raise ValueError(f"vae_reference_dropout is {vae_reference_dropout} and vae_references {vae_references}, "
                         "but the samples have no CLIP features (clip_vision) for a model with a CLIP branch: "
                         "without them the VAE latents are the only reference")
    if clip_reference_dropout > 0 and (ref_clip is None or not vae_references
                                       or vae_reference_dropout + clip_reference_dropout > 1):
        raise ValueError(f"clip_reference_dropout is {clip_reference_dropout}: it needs CLIP features and VAE "
                         f"references (vae_references is {vae_references}, CLIP features "
                         f"{'given' if ref_clip is not None else 'missing'}), and vae_reference_dropout "
                         f"({vae_reference_dropout}) + clip_reference_dropout at most 1")
    if ref_clip is not None:
        drop_both = (drop_u < reference_dropout).to(ref_clip.device).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        drop_clip = (vae_drop_u >= 1 - clip_reference_dropout).to(ref_clip.device).view(-1, 1, 1, 1)
        ref_clip = torch.where(drop_both | drop_clip, 0.0, ref_clip)  # u < 1: p 0 drops none
    if not vae_references:
        return None, ref_clip
    drop_vae = (vae_drop_u < vae_reference_dropout).to(ref_latents.device).view(-1, 1, 1, 1, 1)  # (B, 1, 1, 1, 1)
    return torch.where(drop_vae, 0.0, ref_latents), ref_clip


def video_mse(prediction: Tensor, target: Tensor) -> Tensor:
    """Mean squared error over the video frames only, in float32.

    Args:
        prediction: ``[B, 16, F, h, w]`` predicted velocity of the video frames (what the DiT returns).
        target: ``[B, 16, F (+ N), h, w]``; a target carrying the reference tail (upstream's layout: video then
            references on the time axis) is cut to its first ``F`` frames, so the references carry no loss.
    Returns:
        A scalar float32 tensor.
    """
    frames = prediction.shape[2]
    return torch.mean((prediction.float() - target[:, :, :frames].float()) ** 2)


def temporal_mse(prediction: Tensor, target: Tensor, sigma: Tensor) -> Tensor:
    """Mean squared error of the frame-to-frame change of the clean estimate, in float32.

    The clean estimate of a velocity ``v`` at ``x_t`` is ``x0_hat = x_t - sigma v`` (paper Eq. 3-4), so its error
    is ``x0_hat - x0 = -sigma (v - v_target)`` and this term is ``mean((diff_F(sigma (v - v_target)))^2)``, the
    differences taken between consecutive latent frames. An error that is the same in every frame (a wrong
    background, a wrong static subject) cancels in it; what remains is an error in what changes over the clip: where
    a moving subject is in each frame. Weighted by ``sigma^2`` it is a clean-estimate error, so it does not grow
    with the noise-prediction error of low sigmas as a velocity difference would. Not in the Phantom paper: a
    motion-weighted term for small worlds in which the motion is a small share of the plain loss (docs/WORLD.md).

    Args:
        prediction: ``[B, 16, F, h, w]`` predicted velocity of the video frames.
        target: ``[B, 16, F (+ N), h, w]`` velocity target (a reference tail is cut, as ``video_mse`` does).
        sigma: ``[B]`` noise levels in [0, 1].
    Returns:
        A scalar float32 tensor; 0 for a one-frame video (no change to measure).
    """
    frames = prediction.shape[2]
    if frames < 2:
        return prediction.float().sum() * 0.0
    s = sigma.float().view(-1, 1, 1, 1, 1)  # (B, 1, 1, 1, 1)
    error = s * (prediction.float() - target[:, :, :frames].float())  # (B, 16, F, h, w): x0 - x0_hat
    return torch.mean(torch.diff(error, dim=2) ** 2)


def flow_matching_loss(model: VelocityModel, x0: Tensor, ref_latents: Tensor | None, context: Tensor, sigma: Tensor,
                       noise: Tensor, ref_clip: Tensor | None = None, temporal_weight: float = 0.0) -> Tensor:
    """The training loss of one batch (paper Eq. 3-4): noise the video, predict its velocity, MSE on the video.

    Args:
        model: ``model(x, t, context, ref_latents) -> velocity of the video frames`` (``PhantomWanDiT``), with
            ``ref_clip=`` when CLIP features are given (``PhantomMMDiT``).
        x0: ``[B, 16, F, h, w]`` clean normalized video latents.
        ref_latents: ``[B, 16, N, h, w]`` clean normalized reference latents (after dropout); never noised; None:
            no VAE reference (an MMDiT's CLIP-only variant).
        context: ``[B, L, D]`` text contexts (after dropout).
        sigma: ``[B]`` float noise levels in [0, 1]; the model sees ``1000 * sigma`` (as sampling).
        noise: ``[B, 16, F, h, w]`` standard normal noise.
        ref_clip: ``[B, N, T, C]`` CLIP features of the references (after dropout), or None (not passed).
        temporal_weight: the weight of ``temporal_mse`` added to the MSE (0: the plain loss, the paper's).
    Returns:
        The scalar float32 loss (differentiable).
    """
    x_t = noisy_latents(x0, noise, sigma)  # (B, 16, F, h, w)
    t = sigma.float() * NUM_TRAIN_TIMESTEPS  # (B,) in [0, 1000]
    extra = {} if ref_clip is None else {"ref_clip": ref_clip}
    prediction = model(x_t, t, context, ref_latents, **extra)  # (B, 16, F, h, w), video frames only
    target = velocity_target(x0, noise)
    loss = video_mse(prediction, target)
    return loss + temporal_weight * temporal_mse(prediction, target, sigma) if temporal_weight else loss
