"""The flow-matching noise schedule of Wan2.1 / Phantom-Wan: time shift, sigmas, model timesteps.

Rectified flow (Liu et al. 2022; Esser et al. 2024, arXiv 2403.03206): ``x_t = (1 - sigma) * x0 + sigma * eps``
with sigma in [0, 1]; the DiT predicts the velocity ``v = eps - x0`` and is conditioned on ``t = 1000 * sigma``.

The schedule reproduces ``FlowUniPCMultistepScheduler.set_timesteps`` of the official code
(svjack/Phantom ``phantom_wan/utils/fm_solvers_unipc.py``, itself adapted from diffusers 0.31):

1. ``sigma_max`` is the first of 1000 training sigmas ``1 - linspace(1, 1/1000, 1000)[::-1]`` stored as
   float32, i.e. ``float32(0.999) = 0.99900001287...``; ``sigma_min = 0``.
2. ``linspace(sigma_max, sigma_min, steps + 1)`` in float64, the last point (0) dropped.
3. The time shift ``s * sigma / (1 + (s - 1) * sigma)`` (SD3's resolution shift; Wan uses s = 5 for 480p/720p
   text-to-video), still in float64.
4. Model timesteps ``sigma * 1000`` *truncated to int64* (upstream casts the float timesteps to int64), and a
   final sigma of 0 appended; the sigmas the solver uses are stored as float32.

Not reproduced: upstream locates its first step by searching the timestep list for the first timestep and takes
the *second* match when it is duplicated, which happens only when truncation repeats 999 (e.g. 300 steps
at shift 5); we always start at the first sigma.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

NUM_TRAIN_TIMESTEPS = 1000
"""Wan2.1's training timesteps: the model is conditioned on ``t = 1000 * sigma``."""

# float32(1 - 1/1000): upstream builds its training sigmas in float64, stores them as float32 and reads the
# first one back as a Python float, so the schedule starts at 0.99900001287..., not at 0.999.
SIGMA_MAX = float(np.float32(1.0 - 1.0 / NUM_TRAIN_TIMESTEPS))


def shift_sigma(sigma: Tensor | np.ndarray | float, shift: float) -> Tensor | np.ndarray | float:
    """Flow time shift ``sigma' = shift * sigma / (1 + (shift - 1) * sigma)``.

    Maps [0, 1] onto [0, 1] monotonically, keeping 0 and 1 fixed; ``shift > 1`` spends more of the steps at
    high noise (source: Esser et al. 2024, arXiv 2403.03206, Eq. 23 with ``shift = sqrt(m/n)``; upstream
    ``FlowUniPCMultistepScheduler.set_timesteps``). Works element-wise on tensors, arrays and floats.

    Raises:
        ValueError: ``shift`` is not > 0.
    """
    if not shift > 0:
        raise ValueError(f"shift must be > 0 (Wan uses 5.0 at 480p/720p, 3.0 for small images); got {shift}")
    return shift * sigma / (1 + (shift - 1) * sigma)


def _schedule_float64(steps: int, shift: float) -> np.ndarray:
    """The ``steps`` shifted sigmas before the final 0, in float64 (upstream steps 1-3)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1 (the official default is 50); got {steps!r}")
    sigmas = np.linspace(SIGMA_MAX, 0.0, steps + 1)[:-1]  # (steps,) float64, the final 0 dropped
    return shift_sigma(sigmas, shift)


def flow_sigmas(steps: int, shift: float) -> Tensor:
    """The sigmas the solver walks through: ``steps`` shifted sigmas then a final 0.

    Args:
        steps: number of sampling steps (= model evaluations per guidance pass), >= 1.
        shift: time shift, > 0 (5.0 for Phantom-Wan).
    Returns:
        ``(steps + 1,)`` float32 tensor on the CPU, strictly decreasing from ~0.9998 (shift 5) to exactly 0.
    Raises:
        ValueError: ``steps < 1`` or ``shift <= 0``.
    """
    sigmas = _schedule_float64(steps, shift)
    return torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))  # (steps + 1,)


def model_timesteps(steps: int, shift: float, *, truncate: bool = True) -> Tensor:
    """The timesteps fed to the DiT at each step, in [0, 1000].

    Args:
        steps, shift: as in :func:`flow_sigmas`.
        truncate: reproduce upstream, which converts ``1000 * sigma`` (float64) to int64, so the model sees
            999, 995, 991, ... (50 steps, shift 5) while the solver uses the unrounded sigmas. ``False`` feeds
            ``1000 * sigma`` exactly (the DiT is continuous in t; the difference is below one timestep).
    Returns:
        ``(steps,)`` float32 tensor on the CPU (integral values when ``truncate``).
    """
    t = _schedule_float64(steps, shift) * NUM_TRAIN_TIMESTEPS  # (steps,) float64
    if truncate:
        t = t.astype(np.int64)  # upstream quirk: truncation toward zero, not rounding
    return torch.from_numpy(np.asarray(t, dtype=np.float32))
