"""Step caching that knows Phantom's three guidance passes: reuse each pass's last transformation when the input
has barely moved, so whole steps run no DiT evaluation.

The rule is EasyCache's (Zhou et al. 2025, "EasyCache: Training-Free Video Diffusion Acceleration via
Runtime-Adaptive Caching"; ComfyUI ``comfy_extras/nodes_easycache.py`` implements it for two CFG branches): the
model's output-minus-input ``d = v - x`` changes slowly along a sampling trajectory, and how fast it changes per
unit of input change, ``k = |d_i - d_j| / |x_i - x_j|``, is nearly constant. After a computed step the sampler
accumulates the predicted relative output change ``k * |x - x_last| / |x_last|`` of each later step and reuses
``x + d_last`` as long as the sum stays under ``threshold``; then it computes again and resets the sum.

Phantom specifics: the state is kept per pass NAME (``text_img``, ``img``, ``neg``), never by call parity (the
official caches count calls modulo 2 and mix up Phantom's three passes). All passes of a step share ``x``, so the
decision is taken once per step with the largest ``k`` of the passes (conservative) and the passes stay batched.
A pass that has no state yet (e.g. ``neg`` entering the image-guidance window) forces a computed step. The first
``warmup_steps`` steps and the last step are always computed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


def _relative_change(a: Tensor, b: Tensor) -> float:
    """``|a - b|_1 / |b|_1`` (mean absolute values, float32), 0 when ``b`` is all zero."""
    denom = b.float().abs().mean().item()
    return (a.float() - b.float()).abs().mean().item() / denom if denom > 0 else 0.0


@dataclass
class _PassState:
    x: Tensor  # input of the last computed step
    d: Tensor  # v - x of the last computed step
    k: float | None = None  # |d_i - d_j| / |x_i - x_j| between the last two computed steps


@dataclass
class StepCache:
    """Per-pass EasyCache state for one sampling run (make a new one per video).

    Args:
        threshold: accumulated predicted relative change of the output under which a step is reused; 0 disables
            reuse (every step computed). Typical: 0.05 - 0.2 (larger: faster, further from the uncached video).
        warmup_steps: leading steps always computed (the trajectory moves fastest there), >= 2 so that ``k``
            is measured before the first reuse.

    Raises:
        ValueError: a negative threshold or fewer than 2 warm-up steps.
    """

    threshold: float
    warmup_steps: int = 3
    computed: int = 0  # DiT pass evaluations run
    reused: int = 0  # pass evaluations saved
    _passes: dict[str, _PassState] = field(default_factory=dict)
    _accumulated: float = 0.0
    _x_prev: Tensor | None = None

    def __post_init__(self) -> None:
        if not self.threshold >= 0:
            raise ValueError(f"cache threshold is {self.threshold}; it must be >= 0 (0 = off)")
        if self.warmup_steps < 2:
            raise ValueError(f"cache warmup_steps is {self.warmup_steps}; it must be >= 2 (k needs two steps)")

    def should_compute(self, step: int, total: int, x: Tensor, passes: list[str]) -> bool:
        """Whether step ``step`` (0-based, of ``total``) must run the model for ``passes`` at input ``x``."""
        if self._x_prev is not None:
            k = max((self._passes[p].k or 0.0) if p in self._passes else 0.0 for p in passes)
            self._accumulated += k * _relative_change(x, self._x_prev)
        self._x_prev = x
        must = (self.threshold == 0 or step < self.warmup_steps or step == total - 1
                or any(p not in self._passes or self._passes[p].k is None for p in passes))
        if must or self._accumulated >= self.threshold:
            self._accumulated = 0.0
            return True
        return False

    def update(self, x: Tensor, velocities: dict[str, Tensor]) -> None:
        """Record a computed step: each pass's ``d = v - x`` and its rate ``k``."""
        for name, v in velocities.items():
            d = v.float() - x.float()
            old, k = self._passes.get(name), None
            if old is not None:  # relative output change per relative input change since the last computed step
                rel_in = _relative_change(x, old.x)
                k = _relative_change(d, old.d) / rel_in if rel_in > 0 else old.k
            self._passes[name] = _PassState(x.float().clone(), d, k)
        self.computed += len(velocities)

    def reuse(self, x: Tensor, passes: list[str]) -> dict[str, Tensor]:
        """The velocities of ``passes`` at ``x`` from the cached transformations: ``v = x + d_last``."""
        self.reused += len(passes)
        return {p: x.float() + self._passes[p].d for p in passes}

    @property
    def saved_fraction(self) -> float:
        """Fraction of pass evaluations reused (0 when nothing ran)."""
        total = self.computed + self.reused
        return self.reused / total if total else 0.0
