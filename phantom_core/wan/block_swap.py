"""Block swap: keep the weights of N transformer blocks off the compute device and stream each one in just before it
runs, the next one prefetched while the current one computes.

A wrapper, not a fork of the forward: forward hooks on the blocks (``nn.Module.register_forward_pre_hook`` /
``register_forward_hook``), so every caller of a block is served the same way: ``PhantomWanDiT.run_blocks`` and
whatever wraps that seam (a step cache, Ulysses), a first-block cache that calls ``blocks[0]`` itself, LoRA adapters
(their ``lora_down`` / ``lora_up`` are parameters of the block like any other) and fp8 / scaled-fp8 layers (the fp8
weight and its ``scale_weight`` buffer are moved as stored, 1 byte a weight, and cast on the device).

Which blocks: the LAST ``N`` (``blocks[L - N:]``). The resident blocks run first, and while the last resident one
computes the first swapped one is already being copied, so the stream of copies starts hidden behind compute.

Per swapped block ``i`` and forward:

1. the pre-hook of block ``i - 1`` (or of block ``i`` itself when nothing was prefetched) issues the copies: every
   parameter and buffer of the block, from its resting place (pinned CPU memory when CUDA is available) to the
   device of the block's input, ``non_blocking`` on a side CUDA stream, and records a CUDA event after them;
2. the pre-hook of block ``i`` makes the compute stream wait for that event, marks the copies as used by the compute
   stream (``Tensor.record_stream``, so the caching allocator does not hand their memory out while the block still
   runs), puts them in the block's ``_parameters`` / ``_buffers`` in place of the resting tensors, and issues the
   prefetch of block ``i + 1`` when that one is swapped too;
3. the forward hook of block ``i`` (``always_call``: an exception inside the block restores it too) puts the resting
   tensors back and drops the device copies: nothing is copied back (the weights did not change).

So at most two swapped blocks are on the device at a time (the running one and the prefetched one): the
``2 block buffers`` of ``wan.memory.resident_weight_bytes``. The resting tensors are the very objects the model had
(a LoRA merged into them, an optimizer or ComfyUI's backups holding them, all see the same Parameters).

On a machine without CUDA the same steps run without a stream or events; a block whose resting device is already
the compute device is used in place (no copy) unless ``always_copy`` is set (tests use it to run the full fetch /
release path on a CPU). Inference only: a forward with autograd recording raises (the backward pass would need the
device copies that were dropped).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from phantom_core.log import logger

STATE_ATTR = "block_swap"  # the model attribute holding its BlockSwap (None when off)


def block_list(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a Phantom-Wan DiT (``blocks``) or a Phantom MMDiT (``joint_blocks``).

    Raises:
        ValueError: for a module that has neither.
    """
    for name in ("blocks", "joint_blocks"):
        blocks = getattr(model, name, None)
        if isinstance(blocks, nn.ModuleList):
            return blocks
    raise ValueError(f"{type(model).__name__} has no blocks / joint_blocks ModuleList; block swap needs a DiT")


def check_block_swap(block_swap: Any, num_layers: int) -> int:
    """``block_swap`` as an int in ``0..num_layers``.

    Raises:
        ValueError: naming ``block_swap``, the value received and the valid range.
    """
    if isinstance(block_swap, bool) or not isinstance(block_swap, int) or not 0 <= block_swap <= num_layers:
        raise ValueError(f"block_swap is {block_swap!r}; expected an integer from 0 (off) to {num_layers} (every "
                         f"block of this {num_layers}-block model kept off the device)")
    return block_swap


def _slots(block: nn.Module) -> Iterator[tuple[dict[str, Tensor | None], str]]:
    """Every ``(module._parameters or module._buffers, name)`` of ``block`` holding a tensor."""
    for module in block.modules():
        for table in (module._parameters, module._buffers):
            for name, value in table.items():
                if value is not None:
                    yield table, name


def _pin(t: Tensor) -> Tensor:
    """``t`` in pinned CPU memory (a copy, same class: a Parameter stays a Parameter) when CUDA is available and it
    is not pinned yet; else ``t``."""
    if not torch.cuda.is_available() or t.device.type != "cpu" or t.is_pinned():
        return t
    pinned = t.detach().pin_memory()
    return nn.Parameter(pinned, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else pinned


@dataclass
class _Loan:
    """One swapped block's device copies: ``(table, name, resting, copy)`` per tensor, and the CUDA event recorded
    after the copies on the side stream (None without CUDA)."""

    slots: list[tuple[dict[str, Tensor | None], str, Tensor, Tensor]]
    event: torch.cuda.Event | None


@dataclass
class BlockSwap:
    """The block-swap state of one model (``model.block_swap``); made by :func:`enable_block_swap`.

    Attributes:
        swapped: indices of the swapped blocks (the last ``N``).
        always_copy: copy a block even when its resting device is the compute device (tests).
        fetches: blocks copied to a device so far (for tests and logs); prefetched: of those, issued ahead.
    """

    swapped: tuple[int, ...]
    always_copy: bool = False
    fetches: int = 0
    prefetched: int = 0
    _blocks: nn.ModuleList | None = None
    _in_flight: dict[int, _Loan] = field(default_factory=dict)  # issued, not yet installed
    _installed: dict[int, _Loan] = field(default_factory=dict)  # in the block while it runs
    _streams: dict[torch.device, torch.cuda.Stream] = field(default_factory=dict)
    _handles: list[Any] = field(default_factory=list)

    # ------------------------------------------------------------------------------------------- copies

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def _issue(self, i: int, device: torch.device) -> _Loan:
        """Start copying block ``i`` to ``device`` (asynchronously on CUDA)."""
        cuda = device.type == "cuda"
        stream = self._stream(device) if cuda else None
        slots = []
        with torch.cuda.stream(stream) if cuda else nullcontext():
            for table, name in _slots(self._blocks[i]):
                resting = table[name]
                if resting.device == device and not self.always_copy:
                    copy = resting
                else:
                    # a plain tensor (no Parameter wrapper) in the _parameters slot while the block runs
                    copy = resting.detach().to(device, non_blocking=True, copy=True)
                slots.append((table, name, resting, copy))
            event = torch.cuda.Event() if cuda else None
            if event is not None:
                event.record(stream)
        self.fetches += 1
        return _Loan(slots, event)

    def _prefetch(self, i: int, device: torch.device) -> None:
        if i in self.swapped and i not in self._in_flight and i not in self._installed:
            self._in_flight[i] = self._issue(i, device)
            self.prefetched += 1

    def _install(self, i: int, device: torch.device) -> None:
        loan = self._in_flight.pop(i, None)
        if loan is not None and any(table[name] is not resting or copy.device != device
                                    for table, name, resting, copy in loan.slots):
            loan = None  # tensors replaced since the prefetch (a LoRA merged), or another device: copy again
        loan = loan or self._issue(i, device)
        if loan.event is not None:
            compute = torch.cuda.current_stream(device)
            compute.wait_event(loan.event)
            for _, _, resting, copy in loan.slots:
                if copy is not resting:
                    copy.record_stream(compute)  # allocated on the side stream, used (and freed) on this one
        for table, name, _, copy in loan.slots:
            table[name] = copy
        self._installed[i] = loan

    def _restore(self, i: int) -> None:
        loan = self._installed.pop(i, None)
        if loan is not None:
            for table, name, resting, _ in loan.slots:
                table[name] = resting

    # -------------------------------------------------------------------------------------------- hooks

    def _before(self, i: int, args: tuple) -> None:
        device = _input_device(args)
        if i in self.swapped:
            if torch.is_grad_enabled():
                raise RuntimeError("block swap is for inference: run the model under torch.no_grad() or "
                                   "torch.inference_mode(), or call disable_block_swap(model) before training")
            self._restore(i)  # left installed by an interrupted earlier call: start clean
            self._install(i, device)
        if device is not None:
            self._prefetch(i + 1, device)

    def _after(self, i: int) -> None:
        if i in self.swapped:
            self._restore(i)

    def attach(self, blocks: nn.ModuleList) -> None:
        """Register the hooks on ``blocks`` (every block gets the pre-hook, which prefetches its successor)."""
        self._blocks = blocks
        for i, block in enumerate(blocks):
            self._handles.append(block.register_forward_pre_hook(lambda _m, args, i=i: self._before(i, args)))
            if i in self.swapped:
                self._handles.append(block.register_forward_hook(lambda _m, _a, _o, i=i: self._after(i),
                                                                 always_call=True))

    def detach(self) -> None:
        """Remove the hooks and drop any copy still in flight or installed (the resting tensors put back)."""
        for handle in self._handles:
            handle.remove()
        for i in list(self._installed):
            self._restore(i)
        self._handles.clear()
        self._in_flight.clear()


def _input_device(args: tuple) -> torch.device | None:
    """The device of a block's first tensor argument (its tokens)."""
    return next((a.device for a in args if isinstance(a, Tensor)), None)


def enable_block_swap(model: nn.Module, blocks: int, device: torch.device | str | None = None,
                      always_copy: bool = False) -> nn.Module:
    """Keep the weights of the last ``blocks`` transformer blocks of ``model`` off the compute device (see the
    module docstring); usable on an already-built (and loaded) model, e.g. by a node. Replaces any earlier setting.

    Args:
        model: a ``PhantomWanDiT`` (or a ``PhantomMMDiT``), any weight dtype (fp8 included), adapters allowed.
        blocks: how many blocks to swap, ``0..num_layers`` (0 turns block swap off).
        device: the compute device: the rest of the model (embeddings, head, resident blocks) is moved there;
            None leaves everything where it is (the host, e.g. ComfyUI, places the model). Swapped blocks go to the
            CPU in pinned memory (pageable when CUDA is not available) either way.
        always_copy: copy swapped blocks even when their resting device is the compute device (tests).

    Returns:
        ``model`` (``model.block_swap`` holds the :class:`BlockSwap` state, None when ``blocks`` is 0).

    Raises:
        ValueError: ``blocks`` not an integer in ``0..num_layers`` (naming ``block_swap``), or a model without
            a block list.
    """
    block_modules = block_list(model)
    n = check_block_swap(blocks, len(block_modules))
    disable_block_swap(model)
    first = len(block_modules) - n
    if device is not None:
        for child in model.children():
            if child is not block_modules:
                child.to(device)
        for block in block_modules[:first]:
            block.to(device)
    if n == 0:
        return model
    for block in block_modules[first:]:
        block.to("cpu")
        for table, name in _slots(block):
            table[name] = _pin(table[name])
    state = BlockSwap(swapped=tuple(range(first, len(block_modules))), always_copy=always_copy)
    state.attach(block_modules)
    setattr(model, STATE_ATTR, state)
    logger.info("block swap: blocks %d-%d of %d kept on the CPU (%s), streamed to the compute device per forward",
                first, len(block_modules) - 1, len(block_modules),
                "pinned" if torch.cuda.is_available() else "pageable")
    return model


def disable_block_swap(model: nn.Module) -> nn.Module:
    """Remove block swap from ``model`` (the swapped blocks stay where they rest, on the CPU); returns ``model``."""
    state = getattr(model, STATE_ATTR, None)
    if state is not None:
        state.detach()
    if STATE_ATTR in model.__dict__:
        setattr(model, STATE_ATTR, None)
    return model


def swapped_blocks(model: nn.Module) -> int:
    """How many blocks of ``model`` are swapped (0 when block swap is off)."""
    state = getattr(model, STATE_ATTR, None)
    return len(state.swapped) if state is not None else 0
