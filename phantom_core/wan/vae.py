"""Wan2.1 causal 3-D VAE (video <-> 16-channel latents, stride 4 in time and 8 in space), upstream key names.

Architecture: Wan-Video/Wan2.1 `wan/modules/vae.py` (also used unchanged by Phantom-Wan), re-written here.
The layers (causal convs, `CausalCache`, residual / attention / resample blocks) live in
`phantom_core.wan.vae_blocks`; this module assembles the encoder and decoder, runs them chunk by chunk
(encode: the first frame, then 4 frames at a time; decode: one latent frame at a time, each call with its own
`CausalCache`) and loads checkpoints. Spatially tiled decoding is in `phantom_core.wan.vae_tiling`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from phantom_core.loading.files import read_state_dict
from phantom_core.loading.keys import errors_name_file, keep_prefixed, key_problems
from phantom_core.log import logger
from phantom_core.wan.latents import LATENT_CHANNELS, denormalize_latents, normalize_latents
from phantom_core.wan.vae_blocks import (
    AttentionBlock,
    CausalCache,
    Ops,
    Resample,
    ResidualBlock,
    RMSNorm,
    apply_causal,
    causal_conv,
)
from phantom_core.wan.vae_tiling import DEFAULT_OVERLAP_LATENT, Progress, decode_tiled


@dataclass(frozen=True)
class WanVAEConfig:
    """Architecture of the Wan2.1 VAE (upstream constructor arguments; upstream spells `temperal_downsample`).

    dim: base channel count (96 for the released VAE); stage ``i`` has ``dim * dim_mult[i]`` channels.
    z_dim: latent channels (16). num_res_blocks: residual blocks per encoder stage (decoder: one more).
    temporal_downsample: per stage transition, whether time is halved too (decoder mirrors it).
    Upstream's ``attn_scales`` (attention blocks inside the stages) is [] for every released checkpoint, and its
    chunked forward cannot run them, so it is not a field; attention exists only in the middle blocks.
    """

    dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)

    def __post_init__(self) -> None:
        if self.dim <= 0 or self.z_dim <= 0 or self.num_res_blocks <= 0 or not self.dim_mult:
            raise ValueError(f"WanVAEConfig needs positive dim, z_dim, num_res_blocks and a dim_mult; got {self}")
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(
                f"temporal_downsample has {len(self.temporal_downsample)} entries; it needs one per stage "
                f"transition, len(dim_mult) - 1 = {len(self.dim_mult) - 1}"
            )

    @property
    def temporal_stride(self) -> int:
        """Video frames per latent frame after the first (4 for Wan2.1)."""
        return 2 ** sum(self.temporal_downsample)

    @property
    def spatial_stride(self) -> int:
        """Pixels per latent cell on each side (8 for Wan2.1)."""
        return 2 ** (len(self.dim_mult) - 1)


VAE_PRESETS: dict[str, WanVAEConfig] = {
    "wan2.1": WanVAEConfig(),  # Wan2.1_VAE.pth, 194 tensors, ~127 M parameters
    "tiny": replace(WanVAEConfig(), dim=8),  # same 194 keys and strides, random weights for tests and the demo
    # the miniature world's wider VAE (2.6 M parameters): one residual block per stage, twice tiny's channels
    "world": replace(WanVAEConfig(), dim=16, num_res_blocks=1),
}


class Encoder3d(nn.Module):
    """Video chunk (B, 3, t, H, W) -> (B, 2*z_dim, t', H/8, W/8): posterior mean and log-variance channels."""

    def __init__(self, cfg: WanVAEConfig, ops: Ops, **kw: Any) -> None:
        super().__init__()
        dims = [cfg.dim * m for m in (1, *cfg.dim_mult)]
        self.conv1 = causal_conv(ops, 3, dims[0], 3, **kw)
        blocks: list[nn.Module] = []
        for i, (c_in, c_out) in enumerate(zip(dims[:-1], dims[1:])):
            for j in range(cfg.num_res_blocks):
                blocks.append(ResidualBlock(c_in if j == 0 else c_out, c_out, ops, **kw))
            if i < len(cfg.dim_mult) - 1:
                mode = "downsample3d" if cfg.temporal_downsample[i] else "downsample2d"
                blocks.append(Resample(c_out, mode, ops, **kw))
        self.downsamples = nn.Sequential(*blocks)
        c = dims[-1]
        mid = [ResidualBlock(c, c, ops, **kw), AttentionBlock(c, ops, **kw), ResidualBlock(c, c, ops, **kw)]
        self.middle = nn.Sequential(*mid)
        self.head = nn.Sequential(RMSNorm(c, **kw), nn.SiLU(), causal_conv(ops, c, 2 * cfg.z_dim, 3, **kw))

    def forward(self, x: Tensor, cache: CausalCache) -> Tensor:
        x = apply_causal(self.conv1, x, cache)  # (B, dim, t, H, W)
        for block in (*self.downsamples, *self.middle):
            x = block(x, cache)  # ends (B, dim*mult[-1], t', H/8, W/8)
        return apply_causal(self.head[2], F.silu(self.head[0](x), inplace=True), cache)  # (B, 2z, t', h, w)


class Decoder3d(nn.Module):
    """Latent chunk (B, z_dim, 1, h, w) -> video frames (B, 3, 1 or 4, 8h, 8w) (1 for the first chunk)."""

    def __init__(self, cfg: WanVAEConfig, ops: Ops, **kw: Any) -> None:
        super().__init__()
        dims = [cfg.dim * m for m in (cfg.dim_mult[-1], *cfg.dim_mult[::-1])]
        temporal_upsample = cfg.temporal_downsample[::-1]
        self.conv1 = causal_conv(ops, cfg.z_dim, dims[0], 3, **kw)
        c = dims[0]
        mid = [ResidualBlock(c, c, ops, **kw), AttentionBlock(c, ops, **kw), ResidualBlock(c, c, ops, **kw)]
        self.middle = nn.Sequential(*mid)
        blocks: list[nn.Module] = []
        for i, (c_in, c_out) in enumerate(zip(dims[:-1], dims[1:])):
            c_in = c_in // 2 if i > 0 else c_in  # every stage after the first follows an upsample (C -> C/2)
            for j in range(cfg.num_res_blocks + 1):
                blocks.append(ResidualBlock(c_in if j == 0 else c_out, c_out, ops, **kw))
            if i < len(cfg.dim_mult) - 1:
                mode = "upsample3d" if temporal_upsample[i] else "upsample2d"
                blocks.append(Resample(c_out, mode, ops, **kw))
        self.upsamples = nn.Sequential(*blocks)
        c = dims[-1]
        self.head = nn.Sequential(RMSNorm(c, **kw), nn.SiLU(), causal_conv(ops, c, 3, 3, **kw))

    def forward(self, x: Tensor, cache: CausalCache) -> Tensor:
        x = apply_causal(self.conv1, x, cache)  # (B, dim*mult[-1], 1, h, w)
        for block in (*self.middle, *self.upsamples):
            x = block(x, cache)  # ends (B, dim, t, 8h, 8w)
        return apply_causal(self.head[2], F.silu(self.head[0](x), inplace=True), cache)  # (B, 3, t, 8h, 8w)


class WanVAE(nn.Module):
    """The Wan2.1 video VAE: pixels [-1, 1] (B, 3, T, H, W) <-> latents (B, 16, 1 + (T-1)/4, H/8, W/8).

    `encode` / `decode` use normalized latents (what the DiT sees); `encode_raw` / `decode_raw` use the raw
    latent space (what ComfyUI's LATENT holds). Compute runs in the parameters' dtype; results are float32.
    Both decoders take optional spatial tiling (``tile_latent``, ``overlap_latent``, ``blend``) that bounds
    activation memory by one tile (`phantom_core.wan.vae_tiling`).
    Build with ``device="meta"`` and load with `load_vae` to avoid allocating weights twice.
    """

    def __init__(
        self,
        config: WanVAEConfig = VAE_PRESETS["wan2.1"],
        ops: Ops = nn,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        kw = {"dtype": dtype, "device": device}
        self.config = config
        z = config.z_dim
        self.encoder = Encoder3d(config, ops, **kw)
        self.conv1 = ops.Conv3d(2 * z, 2 * z, 1, **kw)  # posterior (mean, log-variance) projection
        self.conv2 = ops.Conv3d(z, z, 1, **kw)  # latent projection before the decoder
        self.decoder = Decoder3d(config, ops, **kw)

    def _compute_params(self) -> tuple[torch.dtype, torch.device]:
        weight = self.encoder.conv1.weight
        return weight.dtype, weight.device

    def encode_raw(self, video: Tensor) -> Tensor:
        """Posterior mean of the latents (no sampling, no normalisation).

        Args:
            video: ``[B, 3, T, H, W]`` float pixels in [-1, 1]; T = 1 + 4k, H and W multiples of 8.
        Returns:
            ``[B, 16, 1 + (T - 1) // 4, H / 8, W / 8]`` float32 raw latents.
        Raises:
            ValueError: if the shape breaks the rules above (the message names the input and valid values).
        """
        cfg = self.config
        _check_video(video, cfg)
        dtype, device = self._compute_params()
        b, _, t, h, w = video.shape
        n_latent = 1 + (t - 1) // cfg.temporal_stride
        s = cfg.spatial_stride
        latents = torch.empty(b, cfg.z_dim, n_latent, h // s, w // s, dtype=torch.float32, device=device)
        cache = CausalCache()
        # 1. chunk 0 is frame 0; chunk i >= 1 is frames 1 + 4(i-1) .. 4i, each giving one latent frame
        for i in range(n_latent):
            start, stop = (0, 1) if i == 0 else (1 + cfg.temporal_stride * (i - 1), 1 + cfg.temporal_stride * i)
            chunk = video[:, :, start:stop].to(device=device, dtype=dtype)  # (B, 3, 1 or 4, H, W)
            moments = self.conv1(self.encoder(chunk, cache))  # (B, 2*16, 1, h, w)
            latents[:, :, i : i + 1] = moments[:, : cfg.z_dim]  # keep the mean, drop the log-variance
        return latents

    def decode_raw(
        self,
        latents: Tensor,
        tile_latent: int | tuple[int, int] | None = None,
        overlap_latent: int = DEFAULT_OVERLAP_LATENT,
        blend: str = "linear",
        progress: Progress | None = None,
    ) -> Tensor:
        """Raw latents -> video (not clamped), whole or in overlapping spatial tiles.

        Args:
            latents: ``[B, 16, F, h, w]`` float raw latents.
            tile_latent: None decodes the whole frame at once; an int or ``(height, width)`` in latent cells
                (8 px each) decodes tiles of that size with ``overlap_latent`` cells of overlap, blended with a
                ``blend`` ("linear" / "cosine") ramp, peak memory ~ one tile (see `phantom_core.wan.vae_tiling`).
            progress: called as ``progress(done, total)`` after each latent frame is decoded (of each tile when
                tiled: ``total`` = tiles x F), e.g. to drive a progress bar; it may raise to stop the decode.
        Returns:
            ``[B, 3, 1 + 4 * (F - 1), 8h, 8w]`` float32 pixels, nominally in [-1, 1].
        Raises:
            ValueError: if ``latents`` is not ``[B, 16, F, h, w]`` with F, h, w >= 1, or the tiling is invalid.
        """
        cfg = self.config
        if latents.ndim != 5 or latents.shape[1] != cfg.z_dim or min(latents.shape) < 1:
            raise ValueError(f"latents has shape {tuple(latents.shape)}; expected [B, {cfg.z_dim}, F, h, w]")
        if tile_latent is not None:
            return decode_tiled(self, latents, tile_latent, overlap_latent, blend, progress=progress)
        dtype, device = self._compute_params()
        b, _, n_latent, h, w = latents.shape
        s, ts = cfg.spatial_stride, cfg.temporal_stride
        video = torch.empty(b, 3, 1 + ts * (n_latent - 1), h * s, w * s, dtype=torch.float32, device=device)
        cache = CausalCache()
        # 1. one latent frame per chunk: frame 0 -> 1 video frame, every later frame -> 4
        for i in range(n_latent):
            z = self.conv2(latents[:, :, i : i + 1].to(device=device, dtype=dtype))  # (B, 16, 1, h, w)
            start = 0 if i == 0 else 1 + ts * (i - 1)
            frames = self.decoder(z, cache)  # (B, 3, 1 or 4, 8h, 8w)
            video[:, :, start : start + frames.shape[2]] = frames
            if progress is not None:
                progress(i + 1, n_latent)
        return video

    def encode(self, video: Tensor) -> Tensor:
        """Pixels ``[B, 3, T, H, W]`` in [-1, 1] -> normalized latents ``[B, 16, 1+(T-1)//4, H/8, W/8]`` float32.

        Normalized = (posterior mean - mean) / std with Wan2.1's published per-channel statistics
        (`phantom_core.wan.latents`), exactly what upstream ``WanVAE.encode`` returns.
        """
        return normalize_latents(self.encode_raw(video))

    def decode(
        self,
        latents: Tensor,
        tile_latent: int | tuple[int, int] | None = None,
        overlap_latent: int = DEFAULT_OVERLAP_LATENT,
        blend: str = "linear",
        progress: Progress | None = None,
    ) -> Tensor:
        """Normalized latents ``[B, 16, F, h, w]`` -> pixels ``[B, 3, 1+4(F-1), 8h, 8w]`` float32 in [-1, 1].

        ``tile_latent`` / ``overlap_latent`` / ``blend``: optional spatial tiling; ``progress``: as in `decode_raw`.
        """
        if latents.ndim != 5 or latents.shape[1] != LATENT_CHANNELS:
            raise ValueError(f"latents has shape {tuple(latents.shape)}; expected [B, {LATENT_CHANNELS}, F, h, w]")
        raw = denormalize_latents(latents.float())
        return self.decode_raw(raw, tile_latent, overlap_latent, blend, progress).clamp_(-1.0, 1.0)


def _check_video(video: Tensor, cfg: WanVAEConfig) -> None:
    """Raise ValueError naming the input if ``video`` is not a valid [B, 3, T, H, W] clip for this VAE."""
    if video.ndim != 5 or video.shape[1] != 3:
        raise ValueError(f"video has shape {tuple(video.shape)}; expected [B, 3, T, H, W] pixels in [-1, 1]")
    if not video.is_floating_point():
        raise ValueError(f"video has dtype {video.dtype}; expected floating-point pixels in [-1, 1]")
    _, _, t, h, w = video.shape
    ts, s = cfg.temporal_stride, cfg.spatial_stride
    if t < 1 or (t - 1) % ts != 0:
        raise ValueError(f"video has T={t} frames; the VAE needs T = {ts}k + 1 (1, {ts + 1}, {2 * ts + 1}, ...)")
    for name, size in (("height H", h), ("width W", w)):
        if size < s or size % s != 0:
            raise ValueError(f"video {name}={size} px; it must be a positive multiple of {s}")


def infer_vae_config(state_dict: Mapping[str, Tensor]) -> WanVAEConfig:
    """Read the architecture of a Wan2.1-style VAE from its tensor shapes (keys as upstream, no prefix).

    dim = encoder.conv1 output channels; z_dim = conv2 channels; the encoder's residual blocks between
    Resample blocks give num_res_blocks and dim_mult; a Resample with a ``time_conv`` halves time.
    Raises:
        ValueError: if a required key is missing or the encoder layout is not one this module builds.
    """
    for key in ("encoder.conv1.weight", "conv2.weight"):
        if key not in state_dict:
            raise ValueError(f"state dict is not a Wan2.1 VAE: key {key!r} is missing")
    dim, z_dim = state_dict["encoder.conv1.weight"].shape[0], state_dict["conv2.weight"].shape[0]
    prefix = "encoder.downsamples."
    indices = sorted({int(k[len(prefix) :].split(".")[0]) for k in state_dict if k.startswith(prefix)})
    stages: list[list[int]] = [[]]  # output widths of the residual blocks of each encoder stage
    temporal: list[bool] = []
    for i in indices:
        block = f"{prefix}{i}."
        if block + "residual.2.weight" in state_dict:
            stages[-1].append(state_dict[block + "residual.2.weight"].shape[0])
        elif block + "resample.1.weight" in state_dict:
            temporal.append(block + "time_conv.weight" in state_dict)
            stages.append([])
        else:
            raise ValueError(f"state dict block {block[:-1]!r} is neither a residual nor a resample block")
    counts = [len(widths) for widths in stages]
    if len(set(counts)) != 1 or counts[0] == 0:
        raise ValueError(f"state dict has {counts} residual blocks per encoder stage; expected the same count >= 1")
    mults = tuple(widths[-1] // dim for widths in stages)
    config = WanVAEConfig(dim, z_dim, mults, counts[0], tuple(temporal))
    logger.debug("inferred VAE config %s", config)
    return config


VAE_PREFIXES = ("first_stage_model.", "vae.")  # containers that bundle the VAE with other models


def strip_vae_prefix(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Keep only the ``first_stage_model.*`` / ``vae.*`` tensors (prefix dropped) when there are any; else as is."""
    return keep_prefixed(state_dict, VAE_PREFIXES)


def _check_keys(expected: Mapping[str, Tensor], state_dict: Mapping[str, Tensor]) -> None:
    """ValueError listing missing, unexpected and wrongly shaped keys, if any."""
    if problems := key_problems({k: tuple(v.shape) for k, v in expected.items()}, state_dict):
        raise ValueError("VAE state dict does not match the Wan2.1 VAE layout: " + "; ".join(problems))


def load_vae(
    path_or_state_dict: str | Path | Mapping[str, Tensor],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    ops: Ops = nn,
) -> WanVAE:
    """Build a `WanVAE` from a checkpoint (``.pth`` / ``.safetensors`` path or a state dict), in eval mode.

    The network is built on the meta device and the checkpoint tensors are assigned (converted to ``dtype`` on
    ``device``), so weights are never held twice. Keys may carry a ``first_stage_model.`` / ``vae.`` prefix
    (other tensors of such a bundle are ignored). Gradients are switched off.
    Raises:
        FileNotFoundError: if the path does not exist (see `phantom_core.loading.files.read_state_dict`).
        ValueError: if keys are missing / unexpected / wrongly shaped (all named), or the file is unreadable.
    """
    owned = isinstance(path_or_state_dict, (str, Path))  # read here: tensors can be dropped once converted
    state_dict = strip_vae_prefix(read_state_dict(path_or_state_dict) if owned else path_or_state_dict)
    with errors_name_file(path_or_state_dict):
        config = infer_vae_config(state_dict)
        vae = WanVAE(config, ops=ops, dtype=dtype, device="meta")
        _check_keys(vae.state_dict(), state_dict)
    tensors = {}
    for key in list(state_dict):
        tensor = state_dict.pop(key) if owned else state_dict[key]
        tensors[key] = tensor.to(device=device, dtype=dtype)
    vae.load_state_dict(tensors, strict=True, assign=True)
    logger.info("loaded Wan VAE (dim %d, z_dim %d) as %s on %s", config.dim, config.z_dim, dtype, device)
    return vae.eval().requires_grad_(False)
