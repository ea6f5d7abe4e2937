"""Wan2.1 per-channel latent normalisation: raw VAE latents <-> the normalized space the DiT works in.

The ComfyUI LATENT dict at our node boundary holds RAW latents (ComfyUI's convention, so its own VAEDecode and
previews work); everything inside phantom_core (DiT input, sampler) uses NORMALIZED latents, as upstream
``WanVAE.encode`` returns them: ``normalized = (raw - mean) / std`` per channel.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# The 16 published per-channel statistics of the Wan2.1 VAE latent (z_dim = 16).
# Source: Wan-Video/Wan2.1 `wan/modules/vae.py`, class `WanVAE.__init__` (`mean` / `std` lists); the same numbers
# are in ComfyUI `comfy/latent_formats.py`, class `Wan21` (`latents_mean` / `latents_std`).
WAN21_LATENT_MEAN: tuple[float, ...] = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
WAN21_LATENT_STD: tuple[float, ...] = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip
LATENT_CHANNELS = len(WAN21_LATENT_MEAN)
TIME_STRIDE = 4  # Wan2.1 VAE: one latent frame for the first video frame, then one per 4 (so 4k + 1 frames)
SPACE_STRIDE = 8  # Wan2.1 VAE: one latent cell per 8 x 8 pixels


def latent_shape(frames: int, height: int, width: int, batch: int = 1) -> tuple[int, int, int, int, int]:
    """``(B, 16, F, h, w)`` of the Wan2.1 latents of a video: ``F = 1 + (frames - 1) // 4``, ``h = height // 8``,
    ``w = width // 8`` (source: Wan2.1 ``wan/modules/vae.py``, causal encoder with 4x temporal, 8x spatial stride).

    Args:
        frames: video frames (4k + 1); height, width: px (multiples of 8; 16 for the DiT's 2x2 patch).
        batch: videos in the batch.
    """
    return batch, LATENT_CHANNELS, 1 + (frames - 1) // TIME_STRIDE, height // SPACE_STRIDE, width // SPACE_STRIDE


def token_grid(patch_size: tuple[int, int, int], frames: int, height: int, width: int,
               extra_latent_frames: int = 0) -> tuple[int, int, int]:
    """``(f, h, w)`` tokens after a DiT's ``(pt, ph, pw)`` patchify (padding included) of the latents of a
    ``frames x height x width`` video plus ``extra_latent_frames`` latent frames on its time axis (Phantom-Wan's
    appended references); ``latent_shape`` gives the latent sizes."""
    _, _, f, h, w = latent_shape(frames, height, width)
    pt, ph, pw = patch_size
    return math.ceil((f + extra_latent_frames) / pt), math.ceil(h / ph), math.ceil(w / pw)


def _stats(latents: Tensor, name: str) -> tuple[Tensor, Tensor]:
    """Mean and std shaped ``(1, 16, 1, 1, 1)`` in the dtype/device of ``latents`` (validated ``[B,16,F,h,w]``)."""
    if latents.ndim != 5 or latents.shape[1] != LATENT_CHANNELS:
        raise ValueError(
            f"{name} has shape {tuple(latents.shape)}; Wan2.1 latents must be [B, {LATENT_CHANNELS}, F, h, w]"
        )
    if not latents.is_floating_point():
        raise ValueError(f"{name} has dtype {latents.dtype}; latents must be a floating-point tensor")
    kw = {"dtype": latents.dtype, "device": latents.device}
    mean = torch.tensor(WAN21_LATENT_MEAN, **kw).view(1, LATENT_CHANNELS, 1, 1, 1)
    std = torch.tensor(WAN21_LATENT_STD, **kw).view(1, LATENT_CHANNELS, 1, 1, 1)
    return mean, std


def normalize_latents(raw: Tensor) -> Tensor:
    """Raw VAE latents -> normalized latents, ``(raw - mean) / std`` per channel.

    Args:
        raw: ``[B, 16, F, h, w]`` float tensor of raw latents (posterior mean of the VAE encoder).
    Returns:
        A new tensor, same shape, dtype and device.
    Raises:
        ValueError: if ``raw`` is not a 5-D float tensor with 16 channels.
    """
    mean, std = _stats(raw, "raw latents")
    return (raw - mean) / std


def denormalize_latents(latents: Tensor) -> Tensor:
    """Normalized latents -> raw VAE latents, ``latents * std + mean`` per channel (inverse of the above).

    Args:
        latents: ``[B, 16, F, h, w]`` float tensor of normalized latents.
    Returns:
        A new tensor, same shape, dtype and device.
    Raises:
        ValueError: if ``latents`` is not a 5-D float tensor with 16 channels.
    """
    mean, std = _stats(latents, "normalized latents")
    return torch.addcmul(mean, latents, std)
