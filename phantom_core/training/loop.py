"""``train(config) -> TrainResult``: the training loop, top to bottom like DiT's train.py or nanoGPT.

    data -> noise -> loss -> step -> log -> checkpoint (-> validation)

1. data: the dataset folder is read, bad samples reported and skipped, latents and text contexts cached once
   (rank 0 encodes, the other ranks wait and read the cache); or a ``LatentDataset`` is passed in directly.
2. model: the DiT (checkpoint or from scratch), full or LoRA, gradient checkpointing, DDP / FSDP.
3. optimizer AdamW and a warm-up (+ cosine) schedule; a checkpoint to resume from, if asked.
4. each optimizer step: ``grad_accum`` micro-batches; each draws its global batch (``order.BatchOrder``), takes
   this rank's slice, draws each sample's timestep, dropout and noise from (seed, micro-step, position)
   (``objective.draw_sample``), applies condition dropout (to the VAE latents and, for an MMDiT with a CLIP branch,
   to the references' CLIP features too: ``objective.reference_inputs``) and backpropagates the video-only
   flow-matching loss (bf16 autocast on CUDA, fp32 on the CPU unless ``precision`` is bf16); gradients are clipped,
   AdamW steps, the loss (mean over ranks) is logged; checkpoints every ``checkpoint_every`` steps and at the end;
   a validation video every ``validate_every`` steps.

Determinism: a fixed seed gives the same run; the per-sample randomness does not depend on the number of ranks
or on resuming, and every global RNG state of every rank is saved in the checkpoints. A resumed run therefore
produces the same losses as an uninterrupted one: bit for bit on the CPU (same code path, same machine), up to
non-deterministic kernels on CUDA.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from phantom_core.log import logger
from phantom_core.training.cache import CachedLatents, Encoders, LatentDataset, LatentSample, build_cache
from phantom_core.training.checkpoint import (
    list_checkpoints,
    load_checkpoint,
    read_checkpoint_config,
    rng_states,
    save_checkpoint,
    set_rng_states,
)
from phantom_core.training.clip_features import file_clip_features
from phantom_core.training.config import SCRATCH_PREFIX, TrainConfig
from phantom_core.training.dataset import BadSample, read_dataset, report_bad
from phantom_core.training.distributed import (
    DistContext,
    barrier,
    gather_objects,
    gradient_sync,
    mean_over_ranks,
    setup_distributed,
    teardown_distributed,
    unwrap,
    wrap_model,
)
from phantom_core.training.ema import WeightEMA
from phantom_core.training.model import build_model, check_preset, file_encoders, make_trainable, save_output
from phantom_core.training.objective import (
    TimestepSampling,
    draw_sample,
    drop_conditions,
    flow_matching_loss,
    reference_inputs,
)
from phantom_core.training.order import BatchOrder, shard
from phantom_core.training.runlog import RunLog, write_loss_plot
from phantom_core.training.validation import Validator

TrainCallback = Callable[[int, int, float], None]
"""``callback(step, total_steps, loss)`` after each optimizer step (1-based); it may raise to stop the run (the
last checkpoint is kept)."""

IN_MEMORY_BYTES = 1 << 30  # a latent cache smaller than this is loaded into memory once
RESUME_FIXED = ("mode", "lora_rank", "lora_alpha", "lora_targets", "batch_size", "grad_accum", "seed",
                "timesteps", "text_dropout", "reference_dropout", "width", "height", "frames", "clip_output",
                "vae_reference_dropout", "vae_references", "ema_decay", "clip_reference_dropout")


@dataclass
class TrainResult:
    """What a run leaves: ``out`` (the final file; None on ranks > 0), ``run_dir``, the number of ``steps``
    done, the loss of every step (``losses[k]`` is step ``k + 1``, also those before a resume), the samples
    skipped with their reasons, and the last checkpoint."""

    out: Path | None
    run_dir: Path
    steps: int
    losses: list[float]
    bad_samples: list[BadSample] = field(default_factory=list)
    checkpoint: Path | None = None


def train(config: TrainConfig, *, dataset: LatentDataset | None = None, model: nn.Module | None = None,
          encoders: Encoders | None = None, fingerprints: dict[str, str] | None = None,
          callback: TrainCallback | None = None) -> TrainResult:
    """Train as ``config`` says and write ``config.out``.

    Args:
        config: the run (``TrainConfig``).
        dataset: latent samples to train on; None reads ``config.dataset`` and caches it (needs ``encoders``
            and ``fingerprints`` unless the cache is complete).
        model: the DiT to train (float weights; trained in place); None builds ``config.dit``.
        encoders: ``() -> (vae, text_encoder)`` for caching and validation (called once, when needed); None
            loads ``config.vae`` / ``config.text_encoder`` when they are given (``model.file_encoders``).
        fingerprints: identities of those models for the cache keys (``cache.module_fingerprint`` /
            ``file_fingerprint``); None with ``encoders``: those the cache recorded.
        callback: see ``TrainCallback``.
    Raises:
        ValueError: bad settings, no usable sample, a checkpoint that does not fit the run.
    """
    ctx = setup_distributed(config.device)
    try:
        result = _train(config, ctx, dataset, model, encoders, fingerprints, callback)
        barrier(ctx)  # no rank tears the group down while another still writes or gathers
        return result
    finally:
        teardown_distributed(ctx)


def _train(config: TrainConfig, ctx: DistContext, dataset: LatentDataset | None, model: nn.Module | None,
           encoders: Encoders | None, fingerprints: dict[str, str] | None,
           callback: TrainCallback | None) -> TrainResult:
    run_dir = config.run_path
    if not config.out:
        raise ValueError("out is empty; give the file to write (.safetensors)")
    if model is None and not config.dit:
        raise ValueError(f"dit is empty; give a DiT checkpoint or {SCRATCH_PREFIX}<preset> (e.g. scratch:tiny)")
    if model is None and config.dit.startswith(SCRATCH_PREFIX):
        check_preset(config.dit.removeprefix(SCRATCH_PREFIX))
    if dataset is None and not config.dataset:
        raise ValueError("dataset is empty; give a dataset folder or .jsonl manifest")
    _seed_everything(config.seed + ctx.rank)
    if encoders is None:
        encoders, fingerprints = file_encoders(config, ctx.device)
    encoders = _once(encoders)
    # 1. data
    bad: list[BadSample] = []
    if dataset is None:
        dataset, bad = prepare_dataset(config, encoders, fingerprints, ctx)
    global_batch = config.batch_size * ctx.world_size
    order = BatchOrder([dataset.bucket(i) for i in range(len(dataset))], global_batch, config.seed)
    # 2. model
    model = build_model(config, ctx.device) if model is None else model.to(ctx.device)
    make_trainable(model, config)
    use_clip = reads_clip(model, dataset)
    trained = wrap_model(model, ctx, config.fsdp)
    params = [p for p in trained.parameters() if p.requires_grad]
    ema = WeightEMA(unwrap(trained), config.ema_decay) if config.ema_decay else None
    # 3. optimizer, schedule, resume
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                                  weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, config=config))
    start, last_ckpt = _resume(config, ctx, trained, optimizer, scheduler, order, ema)
    log = RunLog(run_dir / "log.jsonl", resume_step=start) if ctx.is_main else None
    validator = _validator(config, ctx, encoders)
    encoders = None  # the VAE and text encoder are freed here unless validation keeps them
    autocast = partial(_autocast, config, ctx.device)
    timesteps = TimestepSampling(config.timesteps, config.shift, config.logit_mean, config.logit_std)
    dropped = dataset.dropped_context.to(ctx.device)
    logger.info("training %d steps from step %d: global batch %d x %d accumulation, %d samples", config.steps,
                start, global_batch, config.grad_accum, len(dataset))
    # 4. the loop
    for step in range(start + 1, config.steps + 1):
        started = time.perf_counter()
        loss_sum = 0.0
        for micro in range(config.grad_accum):
            micro_step = (step - 1) * config.grad_accum + micro
            positions = shard(list(range(global_batch)), ctx.rank, ctx.world_size)
            indices = shard(order.next_batch(), ctx.rank, ctx.world_size)
            batch = [dataset[i] for i in indices]
            x0, refs, context = collate(batch, ctx.device)
            draws = [draw_sample(config.seed, micro_step, j, tuple(x0.shape[1:]), timesteps) for j in positions]
            sigma = torch.tensor([d.sigma for d in draws], dtype=torch.float32, device=ctx.device)  # (B,)
            noise = torch.stack([d.noise for d in draws]).to(ctx.device)  # (B, 16, F, h, w)
            drop_u = torch.tensor([d.drop_u for d in draws], dtype=torch.float64)  # (B,)
            context, refs = drop_conditions(context, refs, dropped, drop_u, config.text_dropout,
                                            config.reference_dropout)
            ref_clip = torch.stack([s.ref_clip for s in batch]).to(ctx.device).float() if use_clip else None
            if use_clip or config.vae_reference_dropout or not config.vae_references or config.clip_reference_dropout:
                refs, ref_clip = reference_inputs(refs, ref_clip, drop_u, torch.tensor([d.vae_drop_u for d in draws]),
                                                  config.reference_dropout, config.vae_reference_dropout,
                                                  config.vae_references, config.clip_reference_dropout)
            with gradient_sync(trained, micro == config.grad_accum - 1), autocast():
                loss = flow_matching_loss(trained, x0, refs, context, sigma, noise, ref_clip, config.temporal_weight)
                (loss / config.grad_accum).backward()
            loss_sum += float(loss.detach())
        grad_norm = _clip_gradients(params, config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(step)
        loss = mean_over_ranks(loss_sum / config.grad_accum, ctx)
        if log is not None:
            log.write({"step": step, "loss": loss, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                       "epoch": order.epoch, "seconds": round(time.perf_counter() - started, 4)})
        if callback is not None:
            callback(step, config.steps, loss)
        if step % config.checkpoint_every == 0 or step == config.steps:
            last_ckpt = _checkpoint(config, ctx, step, trained, optimizer, scheduler, order, ema) or last_ckpt
            if log is not None:
                write_loss_plot(log.losses(), run_dir / "loss.png")
        if validator is not None and step % config.validate_every == 0:
            validator.run(trained if config.fsdp else unwrap(trained), step, run_dir / "validation", autocast,
                          write=ctx.is_main)
    # 5. the final file (the weights' average when there is one)
    done = max(start, config.steps)
    with ema.applied() if ema is not None else contextlib.nullcontext():
        out = _finish(config, ctx, trained, log, done)
    return TrainResult(out, run_dir, done, log.losses() if log else [], bad, last_ckpt)


def lr_factor(step: int, config: TrainConfig) -> float:
    """The learning-rate multiplier after ``step`` scheduler steps: linear warm-up from ``1 / warmup_steps`` to 1,
    then 1 (``constant``) or a half cosine to 0 at ``config.steps`` (``cosine``)."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.lr_schedule == "constant":
        return 1.0
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def collate(samples: list[LatentSample], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Stack samples of one bucket -> ``(latents [B, 16, F, h, w], ref_latents [B, 16, N, h, w],
    context [B, L_max, D])`` on ``device``; contexts are zero-padded to the longest (exact: the DiT zero-pads)."""
    length = max(s.context.shape[0] for s in samples)
    context = torch.stack([nn.functional.pad(s.context, (0, 0, 0, length - s.context.shape[0])) for s in samples])
    x0 = torch.stack([s.latents for s in samples])
    refs = torch.stack([s.ref_latents for s in samples])
    return x0.to(device).float(), refs.to(device).float(), context.to(device).float()


def reads_clip(model: nn.Module, dataset: LatentDataset) -> bool:
    """Whether the run feeds CLIP reference features: ``model`` has a CLIP branch (``config.clip_dim > 0``).

    Raises:
        ValueError: a CLIP-branch model on samples without ``ref_clip`` (give ``clip_vision``).
    """
    if not getattr(getattr(model, "config", None), "clip_dim", 0):
        if len(dataset) and getattr(dataset[0], "ref_clip", None) is not None:
            logger.warning("the samples' CLIP features are not used: the model has no CLIP branch")
        return False
    if not len(dataset) or getattr(dataset[0], "ref_clip", None) is None:
        raise ValueError("this MMDiT has a CLIP branch (clip_dim > 0) but the samples have no CLIP features: give "
                         "clip_vision (the CLIP vision file) so that the cache holds them")
    return True


def _seed_everything(seed: int) -> None:
    """Seed the global RNGs (torch, numpy, python): what a model draws itself (e.g. LoRA dropout) is seeded too."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _once(encoders: Encoders | None) -> Encoders | None:
    """``encoders`` called at most once (its result kept: caching and validation share the loaded models)."""
    if encoders is None:
        return None
    kept: list[tuple[Any, Any]] = []
    return lambda: kept[0] if kept else (kept.append(encoders()) or kept[0])


def prepare_dataset(config: TrainConfig, encoders: Encoders | None, fingerprints: dict[str, str] | None,
                    ctx: DistContext | None = None, contained: bool = False) -> tuple[CachedLatents, list[BadSample]]:
    """Read ``config.dataset`` and cache its latents and contexts (``cache.build_cache``, into
    ``config.cache_path``): rank 0 encodes what is missing, the other ranks then read the cache. A cache under
    ``IN_MEMORY_BYTES`` is loaded into memory. ``contained``: refuse files outside the dataset folder.

    Returns ``(dataset, bad samples)``; raises ``ValueError`` when no sample is usable.
    """
    ctx = ctx or DistContext()
    specs, bad = read_dataset(config.dataset, contained=contained)
    report_bad(bad)
    clip = file_clip_features(config.clip_vision, config.clip_output, ctx.device) if config.clip_vision else None
    kw = dict(frames=config.frames, width=config.width, height=config.height, ref_mode=config.ref_mode,
              dropped_prompt=config.dropped_prompt, bad=bad, clip=clip)
    if ctx.is_main:
        dataset, bad = build_cache(specs, config.cache_path, encoders=encoders, fingerprints=fingerprints, **kw)
    barrier(ctx)
    if not ctx.is_main:
        dataset, bad = build_cache(specs, config.cache_path, encoders=None, fingerprints=None, **{**kw, "clip": None})
    if isinstance(dataset, CachedLatents) and sum(f.stat().st_size for f in dataset.files) < IN_MEMORY_BYTES:
        dataset = CachedLatents(dataset.files, dataset.dropped_context, in_memory=True)
    return dataset, bad


def _validator(config: TrainConfig, ctx: DistContext, encoders: Encoders | None) -> Validator | None:
    """The validation sampler when ``validate_every`` is set (every rank under FSDP, else rank 0)."""
    if not config.validate_every or not (ctx.is_main or config.fsdp):
        return None
    if encoders is None:
        raise ValueError("validate_every is set but no VAE and text encoder were given to encode the validation "
                         "prompt and references")
    vae, text_encoder = encoders()
    return Validator(config, vae, text_encoder, ctx.device)


def _autocast(config: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (``precision`` auto or bf16, where the GPU supports bf16) and on the CPU when asked
    (``precision`` bf16: ~2.4x faster per step where the CPU has AVX512-BF16 or AMX, see ``config.cpu_bf16_fast``; the
    weights, gradients and AdamW state stay float32), else nothing (fp32)."""
    wanted = config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda")
    if wanted and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if config.precision == "bf16" and device.type == "cpu":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    if config.precision == "bf16":
        raise ValueError(f"precision is bf16 but the device is {device}; bf16 autocast runs on CUDA or the CPU")
    return contextlib.nullcontext()


def _clip_gradients(params: list[nn.Parameter], max_norm: float) -> float:
    """Clip the gradients' total norm to ``max_norm`` (0: no clipping); returns the norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a DTensor
    return float(norm)


def _checkpoint(config: TrainConfig, ctx: DistContext, step: int, model: nn.Module, optimizer: Any,
                scheduler: Any, order: BatchOrder, ema: WeightEMA | None) -> Path | None:
    """Write a checkpoint (every rank takes part; rank 0 writes), with every rank's RNG states and the EMA."""
    state = {"data": order.state_dict(), "rng": gather_objects(rng_states(), ctx), "world_size": ctx.world_size}
    if ema is not None:
        state["ema"] = ema.state_dict()
    return save_checkpoint(config.run_path / "checkpoints", step, model, optimizer, scheduler, state,
                           config.to_json(), rank=ctx.rank, keep=config.keep_checkpoints)


def _resume(config: TrainConfig, ctx: DistContext, model: nn.Module, optimizer: Any, scheduler: Any,
            order: BatchOrder, ema: WeightEMA | None) -> tuple[int, Path | None]:
    """Load the latest checkpoint of the run when ``config.resume`` and there is one; returns (its step, path)
    or (0, None). Raises ``ValueError`` when it was made with settings that change the run."""
    found = list_checkpoints(config.run_path / "checkpoints") if config.resume else []
    if not found:
        return 0, None
    step, path = found[-1]
    saved = read_checkpoint_config(path)
    # a field newer than the checkpoint counts as its default (JSON: a tuple is a list)
    saved = {k: saved[k] if k in saved else TrainConfig().to_json()[k] for k in RESUME_FIXED}
    changed = [f"{k}: {saved[k]!r} -> {v!r}" for k, v in config.to_json().items()
               if k in RESUME_FIXED and saved[k] != v]
    if changed:
        raise ValueError(f"cannot resume from {path}: settings changed ({'; '.join(changed)}); start a new run_dir")
    state = load_checkpoint(path, model, optimizer, scheduler)
    if state["world_size"] != ctx.world_size:
        raise ValueError(f"cannot resume from {path}: it was written by {state['world_size']} ranks, this run has "
                         f"{ctx.world_size}; the per-rank RNG states would not match")
    order.load_state_dict(state["data"])
    set_rng_states(state["rng"][ctx.rank])
    if ema is not None:
        ema.load_state_dict(state["ema"])
    logger.info("resumed from %s (step %d)", path, step)
    return step, path


def _finish(config: TrainConfig, ctx: DistContext, model: nn.Module, log: RunLog | None, steps: int) -> Path | None:
    """Write the final file (rank 0; every rank gathers FSDP shards) and the loss plot."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    weights = None
    if config.mode == "full" or config.fsdp:  # gathered on rank 0 (FSDP shards; LoRA: the adapters only)
        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=config.mode == "lora")
        weights = get_model_state_dict(model, options=options)
    if not ctx.is_main:
        return None
    out = save_output(unwrap(model), weights, config, config.out, steps)
    write_loss_plot(log.losses(), config.run_path / "loss.png")
    logger.info("wrote %s", out)
    return out
