"""Wan2.1 causal 3-D VAE (video <-> 16-channel latents, stride 4 in time and 8 in space), upstream key names.

Architecture: Wan-Video/Wan2.1 `wan/modules/vae.py` (also used unchanged by Phantom-Wan), re-written here.
Every layer works frame by frame except the causal temporal convolutions, so a video is processed in chunks
(encode: the first frame, then 4 frames at a time; decode: one latent frame at a time) and each causal conv
carries the last ``CACHE_T`` input frames of the previous chunk in a `CausalCache` created for that one call.

Temporal quirks reproduced on purpose (they define what the checkpoints were trained with):
- ``downsample3d`` leaves the first chunk alone and afterwards convolves (last frame of the previous chunk,
  this chunk) with kernel 3, stride 2, no padding: 1 + 4k frames -> 1 + 2k -> 1 + k.
- ``upsample3d`` leaves the first latent frame alone; later frames go through a causal conv whose 2*C output
  channels are two frames interleaved: 1 + k latent frames -> 1 + 2k -> 1 + 4k.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from phantom_core.checkpoint import read_state_dict
from phantom_core.latent_norm import LATENT_CHANNELS, denormalize_latents, normalize_latents
from phantom_core.log import logger

CACHE_T = 2  # frames of history a kernel-3 causal conv needs from the previous chunk
Ops = Any  # a namespace with Conv2d / Conv3d layer classes: torch.nn (default) or e.g. ComfyUI's comfy.ops classes


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
}


class CausalCache:
    """Per-call state of a chunked encode/decode: for each causal conv, its last input frames.

    Keys are the conv modules themselves, so no layer counter is threaded through the network. A new cache
    is created by every `WanVAE.encode_raw` / `decode_raw` call and dropped at its end.
    """

    def __init__(self) -> None:
        self._frames: dict[nn.Module, Tensor] = {}
        self._seen: set[nn.Module] = set()

    def get(self, module: nn.Module) -> Tensor | None:
        """Frames stored for ``module`` by the previous chunk (None on the first chunk)."""
        return self._frames.get(module)

    def put(self, module: nn.Module, frames: Tensor) -> None:
        self._frames[module] = frames

    def first_visit(self, module: nn.Module) -> bool:
        """True the first time ``module`` asks (its first chunk), False afterwards."""
        first = module not in self._seen
        self._seen.add(module)
        return first


def causal_conv(ops: Ops, c_in: int, c_out: int, kernel: int | tuple[int, int, int], **kw: Any) -> nn.Module:
    """A Conv3d that pads only in space; `apply_causal` adds the causal (past-only) time padding."""
    k = (kernel,) * 3 if isinstance(kernel, int) else kernel
    return ops.Conv3d(c_in, c_out, k, padding=(0, k[1] // 2, k[2] // 2), **kw)


def apply_causal(conv: nn.Module, x: Tensor, cache: CausalCache | None) -> Tensor:
    """Run ``conv`` (from `causal_conv`, stride 1 in time) on ``x`` (B, C, t, H, W) causally along time.

    Output frame i sees input frames i-k+1..i; frames before the video start are zeros, frames from earlier
    chunks come from ``cache`` (which then keeps the last ``CACHE_T`` frames of what it has seen).
    """
    pad_t = conv.kernel_size[0] - 1
    if pad_t == 0:
        return conv(x)
    previous = None
    if cache is not None:
        previous = cache.get(conv)
        cache.put(conv, _last_frames(previous, x))
    parts = [x] if previous is None else [previous, x]
    missing = pad_t - (0 if previous is None else previous.shape[2])
    if missing > 0:
        parts.insert(0, x.new_zeros(x.shape[0], x.shape[1], missing, *x.shape[3:]))
    return conv(torch.cat(parts, 2) if len(parts) > 1 else x)  # (B, C_out, t, H, W)


def _last_frames(previous: Tensor | None, x: Tensor) -> Tensor:
    """The last ``CACHE_T`` frames of (previous, x) as a new tensor (a view of ``x`` would keep all of it alive)."""
    if x.shape[2] >= CACHE_T or previous is None:
        return x[:, :, -CACHE_T:].clone()
    return torch.cat([previous[:, :, x.shape[2] - CACHE_T :], x], 2)


class RMSNorm(nn.Module):
    """x / rms(x) * gamma over the channel axis (dim 1): ``F.normalize(x) * sqrt(C) * gamma``, no bias.

    ``spatial_dims`` is 3 for 5-D video tensors and 2 for per-frame 4-D tensors (it fixes gamma's checkpoint shape
    ``(C, 1, 1, 1)`` or ``(C, 1, 1)``).
    """

    def __init__(
        self, dim: int, spatial_dims: int = 3, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones((dim,) + (1,) * spatial_dims, dtype=dtype, device=device))

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=1) * self.scale * self.gamma.to(dtype=x.dtype, device=x.device)


class ResidualBlock(nn.Module):
    """norm-SiLU-conv3 -> norm-SiLU-conv3 plus a (1x1x1 conv) shortcut; 3-D convs are causal in time.

    The Sequential keeps upstream's layer indices (0 norm, 1 SiLU, 2 conv, 3 norm, 4 SiLU, 5 dropout slot,
    6 conv) because they are in the checkpoint keys; `forward` calls the layers explicitly.
    """

    def __init__(self, c_in: int, c_out: int, ops: Ops, **kw: Any) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            RMSNorm(c_in, **kw), nn.SiLU(), causal_conv(ops, c_in, c_out, 3, **kw),
            RMSNorm(c_out, **kw), nn.SiLU(), nn.Identity(), causal_conv(ops, c_out, c_out, 3, **kw),
        )  # fmt: skip
        self.shortcut = ops.Conv3d(c_in, c_out, 1, **kw) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, cache: CausalCache | None = None) -> Tensor:
        r = self.residual
        h = apply_causal(r[2], F.silu(r[0](x), inplace=True), cache)  # (B, C_out, t, H, W)
        h = apply_causal(r[6], F.silu(r[3](h), inplace=True), cache)  # (B, C_out, t, H, W)
        return h.add_(self.shortcut(x))


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H*W positions of each frame separately, with a residual."""

    def __init__(self, dim: int, ops: Ops, **kw: Any) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, spatial_dims=2, **kw)
        self.to_qkv = ops.Conv2d(dim, dim * 3, 1, **kw)
        self.proj = ops.Conv2d(dim, dim, 1, **kw)

    def forward(self, x: Tensor, cache: CausalCache | None = None) -> Tensor:
        b, _, t, h, w = x.shape
        y = self.norm(rearrange(x, "b c t h w -> (b t) c h w"))  # (B*t, C, H, W)
        qkv = rearrange(self.to_qkv(y), "n (three c) h w -> three n 1 (h w) c", three=3)  # 3 x (B*t, 1, HW, C)
        y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B*t, 1, HW, C)
        y = self.proj(rearrange(y, "n 1 (h w) c -> n c h w", h=h))  # (B*t, C, H, W)
        return x + rearrange(y, "(b t) c h w -> b c t h w", b=b)


class Resample(nn.Module):
    """Spatial x2 up/down-sampling per frame, optionally with the temporal x2 step (see module docstring).

    Modes: ``upsample2d`` / ``upsample3d`` (channels halve: C -> C/2), ``downsample2d`` / ``downsample3d``.
    """

    MODES = ("upsample2d", "upsample3d", "downsample2d", "downsample3d")

    def __init__(self, dim: int, mode: str, ops: Ops, **kw: Any) -> None:
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"Resample mode {mode!r} is not one of {self.MODES}")
        self.mode = mode
        if mode.startswith("up"):
            up = nn.Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact")
            self.resample = nn.Sequential(up, ops.Conv2d(dim, dim // 2, 3, padding=1, **kw))
        else:  # pad right/bottom by one so a stride-2 3x3 conv halves even sizes exactly
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), ops.Conv2d(dim, dim, 3, stride=2, **kw))
        if mode == "upsample3d":
            self.time_conv = causal_conv(ops, dim, dim * 2, (3, 1, 1), **kw)
        elif mode == "downsample3d":
            self.time_conv = ops.Conv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1), **kw)

    def forward(self, x: Tensor, cache: CausalCache | None = None) -> Tensor:
        if cache is None and self.mode.endswith("3d"):
            raise ValueError(f"Resample({self.mode}) runs chunk by chunk and needs a CausalCache")
        # 1. temporal upsampling: C channels -> 2*C (two frames per input frame), interleaved into time
        if self.mode == "upsample3d" and not cache.first_visit(self):
            x = apply_causal(self.time_conv, x, cache)  # (B, 2C, t, H, W)
            x = rearrange(x, "b (two c) t h w -> b c (t two) h w", two=2)  # (B, C, 2t, H, W)
        # 2. spatial resampling, frame by frame
        t = x.shape[2]
        x = self.resample(rearrange(x, "b c t h w -> (b t) c h w"))  # (B*t, C', H', W')
        x = rearrange(x, "(b t) c h w -> b c t h w", t=t)  # (B, C', t, H', W')
        # 3. temporal downsampling with the last frame of the previous chunk in front (none for the first chunk)
        if self.mode == "downsample3d":
            previous = cache.get(self)
            cache.put(self, x[:, :, -1:].clone())
            if previous is not None:
                x = self.time_conv(torch.cat([previous, x], 2))  # (B, C, t/2, H', W')
        return x


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

    def decode_raw(self, latents: Tensor) -> Tensor:
        """Raw latents -> video (not clamped).

        Args:
            latents: ``[B, 16, F, h, w]`` float raw latents.
        Returns:
            ``[B, 3, 1 + 4 * (F - 1), 8h, 8w]`` float32 pixels, nominally in [-1, 1].
        Raises:
            ValueError: if ``latents`` is not ``[B, 16, F, h, w]`` with F, h, w >= 1.
        """
        cfg = self.config
        if latents.ndim != 5 or latents.shape[1] != cfg.z_dim or min(latents.shape) < 1:
            raise ValueError(f"latents has shape {tuple(latents.shape)}; expected [B, {cfg.z_dim}, F, h, w]")
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
        return video

    def encode(self, video: Tensor) -> Tensor:
        """Pixels ``[B, 3, T, H, W]`` in [-1, 1] -> normalized latents ``[B, 16, 1+(T-1)//4, H/8, W/8]`` float32.

        Normalized = (posterior mean - mean) / std with Wan2.1's published per-channel statistics
        (`phantom_core.latent_norm`), exactly what upstream ``WanVAE.encode`` returns.
        """
        return normalize_latents(self.encode_raw(video))

    def decode(self, latents: Tensor) -> Tensor:
        """Normalized latents ``[B, 16, F, h, w]`` -> pixels ``[B, 3, 1+4(F-1), 8h, 8w]`` float32 in [-1, 1]."""
        if latents.ndim != 5 or latents.shape[1] != LATENT_CHANNELS:
            raise ValueError(f"latents has shape {tuple(latents.shape)}; expected [B, {LATENT_CHANNELS}, F, h, w]")
        return self.decode_raw(denormalize_latents(latents.float())).clamp_(-1.0, 1.0)


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


def strip_vae_prefix(state_dict: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    """Keep only the ``first_stage_model.*`` / ``vae.*`` tensors (prefix dropped) when there are any; else as is."""
    for prefix in VAE_PREFIXES:
        kept = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if kept:
            if len(kept) < len(state_dict):
                logger.info("kept %d '%s*' tensors, ignored %d others", len(kept), prefix, len(state_dict) - len(kept))
            return kept
    return state_dict


def _check_keys(expected: Mapping[str, Tensor], state_dict: Mapping[str, Tensor]) -> None:
    """ValueError listing missing, unexpected and wrongly shaped keys, if any."""
    missing = sorted(expected.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - expected.keys())
    wrong = [f"{k}: {tuple(state_dict[k].shape)} != {tuple(v.shape)}"
             for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape]  # fmt: skip
    if missing or unexpected or wrong:
        raise ValueError(f"VAE state dict does not match the Wan2.1 VAE layout: missing {missing}, "
                         f"unexpected {unexpected}, wrong shape (got != expected) {wrong}")  # fmt: skip


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
        FileNotFoundError: if the path does not exist (see `phantom_core.checkpoint.read_state_dict`).
        ValueError: if keys are missing / unexpected / wrongly shaped (all named), or the file is unreadable.
    """
    owned = isinstance(path_or_state_dict, (str, Path))  # read here: tensors can be dropped once converted
    state_dict = strip_vae_prefix(read_state_dict(path_or_state_dict) if owned else path_or_state_dict)
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
