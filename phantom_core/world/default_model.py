"""The recipe of the trained embedded default: a tiny VAE, a frozen tiny umT5 and a Phantom-Wan DiT, learned in
the miniature world on two CPU cores, deterministically from ``RECIPE_SEED``.

Stages (each resumable; ``tools/train_default.py`` runs them in order, ``make train-default``):

1. ``text``: a umT5-style sentencepiece tokenizer trained on the world's grammar (``world.corpus``) and a
   random, frozen tiny umT5 (``TEXT_ENCODER_PRESETS["tiny"]``): the DiT learns to read its features.
2. ``vae``: the tiny Wan2.1 VAE (``VAE_PRESETS["tiny"]``), ``training.vae``, in two phases: 64 x 64 crops of
   5-frame world clips (the first frame alone and one 4-frame chunk, as the causal encoder sees them) and single
   frames (references, video frames); then whole 17-frame clips at 32 x 32 (every later chunk) with some of the
   first kind; then ``calibrate_latents`` on held-in clips; phase 3 trains the decoder alone on whole 17-frame
   clips; phase 4 (off unless ``PHANTOM_VAE_SUBJECT_STEPS`` > 0) the whole VAE on subject-centred 9-frame clips.
3. ``latents``: ``LATENT_SAMPLES`` training triplets encoded once with that VAE and umT5 (one cache file each).
4. ``dit``: ``DIT_PRESETS["world"]`` from the upstream init, full training with the general trainer
   (``training.loop.train``), on the cached latents.

The world's training data never contains a held-out subject (``world.subjects``): every figure of
``python -m phantom_core evaluate --model default`` is on subjects the model never saw.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from phantom_core.log import logger
from phantom_core.training.config import cpu_bf16_fast
from phantom_core.world.dataset import sample_tensors
from phantom_core.world.render import TRAVEL_FRACTION, VideoFormat
from phantom_core.world.sample import WorldConfig, make_sample
from phantom_core.world.subjects import split_subjects
from phantom_core.world.vae_batches import VAEData, subject_clip_batches, vae_batches

RECIPE_SEED = 11079
RECIPE_SOURCES = ("emoji", "photo", "shape")  # the default needs the emoji font: `make emoji-font`
# For runs on a bigger machine (docs/WORLD.md; the committed defaults used none of them): PHANTOM_WORLD_TRAVEL makes
# the subjects move farther (``WorldConfig.travel``, up to 0.75; a new --work folder: the latents record it),
# PHANTOM_LATENT_WORKERS encodes the latents in more processes, PHANTOM_DIT_DEVICE trains the DiT stages on a GPU
WORLD = WorldConfig(video=VideoFormat(), pair_mode="cross", sources=RECIPE_SOURCES,
                    travel=float(os.environ.get("PHANTOM_WORLD_TRAVEL", TRAVEL_FRACTION)))
LATENT_WORKERS = int(os.environ.get("PHANTOM_LATENT_WORKERS", 2))
DIT_DEVICE = os.environ.get("PHANTOM_DIT_DEVICE", "cpu")


# ---------------------------------------------------------------- stages (tools/train_default.py runs them)
TEXT_STAGE_FILE = "umt5.safetensors"
VAE_RUN, VAE_STAGE_FILE = "vae_run", "vae.safetensors"
# PHANTOM_VAE_STEPS / PHANTOM_LATENT_SAMPLES / PHANTOM_DIT_STEPS shrink a run for a quick check of the recipe
VAE_TRAIN = dict(steps=int(os.environ.get("PHANTOM_VAE_STEPS", 1800)), learning_rate=1e-3, warmup_steps=50,
                 kl_weight=1e-4, seed=RECIPE_SEED, checkpoint_every=100)
VAE_LONG_RUN = "vae_run_long"
VAE_LONG_TRAIN = dict(steps=int(os.environ.get("PHANTOM_VAE_LONG_STEPS", 350)), learning_rate=3e-4, warmup_steps=20,
                      kl_weight=1e-4, seed=RECIPE_SEED + 1, checkpoint_every=50)
CALIBRATION_CLIPS = 32
# the committed default is "tiny"; "world" (wider, one residual block per stage) is its candidate successor
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


def stage_text(work: str | Path) -> Path:
    """The world tokenizer (grammar corpus + the negative prompts, 512 pieces) and a frozen random tiny umT5."""
    from phantom_core.inference.settings import WAN_NEGATIVE_PROMPT
    from phantom_core.tiny.text import random_text_encoder_state_dict, train_tiny_tokenizer
    from phantom_core.wan.umt5 import TEXT_ENCODER_PRESETS, write_text_encoder_checkpoint
    from phantom_core.world.corpus import world_corpus

    path = Path(work) / TEXT_STAGE_FILE
    if path.is_file():
        return path
    spec = TEXT_ENCODER_PRESETS["tiny"]
    corpus = [*world_corpus(split_subjects("train", RECIPE_SOURCES) + split_subjects("test", RECIPE_SOURCES)),
              WAN_NEGATIVE_PROMPT, WAN_NEGATIVE_PROMPT.replace("，", ",")]
    spiece = train_tiny_tokenizer(corpus, vocab_size=spec.vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text_encoder_checkpoint(path, random_text_encoder_state_dict(spec, seed=RECIPE_SEED + 2), spiece)


def long_clip_batches():
    """Phase-2 batches: 17-frame clips at 32 x 32 (every causal chunk of a training video) plus phase-1-like
    5-frame clips and single frames at 64 x 64, so that the first chunks and the references stay as good."""
    long = vae_batches(VAEData(clips=4, clip_frames=17, frames=2, crop=32, seed=RECIPE_SEED + 5), WORLD)
    short = vae_batches(VAEData(clips=2, clip_frames=5, frames=2, crop=64, seed=RECIPE_SEED + 6), WORLD)
    return lambda step: long(step) + short(step)


def _calibration_clips() -> list[Tensor]:
    """Full-size training clips and their references, for ``calibrate_latents`` (seed distinct from training)."""
    pool = split_subjects("train", RECIPE_SOURCES)
    out = []
    for i in range(CALIBRATION_CLIPS):
        item = sample_tensors(make_sample("train", RECIPE_SEED + 3, i, WORLD, pool=pool))
        out += [item.video[None], item.references[:, :, None]]
    return out


StageProgress = Callable[[int, int, str], None]
"""``progress(step, total, note)`` after each optimizer step (1-based), e.g. a progress bar; None logs every 10."""


def _reporter(name: str, progress: StageProgress | None) -> StageProgress:
    def report(step: int, total: int, note: str) -> None:
        if progress is not None:
            progress(step, total, note)
        elif step % 10 == 0 or step == total:
            logger.info("%s step %d/%d %s", name, step, total, note)
    return report


def _save_vae(vae, path: Path) -> None:
    from safetensors.torch import save_file

    from phantom_core.loading.disk import atomic_write

    with atomic_write(path) as tmp:
        save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(tmp), metadata={"format": "pt"})


def decoder_clip_batches():
    """Phase-3 batches: two whole 17-frame clips, 64 x 64 crops (only video frames: references are never decoded)."""
    clips = vae_batches(VAEData(clips=2, clip_frames=17, frames=1, crop=64, seed=RECIPE_SEED + 9), WORLD)
    return lambda step: clips(step)[:1]


def stage_vae(work: str | Path, progress: StageProgress | None = None) -> Path:
    """Train, calibrate and write the tiny VAE (upstream Wan2.1 keys) to ``<work>/vae.safetensors``: phases 1-2
    and the calibration (``vae_phase2.safetensors``), phase 3 (the decoder alone, ``vae_phase3.safetensors``),
    phase 4 when ``PHANTOM_VAE_SUBJECT_STEPS`` > 0 (subject-centred 9-frame clips, the whole VAE) and a new
    calibration."""
    from phantom_core.training.vae import VAETrainConfig, calibrate_latents, train_vae
    from phantom_core.wan.vae import load_vae

    work = Path(work)
    path = work / VAE_STAGE_FILE
    if path.is_file():
        return path
    report = _reporter("vae", progress)

    def on_step(step: int, total: int, parts: dict) -> None:
        report(step, total, f"loss {parts['loss']:.4f} psnr clips {parts['psnr_0']:.2f} dB")

    phase2, phase3 = work / VAE_PHASE2_FILE, work / VAE_PHASE3_FILE
    if not phase3.is_file():
        if not phase2.is_file():
            _save_vae(_vae_phases_1_2(work, progress), phase2)
        vae = load_vae(str(phase2)).requires_grad_(True)
        train_vae(vae, decoder_clip_batches(), VAETrainConfig(**VAE_DECODER_TRAIN), work / VAE_DECODER_RUN, on_step)
        _save_vae(vae, phase3)
    vae = load_vae(str(phase3)).requires_grad_(True)
    if VAE_SUBJECT_TRAIN["steps"] == 0:  # phase 4 off: the phase-3 VAE is the stage's file
        _save_vae(vae, path)
        return path
    phase4 = subject_clip_batches(VAEData(clips=3, clip_frames=9, frames=2, crop=64, seed=RECIPE_SEED + 10), WORLD)
    train_vae(vae, phase4, VAETrainConfig(**VAE_SUBJECT_TRAIN), work / VAE_SUBJECT_RUN, on_step)
    with torch.no_grad():
        mean, std = calibrate_latents(vae, _calibration_clips())
    logger.info("vae phase-4 calibration: normalized latents had |mean| %.3f, std %.3f", mean.abs().mean(), std.mean())
    _save_vae(vae, path)
    return path


def _vae_phases_1_2(work: Path, progress: StageProgress | None):
    """Phases 1 and 2 from PyTorch's default init (``init_for_training``), then ``calibrate_latents``."""
    from phantom_core.training.vae import VAETrainConfig, calibrate_latents, init_for_training, train_vae
    from phantom_core.wan.vae import VAE_PRESETS, WanVAE

    torch.manual_seed(RECIPE_SEED)
    vae = WanVAE(VAE_PRESETS[VAE_PRESET])  # PyTorch's default init, from the seed
    init_for_training(vae, RECIPE_SEED)

    report = _reporter("vae", progress)

    def on_step(step: int, total: int, parts: dict) -> None:
        report(step, total, f"loss {parts['loss']:.4f} psnr clips {parts['psnr_0']:.2f} dB frames "
                            f"{parts['psnr_1']:.2f} dB")

    phase1 = vae_batches(VAEData(seed=RECIPE_SEED + 1), WORLD)
    train_vae(vae, phase1, VAETrainConfig(**VAE_TRAIN), work / VAE_RUN, on_step)
    # 2. whole 17-frame clips: the causal chunks after the second (measured before this phase, on a 17-frame
    # clip: 20.9 dB on frame 0, 16.7 dB on frame 5, 7-9 dB from frame 7 on: chunks never seen in phase 1)
    train_vae(vae, long_clip_batches(), VAETrainConfig(**VAE_LONG_TRAIN), work / VAE_LONG_RUN, on_step)
    mean, std = calibrate_latents(vae, _calibration_clips())
    logger.info("vae calibration: normalized latents had |mean| %.3f, std %.3f", mean.abs().mean(), std.mean())
    return vae


LATENT_DIR, LATENT_INDEX = "latents", "latents/index.json"
LATENT_SAMPLES = int(os.environ.get("PHANTOM_LATENT_SAMPLES", 600))
# The committed default was trained in fp32. PHANTOM_DIT_PRECISION=bf16 computes the DiT's steps ~2.4x faster where
# the CPU has AVX512-BF16 or AMX (training.config.cpu_bf16_fast; measured on the 2-core EPYC: 0.48 s against 1.15 s
# a step of batch 8, with the same losses), for experiments; "auto" picks bf16 where it is fast
_PRECISION = os.environ.get("PHANTOM_DIT_PRECISION", "fp32")
DIT_PRECISION = ("bf16" if cpu_bf16_fast() else "fp32") if _PRECISION == "auto" else _PRECISION
DIT_RUN, DIT_PHASE1_FILE, DIT_STAGE_FILE = "dit_run", "dit_phase1.safetensors", "dit.safetensors"
DIT_TRAIN = dict(dit="scratch:world", mode="full", steps=int(os.environ.get("PHANTOM_DIT_STEPS", 1200)),
                 batch_size=8, learning_rate=4e-4, warmup_steps=100, lr_schedule="cosine", weight_decay=0.01,
                 gradient_checkpointing=False, timesteps="shifted", shift=5.0, text_dropout=0.2,
                 reference_dropout=0.1, seed=RECIPE_SEED, checkpoint_every=100, keep_checkpoints=2, width=128,
                 height=128, frames=17, device=DIT_DEVICE, precision=DIT_PRECISION)
# Phase 2 continues phase 1's weights with a new schedule and timesteps shifted by 2, not 5: at shift 5 only 17%
# of the training sigmas fall below 0.5, where the subjects take shape (measured after phase 1: train and held-out
# losses equal, 0.18-0.24, so the model was underfit, not overfit)
DIT_LONG_RUN = "dit_run_long"
DIT_LONG_TRAIN = {**DIT_TRAIN, "steps": int(os.environ.get("PHANTOM_DIT_LONG_STEPS", 3000)), "learning_rate": 3e-4,
                  "warmup_steps": 50, "shift": 2.0, "seed": RECIPE_SEED + 7}


def _encoders(work: Path):
    """``(encoders, fingerprints)`` of the stage files, for ``training.cache.build_cache``: the trainer's own
    ``file_encoders`` (float32 VAE, umT5 in its stored dtype computing in float32 on the CPU)."""
    from phantom_core.training.config import load_config
    from phantom_core.training.model import file_encoders

    config = load_config(None, vae=str(work / VAE_STAGE_FILE), text_encoder=str(work / TEXT_STAGE_FILE))
    return file_encoders(config, torch.device("cpu"))


def _raw_samples(indices, config: WorldConfig = WORLD, split: str = "train", seed: int = RECIPE_SEED + 4,
                 count: int | None = None):
    """``RawSample``s of the world's samples ``indices`` (``make_sample(split, seed, i, config, count=count)``), named
    ``world_<i>`` (the recipe's training triplets) or ``world_<split>_<i>`` for another split."""
    from phantom_core.training.dataset import RawSample

    pool = split_subjects(split, RECIPE_SOURCES)
    prefix = "world" if split == "train" else f"world_{split}"
    for i in indices:
        sample = make_sample(split, seed, i, config, pool=pool, count=count)
        item = sample_tensors(sample)
        yield RawSample(f"{prefix}_{i:05d}", item.video, sample.references, sample.prompt)


def write_latent_index(latent_dir: Path, files: list[str], travel: float, subjects: int | None = None) -> Path:
    """Write ``latent_dir/index.json`` atomically (what ``cached_latents`` reads): the cache ``files`` in order, the
    newest dropped prompt's context file in ``latent_dir``, and the world's ``travel`` (and ``subjects``, the
    subjects per scene when every scene has that many; None: the world's mix, not recorded). Returns its path."""
    import json

    from phantom_core.loading.disk import atomic_write

    dropped = sorted(latent_dir.glob("dropped-*.safetensors"))[-1].name
    index = latent_dir / "index.json"
    with atomic_write(index) as tmp:
        world = {"travel": travel} if subjects is None else {"travel": travel, "subjects": subjects}
        tmp.write_text(json.dumps({"files": files, "dropped": dropped, "world": world}), encoding="utf-8")
    return index


def _encode_part(work: str, part: int, parts: int, samples: int, pair_mode: str) -> int:
    """Worker: encode samples ``part, part + parts, ...`` into the cache with one thread; returns how many."""
    from dataclasses import replace

    from phantom_core.inference.settings import WAN_NEGATIVE_PROMPT
    from phantom_core.training.cache import build_cache

    torch.set_num_threads(1)
    encoders, fingerprints = _encoders(Path(work))
    fmt = WORLD.video
    raw = _raw_samples(range(part, samples, parts), replace(WORLD, pair_mode=pair_mode))
    data, _ = build_cache(raw, Path(work) / LATENT_DIR, encoders=encoders, fingerprints=fingerprints,
                          frames=fmt.frames, width=fmt.width, height=fmt.height, dropped_prompt=WAN_NEGATIVE_PROMPT)
    return len(data)


def stage_latents(work: str | Path, workers: int = LATENT_WORKERS, samples: int = LATENT_SAMPLES,
                  pair_mode: str = "cross") -> Path:
    """Encode ``samples`` training triplets (``pair_mode`` references: the recipe's cross-pair, or in-pair for
    the Phantom-Data comparison) once (``training.cache``; resumable: what is cached stays), in ``workers``
    single-threaded processes, and write ``latents/index.json`` (the cache files in order, the dropped prompt's
    context file, the world's travel). Raises ``ValueError`` when ``work`` already holds latents of another travel
    than ``WORLD``'s (``PHANTOM_WORLD_TRAVEL``)."""
    import json
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from dataclasses import replace

    from phantom_core.inference.settings import WAN_NEGATIVE_PROMPT
    from phantom_core.training.cache import build_cache

    work = Path(work)
    index = work / LATENT_INDEX
    if index.is_file():
        cached = json.loads(index.read_text(encoding="utf-8")).get("world", {}).get("travel", TRAVEL_FRACTION)
        if cached != WORLD.travel:
            raise ValueError(f"{index}: latents of a world whose subjects travel {cached} of the frame, but "
                             f"PHANTOM_WORLD_TRAVEL asks for {WORLD.travel}; use another --work folder")
        return index
    (work / LATENT_DIR).mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        done = list(pool.map(_encode_part, [str(work)] * workers, range(workers), [workers] * workers,
                             [samples] * workers, [pair_mode] * workers))
    logger.info("latents: %d samples cached", sum(done))
    encoders, fingerprints = _encoders(work)
    fmt = WORLD.video
    data, bad = build_cache(_raw_samples(range(samples), replace(WORLD, pair_mode=pair_mode)), work / LATENT_DIR,
                            encoders=encoders, fingerprints=fingerprints, frames=fmt.frames, width=fmt.width,
                            height=fmt.height, dropped_prompt=WAN_NEGATIVE_PROMPT)
    if bad:
        raise ValueError(f"{len(bad)} world samples could not be encoded: {bad[:3]}")
    return write_latent_index(work / LATENT_DIR, [p.name for p in data.files], WORLD.travel)


def latent_files(work: str | Path) -> tuple[list[Path], torch.Tensor]:
    """``(sample files, dropped-prompt context)`` of the latent cache of ``stage_latents`` in ``work``
    (``LATENT_INDEX``; raises ``FileNotFoundError`` without one)."""
    import json

    from safetensors.torch import load_file

    folder = Path(work) / LATENT_DIR
    index = json.loads((Path(work) / LATENT_INDEX).read_text(encoding="utf-8"))
    return [folder / f for f in index["files"]], load_file(str(folder / index["dropped"]))["context"]


def cached_latents(work: str | Path, limit: int | None = None):
    """The latent cache of ``stage_latents`` in ``work`` (its first ``limit`` samples), loaded in memory."""
    from phantom_core.training.cache import CachedLatents

    files, dropped = latent_files(work)
    return CachedLatents(files[:limit], dropped, in_memory=True)


def stage_dit(work: str | Path, progress: StageProgress | None = None) -> Path:
    """Train the world DiT with the general trainer in two phases (full training from the upstream init, then a
    continuation: ``DIT_TRAIN``, ``DIT_LONG_TRAIN``); resumable."""
    from phantom_core.inference.settings import WAN_NEGATIVE_PROMPT
    from phantom_core.training.config import load_config
    from phantom_core.training.loop import train

    work = Path(work)
    path = work / DIT_STAGE_FILE
    if path.is_file():
        return path
    data = cached_latents(work)
    report = _reporter("dit", progress)
    phase1 = work / DIT_PHASE1_FILE
    phases = ((DIT_TRAIN, phase1, DIT_RUN), ({**DIT_LONG_TRAIN, "dit": str(phase1)}, path, DIT_LONG_RUN))
    for settings, out, run in phases:
        if out.is_file():
            continue
        config = load_config(None, **settings, out=str(out), run_dir=str(work / run), resume=True,
                             dropped_prompt=WAN_NEGATIVE_PROMPT)
        train(config, dataset=data, callback=lambda step, total, loss: report(step, total, f"loss {loss:.4f}"))
    return path


def stage_export(work: str | Path) -> dict[str, Path]:
    """Copy the finished files into ``phantom_core/tiny/trained/`` (atomically; what ``install_trained_default``
    installs) and print their sizes."""
    from phantom_core.loading.disk import atomic_write
    from phantom_core.tiny.default import TRAINED_DIR, TRAINED_FILES

    work, out = Path(work), {}
    sources = {"dit": work / DIT_STAGE_FILE, "vae": work / VAE_STAGE_FILE, "text_encoder": work / TEXT_STAGE_FILE}
    for name, relative in TRAINED_FILES.items():
        target = TRAINED_DIR / Path(relative).name
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(target) as tmp:
            tmp.write_bytes(sources[name].read_bytes())
        logger.info("export %s: %s (%.1f MiB)", name, target, target.stat().st_size / 2**20)
        out[name] = target
    return out
