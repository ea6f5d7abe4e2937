"""The fixed evaluation case set: seeded scenes of held-out subjects with cross-pair references.

Single-subject case ``i`` (0 <= i < 200) is ``make_sample("test", EVAL_SEED, i, config, count=1)``; two-subject case
``j`` (0 <= j < 100) is ``make_sample("test", EVAL_SEED, MULTI_OFFSET + j, config, count=2)``. The set depends on the
subject pool (with or without the emoji font): a report records the pool's signature, and two reports compare only
when their signatures match. ``quick`` cuts the set to its first N single-subject and first ceil(N / 2) two-subject
cases (smoke runs; the same cases as the start of the full set).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

from phantom_core.world.sample import WorldConfig, WorldSample, make_sample
from phantom_core.world.subjects import split_subjects

EVAL_SEED = 11079
CASES_SINGLE = 200
CASES_MULTI = 100
MULTI_OFFSET = 1_000_000


@dataclass(frozen=True)
class CaseSet:
    """Which cases to run: counts of single- and two-subject cases, the seed, the world's config (cross-pair)."""

    single: int = CASES_SINGLE
    multi: int = CASES_MULTI
    seed: int = EVAL_SEED
    config: WorldConfig = WorldConfig()

    def __post_init__(self) -> None:
        if self.single < 0 or self.multi < 0 or self.single + self.multi < 1:
            raise ValueError(f"case counts: got {self.single} single and {self.multi} two-subject; need >= 1 case")
        if self.config.pair_mode != "cross":
            raise ValueError("evaluation cases use cross-pair references (pair_mode 'cross'); got "
                             f"{self.config.pair_mode!r}")

    def quick(self, n: int) -> CaseSet:
        """The first ``n`` single-subject and first ceil(n / 2) two-subject cases (``ValueError`` for n < 1)."""
        if n < 1:
            raise ValueError(f"quick: got {n}; expected a number of cases >= 1")
        return replace(self, single=min(n, self.single), multi=min(-(-n // 2), self.multi))

    def __len__(self) -> int:
        return self.single + self.multi

    def __iter__(self) -> Iterator[WorldSample]:
        """Make each case when it is needed (a case holds its masks: ~0.5 MB at 128 px)."""
        pool = split_subjects("test", self.config.sources)
        for i in range(self.single):
            yield make_sample("test", self.seed, i, self.config, count=1, pool=pool)
        for j in range(self.multi):
            yield make_sample("test", self.seed, MULTI_OFFSET + j, self.config, count=2, pool=pool)
