"""Attention back-ends: one function, :func:`attention`, for the attention of both DiTs, run by a kernel chosen at
run time.

Every back-end computes the same thing, unmasked multi-head attention ``softmax(q k^T / sqrt(d)) v`` per head, on
``(B, L, H, d)`` tensors (the layout of the DiTs' projections, and FlashAttention's own):

- ``sdpa`` (the default): ``torch.nn.functional.scaled_dot_product_attention``, which picks one of torch's fused
  kernels (flash, memory-efficient, cuDNN) or its math fallback by itself; any device, any float dtype.
- ``flash``: FlashAttention 2, ``flash_attn.flash_attn_func`` (package ``flash-attn``): CUDA, fp16 / bf16,
  head_dim a multiple of 8 up to 256.
- ``sage``: SageAttention, ``sageattention.sageattn`` (package ``sageattention``): CUDA, fp16 / bf16, head_dim 64,
  96 or 128. It quantizes q and k to INT8 per block (and P V to fp16 / fp8), so it is the furthest from ``sdpa``:
  faster, and a few 1e-3 away in relative terms.
- ``math``: the formula written out in float32 (the ``(B, H, Lq, Lk)`` scores held in memory): the reference the
  tests hold the others to, and a fallback for debugging a kernel; slow and memory-hungry on real sizes.
- ``auto``: ``flash``, else ``sage``, when its package is installed and the tensors fit it (CUDA, dtype,
  head_dim), else ``sdpa``; decided per call, so the same model on the CPU still runs ``sdpa``.

Selection, first match wins: an open :func:`use_attention` scope (the CLI's ``--attention`` and the sampler node's
``attention`` input open one around sampling), the environment variable ``PHANTOM_ATTENTION``, ``auto``. A name
that is not a back-end, or an explicitly named back-end whose package is missing, is refused with a ``ValueError``
naming the input and the valid values (:func:`check_attention`); a back-end named explicitly for tensors it cannot
take (``flash`` on the CPU, in fp32) is refused at the call (:func:`resolve_attention`), not silently replaced.

The selection is a module global, not a ``contextvars.ContextVar``: ``torch.compile`` (``wan.block_compile``) guards
on the global's value, so a compiled block recompiles when the choice changes, where reading a ``ContextVar``
would break its graph. Hence one selection per process at a time, as ComfyUI runs one prompt at a time.

Not routed here: the VAE's single-head mid-block attention (``vae_blocks.py``) runs in float32 with 384-wide
heads, which no fast kernel takes; it calls ``sdpa`` itself.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

ATTENTION_ENV = "PHANTOM_ATTENTION"
HALF_DTYPES = (torch.float16, torch.bfloat16)


def _sdpa(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (B, H, Lq, d)
    return out.transpose(1, 2)  # (B, Lq, H, d)


def _math(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """The reference: scores, softmax and the weighted sum all in float32, the result cast to ``q``'s dtype."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * q.shape[-1] ** -0.5  # (B, H, Lq, Lk) fp32
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(dim=-1), v.float()).to(q.dtype)  # (B, Lq, H, d)


def _flash(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    from flash_attn import flash_attn_func  # optional package, checked by check_attention / resolve_attention

    return flash_attn_func(q, k, v)  # (B, Lq, H, d): FlashAttention's native layout


def _sage(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    from sageattention import sageattn  # optional package, checked by check_attention / resolve_attention

    return sageattn(q, k, v, tensor_layout="NHD", is_causal=False)  # NHD = (B, L, H, d)


@dataclass(frozen=True)
class AttentionBackend:
    """One way to compute attention.

    ``kernel(q, k, v)``: ``(B, Lq, H, d)``, ``(B, Lk, H, d)`` x 2 -> ``(B, Lq, H, d)`` in ``q``'s dtype.
    ``package``: the module to import (None: part of torch). ``cuda_only``, ``dtypes`` (None: any float dtype),
    ``head_dims`` (None: any) say which tensors it takes.
    """

    name: str
    kernel: Callable[[Tensor, Tensor, Tensor], Tensor]
    package: str | None = None
    cuda_only: bool = False
    dtypes: tuple[torch.dtype, ...] | None = None
    head_dims: tuple[int, ...] | None = None

    def unfit(self, device_type: str, dtype: torch.dtype, head_dim: int) -> str | None:
        """Why this back-end cannot take such tensors, or None when it can."""
        if self.cuda_only and device_type != "cuda":
            return f"it runs on CUDA only, the tensors are on {device_type}"
        if self.dtypes is not None and dtype not in self.dtypes:
            valid = ", ".join(str(d).removeprefix("torch.") for d in self.dtypes)
            return f"it takes {valid}, the tensors are {str(dtype).removeprefix('torch.')}"
        if self.head_dims is not None and head_dim not in self.head_dims:
            return f"it takes head_dim {_span(self.head_dims)}, the model's is {head_dim}"
        return None


def _span(dims: tuple[int, ...]) -> str:
    return f"{dims[0]}, {dims[1]}, ..., {dims[-1]}" if len(dims) > 4 else ", ".join(map(str, dims))


ATTENTION_BACKENDS: dict[str, AttentionBackend] = {
    "sdpa": AttentionBackend("sdpa", _sdpa),
    "flash": AttentionBackend("flash", _flash, "flash_attn", True, HALF_DTYPES, tuple(range(8, 257, 8))),
    "sage": AttentionBackend("sage", _sage, "sageattention", True, HALF_DTYPES, (64, 96, 128)),
    "math": AttentionBackend("math", _math),
}
AUTO_ORDER = ("flash", "sage")  # what "auto" tries before falling back to sdpa, fastest first
ATTENTION_CHOICES: tuple[str, ...] = ("auto", *ATTENTION_BACKENDS)  # the CLI's and the node's choices
# which optional packages are importable, looked up once (find_spec imports nothing): read inside compiled blocks,
# where an import-system lookup would break the graph; tests replace entries to pretend a package is there
INSTALLED: dict[str, bool] = {name: b.package is None or importlib.util.find_spec(b.package) is not None
                              for name, b in ATTENTION_BACKENDS.items()}

_selected: str | None = None  # the open use_attention scope's choice, None outside any


def available_attention() -> list[str]:
    """The choices usable on this machine: ``auto`` and every back-end whose package is installed."""
    return ["auto", *(name for name in ATTENTION_BACKENDS if INSTALLED[name])]


def check_attention(name: str, input_name: str = "attention") -> str:
    """``name`` itself when it is a usable choice; else ``ValueError`` naming ``input_name``, the value and the valid
    (or, for a back-end whose package is missing, the available) values."""
    if name not in ATTENTION_CHOICES:
        raise ValueError(f"{input_name}: got {name!r}; valid: {', '.join(ATTENTION_CHOICES)}")
    if name != "auto" and not INSTALLED[name]:
        package = ATTENTION_BACKENDS[name].package
        raise ValueError(f"{input_name}: {name!r} needs the Python package {package!r}, which is not installed here; "
                         f"available: {', '.join(available_attention())}")
    return name


def selected_attention() -> str:
    """The current choice: the open :func:`use_attention` scope's, else ``$PHANTOM_ATTENTION`` (checked), else
    ``auto``."""
    if _selected is not None:
        return _selected
    value = os.environ.get(ATTENTION_ENV)
    return "auto" if not value else check_attention(value.strip().lower(), f"environment variable {ATTENTION_ENV}")


@contextmanager
def use_attention(name: str | None) -> Iterator[str]:
    """Run every :func:`attention` inside the block with back-end ``name`` (any of ``ATTENTION_CHOICES``); None
    leaves the current choice (``$PHANTOM_ATTENTION`` or an outer scope) as it is. Yields the choice in effect;
    restores the previous one on exit. Raises ``ValueError`` (:func:`check_attention`) on entry."""
    global _selected
    previous = _selected
    if name is not None:
        _selected = check_attention(name)
    try:
        yield selected_attention()
    finally:
        _selected = previous


def resolve_attention(name: str, device_type: str, dtype: torch.dtype, head_dim: int) -> str:
    """The back-end that ``name`` means for tensors on ``device_type`` (``"cuda"``, ``"cpu"``, ...) of ``dtype``
    with ``head_dim`` channels per head: ``auto`` -> the first of ``AUTO_ORDER`` installed and fitting, else
    ``sdpa``; an explicit back-end -> itself.

    Raises:
        ValueError: an unknown or uninstalled ``name`` (:func:`check_attention`), or an explicit back-end that cannot
            take such tensors (the message says why and what to choose instead).
    """
    check_attention(name)
    if name == "auto":
        for candidate in AUTO_ORDER:  # a plain loop: torch.compile traces it without a graph break
            if INSTALLED[candidate] and ATTENTION_BACKENDS[candidate].unfit(device_type, dtype, head_dim) is None:
                return candidate
        return "sdpa"
    reason = ATTENTION_BACKENDS[name].unfit(device_type, dtype, head_dim)
    if reason is not None:
        raise ValueError(f"attention: {name!r} cannot run this model's attention: {reason}; choose auto (falls "
                         "back to sdpa) or sdpa")
    return name


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Unmasked multi-head attention with the selected back-end (:func:`selected_attention`,
    :func:`resolve_attention`).

    Args:
        q: ``(B, Lq, H, d)`` queries (already normalised and rotated where the model does so).
        k, v: ``(B, Lk, H, d)`` keys and values, same dtype and device.

    Returns:
        ``(B, Lq, H, d)`` in ``q``'s dtype: ``softmax(q k^T / sqrt(d)) v`` per head.

    Raises:
        ValueError: see :func:`resolve_attention`.
    """
    name = resolve_attention(selected_attention(), q.device.type, q.dtype, q.shape[-1])
    return ATTENTION_BACKENDS[name].kernel(q, k, v)
