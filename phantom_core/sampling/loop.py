"""The Phantom sampling loop: noise -> guided velocity -> solver step, repeated over the flow schedule.

Mirrors upstream ``Phantom_Wan_S2V.generate`` (svjack/Phantom ``phantom_wan/subject2video.py``) with two
equivalent simplifications: the solver state holds only the video latents (upstream also carries the
reference-length tail through the solver and discards it at the end; every solver operation is element-wise,
so the video part is unaffected), and the model is a callable that appends the clean references itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from phantom_core.log import logger
from phantom_core.sampling.cache import StepCache
from phantom_core.sampling.guidance import PassRunner, VelocityModel, combine_guidance, guidance_weights, run_passes
from phantom_core.sampling.schedule import flow_sigmas, model_timesteps
from phantom_core.sampling.solvers import UniPCState, euler_step, unipc_step, x0_from_velocity
from phantom_core.wan.context_reuse import reuse_text_context

SOLVERS = ("unipc", "euler")
BATCH_PASSES = ("auto", "on", "off")  # the guidance passes of a step as one batched forward (see sample_phantom)

SAMPLER_PRESETS: dict[str, dict[str, object]] = {
    # upstream Phantom_Wan_S2V.generate defaults: FlowUniPCMultistepScheduler, 50 steps, shift 5, 5.0 / 7.5
    "official": dict(solver="unipc", steps=50, shift=5.0, w_img=5.0, w_text=7.5),
    # the setting described in the paper (arXiv 2502.11079): Euler steps, image guidance 3
    "paper": dict(solver="euler", steps=50, shift=5.0, w_img=3.0, w_text=7.5),
}

StepCallback = Callable[[int, int, Tensor], None]
"""``callback(step_index, total_steps, x0_pred)`` after each step; may raise to abort sampling."""


def make_noise(seed: int, video_shape: Sequence[int], num_refs: int,
               generator_device: str | torch.device = "cpu") -> Tensor:
    """Initial noise for a seed, drawn like upstream and cut to the video frames.

    Upstream draws ``randn(16, F + N, h, w)`` (video plus one frame per reference) from a seeded generator and
    drops the reference part at the end; we draw the same full length ``[B, 16, F + N, h, w]`` and return the
    first ``F`` frames, so batch item 0 is upstream's draw for the same generator device. Upstream draws on
    CUDA; we draw with a CPU ``torch.Generator`` by default so that a seed gives the same video on any device
    (CPU and CUDA generators give different numbers for the same seed).

    Args:
        seed: integer in [0, 2**64).
        video_shape: ``(B, C, F, h, w)`` of the video latents.
        num_refs: number of reference images N (>= 0).
        generator_device: device of the generator and of the returned tensor.
    Returns:
        float32 noise ``[B, C, F, h, w]`` on ``generator_device``.
    Raises:
        ValueError: bad seed, shape or ``num_refs``.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an integer in [0, 2**64); got {seed!r}")
    if len(video_shape) != 5 or any(int(s) < 1 for s in video_shape):
        raise ValueError(f"video_shape must be 5 positive sizes (B, C, F, h, w); got {tuple(video_shape)}")
    if isinstance(num_refs, bool) or not isinstance(num_refs, int) or num_refs < 0:
        raise ValueError(f"num_refs must be an integer >= 0; got {num_refs!r}")
    b, c, f, h, w = (int(s) for s in video_shape)
    generator = torch.Generator(device=generator_device).manual_seed(seed)
    full = torch.randn((b, c, f + num_refs, h, w), generator=generator, device=generator_device,
                       dtype=torch.float32)  # (B, C, F + N, h, w)
    return full[:, :, :f].contiguous()  # (B, C, F, h, w)


def sample_from_seed(model: VelocityModel, seed: int, video_shape: Sequence[int], ref_latents: Tensor,
                     context: Tensor, context_neg: Tensor, **sampling: object) -> Tensor:
    """Draw the seed's initial noise (:func:`make_noise`, CPU generator) and sample from it (:func:`sample_phantom`).

    The one noise-then-sample sequence of the pipeline and the sampler node, so that a seed gives the same video
    through either. ``video_shape``: ``(B, 16, F, h, w)`` (``wan.latents.latent_shape``); the noise is moved to
    ``ref_latents``' device; ``sampling``: the keyword arguments of :func:`sample_phantom`.

    Returns:
        Normalized video latents ``[B, 16, F, h, w]``, float32. Raises ``ValueError`` as the two functions do.
    """
    noise = make_noise(seed, video_shape, ref_latents.shape[2]).to(ref_latents.device)  # (B, 16, F, h, w)
    return sample_phantom(model, noise, ref_latents, context, context_neg, **sampling)


def check_batch_passes(batch_passes: bool | str) -> bool | str:
    """``True`` / ``"on"`` -> True, ``False`` / ``"off"`` -> False, ``"auto"`` -> ``"auto"``; else ValueError."""
    if isinstance(batch_passes, bool):
        return batch_passes
    if batch_passes not in BATCH_PASSES:
        raise ValueError(f"batch_passes is {batch_passes!r}; valid: {', '.join(BATCH_PASSES)} (or True / False)")
    return "auto" if batch_passes == "auto" else batch_passes == "on"


def _auto_batch(model: VelocityModel, x: Tensor, num_refs: int, passes: int, clip_tokens: int = 0) -> bool:
    """``batch_passes="auto"``: batched unless the memory model says the batch does not fit the CUDA device."""
    from phantom_core.wan.memory import batched_passes_fit

    fits = batched_passes_fit(model, tuple(x.shape), num_refs, passes, x.device, clip_tokens=clip_tokens)
    if not fits:
        logger.info("guidance passes run one at a time: %d batched would not fit the free GPU memory", passes)
    return fits


def _in_window(step: int, steps: int, window: tuple[float, float]) -> bool:
    """Whether step ``step`` of ``steps`` lies in the image-guidance window ``(start, end)`` (fractions)."""
    return window[0] <= step / steps < window[1]


def _check_batch(name: str, tensor: Tensor, batch: int) -> Tensor:
    """Broadcast a batch of 1 to ``batch``; reject other mismatches."""
    if tensor.shape[0] not in (1, batch):
        raise ValueError(f"{name} has batch size {tensor.shape[0]}; it must be 1 or the noise batch {batch}")
    return tensor.expand(batch, *tensor.shape[1:])


def _validate(noise: Tensor, ref_latents: Tensor, context: Tensor, context_neg: Tensor, steps: int,
              shift: float, solver: str, w_img: float, w_text: float,
              image_guidance_window: tuple[float, float], ref_clip: Tensor | None) -> None:
    """Raise ``ValueError`` naming the first invalid argument of :func:`sample_phantom`."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1 (official: 50); got {steps!r}")
    if not (isinstance(shift, (int, float)) and math.isfinite(shift) and shift > 0):
        raise ValueError(f"shift must be a finite number > 0 (official: 5.0); got {shift!r}")
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}; got {solver!r}")
    start, end = image_guidance_window
    if not 0.0 <= start < end <= 1.0:
        raise ValueError(f"image_guidance_window is {image_guidance_window}; expected (start, end) fractions of the "
                         "steps with 0 <= start < end <= 1 (official: (0, 1))")
    for name, w in (("w_img", w_img), ("w_text", w_text)):
        if not (isinstance(w, (int, float)) and math.isfinite(w)):
            raise ValueError(f"{name} must be a finite number; got {w!r}")
    if noise.ndim != 5:
        raise ValueError(f"noise must be [B, C, F, h, w] video latents; got shape {tuple(noise.shape)}")
    if ref_latents.ndim != 5 or ref_latents.shape[2] < 1:
        raise ValueError(f"ref_latents must be [B, C, N, h, w] with N >= 1; got shape {tuple(ref_latents.shape)}")
    if ref_latents.shape[1] != noise.shape[1]:
        raise ValueError(f"ref_latents have {ref_latents.shape[1]} channels but the noise has {noise.shape[1]}")
    if ref_latents.shape[-2:] != noise.shape[-2:]:
        rh, rw = ref_latents.shape[-2:]
        nh, nw = noise.shape[-2:]
        raise ValueError(f"reference latents are {rh}x{rw} (h x w) but the video latents are {nh}x{nw}; "
                         "encode the references at the video resolution")
    for name, ctx in (("context", context), ("context_neg", context_neg)):
        if ctx.ndim != 3 or ctx.shape[1] < 1:
            raise ValueError(f"{name} must be [B, L, D] text embeddings with L >= 1; got {tuple(ctx.shape)}")
    if context.shape[2] != context_neg.shape[2]:
        raise ValueError(f"context has width {context.shape[2]} but context_neg has {context_neg.shape[2]}")
    if ref_clip is not None and (ref_clip.ndim != 4 or ref_clip.shape[1] != ref_latents.shape[2]):
        raise ValueError(f"ref_clip must be [B, N, T, C] CLIP features of the N = {ref_latents.shape[2]} references; "
                         f"got shape {tuple(ref_clip.shape)}")


@torch.no_grad()
def sample_phantom(model: VelocityModel, noise: Tensor, ref_latents: Tensor, context: Tensor,
                   context_neg: Tensor, *, steps: int = 50, shift: float = 5.0, solver: str = "unipc",
                   w_img: float = 5.0, w_text: float = 7.5, callback: StepCallback | None = None,
                   batch_passes: bool | str = "auto", model_dtype: torch.dtype | None = None,
                   integer_timesteps: bool = True, image_guidance_window: tuple[float, float] = (0.0, 1.0),
                   cache: StepCache | None = None, ref_clip: Tensor | None = None,
                   pass_runner: PassRunner = run_passes) -> Tensor:
    """Sample Phantom video latents from noise, guided by a prompt and reference latents.

    Args:
        model: ``model(x, t, context, ref_latents[, ref_clip=]) -> velocity`` (see ``guidance.VelocityModel``).
        noise: initial noise ``[B, 16, F, h, w]`` (e.g. :func:`make_noise`); defines device and shape.
        ref_latents: clean normalized reference latents ``[B or 1, 16, N, h, w]``, same h, w as the noise.
        context / context_neg: prompt / negative prompt embeddings ``[B or 1, L, D]`` (L may differ).
        steps: sampling steps >= 1 (model calls per pass). shift: flow time shift > 0.
        solver: ``"unipc"`` (upstream, order 2 bh2 with corrector) or ``"euler"`` (the paper).
        w_img, w_text: Phantom guidance weights (Eq. 5); passes that cannot matter are skipped.
        callback: ``callback(i, steps, x0_pred)`` after step i (0-based) with the fp32 data prediction of
            that step; it may raise (e.g. on user interrupt) to abort.
        batch_passes: the guidance passes of a step as one batched model call (``True`` / ``"on"``), one call
            per pass (``False`` / ``"off"``: a third of the activation memory), or ``"auto"``: batched unless the
            memory model (``wan.memory.batched_passes_fit``) says the batch does not fit the free CUDA memory, and
            one by one for the rest of the run if a batched call still runs out of CUDA memory. Equal to within
            fp32 rounding either way.
        model_dtype: dtype of the model's inputs; default ``getattr(model, "dtype", None)`` (None: fp32).
        integer_timesteps: feed the model upstream's truncated integer timesteps (999, 995, ...), see
            ``schedule.model_timesteps``; ``False`` feeds ``1000 * sigma``.
        image_guidance_window: ``(start, end)`` fractions of the steps in which the ``v_neg`` pass runs (step
            ``i`` is inside when ``start <= i / steps < end``); outside it, ``w_img = 1`` (no image guidance, one
            pass fewer). ``(0, 1)``: every step (official).
        cache: a fresh :class:`cache.StepCache` to reuse passes across steps (its counters tell what was saved);
            None: every pass of every step computed (official).
        ref_clip: CLIP features of the references ``[B or 1, N, T, C]`` for a model that reads them (the
            paper's MMDiT); they travel with ``ref_latents`` through the passes (zero in ``v_neg``). None: the
            model is called without them.
        pass_runner: runs a step's passes (:data:`guidance.PassRunner`): :func:`guidance.run_passes` (default), or
            a strategy sharing them among ranks (``guidance_parallel.GuidanceParallel``; every rank then runs this
            loop on the same noise and gets every pass's velocity, so the cache decides alike on every rank).
    Returns:
        Denoised normalized video latents ``[B, 16, F, h, w]``, float32, on the noise's device. The latents
        stay fp32 throughout; only the model call runs in ``model_dtype`` and its velocity is cast back to fp32.
    Raises:
        ValueError: an argument is out of range or shapes are inconsistent (the message names it).
    """
    # 1. validate and bring every input to the noise's batch size and device, in fp32
    batch_passes = check_batch_passes(batch_passes)
    _validate(noise, ref_latents, context, context_neg, steps, shift, solver, w_img, w_text, image_guidance_window,
              ref_clip)
    b, device = noise.shape[0], noise.device
    refs = _check_batch("ref_latents", ref_latents, b).to(device=device, dtype=torch.float32)  # (B,16,N,h,w)
    ctx = _check_batch("context", context, b).to(device=device, dtype=torch.float32)  # (B, L1, D)
    ctx_neg = _check_batch("context_neg", context_neg, b).to(device=device, dtype=torch.float32)  # (B, L2, D)
    if ref_clip is not None:
        ref_clip = _check_batch("ref_clip", ref_clip, b).to(device=device, dtype=torch.float32)  # (B, N, T, C)
    model_dtype = model_dtype if model_dtype is not None else getattr(model, "dtype", None)

    # 2. schedule: solver sigmas (float32 values, final 0) and the timesteps the model sees
    sigmas = flow_sigmas(steps, shift).tolist()  # steps + 1 floats
    timesteps = model_timesteps(steps, shift, truncate=integer_timesteps).tolist()  # steps floats
    logger.info("Phantom sampling: %s, %d steps, shift %g, w_img %g, w_text %g, passes %s", solver, steps,
                shift, w_img, w_text, list(guidance_weights(w_img, w_text)))

    # 3. the loop: guided velocity -> data prediction -> solver step
    x = noise.to(torch.float32)  # (B, 16, F, h, w)
    fallback = batch_passes == "auto"  # one by one after a CUDA out-of-memory error in a batched call
    if batch_passes == "auto":
        batch_passes = _auto_batch(model, x, refs.shape[2], len(guidance_weights(w_img, w_text)),
                                   0 if ref_clip is None else ref_clip.shape[2])
    state = UniPCState()
    with reuse_text_context(model):  # the contexts' embedding and cross-attention K, V: once per run
        for i in range(steps):
            w_img_i = w_img if _in_window(i, steps, image_guidance_window) else 1.0
            names = list(guidance_weights(w_img_i, w_text))
            if cache is None or cache.should_compute(i, steps, x, names):
                run = dict(model_dtype=model_dtype, ref_clip=ref_clip)
                try:
                    velocities = pass_runner(model, x, timesteps[i], ctx, ctx_neg, refs, names,
                                             batch_passes=batch_passes, **run)  # {pass: (B, 16, F, h, w) fp32}
                except torch.cuda.OutOfMemoryError:
                    if not (fallback and batch_passes and len(names) > 1):
                        raise
                    logger.warning("batched guidance passes ran out of GPU memory; running them one at a time")
                    batch_passes = False
                    torch.cuda.empty_cache()
                    velocities = pass_runner(model, x, timesteps[i], ctx, ctx_neg, refs, names, batch_passes=False,
                                             **run)
                if cache is not None:
                    cache.update(x, velocities)
            else:
                velocities = cache.reuse(x, names)
            v = combine_guidance(velocities, w_img_i, w_text)  # (B, 16, F, h, w) fp32, Eq. 5
            x0_pred = x0_from_velocity(x, v, sigmas[i])
            if solver == "euler":
                x = euler_step(x, v, sigmas[i], sigmas[i + 1])
            else:
                x, state = unipc_step(x, x0_pred, sigmas, i, state)
            if callback is not None:
                callback(i, steps, x0_pred)
    return x
