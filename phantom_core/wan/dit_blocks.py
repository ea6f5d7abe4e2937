"""The layers of the Phantom-Wan DiT (``dit.PhantomWanDiT``): attention, the transformer block and the head.

Parameter names and shapes are those of Wan2.1 ``wan/modules/model.py`` (``WanSelfAttention``,
``WanT2VCrossAttention``, ``WanAttentionBlock``, ``Head``); every layer is built from the house ``ops`` namespace.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from phantom_core.wan.attention import attention, resolve_attention, selected_attention
from phantom_core.wan.context_reuse import ContextMemo, active_memo, fold_repeated_rows
from phantom_core.wan.rope import apply_rope

if TYPE_CHECKING:
    from phantom_core.wan.dit import WanDiTConfig


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

    def attend_heads(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Scaled dot-product attention of each head, unmasked: ``q (B, Lq, H, d)``, ``k, v (B, Lk, H, d)`` ->
        ``(B, Lq, H, d)``, by the selected back-end (``wan.attention``: sdpa, flash, sage or math).

        The seam sequence parallelism replaces (``wan.ulysses`` assigns a function with this signature to the
        instance, ``attn.attend_heads = f``, and deletes it afterwards): it receives this rank's token slice of all
        heads and exchanges it for all tokens of a slice of the heads around this computation.
        """
        return attention(q, k, v)  # (B, Lq, H, d)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """``q (B, Lq, H, d)``, ``k, v (B, Lk, H, d)`` -> ``(B, Lq, H * d)`` after the output projection."""
        return self.o(self.attend_heads(q, k, v).flatten(2))  # (B, Lq, D)


class SelfAttention(_Attention):
    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """``x (B, L, D)``, RoPE tables ``(L, 1, d/2)`` -> ``(B, L, D)``; video and reference tokens together."""
        heads = (self.num_heads, -1)
        q = apply_rope(self.norm_q(self.q(x)).unflatten(2, heads), cos, sin)  # (B, L, H, d)
        k = apply_rope(self.norm_k(self.k(x)).unflatten(2, heads), cos, sin)  # (B, L, H, d)
        v = self.v(x).unflatten(2, heads)  # (B, L, H, d)
        return self._attend(q, k, v)


class CrossAttention(_Attention):
    kv_memo: ContextMemo | None = None  # set inside context_reuse.reuse_text_context (one sampling run)

    def keys_values(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """``context (B, text_len, D)`` -> the heads' keys and values, each ``(B, text_len, H, d)``."""
        heads = (self.num_heads, -1)
        return self.norm_k(self.k(context)).unflatten(2, heads), self.v(context).unflatten(2, heads)

    def memo_keys_values(self, context: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """What the run's memo keeps: the keys and values of ``context`` with the zero-padding's repeated rows folded
        (``context_reuse.fold_repeated_rows``: ``(k, v)`` of the first ``keep`` rows, ``log_weight (B, keep)``) where
        that is exact and fast: float32, the ``sdpa`` back-end (whose additive mask carries the log-weights) and
        ``attend_heads`` not replaced. Otherwise ``(*keys_values(context), None)``: a half-precision mask would round
        the log-weights, and the other back-ends take no mask."""
        plain = getattr(self.attend_heads, "__func__", None) is _Attention.attend_heads
        head_dim = context.shape[-1] // self.num_heads
        fits = plain and context.dtype == torch.float32 and \
            resolve_attention(selected_attention(), context.device.type, context.dtype, head_dim) == "sdpa"
        folded = fold_repeated_rows(context) if fits else None
        if folded is None:
            return *self.keys_values(context), None
        keep, log_weight = folded
        return *self.keys_values(context[:, :keep]), log_weight  # (B, keep, H, d) x 2, (B, keep)

    def _attend_weighted(self, q: Tensor, k: Tensor, v: Tensor, log_weight: Tensor) -> Tensor:
        """``_attend`` with ``log_weight (B, Lk)`` added to every head's logits (sdpa's additive mask):
        ``q (B, Lq, H, d)``, ``k, v (B, Lk, H, d)`` -> ``(B, Lq, D)``."""
        mask = log_weight[:, None, None, :].to(q.dtype)  # (B, 1, 1, Lk)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=mask)  # (B, H, Lq, d)
        return self.o(out.transpose(1, 2).flatten(2))  # (B, Lq, D)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        """``x (B, L, D)`` attends, unmasked, to ``context (B, text_len, D)`` -> ``(B, L, D)``; keys and values
        come from the run's memo when one is open (``context_reuse``), the context's padding folded there."""
        q = self.norm_q(self.q(x)).unflatten(2, (self.num_heads, -1))  # (B, L, H, d)
        memo = active_memo(self.kv_memo)
        if memo is None:
            return self._attend(q, *self.keys_values(context))
        k, v, log_weight = memo.get(context, self.memo_keys_values)  # (B, Lk, H, d) x 2, (B, Lk) or None
        return self._attend(q, k, v) if log_weight is None else self._attend_weighted(q, k, v, log_weight)


class TanhGELU(nn.GELU):
    """``nn.GELU(approximate="tanh")`` that overwrites its input while autograd is off and nothing is being compiled
    (inference): the FFN's widest activation, ``ffn_dim`` per token, then takes one buffer instead of two. Its input
    is the fresh output of ``ffn.0``, which nothing else holds."""

    def __init__(self) -> None:
        super().__init__(approximate="tanh")

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return super().forward(x)
        return torch.ops.aten.gelu_(x, approximate="tanh")


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
            ops.Linear(cfg.dim, cfg.ffn_dim, **kw), TanhGELU(), ops.Linear(cfg.ffn_dim, cfg.dim, **kw)
        )
        self.modulation = nn.Parameter(torch.empty(1, 6, cfg.dim, **kw))  # shift, scale, gate (attn), same (ffn)
        if self.modulation.device.type != "meta":
            nn.init.normal_(self.modulation, std=cfg.dim**-0.5)  # upstream init: randn / sqrt(dim)

    def forward(self, x: Tensor, e0: Tensor, cos: Tensor, sin: Tensor, context: Tensor) -> Tensor:
        """``x (B, L, D)``, ``e0 (B, 6, D)`` float32, RoPE ``(L, 1, d/2)``, ``context (B, Lc, D)`` -> ``(B, L, D)``.

        The six modulation vectors are summed in float32 and only then cast to the activation dtype; the
        residual stream itself stays in the activation dtype (upstream keeps it in fp32 under autocast, which
        would double the memory of the largest activation; ComfyUI makes the same choice as we do). Without
        autograd the residual additions after the first one run in place, on this block's own new tensor.
        """
        D = x.shape[-1]
        # .to(device): a host that loads the model partially (ComfyUI's low-VRAM mode) leaves it on the offload device
        mod = self.modulation.to(device=x.device, dtype=torch.float32) + e0  # (B, 6, D) fp32
        shift1, _, gate1, shift2, _, gate2 = mod.to(x.dtype).unsqueeze(2).unbind(1)  # 6 x (B, 1, D)
        one_scale1, one_scale2 = (1.0 + mod[:, [1, 4]]).to(x.dtype).unsqueeze(2).unbind(1)  # 2 x (B, 1, D)
        # 1. self-attention over video + reference tokens, gated residual
        h = torch.addcmul(shift1, F.layer_norm(x, (D,), eps=self.eps), one_scale1)  # (B, L, D)
        x = torch.addcmul(x, self.self_attn(h, cos, sin), gate1)  # (B, L, D), a new tensor: not the caller's
        inplace = not torch.is_grad_enabled()
        # 2. cross-attention to the text (no gate)
        c = self.cross_attn(self.norm3(x), context)  # (B, L, D)
        x = x.add_(c) if inplace else x + c  # (B, L, D)
        # 3. feed-forward, gated residual
        h = torch.addcmul(shift2, F.layer_norm(x, (D,), eps=self.eps), one_scale2)  # (B, L, D)
        f = self.ffn(h)  # (B, L, D)
        return x.addcmul_(f, gate2) if inplace else torch.addcmul(x, f, gate2)  # (B, L, D)


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
