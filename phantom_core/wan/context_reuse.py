"""Reuse the text context's work across the steps of one sampling run.

The prompt and negative-prompt contexts do not change between sampling steps, yet a Wan2.1 forward embeds the
context (``text_embedding``: ``text_len x text_dim -> dim``, two Linears) and projects it to every block's
cross-attention keys and values (``norm_k(k(ctx))``, ``v(ctx)``) at every call: upstream Wan2.1
(``wan/modules/model.py``) and ComfyUI (``comfy/ldm/wan/model.py``) both do. At Wan2.1-1.3B's width with the
512-token context that is ~1.3 GFLOP per pass for the embedding plus ~0.8 GFLOP per block, recomputed 150 times
for a 50-step, three-pass video. Inside :func:`reuse_text_context` the DiT computes them once per distinct
context and reuses them; nothing else changes, so the output equals the plain path's up to floating-point
rounding (the same operations on the same inputs).

The scope must be one sampling run: weights are assumed fixed inside it (a LoRA or patch applied in between
would not be seen), and it is bypassed while autograd records (training recomputes every call) and, for the
cross-attention K, V, inside blocks compiled by ``torch.compile`` (see :func:`active_memo`).

Inside the scope the cross-attention also folds the context's zero-padding (:func:`fold_repeated_rows`): the
``text_len - n`` padding rows of a context with ``n`` real tokens all embed to one and the same key / value row,
and attending to ``m`` identical ``(k, v)`` rows is exactly attending to one of them with ``log m`` added to its
logit (``softmax`` sums ``m e^s v``). A 30-token prompt then attends to 31 weighted keys instead of 512.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

MEMO_ENTRIES = 4  # distinct contexts kept per scope: pass batches of 3, 2 or 1 (window edges), plus one spare


def _same_values(a: Tensor, b: Tensor) -> bool:
    """Whether ``a`` and ``b`` hold the same values (same shape, dtype and device): the raw context batch is
    concatenated anew at each step, so identity cannot tell."""
    return a is b or (a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b))


class ContextMemo:
    """At most ``MEMO_ENTRIES`` ``(key tensor, value)`` pairs; ``get`` returns the value of the first key that
    ``same(key, new)`` accepts, else computes, stores (dropping the oldest) and returns ``compute(new)``."""

    def __init__(self, same: Callable[[Tensor, Tensor], bool]) -> None:
        self.same = same
        self.entries: list[tuple[Tensor, Any]] = []
        self.hits = 0

    def get(self, key: Tensor, compute: Callable[[Tensor], Any]) -> Any:
        for stored, value in self.entries:
            if self.same(stored, key):
                self.hits += 1
                return value
        value = compute(key)
        self.entries = [*self.entries, (key, value)][-MEMO_ENTRIES:]
        return value


def active_memo(memo: ContextMemo | None) -> ContextMemo | None:
    """``memo`` when reuse applies to this call (a scope is open, autograd is not recording, and the call is not being
    traced by ``torch.compile``), else None.

    Inside a compiled block (``wan.block_compile``) the cross-attention recomputes its K, V: Dynamo would guard on
    the memo's contents and recompile the block at every hit, and the projection, fused into the block's graph,
    costs little beside the self-attention. The model-level text embedding (outside the blocks) is still reused.
    """
    return memo if memo is not None and not torch.is_grad_enabled() and not torch.compiler.is_compiling() else None


def fold_repeated_rows(context: Tensor) -> tuple[int, Tensor] | None:
    """How many leading rows of a text context to keep, and their attention log-weights, when the trailing rows that
    repeat the last row (the zero-padding, once embedded) are folded into a few of them.

    Only rows equal to the last row are folded. Keys and values are row-wise functions of the context, so those rows
    have one and the same ``(key, value)``, and attention to the kept rows with ``log_weight`` added to the logits
    equals attention to all rows up to rounding: item ``b`` with ``r_b`` such rows keeps ``m_b`` of them, each
    standing for ``r_b / m_b`` rows (logit ``+ log(r_b / m_b)``).

    Args:
        context: ``(B, Lc, D)`` embedded text context (the padding rows last, as the DiT pads).

    Returns:
        ``(keep, log_weight)``: rows ``[:keep]`` hold every item's rows before its repeated tail and at least one row
        of each tail; ``log_weight`` ``(B, keep)`` float32 (0 for rows standing for themselves). None when folding
        would drop fewer than two rows.
    """
    n = context.shape[1]
    same = (context == context[:, -1:]).all(-1)  # (B, Lc): the row equals the item's last row
    tail = same.flip(1).int().cumprod(1).sum(1)  # (B,) trailing rows equal to the last one, >= 1
    keep = n - int(tail.min()) + 1
    if keep > n - 2:
        return None
    start = n - tail  # (B,) each item's first tail row
    log_w = torch.log(tail.double() / (keep - start).double()).float()  # (B,) log(r_b / m_b)
    rows = torch.arange(keep, device=context.device)  # (keep,)
    return keep, torch.where(rows[None] >= start[:, None], log_w[:, None], 0.0)  # (B, keep) float32


@contextmanager
def reuse_text_context(model: Any) -> Iterator[None]:
    """Within this scope, a Phantom-Wan DiT (anything with a ``text_memo`` attribute and ``blocks`` whose
    ``cross_attn`` has a ``kv_memo``) embeds each distinct text context once and computes each block's
    cross-attention K, V once per embedded context (its zero-padding folded, :func:`fold_repeated_rows`, where the
    cross-attention supports it). Any other model (the MMDiT, whose text stream changes from
    block to block; a plain callable) runs unchanged. Nested scopes reuse the outer one. Clears everything on exit.
    """
    blocks = getattr(model, "blocks", None)
    if getattr(model, "text_memo", "absent") is not None or blocks is None:
        yield  # not a Phantom-Wan DiT, or a scope is already open
        return
    attns = [b.cross_attn for b in blocks if hasattr(getattr(b, "cross_attn", None), "kv_memo")]
    model.text_memo = ContextMemo(_same_values)
    for attn in attns:
        attn.kv_memo = ContextMemo(lambda a, b: a is b)  # keyed by the embedded context the model memo returns
    try:
        yield
    finally:
        model.text_memo = None
        for attn in attns:
            attn.kv_memo = None
