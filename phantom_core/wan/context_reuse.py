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


@contextmanager
def reuse_text_context(model: Any) -> Iterator[None]:
    """Within this scope, a Phantom-Wan DiT (anything with a ``text_memo`` attribute and ``blocks`` whose
    ``cross_attn`` has a ``kv_memo``) embeds each distinct text context once and computes each block's
    cross-attention K, V once per embedded context. Any other model (the MMDiT, whose text stream changes from
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
