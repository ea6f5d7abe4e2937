"""Guidance parallelism: the guidance passes of each step (``v_text_img``, ``v_img``, ``v_neg`` of Phantom's Eq. 5)
computed by up to three groups of ranks at once, launched with torch.distributed (``torchrun``).

Every rank runs the same sampling loop (``loop.sample_phantom``) on the same noise. At each computed step the loop
hands the step's pass names to its pass runner, :class:`GuidanceParallel`: pass ``j`` of the list (in ``PASS_NAMES``
order) belongs to guidance group ``j % G`` (:func:`assign_passes`). With three passes and ``G = 2`` group 0 runs
``text_img`` and ``neg`` (batched or one by one, as ``run_passes``) and group 1 ``img``: a 2 + 1 split; with
``G = 3`` one pass each. The velocities are then all-gathered, so every rank holds every pass's velocity, bit for
bit the same, combines them identically (Eq. 5) and takes the same solver step: the latents stay identical on all
ranks, and equal to one process's up to float rounding (the model runs on smaller batches).

Fewer passes than groups (the image-guidance window skips ``v_neg``; ``w_img == w_text`` skips ``v_img``): a group
without a pass computes nothing but still joins the all-gather with zeros, so no rank waits for it. The step cache
(``cache.StepCache``, one per rank) sees the same latents and the same gathered velocities on every rank, so it
decides alike everywhere; a reused step runs no model and no collective on any rank.

Collective: one ``all_gather`` per computed step of ``ceil(passes / G)`` float32 velocities per rank, over a group
holding one rank of each guidance group, in guidance-group order (``inference.parallel`` builds these groups; with
sequence parallelism as well, the ranks that hold the same token slice).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from phantom_core.sampling.guidance import PASS_NAMES, VelocityModel, run_passes

MAX_GUIDANCE_GROUPS = len(PASS_NAMES)  # one pass per group at most: a fourth group would never have work


def assign_passes(names: Sequence[str], groups: int) -> list[list[str]]:
    """The passes each of ``groups`` guidance groups computes: pass ``j`` of ``names`` goes to group ``j % groups``.

    Example: ``(["text_img", "img", "neg"], 2) -> [["text_img", "neg"], ["img"]]``; ``(["text_img"], 3) ->
    [["text_img"], [], []]``. Group 0 always has the largest share.
    """
    return [list(names[g::groups]) for g in range(groups)]


@dataclass(frozen=True)
class GuidanceParallel:
    """A pass runner (``guidance.PassRunner``): this rank's share of a step's passes, then everyone's, gathered.

    Args:
        index: this rank's guidance group, ``0 <= index < size``.
        size: the number of guidance groups ``G``, 1 to 3 (1: every pass here, no collective).
        group: the process group of ``size`` ranks, one per guidance group, whose group rank ``g`` computes group
            ``g``'s passes; None: the default (world) group.

    Raises:
        ValueError: ``size`` or ``index`` out of range, or a ``group`` of another size than ``size``.
    """

    index: int
    size: int
    group: dist.ProcessGroup | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.size <= MAX_GUIDANCE_GROUPS:
            raise ValueError(f"guidance-parallel size is {self.size}; Phantom has {MAX_GUIDANCE_GROUPS} guidance "
                             f"passes per step, so 1 to {MAX_GUIDANCE_GROUPS} guidance groups")
        if not 0 <= self.index < self.size:
            raise ValueError(f"guidance group index {self.index} is outside 0..{self.size - 1}")
        if self.size > 1 and dist.get_world_size(self.group) != self.size:
            raise ValueError(f"the guidance process group has {dist.get_world_size(self.group)} ranks; expected one "
                             f"per guidance group, {self.size}")

    def __call__(self, model: VelocityModel, x: Tensor, t: float, context: Tensor, context_neg: Tensor,
                 ref_latents: Tensor, names: list[str], **options: object) -> dict[str, Tensor]:
        """Like ``guidance.run_passes`` (same arguments and result: ``{pass name: fp32 velocity shaped like x}``
        for every name), computing only this rank's share; every rank of ``group`` must call it at the same step."""
        shares = assign_passes(names, self.size)
        mine = shares[self.index]
        local = run_passes(model, x, t, context, context_neg, ref_latents, mine, **options) if mine else {}
        if self.size == 1:
            return local
        send = torch.zeros((len(shares[0]), *x.shape), dtype=torch.float32, device=x.device)  # (S, B, 16, F, h, w)
        for k, name in enumerate(mine):
            send[k] = local[name]
        received = [torch.empty_like(send) for _ in range(self.size)]  # G x (S, B, 16, F, h, w)
        dist.all_gather(received, send, group=self.group)
        gathered = {name: received[g][k] for g, share in enumerate(shares) for k, name in enumerate(share)}
        return {name: gathered[name] for name in names}
