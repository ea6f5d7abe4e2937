"""torch's CPU thread count for one call: on the CPU the order of the float sums, hence a video's bits, depends on it,
so a generation records it in its sidecar and a regeneration sets it again."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def cpu_threads_checked(threads: int | None, name: str = "threads") -> int | None:
    """``threads`` when None or a positive int; else ``ValueError`` naming ``name`` (say ``--threads``)."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"{name}: got {threads!r}; expected a positive number of CPU threads")
    return threads


@contextmanager
def cpu_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op CPU thread count set to ``threads`` inside the block and restored after it (None: left
    as it is). Raises ``ValueError`` for a count below 1."""
    previous = torch.get_num_threads()
    if cpu_threads_checked(threads) is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
