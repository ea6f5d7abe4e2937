"""Sampling as small plain functions: the rectified-flow schedule and time shift (``schedule``), the solver steps
(``solvers``: Euler, UniPC bh2), Phantom's three-pass guidance (``guidance``, paper Eq. 5) and the loop (``loop``).
The model is any callable ``(x, t, context, ref_latents) -> velocity``."""
