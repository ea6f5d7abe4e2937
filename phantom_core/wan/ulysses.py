"""Sequence parallelism for the Phantom-Wan DiT: DeepSpeed-Ulysses (Jacobs et al. 2023, arXiv 2309.14509).

The ``P`` ranks of a process group each hold a slice of the token sequence; before self-attention an
all-to-all trades "my tokens, all heads" for "all tokens, my heads", and after it a second all-to-all trades back.
Each rank then computes ``1 / P`` of every block. One forward, on rank ``r``:

1. ``run_blocks`` (the DiT's block-loop seam) pads the ``L`` tokens (video tokens, then reference tokens, on the
   time axis: Phantom's layout) with zero rows up to ``P * ceil(L / P)`` and keeps slice ``r``, ``(B, L_r, D)``.
   The RoPE tables are padded and sliced alike, so every token keeps its position in the unsplit sequence.
2. In a block everything but self-attention acts token by token (modulation, norms, FFN, and the cross-attention,
   where each rank's tokens attend to the full text context): it runs on the slice as it is.
3. Self-attention (``attend_heads``, the attention's seam): q, k, v of the slice (all ``H`` heads, q/k-normed and
   rotated) go through one all-to-all to ``(B, P * L_r, H / P, d)``; the padding rows are cut off, so the heads
   attend over exactly the ``L`` real tokens (no mask needed); the output is padded again and a second
   all-to-all returns ``(B, L_r, H, d)`` to the output projection.
4. After the last block the slices are all-gathered and the padding dropped: every rank holds ``(B, L, D)`` and
   runs the head itself, so every rank returns the same velocity.

Pad, not an uneven split: the all-to-alls then move equal chunks, and the padding (at most ``P - 1`` rows, which
are all-zero tokens: their norms stay finite thanks to ``eps``) never reaches an attention or the output.

``P`` must divide the head count (12 for the 1.3B, 40 for the 14B, 2 for the ``tiny`` preset):
:func:`check_sequence_size`. Inference only: the collectives carry no gradients, so a forward with autograd
recording is refused. Collectives: ``all_to_all_single`` and ``all_gather`` on the group's backend. NCCL has both;
gloo implements ``all_to_all_single`` for CPU tensors (checked on torch 2.14.1: the tests run on it), so there is no
all-gather emulation of the all-to-all here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from phantom_core.wan.dit import PhantomWanDiT

AttendHeads = Callable[[Tensor, Tensor, Tensor], Tensor]


def check_sequence_size(size: int, num_heads: int) -> None:
    """Raise ``ValueError`` unless ``size`` sequence-parallel ranks can share ``num_heads`` attention heads evenly.

    The message names the world size, the head count and the valid sizes (the divisors of the head count).
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1 or num_heads % size:
        valid = ", ".join(str(n) for n in range(1, num_heads + 1) if num_heads % n == 0)
        raise ValueError(f"sequence-parallel world size {size!r} does not divide the DiT's {num_heads} attention heads "
                         f"(each rank attends with heads / world size of them); valid sizes: {valid}")


def all_to_all(x: Tensor, scatter_dim: int, gather_dim: int, group: dist.ProcessGroup | None = None) -> Tensor:
    """Cut ``x`` into ``P`` equal chunks along ``scatter_dim``, send chunk ``j`` to rank ``j`` of ``group``, and
    concatenate the chunks received (in rank order) along ``gather_dim``.

    Example with ``P = 2``: ``(B, L / 2, H, d)``, scatter 2, gather 1 -> ``(B, L, H / 2, d)``, and back with scatter 1,
    gather 2. ``x``'s size along ``scatter_dim`` must be a multiple of ``P`` (an internal invariant here).
    """
    size = dist.get_world_size(group)
    assert x.shape[scatter_dim] % size == 0, (tuple(x.shape), scatter_dim, size)
    send = torch.stack(x.chunk(size, dim=scatter_dim)).contiguous()  # (P, *chunk)
    received = torch.empty_like(send)  # (P, *chunk): row j from rank j
    dist.all_to_all_single(received, send, group=group)
    return torch.cat(received.unbind(0), dim=gather_dim)


@dataclass
class _Slicing:
    """The split of the current forward: ``size`` ranks, this one ``rank`` of ``group``; ``length`` real tokens."""

    size: int
    rank: int
    group: dist.ProcessGroup | None
    length: int = 0

    @property
    def per_rank(self) -> int:
        return -(-self.length // self.size)  # ceil(L / P)


def _exchange_heads(attend: AttendHeads, split: _Slicing, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Self-attention of this rank's token slice through two all-to-alls: ``q, k, v (B, L_r, H, d)`` ->
    ``(B, L_r, H, d)``, equal to the unsplit attention's rows of this slice."""
    n, padded = split.length, split.per_rank * split.size
    qkv = all_to_all(torch.stack((q, k, v)), scatter_dim=3, gather_dim=2, group=split.group)  # (3, B, P*L_r, H/P, d)
    q, k, v = qkv[:, :, :n].unbind(0)  # 3 x (B, L, H/P, d): the padding rows cut off
    out = attend(q, k, v)  # (B, L, H/P, d)
    out = F.pad(out, (0, 0, 0, 0, 0, padded - n))  # (B, P*L_r, H/P, d)
    return all_to_all(out, scatter_dim=1, gather_dim=2, group=split.group)  # (B, L_r, H, d)


def _split_blocks(run_blocks: Callable[..., Tensor], split: _Slicing) -> Callable[..., Tensor]:
    """The block loop on this rank's token slice, then all slices gathered: same signature and result as
    ``PhantomWanDiT.run_blocks``."""

    def run(tokens: Tensor, e0: Tensor, cos: Tensor, sin: Tensor, ctx: Tensor) -> Tensor:
        if torch.is_grad_enabled():
            raise RuntimeError("sequence parallelism is for inference: its all-to-alls carry no gradients; run the "
                               "model under torch.no_grad() (the sampler does)")
        split.length = tokens.shape[1]
        m = split.per_rank
        pad, lo, hi = m * split.size - split.length, split.rank * m, (split.rank + 1) * m
        part = F.pad(tokens, (0, 0, 0, pad))[:, lo:hi].contiguous()  # (B, L_r, D)
        cos_r = F.pad(cos, (0, 0, 0, 0, 0, pad))[lo:hi]  # (L_r, 1, d/2): positions of the unsplit sequence
        sin_r = F.pad(sin, (0, 0, 0, 0, 0, pad))[lo:hi]  # (L_r, 1, d/2)
        out = run_blocks(part, e0, cos_r, sin_r, ctx).contiguous()  # (B, L_r, D)
        parts = [torch.empty_like(out) for _ in range(split.size)]
        dist.all_gather(parts, out, group=split.group)  # P x (B, L_r, D)
        return torch.cat(parts, dim=1)[:, :split.length]  # (B, L, D)

    return run


@contextlib.contextmanager
def sequence_parallel(model: PhantomWanDiT, group: dist.ProcessGroup | None = None) -> Iterator[PhantomWanDiT]:
    """Run ``model``'s forwards sequence-parallel over ``group`` (default: the whole world) inside the block.

    Every rank of ``group`` must call the model at the same time with the same inputs (the same ``x``, ``t``,
    context and references: the sampler guarantees it by drawing the same noise on every rank); each returns the
    full velocity, equal to the unsplit forward's up to float rounding (the attention runs on other shapes). The
    model's ``run_blocks`` and each block's ``self_attn.attend_heads`` are replaced on the instances for the
    duration and restored on exit.

    Raises:
        ValueError: ``model`` is not a ``PhantomWanDiT``; the group's size does not divide the head count
            (:func:`check_sequence_size`); ``run_blocks`` or an ``attend_heads`` is already replaced on the
            instance (a block cache: it would see token slices, which it does not expect).
        RuntimeError: (on a forward) autograd is recording.
    """
    if not isinstance(model, PhantomWanDiT):
        raise ValueError(f"sequence parallelism splits the Phantom-Wan DiT's tokens (PhantomWanDiT); got "
                         f"{type(model).__name__}")
    check_sequence_size(dist.get_world_size(group), model.config.num_heads)
    attentions = [block.self_attn for block in model.blocks]
    replaced = [name for name, m in (("run_blocks", model), *(("attend_heads", a) for a in attentions))
                if name in vars(m)]
    if replaced:
        raise ValueError(f"sequence_parallel: {sorted(set(replaced))} already replaced on the model instance (a block "
                         "cache?); sequence parallelism wraps the plain block loop and attention")
    split = _Slicing(dist.get_world_size(group), dist.get_rank(group), group)
    model.run_blocks = _split_blocks(model.run_blocks, split)
    for attn in attentions:
        attn.attend_heads = lambda q, k, v, _inner=attn.attend_heads: _exchange_heads(_inner, split, q, k, v)
    try:
        yield model
    finally:
        del model.run_blocks
        for attn in attentions:
            del attn.attend_heads
