"""The layers of ``PhantomMMDiT``: one stream's half of a joint block, the joint block, and the output layer.

A joint block (SD3, arXiv 2403.03206, Fig. 2; read in Stability-AI/sd3.5 ``mmditx.py`` ``DismantledBlock`` /
``JointBlock``) holds two sets of weights: ``x_block`` for the video stream (video tokens and the reference VAE
tokens ``F_ref,v``) and ``context_block`` for the text stream (text tokens and the CLIP reference tokens
``F_ref,c``). Each stream: adaLN-Zero modulation from the timestep conditioning (6 vectors: shift, scale, gate of
the attention, then of the MLP), affine-free LayerNorm, q/k/v projection, RMSNorm on q and k per head (qk-norm),
joint attention over both streams (here window attention with dynamic injection, ``windows.py``), output
projection, gated residual, modulated GELU(tanh) MLP, gated residual. The last block's text stream is
``pre_only`` (only its keys and values are used; SD3 does the same), so every parameter gets a gradient.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from phantom_core.mmdit.windows import WindowPlan, window_joint_attention
from phantom_core.wan.dit import run_fp32
from phantom_core.wan.rope import apply_rope

if TYPE_CHECKING:
    from phantom_core.mmdit.config import MMDiTConfig

QKV = tuple[Tensor, Tensor, Tensor]


def modulation(layer: nn.Module, c: Tensor, n: int, dtype: torch.dtype) -> list[Tensor]:
    """``n`` adaLN vectors ``(B, 1, D)`` in ``dtype`` from ``layer`` (SiLU + Linear to ``n * D``) on the timestep
    conditioning ``c (B, D)`` float32, computed in float32 through the Linear's own call (``run_fp32``: hooks and
    adapters apply), as the Phantom-Wan DiT computes its modulation."""
    mod = run_fp32(layer[1], F.silu(c))  # (B, n * D) fp32
    return [m.to(dtype) for m in mod.unsqueeze(1).chunk(n, dim=2)]  # n x (B, 1, D)


def modulate(x: Tensor, shift: Tensor, scale: Tensor, eps: float) -> Tensor:
    """``LayerNorm(x) * (1 + scale) + shift`` (affine-free LayerNorm over the last dim); ``x (B, L, D)``."""
    return torch.addcmul(shift, F.layer_norm(x, (x.shape[-1],), eps=eps), 1.0 + scale)


class StreamBlock(nn.Module):
    """One stream's weights in a joint block (SD3's ``DismantledBlock``): adaLN, attention projections with
    per-head RMSNorm on q and k, and (unless ``pre_only``) the output projection and the MLP."""

    def __init__(self, cfg: MMDiTConfig, pre_only: bool, ops: Any, dtype, device) -> None:
        super().__init__()
        kw = {"dtype": dtype, "device": device}
        D = cfg.dim
        self.pre_only, self.num_heads, self.eps = pre_only, cfg.num_heads, cfg.eps
        self.n_mods = 2 if pre_only else 6
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), ops.Linear(D, self.n_mods * D, **kw))
        self.attn = nn.Module()
        self.attn.qkv = ops.Linear(D, 3 * D, **kw)
        self.attn.ln_q = ops.RMSNorm(cfg.head_dim, eps=cfg.eps, elementwise_affine=True, **kw)
        self.attn.ln_k = ops.RMSNorm(cfg.head_dim, eps=cfg.eps, elementwise_affine=True, **kw)
        if not pre_only:
            self.attn.proj = ops.Linear(D, D, **kw)
            self.mlp = nn.Sequential(OrderedDict(
                fc1=ops.Linear(D, cfg.ffn_dim, **kw), act=nn.GELU(approximate="tanh"),
                fc2=ops.Linear(cfg.ffn_dim, D, **kw)))

    def pre_attention(self, x: Tensor, c: Tensor) -> tuple[QKV, list[Tensor]]:
        """``x (B, L, D)``, conditioning ``c (B, D)`` fp32 -> ``(q, k, v)`` each ``(B, L, H, d)`` (q, k normalised,
        not rotated) and the modulation vectors."""
        mods = modulation(self.adaLN_modulation, c, self.n_mods, x.dtype)  # n x (B, 1, D)
        h = modulate(x, mods[0], mods[1], self.eps)  # (B, L, D)
        q, k, v = self.attn.qkv(h).unflatten(2, (3, self.num_heads, -1)).unbind(2)  # 3 x (B, L, H, d)
        return (self.attn.ln_q(q), self.attn.ln_k(k), v), mods

    def post_attention(self, x: Tensor, attn: Tensor, mods: list[Tensor]) -> Tensor:
        """Gated residuals of the attention output ``attn (B, L, D)`` and of the modulated MLP -> ``(B, L, D)``."""
        _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        x = torch.addcmul(x, self.attn.proj(attn), gate_msa)  # (B, L, D)
        return torch.addcmul(x, self.mlp(modulate(x, shift_mlp, scale_mlp, self.eps)), gate_mlp)  # (B, L, D)


class JointBlock(nn.Module):
    """Video stream (``x_block``) and text stream (``context_block``) joined in one window attention."""

    def __init__(self, cfg: MMDiTConfig, last: bool, ops: Any, dtype, device) -> None:
        super().__init__()
        self.x_block = StreamBlock(cfg, False, ops, dtype, device)
        self.context_block = StreamBlock(cfg, last, ops, dtype, device)

    def forward(self, tokens: Tensor, ctx: Tensor, c: Tensor, cos: Tensor, sin: Tensor, plan: WindowPlan
                ) -> tuple[Tensor, Tensor]:
        """One joint block.

        Args:
            tokens: ``(B, Lv + Lr, D)`` video-stream tokens: the video tokens (grid order), then the reference
                VAE tokens (Lr = N * h * w, 0 without references).
            ctx: ``(B, Lt + Lc, D)`` text-stream tokens: text, then the CLIP reference tokens (Lc, 0 without).
            c: ``(B, D)`` float32 timestep conditioning.
            cos, sin: ``(Lv + Lr, 1, head_dim / 2)`` float32 RoPE tables of the video-stream tokens.
            plan: this block's video windows (``window_plan``; ``plan.n_video`` = Lv).

        Returns:
            ``(tokens, ctx)`` with their input shapes (``ctx`` unchanged by a ``pre_only`` text stream).
        """
        L = tokens.shape[1]
        (q, k, v), x_mods = self.x_block.pre_attention(tokens, c)  # 3 x (B, Lv + Lr, H, d)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # text-stream tokens: no rotation
        (cq, ck, cv), c_mods = self.context_block.pre_attention(ctx, c)  # 3 x (B, Lt + Lc, H, d)
        # [video | F_ref,v | F_text | F_ref,c]: the video tokens windowed, everything after them injected
        joint = [torch.cat(pair, dim=1) for pair in ((q, cq), (k, ck), (v, cv))]  # 3 x (B, L + Lt + Lc, H, d)
        out = window_joint_attention(*joint, plan)  # (B, L + Lt + Lc, D)
        tokens = self.x_block.post_attention(tokens, out[:, :L], x_mods)  # (B, Lv + Lr, D)
        if not self.context_block.pre_only:
            ctx = self.context_block.post_attention(ctx, out[:, L:], c_mods)  # (B, Lt + Lc, D)
        return tokens, ctx


class FinalLayer(nn.Module):
    """adaLN (shift, scale) + affine-free LayerNorm + Linear to the patch's latent values (SD3 ``FinalLayer``)."""

    def __init__(self, cfg: MMDiTConfig, ops: Any, dtype, device) -> None:
        super().__init__()
        kw = {"dtype": dtype, "device": device}
        self.eps = cfg.eps
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), ops.Linear(cfg.dim, 2 * cfg.dim, **kw))
        self.linear = ops.Linear(cfg.dim, cfg.out_dim * math.prod(cfg.patch_size), **kw)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """``x (B, L, D)``, ``c (B, D)`` float32 -> ``(B, L, out_dim * prod(patch))``."""
        shift, scale = modulation(self.adaLN_modulation, c, 2, x.dtype)  # 2 x (B, 1, D)
        return self.linear(modulate(x, shift, scale, self.eps))
