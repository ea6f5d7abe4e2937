"""The world VAE's recipe: the ``vae`` stage of ``world.default_model`` (``tools/train_default.py --stages vae``).

A Wan2.1-architecture VAE learned from scratch on world clips with ``training.vae`` (pixel L1 + MSE, a KL term
towards Wan2.1's latent normalisation), then ``calibrate_latents`` on held-in clips. ``PHANTOM_VAE_RECIPE`` picks
one of two recipes, each resumable (every phase checkpoints in its own run folder of the work folder):

``phased`` (default; the committed default's VAE, MODEL_CARD.md): ``VAE_PRESETS["tiny"]`` (dim 8; or
``PHANTOM_VAE_PRESET``). Phase 1: 64 x 64 crops of 5-frame clips (the first frame alone and one 4-frame chunk, as
the causal encoder sees them) and single frames (references, video frames); phase 2: whole 17-frame clips at
32 x 32 (every later chunk) with some of the first kind; the calibration; phase 3: the decoder alone on whole
17-frame clips at 64 x 64; phase 4 (off unless ``PHANTOM_VAE_SUBJECT_STEPS`` > 0) the whole VAE on subject-centred
9-frame clips, then a new calibration. Its weakness, measured (docs/WORLD.md): its crops mostly show background,
so held-out subjects come back in the wrong colours and fade from frame ~4 on (VAE ceiling: subject PSNR ~10 dB).

``subjects`` (2026-12-06, docs/WORLD.md seventeenth-session entry): ``VAE_PRESETS["world"]`` (dim 16, one residual
block per stage, 2.6 M parameters). Phase A: 9-frame clips (causal chunks 0-2) cropped to 64 x 64 around a subject
(``subject_clip_batches``) and prepared references, from ``init_for_training``; phase B: whole 17-frame clips
around a subject (every causal chunk: a VAE trained on 9 frames drifts in chunks 3-4, the background turning green),
at a lower learning rate; the calibration. Its world moves subjects 0.5 of the frame (``SUBJECT_TRAVEL``), the
fastest the motion stages use.

``PHANTOM_VAE_STEPS`` / ``PHANTOM_VAE_LONG_STEPS`` shrink the first / the whole-clip phase of either recipe for a
quick check.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor

from phantom_core.log import logger
from phantom_core.world.dataset import sample_tensors
from phantom_core.world.default_model import (
    RECIPE_SEED,
    RECIPE_SOURCES,
    WORLD,
    StageProgress,
    reporter,
)
from phantom_core.world.sample import make_sample
from phantom_core.world.subjects import split_subjects
from phantom_core.world.vae_batches import VAEData, subject_clip_batches, vae_batches

VAE_RECIPES = ("phased", "subjects")
CALIBRATION_CLIPS = 32

# ---------------------------------------------------------------- recipe "phased" (the committed default's VAE)
VAE_RUN = "vae_run"
VAE_TRAIN = dict(steps=int(os.environ.get("PHANTOM_VAE_STEPS", 1800)), learning_rate=1e-3, warmup_steps=50,
                 kl_weight=1e-4, seed=RECIPE_SEED, checkpoint_every=100)
VAE_LONG_RUN = "vae_run_long"
VAE_LONG_TRAIN = dict(steps=int(os.environ.get("PHANTOM_VAE_LONG_STEPS", 350)), learning_rate=3e-4, warmup_steps=20,
                      kl_weight=1e-4, seed=RECIPE_SEED + 1, checkpoint_every=50)
VAE_PRESET = os.environ.get("PHANTOM_VAE_PRESET", "tiny")
# Phase 3 fine-tunes the decoder alone (the encoder, hence every cached latent, stays as it is) on whole 17-frame
# clips at 64 x 64: after phase 2, subjects faded from frame ~8 on in the decoded clips (the VAE ceiling's
# subject PSNR was 11.2 dB, its motion accuracy 67%)
VAE_PHASE2_FILE, VAE_DECODER_RUN = "vae_phase2.safetensors", "vae_run_decoder"
VAE_DECODER_TRAIN = dict(steps=int(os.environ.get("PHANTOM_VAE_DECODER_STEPS", 500)), learning_rate=5e-4,
                         warmup_steps=20, kl_weight=0.0, seed=RECIPE_SEED + 8, checkpoint_every=50,
                         decoder_only=True, latent_noise=0.05)
# Phase 4 (off in the committed recipe: PHANTOM_VAE_SUBJECT_STEPS=400 turns it on) trains the whole VAE on
# subject-centred 9-frame clips at 64 x 64 (subject_clip_batches), then calibrates again: after phase 3 the VAE's own
# reconstruction of held-out clips lost small subjects from frame ~4 on. Measured (docs/WORLD.md): 400 steps raise
# the ceiling's motion accuracy from 71% to 83%, but DiTs trained on its latents (600 triplets fp32, and 1,800
# triplets bf16 with 4,200 steps) scored no better, so the committed default keeps the phase-3 VAE
VAE_PHASE3_FILE, VAE_SUBJECT_RUN = "vae_phase3.safetensors", "vae_run_subjects"
VAE_SUBJECT_TRAIN = dict(steps=int(os.environ.get("PHANTOM_VAE_SUBJECT_STEPS", 0)), learning_rate=3e-4,
                         warmup_steps=20, kl_weight=1e-4, seed=RECIPE_SEED + 10, checkpoint_every=50,
                         latent_noise=0.05)

# ---------------------------------------------------------------- recipe "subjects"
SUBJECT_TRAVEL = 0.5
SUBJECTS_PRESET = "world"
SUBJECTS_A_RUN, SUBJECTS_A_FILE = "vae_subjects_a", "vae_subjects_a.safetensors"
SUBJECTS_A_DATA = VAEData(clips=4, clip_frames=9, frames=4, crop=64, seed=RECIPE_SEED + 11)
SUBJECTS_A_TRAIN = dict(steps=int(os.environ.get("PHANTOM_VAE_STEPS", 3000)), learning_rate=1e-3, warmup_steps=50,
                        kl_weight=1e-4, seed=RECIPE_SEED + 12, checkpoint_every=100)
SUBJECTS_B_RUN = "vae_subjects_b"
SUBJECTS_B_DATA = VAEData(clips=2, clip_frames=17, frames=2, crop=64, seed=RECIPE_SEED + 13)
SUBJECTS_B_TRAIN = dict(steps=int(os.environ.get("PHANTOM_VAE_LONG_STEPS", 600)), learning_rate=3e-4,
                        warmup_steps=20, kl_weight=1e-4, seed=RECIPE_SEED + 14, checkpoint_every=50)


def vae_recipe(recipe: str | None = None) -> str:
    """``recipe``, else ``PHANTOM_VAE_RECIPE`` (default ``phased``); ``ValueError`` naming the input that gave it and
    the valid recipes (``VAE_RECIPES``) otherwise."""
    given = "recipe" if recipe is not None else "PHANTOM_VAE_RECIPE"
    name = recipe if recipe is not None else os.environ.get("PHANTOM_VAE_RECIPE", "phased")
    if name not in VAE_RECIPES:
        raise ValueError(f"{given}: got {name!r}; valid recipes are {', '.join(VAE_RECIPES)}")
    return name


def train_world_vae(work: Path, path: Path, progress: StageProgress | None = None, recipe: str | None = None) -> Path:
    """Train, calibrate and write the world VAE (upstream Wan2.1 keys) to ``path`` with ``vae_recipe(recipe)``'s
    recipe (``recipe``, else ``PHANTOM_VAE_RECIPE``), its phases' runs and files in ``work``; resumable. Raises
    ``ValueError`` for an unknown recipe."""
    recipe = vae_recipe(recipe)
    report = reporter("vae", progress)

    def on_step(step: int, total: int, parts: dict) -> None:
        report(step, total, f"loss {parts['loss']:.4f} psnr clips {parts['psnr_0']:.2f} dB")

    save_vae(_phased(work, on_step) if recipe == "phased" else _subjects(work, on_step), path)
    return path


def _phased(work: Path, on_step):
    """Recipe ``phased``: phases 1-2 and the calibration (``vae_phase2``), phase 3 (``vae_phase3``), phase 4 and a new
    calibration when ``PHANTOM_VAE_SUBJECT_STEPS`` > 0."""
    from phantom_core.training.vae import VAETrainConfig, train_vae
    from phantom_core.wan.vae import load_vae

    phase2, phase3 = work / VAE_PHASE2_FILE, work / VAE_PHASE3_FILE
    if not phase3.is_file():
        if not phase2.is_file():
            save_vae(_phases_1_2(work, on_step), phase2)
        vae = load_vae(str(phase2)).requires_grad_(True)
        train_vae(vae, decoder_clip_batches(), VAETrainConfig(**VAE_DECODER_TRAIN), work / VAE_DECODER_RUN, on_step)
        save_vae(vae, phase3)
    vae = load_vae(str(phase3)).requires_grad_(True)
    if VAE_SUBJECT_TRAIN["steps"] == 0:  # phase 4 off: the phase-3 VAE is the stage's file
        return vae
    phase4 = subject_clip_batches(VAEData(clips=3, clip_frames=9, frames=2, crop=64, seed=RECIPE_SEED + 10), WORLD)
    train_vae(vae, phase4, VAETrainConfig(**VAE_SUBJECT_TRAIN), work / VAE_SUBJECT_RUN, on_step)
    _calibrate(vae, "phase-4")
    return vae


def _phases_1_2(work: Path, on_step):
    """Recipe ``phased``, phases 1 and 2 from PyTorch's default init (``init_for_training``), then the calibration."""
    from phantom_core.training.vae import VAETrainConfig, train_vae

    vae = _fresh_vae(VAE_PRESET)
    phase1 = vae_batches(VAEData(seed=RECIPE_SEED + 1), WORLD)
    train_vae(vae, phase1, VAETrainConfig(**VAE_TRAIN), work / VAE_RUN, on_step)
    # 2. whole 17-frame clips: the causal chunks after the second (measured before this phase, on a 17-frame
    # clip: 20.9 dB on frame 0, 16.7 dB on frame 5, 7-9 dB from frame 7 on: chunks never seen in phase 1)
    train_vae(vae, long_clip_batches(), VAETrainConfig(**VAE_LONG_TRAIN), work / VAE_LONG_RUN, on_step)
    _calibrate(vae, "phase-2")
    return vae


def _subjects(work: Path, on_step):
    """Recipe ``subjects`` (module docstring): phase A (``vae_subjects_a``, before any calibration), phase B, the
    calibration."""
    from phantom_core.training.vae import VAETrainConfig, train_vae
    from phantom_core.wan.vae import load_vae

    world = replace(WORLD, travel=SUBJECT_TRAVEL)
    phase_a = work / SUBJECTS_A_FILE
    if not phase_a.is_file():
        vae = _fresh_vae(SUBJECTS_PRESET)
        batches = subject_clip_batches(SUBJECTS_A_DATA, world)
        train_vae(vae, batches, VAETrainConfig(**SUBJECTS_A_TRAIN), work / SUBJECTS_A_RUN, on_step)
        save_vae(vae, phase_a)
    vae = load_vae(str(phase_a)).requires_grad_(True)
    batches = subject_clip_batches(SUBJECTS_B_DATA, world)
    train_vae(vae, batches, VAETrainConfig(**SUBJECTS_B_TRAIN), work / SUBJECTS_B_RUN, on_step)
    _calibrate(vae, "subjects")
    return vae


def _fresh_vae(preset: str):
    """``VAE_PRESETS[preset]`` with PyTorch's default init from ``RECIPE_SEED``, then ``init_for_training``."""
    from phantom_core.training.vae import init_for_training
    from phantom_core.wan.vae import VAE_PRESETS, WanVAE

    torch.manual_seed(RECIPE_SEED)
    vae = WanVAE(VAE_PRESETS[preset])
    init_for_training(vae, RECIPE_SEED)
    return vae


def _calibrate(vae, name: str) -> None:
    from phantom_core.training.vae import calibrate_latents

    with torch.no_grad():
        mean, std = calibrate_latents(vae, calibration_clips())
    logger.info("vae %s calibration: normalized latents had |mean| %.3f, std %.3f", name, mean.abs().mean(),
                std.mean())


def long_clip_batches():
    """Recipe ``phased``, phase 2: 17-frame clips at 32 x 32 (every causal chunk of a training video) plus
    phase-1-like 5-frame clips and single frames at 64 x 64, so that the first chunks and the references stay as
    good."""
    long = vae_batches(VAEData(clips=4, clip_frames=17, frames=2, crop=32, seed=RECIPE_SEED + 5), WORLD)
    short = vae_batches(VAEData(clips=2, clip_frames=5, frames=2, crop=64, seed=RECIPE_SEED + 6), WORLD)
    return lambda step: long(step) + short(step)


def decoder_clip_batches():
    """Recipe ``phased``, phase 3: two whole 17-frame clips, 64 x 64 crops (only video frames: references are never
    decoded)."""
    clips = vae_batches(VAEData(clips=2, clip_frames=17, frames=1, crop=64, seed=RECIPE_SEED + 9), WORLD)
    return lambda step: clips(step)[:1]


def calibration_clips() -> list[Tensor]:
    """Full-size training clips and their references, for ``calibrate_latents`` (seed distinct from training)."""
    pool = split_subjects("train", RECIPE_SOURCES)
    out = []
    for i in range(CALIBRATION_CLIPS):
        item = sample_tensors(make_sample("train", RECIPE_SEED + 3, i, WORLD, pool=pool))
        out += [item.video[None], item.references[:, :, None]]
    return out


def save_vae(vae, path: Path) -> None:
    """Write ``vae``'s state dict (upstream keys) to ``path`` as safetensors, atomically."""
    from safetensors.torch import save_file

    from phantom_core.loading.disk import atomic_write

    with atomic_write(path) as tmp:
        save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(tmp), metadata={"format": "pt"})
