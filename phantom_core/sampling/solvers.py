"""ODE solvers for the rectified-flow sampling ODE ``dx/dsigma = v(x, sigma)``: Euler and UniPC (bh2).

Conventions (see ``schedule.py``): ``x_sigma = alpha * x0 + sigma * eps`` with ``alpha = 1 - sigma``; the model
predicts the velocity ``v = eps - x0``, hence the data prediction ``x0 = x - sigma * v``; the half log-SNR is
``lambda = log(alpha) - log(sigma)`` (increasing as sigma -> 0, +inf at sigma = 0).

UniPC: Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion Models",
arXiv 2302.04867, Algorithms 1-3 with the B(h) = e^h - 1 ("bh2") choice, data prediction ("predict x0"),
solver order 2, the corrector UniC on at every step, and the last step taken at first order. The numerics follow
upstream ``FlowUniPCMultistepScheduler`` (svjack/Phantom ``phantom_wan/utils/fm_solvers_unipc.py``:
``solver_order=2, solver_type="bh2", predict_x0=True, lower_order_final=True, disable_corrector=[]``), written
here as two plain functions with an explicit state instead of a scheduler class. The per-step scalars are
computed in float64 from the float32 schedule (upstream does them in float32; the difference is ~1e-7 relative).

One UniPC step, from ``sigma_i`` to ``sigma_{i+1}``, given the data prediction ``m_i`` of the model at ``x_i``:

1. UniC (corrector): the previous predictor produced ``x_i`` from ``x_{i-1}``; now that ``m_i`` is known, redo
   that step with ``m_i`` in the interpolation (no extra model call) -> corrected ``x_i^c``.
2. UniP (predictor) from ``x_i^c`` to ``sigma_{i+1}`` with ``m_i`` and ``m_{i-1}``.

The model output stored for later steps is ``m_i`` computed at the *uncorrected* ``x_i`` (as upstream).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor


def flow_lambda(sigma: float) -> float:
    """Half log-SNR of the flow schedule: ``log(1 - sigma) - log(sigma)``; ``sigma`` in (0, 1)."""
    return math.log(1.0 - sigma) - math.log(sigma)


def x0_from_velocity(x: Tensor, v: Tensor, sigma: float) -> Tensor:
    """Data prediction ``x0 = x - sigma * v`` (exact for ``x = (1 - sigma) x0 + sigma eps``, ``v = eps - x0``)."""
    return x - sigma * v


def euler_step(x: Tensor, v: Tensor, sigma: float, sigma_next: float) -> Tensor:
    """Explicit Euler step of ``dx/dsigma = v``: ``x + (sigma_next - sigma) * v`` (first order)."""
    return x + (sigma_next - sigma) * v


@dataclass(frozen=True)
class UniPCState:
    """What UniPC carries from one step to the next (start from ``UniPCState()``).

    Attributes:
        x0_preds: data predictions of the last (up to ``order``) steps, oldest first, fp32 like the latents.
        sigmas: the sigmas at which they were taken (same length).
        last_x: the sample the last predictor started from (``x_{i-1}``, after its own correction), for UniC.
        last_order: order of the last predictor (0 before the first step).
    """

    x0_preds: tuple[Tensor, ...] = ()
    sigmas: tuple[float, ...] = ()
    last_x: Tensor | None = None
    last_order: int = 0


@dataclass(frozen=True)
class _BhCoefficients:
    """Scalars of one UniPC-bh2 step from ``sigma_s0`` to ``sigma_t`` (paper Alg. 2/3, predict-x0 form)."""

    h: float  # lambda_t - lambda_s0 (> 0)
    x_scale: float  # sigma_t / sigma_s0
    m0_scale: float  # alpha_t * (e^{-h} - 1): the first-order (DDIM) term multiplies m0 by -this
    res_scale: float  # alpha_t * B(h), B(h) = e^{-h} - 1 for bh2 (hh = -h in predict-x0 form)
    b1: float  # phi-coefficients of the order conditions, divided by B(h)
    b2: float


def _bh2_coefficients(sigma_s0: float, sigma_t: float) -> _BhCoefficients:
    """Coefficients for a step ``sigma_s0 -> sigma_t`` with ``0 < sigma_t < sigma_s0 < 1``.

    With ``hh = -h``: ``h*phi_1 = expm1(hh)``, ``B(h) = expm1(hh)`` (bh2), and the order conditions
    ``b_k = k! * h*phi_{k+1}(hh) / B(h)`` via ``phi_{k+1} = (phi_k - 1/k!) / hh`` (paper Eq. 8, Alg. 3).
    """
    h = flow_lambda(sigma_t) - flow_lambda(sigma_s0)
    hh = -h
    h_phi_1 = math.expm1(hh)
    b_h = h_phi_1  # bh2; bh1 would be B(h) = hh
    g1 = h_phi_1 / hh - 1.0
    g2 = g1 / hh - 0.5
    alpha_t = 1.0 - sigma_t
    return _BhCoefficients(h=h, x_scale=sigma_t / sigma_s0, m0_scale=alpha_t * h_phi_1,
                           res_scale=alpha_t * b_h, b1=g1 / b_h, b2=2.0 * g2 / b_h)


def _first_difference(state: UniPCState, c: _BhCoefficients) -> tuple[Tensor, float]:
    """``D1 = (m1 - m0) / r1`` and ``r1 = (lambda_s1 - lambda_s0) / h`` from the two stored predictions."""
    (m1, m0), (s1, s0) = state.x0_preds[-2:], state.sigmas[-2:]
    r1 = (flow_lambda(s1) - flow_lambda(s0)) / c.h  # < 0: s1 lies before s0
    return (m1 - m0) / r1, r1


def unipc_predict(x: Tensor, state: UniPCState, sigma_t: float, order: int) -> Tensor:
    """UniP-``order`` (paper Alg. 2, bh2, predict-x0) from ``state.sigmas[-1]`` to ``sigma_t``.

    ``x_t = (sigma_t/sigma_s0) x - alpha_t (e^{-h} - 1) m0 - alpha_t B(h) * rho_p * D1`` with ``rho_p = 1/2``
    at order 2 (upstream's simplified choice) and no D1 term at order 1. A step to ``sigma_t = 0`` is taken at
    first order, whose limit is exactly ``x_t = m0``.
    """
    m0, sigma_s0 = state.x0_preds[-1], state.sigmas[-1]
    if sigma_t == 0.0:
        assert order == 1, "the step to sigma = 0 must be first order (lower_order_final)"
        return m0.clone()
    c = _bh2_coefficients(sigma_s0, sigma_t)
    x_t = c.x_scale * x - c.m0_scale * m0  # first order (DDIM / DPM-Solver-1 in data prediction)
    if order == 2:
        d1, _ = _first_difference(state, c)
        x_t = x_t - (c.res_scale * 0.5) * d1
    return x_t


def unipc_correct(x_prev: Tensor, state: UniPCState, sigma_t: float, model_t: Tensor, order: int) -> Tensor:
    """UniC-``order`` (paper Alg. 1/3, bh2): recompute the step ``state.sigmas[-1] -> sigma_t`` from
    ``x_prev`` using also the new data prediction ``model_t`` at ``sigma_t``.

    Order 1: ``rho_c = 1/2`` (upstream's simplified choice). Order 2: ``rho_c`` solves
    ``[[1, 1], [r1, 1]] rho = [b1, b2]`` (closed form below) and weights ``(D1, model_t - m0)``.
    """
    m0 = state.x0_preds[-1]
    c = _bh2_coefficients(state.sigmas[-1], sigma_t)
    x_t = c.x_scale * x_prev - c.m0_scale * m0
    d1_t = model_t - m0
    if order == 1:
        return x_t - (c.res_scale * 0.5) * d1_t
    d1, r1 = _first_difference(state, c)
    rho_0 = (c.b1 - c.b2) / (1.0 - r1)
    rho_1 = c.b1 - rho_0
    return x_t - c.res_scale * (rho_0 * d1 + rho_1 * d1_t)


def unipc_step(x: Tensor, x0_pred: Tensor, sigmas: Sequence[float], i: int, state: UniPCState, *,
               order: int = 2, corrector: bool = True) -> tuple[Tensor, UniPCState]:
    """One UniPC step from ``sigmas[i]`` to ``sigmas[i + 1]``.

    Args:
        x: current sample at ``sigmas[i]`` (the previous predictor's output), e.g. ``[B,16,F,h,w]`` fp32.
        x0_pred: the model's data prediction at ``x`` (``x - sigma * v``), same shape.
        sigmas: the whole schedule (``flow_sigmas``), ending in 0.
        i: step index, 0-based; steps must be taken in order starting at 0 with ``UniPCState()``.
        state: returned by the previous call.
        order: solver order, 1 or 2 (upstream: 2). Warm-up: step 0 is first order; the last step (to
            sigma = 0) is first order too (upstream ``lower_order_final=True``).
        corrector: apply UniC before the predictor (upstream: on at every step, ``disable_corrector=[]``).
    Returns:
        ``(x_next, new_state)``: the sample at ``sigmas[i + 1]`` and the state for step ``i + 1``.
    Raises:
        ValueError: ``order`` not in {1, 2}, or ``i`` does not match the state's history.
    """
    if order not in (1, 2):
        raise ValueError(f"UniPC order must be 1 or 2; got {order}")
    if (i == 0) != (state.last_x is None):
        raise ValueError(f"unipc_step: step index {i} does not match the state (steps start at 0 with UniPCState())")
    sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
    # 1. UniC: correct x with the new model output (the output itself stays the one at the uncorrected x)
    if corrector and state.last_x is not None:
        x = unipc_correct(state.last_x, state, sigma, x0_pred, state.last_order)
    # 2. history: keep the last `order` data predictions
    new_preds = (*state.x0_preds, x0_pred)[-order:]
    new_sigmas = (*state.sigmas, sigma)[-order:]
    this_order = min(order, len(new_preds), len(sigmas) - 1 - i)  # warm-up, lower_order_final
    new_state = UniPCState(x0_preds=new_preds, sigmas=new_sigmas, last_x=x, last_order=this_order)
    # 3. UniP: predict the sample at sigma_next
    return unipc_predict(x, new_state, sigma_next, this_order), new_state
