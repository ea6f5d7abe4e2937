"""Many GPUs for ``generate``: the ranks of a torchrun launch, their process groups, and how sampling uses them.

    torchrun --nproc-per-node 3 -m phantom_core generate ... [--parallel auto|guidance|sequence|guidance,sequence]

Modes (``--parallel``; ``auto`` when torchrun starts more than one process, ``WORLD_SIZE`` > 1):

- ``guidance``: 2 or 3 ranks share each step's guidance passes (``sampling.guidance_parallel``; 2 ranks: 2 + 1).
- ``sequence``: the ranks split the token sequence and exchange attention heads (DeepSpeed-Ulysses,
  ``wan.ulysses``); the world size must divide the DiT's head count (12 for the 1.3B, 40 for the 14B).
- ``guidance,sequence``: ``G`` guidance groups of ``S`` sequence ranks, ``G * S = WORLD_SIZE``: ``G = 3`` where
  ``WORLD_SIZE / 3`` divides the heads, else ``G = 2`` (6 ranks: 3 x 2; 4 ranks: 2 x 2; 8 ranks: 2 x 4).
- ``auto``: 2 or 3 ranks: ``guidance``; more: ``guidance,sequence`` where it fits, else ``sequence``.

Rank ``r = g * S + s`` is slice ``s`` of guidance group ``g`` (:class:`ParallelLayout`). Process groups: the
sequence group of ``g`` is ranks ``g*S .. g*S + S - 1``; the guidance group of ``s`` is ranks ``s, S + s, ...,
(G - 1) * S + s`` (one per guidance group, in order: they all-gather the velocities).

Every rank loads the models, encodes and samples; the seed (drawn on rank 0 when -1) and the settings are
broadcast from rank 0 before anything is encoded, and the text context and reference latents are broadcast from
rank 0 once encoded, so every rank samples from the same noise and the same inputs, bit for bit. Rank 0 alone
decodes and writes the MP4 and its sidecar; the other ranks write nothing. The process group is joined with
``training.distributed.setup_distributed`` (NCCL on CUDA, each rank on ``cuda:LOCAL_RANK``; gloo on the CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist
from torch import Tensor, nn

from phantom_core.sampling.guidance import PassRunner, run_passes
from phantom_core.sampling.guidance_parallel import MAX_GUIDANCE_GROUPS, GuidanceParallel
from phantom_core.training.distributed import DistContext, setup_distributed, teardown_distributed
from phantom_core.wan.ulysses import check_sequence_size, sequence_parallel

PARALLEL_MODES = ("auto", "guidance", "sequence", "guidance,sequence")


@dataclass(frozen=True)
class ParallelLayout:
    """``guidance`` groups (1 to 3) of ``sequence`` ranks each; rank ``g * sequence + s`` is slice ``s`` of group
    ``g``."""

    guidance: int = 1
    sequence: int = 1

    @property
    def world_size(self) -> int:
        return self.guidance * self.sequence

    def position(self, rank: int) -> tuple[int, int]:
        """``(guidance group g, sequence slice s)`` of ``rank``."""
        return divmod(rank, self.sequence)


def _combined(world_size: int, num_heads: int) -> ParallelLayout | None:
    """``G x S`` with ``G`` = 3, else 2, and ``S >= 2`` dividing the heads; None when neither fits."""
    for g in (3, 2):
        s = world_size // g
        if world_size % g == 0 and s >= 2 and num_heads % s == 0:
            return ParallelLayout(g, s)
    return None


def plan_layout(mode: str, world_size: int, num_heads: int) -> ParallelLayout:
    """The layout of ``mode`` (``PARALLEL_MODES``) for ``world_size`` ranks and a DiT of ``num_heads`` heads.

    Raises:
        ValueError: naming the mode, the world size, the head count and what would be valid.
    """
    if mode not in PARALLEL_MODES:
        raise ValueError(f"--parallel: got {mode!r}; valid modes are {', '.join(PARALLEL_MODES)}")
    if world_size < 2:
        raise ValueError(f"--parallel {mode} needs several processes: launch with torchrun --nproc-per-node N "
                         f"(WORLD_SIZE is {world_size})")
    if mode == "guidance" or (mode == "auto" and world_size <= MAX_GUIDANCE_GROUPS):
        if world_size > MAX_GUIDANCE_GROUPS:
            raise ValueError(f"--parallel guidance shares Phantom's {MAX_GUIDANCE_GROUPS} guidance passes among 2 or "
                             f"3 ranks; WORLD_SIZE is {world_size}: use --parallel guidance,sequence or sequence")
        return ParallelLayout(guidance=world_size)
    if mode in ("guidance,sequence", "auto") and (layout := _combined(world_size, num_heads)) is not None:
        return layout
    if mode == "guidance,sequence":
        valid = sorted({g * s for g in (2, 3) for s in range(2, num_heads + 1) if num_heads % s == 0})
        raise ValueError(f"--parallel guidance,sequence: WORLD_SIZE {world_size} is not 2 or 3 guidance groups times "
                         f"a sequence size >= 2 dividing the DiT's {num_heads} heads; valid world sizes: "
                         f"{', '.join(map(str, valid))}")
    check_sequence_size(world_size, num_heads)
    return ParallelLayout(sequence=world_size)


@dataclass(frozen=True)
class ParallelSampling:
    """What sampling on this rank uses: the ``pass_runner`` of ``loop.sample_phantom`` and the sequence-parallel
    ``sequence_group`` (None: no sequence parallelism). ``ParallelSampling()`` is one process's plain sampling."""

    layout: ParallelLayout = ParallelLayout()
    pass_runner: PassRunner = run_passes
    sequence_group: dist.ProcessGroup | None = None

    @contextlib.contextmanager
    def parallel_model(self, dit: nn.Module) -> Iterator[nn.Module]:
        """``dit`` sequence-parallel over ``sequence_group`` inside the block (``wan.ulysses``), or as it is."""
        if self.layout.sequence == 1:
            yield dit
            return
        with sequence_parallel(dit, self.sequence_group) as split:
            yield split


def build_sampling(layout: ParallelLayout, rank: int) -> ParallelSampling:
    """The process groups of ``layout`` and this ``rank``'s part in them. Collective: every rank of the world calls
    it with the same layout (``dist.new_group`` is). Raises ``ValueError`` when the world is another size."""
    if dist.get_world_size() != layout.world_size:
        raise ValueError(f"parallel layout {layout.guidance} x {layout.sequence} needs {layout.world_size} ranks; "
                         f"the world has {dist.get_world_size()}")
    g, s = layout.position(rank)
    G, S = layout.guidance, layout.sequence
    guidance_group = sequence_group = None  # None: the world group
    if G > 1 and S > 1:  # every rank creates every group, in the same order
        sequence_group = [dist.new_group(list(range(k * S, (k + 1) * S))) for k in range(G)][g]
        guidance_group = [dist.new_group(list(range(k, G * S, S))) for k in range(S)][s]
    runner = GuidanceParallel(g, G, guidance_group) if G > 1 else run_passes
    return ParallelSampling(layout, runner, sequence_group)


@dataclass
class ParallelRun:
    """This process's place in a torchrun launch of ``generate``: ``mode`` (``PARALLEL_MODES``) and its
    ``DistContext`` (rank, world size, device); the sampling plan is made once per head count, on first use."""

    mode: str
    dist_context: DistContext
    _plans: dict[int, ParallelSampling] = field(default_factory=dict)

    @property
    def is_main(self) -> bool:
        """Rank 0: the one rank that decodes and writes files."""
        return self.dist_context.is_main

    def sampling(self, dit: nn.Module) -> ParallelSampling:
        """The plan for ``dit`` (its ``config.num_heads``); collective on first use. Raises ``ValueError`` as
        :func:`plan_layout`."""
        heads = dit.config.num_heads
        if heads not in self._plans:
            layout = plan_layout(self.mode, self.dist_context.world_size, heads)
            self._plans[heads] = build_sampling(layout, self.dist_context.rank)
        return self._plans[heads]

    def from_main(self, value: Any) -> Any:
        """Rank 0's ``value`` (any picklable object) on every rank; collective."""
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def share_tensors(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        """Rank 0's values of ``tensors`` (same shapes and dtypes on every rank), copied in place; collective."""
        for t in tensors:
            dist.broadcast(t, src=0)
        return tensors

    def describe(self) -> dict[str, Any]:
        """The sidecar's ``runtime["parallel"]``: mode, world size and the layouts used."""
        layouts = [{"guidance": p.layout.guidance, "sequence": p.layout.sequence} for p in self._plans.values()]
        return {"mode": self.mode, "world_size": self.dist_context.world_size, "layouts": layouts}

    def close(self) -> None:
        """Leave the process group if joining it created it."""
        teardown_distributed(self.dist_context)


def add_parallel_argument(group: argparse._ArgumentGroup) -> None:
    """``--parallel`` for ``generate`` (see this module's docstring)."""
    group.add_argument("--parallel", choices=PARALLEL_MODES, default=None,
                       help="under torchrun: share the work of each step among the ranks. guidance: the 3 guidance "
                            "passes on 2-3 ranks; sequence: the tokens (the world size divides the DiT's heads); "
                            "guidance,sequence: both (e.g. 6 ranks = 3 x 2); auto (default with WORLD_SIZE > 1): "
                            "guidance for 2-3 ranks, else both where they fit, else sequence. Rank 0 writes the files")


def join_ranks(mode: str | None, runtime: dict[str, Any]) -> ParallelRun | None:
    """Join torchrun's process group for ``generate``: None for one process without ``--parallel``.

    ``runtime``: the ``device`` / ``text_encoder_device`` arguments of ``generate_to_file``; a plain ``cuda`` in them
    becomes this rank's GPU ``cuda:LOCAL_RANK`` (in place).

    Raises:
        ValueError: ``--parallel`` given to a single process (``WORLD_SIZE`` 1).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and mode is None:
        return None
    if world == 1:
        raise ValueError(f"--parallel {mode} needs several processes: launch with torchrun --nproc-per-node N "
                         "-m phantom_core generate ...")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    for key in ("device", "text_encoder_device"):
        if runtime.get(key) == "cuda":
            runtime[key] = f"cuda:{local_rank}"
    return ParallelRun(mode or "auto", setup_distributed(runtime["device"]))
