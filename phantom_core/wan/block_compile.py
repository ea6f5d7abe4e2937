"""Regional ``torch.compile``: each transformer block of a DiT compiled on its own, never the whole model.

Why blocks and not the model: every block of a network runs the same code on same-shaped weights, so Dynamo
traces one block, and the other blocks of that shape reuse its compiled graph (their parameters are the graph's
inputs, not constants: torch's ``inline_inbuilt_nn_modules``, on by default since torch 2.5). A 30-block DiT
compiles about as fast as one block (a few graphs in all: the MMDiT's shifted and unshifted windows and its
``pre_only`` last block each get their own), and everything around the blocks stays eager and untouched: the
patchify, the fp32 time path, the head, the sampler, and the seams that wrap the block loop (``run_blocks``:
step caches, sequence parallelism, gradient checkpointing, which calls each compiled block).

``nn.Module.compile`` compiles a block in place: its class, parameter names and state-dict keys stay the same (a
``torch.compile(block)`` wrapper would add ``_orig_mod.`` to every key), so loading, LoRA merging and LoRA adapter
injection by name keep working. Dynamo guards what it traced on (module structure, dtypes, shapes, the attention
back-end ``wan.attention`` selects, grad mode): a LoRA adapter injected into a compiled block, another back-end or
another video size recompiles that block's graph, it is never silently reused. Weights changed in place (a merged
LoRA, ComfyUI's weight patches) are inputs, so they need no recompilation.

Numerics: with ``backend="inductor"`` (the default) kernels are fused and reordered, so outputs differ from the
eager blocks by float rounding; ``"eager"`` / ``"aot_eager"`` (what the CPU tests use) run the traced graph with
the eager kernels. Off by default everywhere (CLI ``--compile``, the sampler node's ``compile`` input).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

BLOCK_LISTS = ("blocks", "joint_blocks")  # PhantomWanDiT.blocks, PhantomMMDiT.joint_blocks


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's list of transformer blocks (``blocks`` or ``joint_blocks``).

    Raises:
        ValueError: ``model`` has neither (the message names its type and the attributes looked for).
    """
    for name in BLOCK_LISTS:
        blocks = getattr(model, name, None)
        if isinstance(blocks, nn.ModuleList):
            return blocks
    raise ValueError(f"compile_blocks: {type(model).__name__} has no transformer block list ({' or '.join(BLOCK_LISTS)}"
                     "); expected a PhantomWanDiT or a PhantomMMDiT")


def compile_blocks(model: nn.Module, *, backend: str | Callable = "inductor", mode: str | None = None,
                   dynamic: bool | None = None) -> nn.Module:
    """Compile each transformer block of ``model`` in place with ``torch.compile`` (regional compilation).

    Compilation happens lazily, at each graph's first call. Calling this again recompiles with the new options.

    Args:
        model: a ``PhantomWanDiT`` or ``PhantomMMDiT`` (anything with ``blocks`` / ``joint_blocks``).
        backend: ``torch.compile`` back-end: ``"inductor"`` (fused kernels; needs a C++ compiler on the CPU, Triton
            on CUDA), ``"aot_eager"`` or ``"eager"`` (tracing only: for tests and debugging), any other registered
            name, or a back-end callable (``torch.compile``'s custom back-ends).
        mode: inductor mode, e.g. ``"max-autotune-no-cudagraphs"``; None: torch's default. (CUDA graphs modes
            need static inputs; the sampler's batch of guidance passes changes size, so they are not advised.)
        dynamic: ``torch.compile``'s ``dynamic``; None (default) marks a dimension dynamic once it has changed.

    Returns:
        ``model`` itself.

    Raises:
        ValueError: ``model`` has no block list, or ``backend`` is a name no ``torch.compile`` back-end has.
    """
    blocks = transformer_blocks(model)
    valid = torch.compiler.list_backends(exclude_tags=())
    if isinstance(backend, str) and backend not in valid:
        raise ValueError(f"compile backend: got {backend!r}; registered back-ends: {', '.join(sorted(valid))}")
    for block in blocks:
        block.compile(backend=backend, mode=mode, dynamic=dynamic)
    return model


def uncompile_blocks(model: nn.Module) -> nn.Module:
    """Undo :func:`compile_blocks`: every block runs its eager forward again. Returns ``model``."""
    for block in transformer_blocks(model):
        # nn.Module.compile stores the compiled call here and __call__ prefers it when set (torch has no public
        # "uncompile"); tests/core/test_block_compile.py checks this stays true on the installed torch
        block._compiled_call_impl = None
    return model


def set_compiled(model: nn.Module, on: bool, **options: Any) -> nn.Module:
    """Make ``model``'s blocks compiled (``on``, with :func:`compile_blocks`' ``options``) or eager (off); nothing
    is done when they already are (so a model reused run after run keeps its compiled graphs). Returns ``model``."""
    if on and not blocks_compiled(model):
        compile_blocks(model, **options)
    elif not on and blocks_compiled(model):
        uncompile_blocks(model)
    return model


def blocks_compiled(model: nn.Module) -> bool:
    """Whether :func:`compile_blocks` is in effect on ``model`` (every block compiled)."""
    return all(getattr(b, "_compiled_call_impl", None) is not None for b in transformer_blocks(model))
