"""An exponential moving average (EMA) of the trained weights, kept beside the optimizer's.

After optimizer step ``n`` (1-based), every trainable parameter ``p`` moves its average ``a`` as

    a <- d_n a + (1 - d_n) p,    d_n = min(decay, (1 + n) / (10 + n))

The warm-up ``(1 + n) / (10 + n)`` keeps the first steps' random init from dominating a short run (the form used by
TensorFlow's ``ExponentialMovingAverage`` with ``num_updates``). Diffusion models are sampled from such averages
(DDPM, Ho et al. 2020, App. B: decay 0.9999; EDM2, Karras et al. 2024, studies the profile): the sample quality of
the average is better than the last iterate's long before the loss shows it.

The average is float32 whatever the parameters' dtype, on the parameters' device, for the trainable parameters only
(a LoRA run averages its adapter, not the frozen DiT). Not for FSDP (a parameter there is a shard of another
rank's tensor): ``TrainConfig`` refuses ``ema_decay`` with ``fsdp``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn


def ema_decay_at(step: int, decay: float) -> float:
    """The decay applied after optimizer step ``step`` (1-based): ``min(decay, (1 + step) / (10 + step))``."""
    return min(decay, (1.0 + step) / (10.0 + step))


class WeightEMA:
    """The EMA of ``model``'s trainable parameters (by name, as ``named_parameters`` gives them).

    Args:
        model: the trained module (plain or DDP; its parameters are read, never replaced).
        decay: the long-run decay in (0, 1), e.g. 0.999.
    Raises:
        ValueError: ``decay`` outside (0, 1).
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay: got {decay!r}; expected a number in (0, 1), e.g. 0.999")
        self.decay = decay
        self.params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        self.average = {name: p.detach().float().clone() for name, p in self.params.items()}

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Move the average towards the current weights after optimizer step ``step`` (module docstring)."""
        weight = 1.0 - ema_decay_at(step, self.decay)
        names = list(self.params)
        torch._foreach_lerp_([self.average[n] for n in names], [self.params[n].detach().float() for n in names],
                             weight)

    def state_dict(self) -> dict[str, Tensor]:
        """``{name: float32 CPU tensor}`` for a checkpoint."""
        return {name: a.detach().cpu() for name, a in self.average.items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore :meth:`state_dict`. Raises ``ValueError`` when the names are not this model's."""
        if set(state) != set(self.average):
            missing, extra = sorted(set(self.average) - set(state)), sorted(set(state) - set(self.average))
            raise ValueError(f"EMA state does not fit this model: missing {missing[:5]}, unexpected {extra[:5]}")
        for name, value in state.items():
            self.average[name].copy_(value)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Within the block the parameters hold the average (in their own dtype); afterwards their own values."""
        saved = {name: p.detach().clone() for name, p in self.params.items()}
        try:
            with torch.no_grad():
                for name, p in self.params.items():
                    p.copy_(self.average[name])
            yield
        finally:
            with torch.no_grad():
                for name, p in self.params.items():
                    p.copy_(saved[name])
