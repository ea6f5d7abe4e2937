"""The order in which training samples are visited: deterministic from the seed, resumable, shardable by rank.

Each epoch is a permutation of the samples drawn from (seed, epoch). Samples are grouped by bucket (those that
can be stacked into one batch: same latent shape, same number of references), each bucket is cut into global
batches (its incomplete remainder waits for the next epoch's permutation) and the batches of all buckets are
shuffled together. The state is just (epoch, position): the order itself is recomputed from the seed, so a
resumed run visits exactly the batches an uninterrupted one would. A global batch holds ``batch_size x ranks``
samples; rank ``r`` takes the ``r``-th slice (``shard``), so one process with the whole global batch sees the same
samples as the ranks together.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np

from phantom_core.log import logger

ORDER_STREAM = 0x0DA7A  # keeps the data-order stream apart from every other use of the run seed


class BatchOrder:
    """An endless sequence of global batches (lists of sample indices), ``next_batch()`` after ``next_batch()``.

    Args:
        buckets: one hashable per sample; samples of equal buckets may share a batch.
        global_batch: samples per global batch (>= 1).
        seed: the run seed.
    Raises:
        ValueError: no bucket holds ``global_batch`` samples (nothing could ever be trained).
    """

    def __init__(self, buckets: Sequence[Hashable], global_batch: int, seed: int) -> None:
        self.buckets, self.global_batch, self.seed = list(buckets), global_batch, seed
        sizes: dict[Hashable, int] = defaultdict(int)
        for b in self.buckets:
            sizes[b] += 1
        small = {b: n for b, n in sizes.items() if n < global_batch}
        if len(small) == len(sizes):
            largest = max(sizes.values(), default=0)
            raise ValueError(f"global batch of {global_batch} samples but the largest group of samples that can "
                             f"share a batch (same size, same number of references) has {largest}; lower "
                             "batch_size or add samples")
        for b, n in small.items():
            logger.warning("%d sample(s) of shape/references %s can never fill a batch of %d; they are not used",
                           n, b, global_batch)
        self.epoch, self.position = 0, 0
        self._batches = self._epoch_batches(0)

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, ORDER_STREAM, epoch])
        groups: dict[Hashable, list[int]] = defaultdict(list)
        for i in rng.permutation(len(self.buckets)).tolist():
            groups[self.buckets[i]].append(i)
        batches = [g[k:k + self.global_batch] for g in groups.values()
                   for k in range(0, len(g) - self.global_batch + 1, self.global_batch)]
        return [batches[k] for k in rng.permutation(len(batches)).tolist()]

    def next_batch(self) -> list[int]:
        """The next global batch (``global_batch`` sample indices); a new epoch begins when one runs out."""
        if self.position >= len(self._batches):
            self.epoch, self.position = self.epoch + 1, 0
            self._batches = self._epoch_batches(self.epoch)
        batch = self._batches[self.position]
        self.position += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        """``{"epoch", "position", "seed", "global_batch"}``: where the order stands."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "global_batch": self.global_batch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a ``state_dict()``. Raises ``ValueError`` when it was made with another seed or batch."""
        if (state["seed"], state["global_batch"]) != (self.seed, self.global_batch):
            raise ValueError(f"data order of seed {state['seed']} / global batch {state['global_batch']} cannot "
                             f"continue with seed {self.seed} / global batch {self.global_batch}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._batches = self._epoch_batches(self.epoch)


def shard(batch: list[int], rank: int, world_size: int) -> list[int]:
    """Rank ``rank``'s contiguous slice of a global batch (``len(batch)`` divisible by ``world_size``)."""
    per_rank = len(batch) // world_size
    return batch[rank * per_rank:(rank + 1) * per_rank]
