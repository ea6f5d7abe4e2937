"""The Phantom-Wan DiT: a Wan2.1 text-to-video diffusion transformer that also attends to reference latents.

Phantom (arXiv 2502.11079) fine-tunes Wan2.1 T2V without adding a single parameter: each reference image is
VAE-encoded as its own 1-frame latent, the references are appended after the video latents on the time axis,
kept clean (never noised) at every step, and their output frames are cut off at the end. So this module is
the Wan2.1 T2V DiT (same parameter names and shapes as the upstream checkpoints, no renaming) whose forward
takes the references as a separate input.

Architecture (source: Wan2.1 ``wan/modules/model.py``; cross-checked against ComfyUI's
``comfy/ldm/wan/model.py`` in ``tests/test_wan_dit.py``):

- Conv3d patchify (patch 1x2x2) to ``dim`` channels; 3-D RoPE on q and k (``rope.py``);
- sinusoidal timestep embedding (cos half first) -> time MLP -> per-block 6-way modulation, all in fp32;
- each block: LayerNorm + modulation -> self-attention (RMSNorm on q and k over the full width) -> gated
  residual; affine LayerNorm (``norm3``) -> cross-attention to the text -> residual; LayerNorm + modulation
  -> GELU(tanh) FFN -> gated residual;
- head: LayerNorm + 2-way modulation -> Linear -> unpatchify.

Heads are not stored in a checkpoint; every Wan2.1 model uses 128 channels per head, so
``num_heads = dim // 128`` (``HEAD_DIM``), which is how ``checkpoint.infer_dit_config`` recovers them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from phantom_core.log import logger
from phantom_core.wan.rope import apply_rope, rope_axis_pairs, rope_table

HEAD_DIM = 128  # channels per attention head in every Wan2.1 model (1.3B: 1536 / 12, 14B: 5120 / 40)
TEXT_LEN = 512  # upstream wan_shared_cfg.text_len: umT5 tokens per prompt (</s> included), the DiT's context length


@dataclass(frozen=True)
class WanDiTConfig:
    """Architecture of a Wan2.1 T2V / Phantom-Wan DiT (everything a checkpoint's shapes determine, plus heads).

    ``qk_norm`` and ``cross_attn_norm`` are always on in Wan2.1 and are therefore not parameters here.
    """

    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    in_dim: int = 16
    out_dim: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_dim: int = 4096
    text_len: int = TEXT_LEN  # the text context is zero-padded (or truncated) to exactly this many tokens
    freq_dim: int = 256  # width of the sinusoidal timestep embedding
    eps: float = 1e-6
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        for name in ("dim", "ffn_dim", "num_heads", "num_layers", "in_dim", "out_dim", "text_dim", "text_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"WanDiTConfig.{name} is {getattr(self, name)}; it must be a positive integer")
        if self.dim % self.num_heads:
            raise ValueError(f"WanDiTConfig.dim {self.dim} is not divisible by num_heads {self.num_heads}")
        rope_axis_pairs(self.dim // self.num_heads)  # raises for a head_dim RoPE cannot split
        if self.freq_dim % 2:
            raise ValueError(f"WanDiTConfig.freq_dim is {self.freq_dim}; it must be even")
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"WanDiTConfig.patch_size is {self.patch_size}; expected 3 positive ints (t, h, w)")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


DIT_PRESETS: dict[str, WanDiTConfig] = {
    # 825 state-dict keys, 1,418,996,800 parameters
    "phantom-wan-1.3b": WanDiTConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    # 1095 state-dict keys, 14,288,491,584 parameters
    "phantom-wan-14b": WanDiTConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
    # tests and the embedded demo default; head_dim 128 like the real models, text_dim of the tiny umT5
    "tiny": WanDiTConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=2, text_dim=64),
}


def sinusoidal_embedding(t: Tensor, dim: int) -> Tensor:
    """Timestep embedding ``[cos(t w_i), sin(t w_i)]`` with ``w_i = 10000 ** (-i / (dim / 2))``.

    Args:
        t: ``(B,)`` timesteps in [0, 1000] (any float dtype).
        dim: embedding width (even).

    Returns:
        ``(B, dim)`` float32, cosine half first (Wan2.1 ``sinusoidal_embedding_1d``; phases in float64).
    """
    half = dim // 2
    f64 = torch.float32 if t.device.type == "mps" else torch.float64  # MPS has no float64
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=f64, device=t.device) / half)  # (half,)
    phase = torch.outer(t.to(f64), freqs)  # (B, half)
    return torch.cat([phase.cos(), phase.sin()], dim=1).float()  # (B, dim)


def pad_to_patch(x: Tensor, patch_size: tuple[int, int, int]) -> Tensor:
    """Pad ``(B, C, T, H, W)`` at the end of each of T, H, W up to a multiple of the patch (circular padding,
    as ComfyUI's ``pad_to_patch_size``); returns ``x`` itself when nothing is needed."""
    pad: list[int] = []
    for size, p in zip(reversed(x.shape[2:]), reversed(patch_size)):
        pad += [0, (p - size % p) % p]
    return F.pad(x, pad, mode="circular") if any(pad) else x


def linear_fp32(layer: nn.Module, x: Tensor) -> Tensor:
    """``layer(x)`` computed in float32 whatever dtype the weights are stored in, with the layer's per-tensor
    ``scale_weight`` applied when it has one (scaled fp8). Upstream Wan2.1 runs the time MLP and the modulation
    under ``autocast(dtype=float32)``; this is that, without autocast. ``x (..., in)`` -> ``(..., out)`` fp32."""
    w = layer.weight.to(device=x.device, dtype=torch.float32)
    if (scale := getattr(layer, "scale_weight", None)) is not None:
        w = w * scale.to(device=x.device, dtype=torch.float32)
    b = None if layer.bias is None else layer.bias.to(device=x.device, dtype=torch.float32)
    return F.linear(x.float(), w, b)


class _Attention(nn.Module):
    """q, k, v, o projections plus RMSNorm on q and k over the full width (upstream names)."""

    def __init__(self, dim: int, num_heads: int, eps: float, ops: Any, dtype, device) -> None:
        super().__init__()
        self.num_heads = num_heads
        kw = {"dtype": dtype, "device": device}
        self.q = ops.Linear(dim, dim, **kw)
        self.k = ops.Linear(dim, dim, **kw)
        self.v = ops.Linear(dim, dim, **kw)
        self.o = ops.Linear(dim, dim, **kw)
        self.norm_q = ops.RMSNorm(dim, eps=eps, elementwise_affine=True, **kw)
        self.norm_k = ops.RMSNorm(dim, eps=eps, elementwise_affine=True, **kw)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """``q (B, Lq, H, d)``, ``k, v (B, Lk, H, d)`` -> ``(B, Lq, H * d)`` after the output projection."""
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (B,H,Lq,d)
        return self.o(out.transpose(1, 2).flatten(2))  # (B, Lq, D)


class SelfAttention(_Attention):
    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """``x (B, L, D)``, RoPE tables ``(L, 1, d/2)`` -> ``(B, L, D)``; video and reference tokens together."""
        heads = (self.num_heads, -1)
        q = apply_rope(self.norm_q(self.q(x)).unflatten(2, heads), cos, sin)  # (B, L, H, d)
        k = apply_rope(self.norm_k(self.k(x)).unflatten(2, heads), cos, sin)  # (B, L, H, d)
        v = self.v(x).unflatten(2, heads)  # (B, L, H, d)
        return self._attend(q, k, v)


class CrossAttention(_Attention):
    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        """``x (B, L, D)`` attends, unmasked, to ``context (B, text_len, D)`` -> ``(B, L, D)``."""
        heads = (self.num_heads, -1)
        q = self.norm_q(self.q(x)).unflatten(2, heads)  # (B, L, H, d)
        k = self.norm_k(self.k(context)).unflatten(2, heads)  # (B, Lc, H, d)
        v = self.v(context).unflatten(2, heads)  # (B, Lc, H, d)
        return self._attend(q, k, v)


class WanBlock(nn.Module):
    """One DiT block: modulated self-attention, cross-attention, modulated GELU(tanh) FFN."""

    def __init__(self, cfg: WanDiTConfig, ops: Any, dtype, device) -> None:
        super().__init__()
        kw = {"dtype": dtype, "device": device}
        self.eps = cfg.eps
        # norm1 / norm2 are affine-free LayerNorms (no state-dict keys); they run as F.layer_norm in forward.
        self.self_attn = SelfAttention(cfg.dim, cfg.num_heads, cfg.eps, ops, dtype, device)
        self.norm3 = ops.LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=True, **kw)
        self.cross_attn = CrossAttention(cfg.dim, cfg.num_heads, cfg.eps, ops, dtype, device)
        self.ffn = nn.Sequential(
            ops.Linear(cfg.dim, cfg.ffn_dim, **kw), nn.GELU(approximate="tanh"), ops.Linear(cfg.ffn_dim, cfg.dim, **kw)
        )
        self.modulation = nn.Parameter(torch.empty(1, 6, cfg.dim, **kw))  # shift, scale, gate (attn), same (ffn)
        if self.modulation.device.type != "meta":
            nn.init.normal_(self.modulation, std=cfg.dim**-0.5)  # upstream init: randn / sqrt(dim)

    def forward(self, x: Tensor, e0: Tensor, cos: Tensor, sin: Tensor, context: Tensor) -> Tensor:
        """``x (B, L, D)``, ``e0 (B, 6, D)`` float32, RoPE ``(L, 1, d/2)``, ``context (B, Lc, D)`` -> ``(B, L, D)``.

        The six modulation vectors are summed in float32 and only then cast to the activation dtype; the
        residual stream itself stays in the activation dtype (upstream keeps it in fp32 under autocast, which
        would double the memory of the largest activation; ComfyUI makes the same choice as we do).
        """
        D = x.shape[-1]
        # .to(device): a host that loads the model partially (ComfyUI's low-VRAM mode) leaves it on the offload device
        mod = self.modulation.to(device=x.device, dtype=torch.float32) + e0  # (B, 6, D) fp32
        shift1, _, gate1, shift2, _, gate2 = mod.to(x.dtype).unsqueeze(2).unbind(1)  # 6 x (B, 1, D)
        one_scale1, one_scale2 = (1.0 + mod[:, [1, 4]]).to(x.dtype).unsqueeze(2).unbind(1)  # 2 x (B, 1, D)
        # 1. self-attention over video + reference tokens, gated residual
        h = torch.addcmul(shift1, F.layer_norm(x, (D,), eps=self.eps), one_scale1)  # (B, L, D)
        x = torch.addcmul(x, self.self_attn(h, cos, sin), gate1)  # (B, L, D)
        # 2. cross-attention to the text (no gate)
        x = x + self.cross_attn(self.norm3(x), context)  # (B, L, D)
        # 3. feed-forward, gated residual
        h = torch.addcmul(shift2, F.layer_norm(x, (D,), eps=self.eps), one_scale2)  # (B, L, D)
        return torch.addcmul(x, self.ffn(h), gate2)  # (B, L, D)


class WanHead(nn.Module):
    """Output head: affine-free LayerNorm, 2-way modulation (shift, scale), Linear to patch pixels."""

    def __init__(self, cfg: WanDiTConfig, ops: Any, dtype, device) -> None:
        super().__init__()
        self.eps = cfg.eps
        kw = {"dtype": dtype, "device": device}
        self.head = ops.Linear(cfg.dim, cfg.out_dim * math.prod(cfg.patch_size), **kw)
        self.modulation = nn.Parameter(torch.empty(1, 2, cfg.dim, **kw))
        if self.modulation.device.type != "meta":
            nn.init.normal_(self.modulation, std=cfg.dim**-0.5)

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        """``x (B, L, D)``, time embedding ``e (B, D)`` float32 -> ``(B, L, out_dim * prod(patch))``."""
        mod = self.modulation.to(device=x.device, dtype=torch.float32) + e.unsqueeze(1)  # (B, 2, D) fp32
        shift = mod[:, 0:1].to(x.dtype)  # (B, 1, D)
        one_scale = (1.0 + mod[:, 1:2]).to(x.dtype)  # (B, 1, D)
        return self.head(torch.addcmul(shift, F.layer_norm(x, (x.shape[-1],), eps=self.eps), one_scale))


class PhantomWanDiT(nn.Module):
    """Phantom-Wan DiT (Wan2.1 T2V architecture, upstream parameter names).

    Args:
        config: architecture (see ``DIT_PRESETS``).
        ops: namespace providing ``Linear``, ``Conv3d``, ``LayerNorm``, ``RMSNorm`` (default ``torch.nn``;
            ComfyUI's ``comfy.ops.manual_cast`` etc. fit; ``fp8.fp8_ops(compute_dtype)`` for fp8 weights, whose
            ``compute_dtype`` attribute becomes the activation dtype).
        dtype, device: passed to every layer; build on ``torch.device("meta")`` and load with
            ``load_state_dict(sd, assign=True)`` (``checkpoint.load_dit`` does that).
    """

    def __init__(self, config: WanDiTConfig, ops: Any = nn, dtype: torch.dtype | None = None, device=None) -> None:
        super().__init__()
        self.config = config
        self._ops_compute_dtype: torch.dtype | None = getattr(ops, "compute_dtype", None)  # fp8.fp8_ops sets it
        cfg, kw = config, {"dtype": dtype, "device": device}
        self.patch_embedding = ops.Conv3d(cfg.in_dim, cfg.dim, cfg.patch_size, stride=cfg.patch_size, **kw)
        self.text_embedding = nn.Sequential(
            ops.Linear(cfg.text_dim, cfg.dim, **kw), nn.GELU(approximate="tanh"), ops.Linear(cfg.dim, cfg.dim, **kw)
        )
        self.time_embedding = nn.Sequential(
            ops.Linear(cfg.freq_dim, cfg.dim, **kw), nn.SiLU(), ops.Linear(cfg.dim, cfg.dim, **kw)
        )
        self.time_projection = nn.Sequential(nn.SiLU(), ops.Linear(cfg.dim, 6 * cfg.dim, **kw))
        self.blocks = nn.ModuleList(WanBlock(cfg, ops, dtype, device) for _ in range(cfg.num_layers))
        self.head = WanHead(cfg, ops, dtype, device)

    @property
    def compute_dtype(self) -> torch.dtype:
        """Activation dtype: ``ops.compute_dtype`` when the layers cast their weights per forward
        (``fp8.fp8_ops``), else that of the weights, or bfloat16 for 8-bit weights cast on the fly by ``ops``."""
        if self._ops_compute_dtype is not None:
            return self._ops_compute_dtype
        dt = self.time_embedding[0].weight.dtype
        return dt if dt in (torch.float32, torch.float16, torch.bfloat16, torch.float64) else torch.bfloat16

    def _check_inputs(self, x: Tensor, t: Tensor, context: Tensor, ref_latents: Tensor | None) -> None:
        cfg = self.config
        if x.ndim != 5 or x.shape[1] != cfg.in_dim:
            raise ValueError(f"x has shape {tuple(x.shape)}; expected (B, {cfg.in_dim}, F, H, W) video latents")
        B = x.shape[0]
        if t.ndim != 1 or t.shape[0] != B:
            raise ValueError(f"t has shape {tuple(t.shape)}; expected ({B},): one timestep in [0, 1000] per sample")
        if context.ndim != 3 or context.shape[0] != B or context.shape[2] != cfg.text_dim:
            raise ValueError(f"context has shape {tuple(context.shape)}; expected ({B}, L, {cfg.text_dim})")
        if ref_latents is not None:
            want = (B, cfg.in_dim, x.shape[3], x.shape[4])
            got = (ref_latents.shape[0], ref_latents.shape[1], *ref_latents.shape[3:])
            if ref_latents.ndim != 5 or got != want:
                raise ValueError(
                    f"ref_latents has shape {tuple(ref_latents.shape)}; expected ({B}, {cfg.in_dim}, N, "
                    f"{x.shape[3]}, {x.shape[4]}): one 1-frame latent per reference, same size as the video"
                )

    def _embed_text(self, context: Tensor) -> Tensor:
        """``(B, L, text_dim)`` -> zero-pad / truncate to ``text_len`` -> ``(B, text_len, D)``.

        Wan2.1 was trained with the umT5 output zero-padded to 512 tokens and attends to all 512 without a
        mask, so the padding rows (which become non-zero after ``text_embedding``'s biases) matter.
        """
        n = self.config.text_len
        if context.shape[1] > n:
            logger.warning("text context has %d tokens; truncating to %d (as upstream Wan2.1)", context.shape[1], n)
            context = context[:, :n]
        context = F.pad(context, (0, 0, 0, n - context.shape[1]))  # (B, text_len, text_dim)
        return self.text_embedding(context.to(self.compute_dtype))  # (B, text_len, D)

    def forward(self, x: Tensor, t: Tensor, context: Tensor, ref_latents: Tensor | None = None) -> Tensor:
        """Predict the flow-matching velocity of the video latents.

        Args:
            x: ``(B, 16, F, H, W)`` noisy normalized video latents; H, W need not be multiples of the patch.
            t: ``(B,)`` (or a scalar) float timesteps in [0, 1000] (``1000 * sigma``).
            context: ``(B, L, text_dim)`` umT5 features, ``L <= 512`` real tokens (longer is truncated with a
                warning); zero-padded to 512 here.
            ref_latents: ``(B, 16, N, H, W)`` clean reference latents (one frame each), or None / N = 0.

        Returns:
            ``(B, 16, F, H, W)`` velocity for the video frames only, in ``x.dtype``.

        Raises:
            ValueError: for inputs of the wrong rank, channel count, batch or reference size.
        """
        if t.ndim == 0:
            t = t.expand(x.shape[0])  # one timestep for the whole batch
        if ref_latents is not None and ref_latents.ndim == 5 and ref_latents.shape[2] == 0:
            ref_latents = None  # zero references
        self._check_inputs(x, t, context, ref_latents)
        cfg, dt = self.config, self.compute_dtype
        F_, H, W = x.shape[2:]
        pt, ph, pw = cfg.patch_size
        # 1. pad to the patch and append the references after the video on the time axis
        z = pad_to_patch(x, cfg.patch_size)  # (B, C, F', H', W')
        f_video = z.shape[2] // pt
        if ref_latents is not None:
            refs = pad_to_patch(ref_latents.to(x.dtype), cfg.patch_size)  # (B, C, N', H', W')
            z = torch.cat([z, refs], dim=2)  # (B, C, F' + N', H', W')
        # 2. patchify
        z = self.patch_embedding(z.to(dt))  # (B, D, f, h, w)
        grid = tuple(z.shape[2:])
        tokens = z.flatten(2).transpose(1, 2).contiguous()  # (B, L, D), L = f * h * w
        cos, sin = rope_table(grid, cfg.head_dim, cfg.rope_theta, tokens.device)  # (L, 1, d/2) each
        # 3. timestep: sinusoid -> time MLP -> 6-way projection, all in float32 (as upstream's fp32 autocast)
        mlp, proj = self.time_embedding, self.time_projection
        e = linear_fp32(mlp[2], F.silu(linear_fp32(mlp[0], sinusoidal_embedding(t, cfg.freq_dim))))  # (B, D)
        e0 = linear_fp32(proj[1], F.silu(e)).unflatten(1, (6, cfg.dim))  # (B, 6, D)
        # 4. text context, zero-padded to text_len
        ctx = self._embed_text(context)  # (B, text_len, D)
        # 5. transformer blocks over video + reference tokens
        for block in self.blocks:
            tokens = block(tokens, e0, cos, sin, ctx)  # (B, L, D)
        # 6. head on the video tokens only (reference tokens are cut off)
        n_video = f_video * grid[1] * grid[2]
        out = self.head(tokens[:, :n_video], e)  # (B, f_video * h * w, pt * ph * pw * C)
        # 7. unpatchify and crop the patch padding
        out = rearrange(
            out, "b (f h w) (pf ph pw c) -> b c (f pf) (h ph) (w pw)",
            f=f_video, h=grid[1], w=grid[2], pf=pt, ph=ph, pw=pw,
        )  # (B, C, F', H', W')
        return out[:, :, :F_, :H, :W].to(x.dtype)  # (B, C, F, H, W)
