"""Building blocks of the Wan2.1 causal 3-D VAE: the per-call causal cache, causal convs, norm, residual,
attention and resampling layers (upstream layer and key names). `phantom_core.wan.vae` assembles them.

Every layer works frame by frame except the causal temporal convolutions, so a video is processed in chunks
and each causal conv carries the last ``CACHE_T`` input frames of the previous chunk in a `CausalCache`
created for that one call.

Temporal quirks reproduced on purpose (they define what the checkpoints were trained with):
- ``downsample3d`` leaves the first chunk alone and afterwards convolves (last frame of the previous chunk,
  this chunk) with kernel 3, stride 2, no padding: 1 + 4k frames -> 1 + 2k -> 1 + k.
- ``upsample3d`` leaves the first latent frame alone; later frames go through a causal conv whose 2*C output
  channels are two frames interleaved: 1 + k latent frames -> 1 + 2k -> 1 + 4k.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

CACHE_T = 2  # frames of history a kernel-3 causal conv needs from the previous chunk
Ops = Any  # a namespace with Conv2d / Conv3d layer classes: torch.nn (default) or e.g. ComfyUI's comfy.ops classes


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
        self,
        dim: int,
        spatial_dims: int = 3,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
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
