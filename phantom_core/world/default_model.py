"""The recipe of the trained embedded default: a tiny VAE, a frozen tiny umT5 and a Phantom-Wan DiT, learned in
the miniature world on two CPU cores, deterministically from ``RECIPE_SEED``.

Stages (each resumable; ``tools/train_default.py`` runs them in order, ``make train-default``):

1. ``text``: a umT5-style sentencepiece tokenizer trained on the world's grammar (``world.corpus``) and a
   random, frozen tiny umT5 (``TEXT_ENCODER_PRESETS["tiny"]``): the DiT learns to read its features.
2. ``vae``: a Wan2.1-architecture VAE from scratch with ``training.vae``, then ``calibrate_latents`` on held-in
   clips (``world.vae_recipe``: recipe ``phased``, the committed default's tiny VAE in three phases, or
   ``subjects``, a wider VAE on subject-centred clips; ``PHANTOM_VAE_RECIPE``).
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

from phantom_core.log import logger
from phantom_core.training.config import cpu_bf16_fast
from phantom_core.world.dataset import sample_tensors
from phantom_core.world.render import TRAVEL_FRACTION, VideoFormat
from phantom_core.world.sample import WorldConfig, make_sample
from phantom_core.world.subjects import split_subjects

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
VAE_STAGE_FILE = "vae.safetensors"  # the vae stage (world.vae_recipe)
# PHANTOM_VAE_STEPS / PHANTOM_LATENT_SAMPLES / PHANTOM_DIT_STEPS shrink a run for a quick check of the recipe

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


StageProgress = Callable[[int, int, str], None]
"""``progress(step, total, note)`` after each optimizer step (1-based), e.g. a progress bar; None logs every 10."""


def reporter(name: str, progress: StageProgress | None) -> StageProgress:
    """``progress`` itself, or (None) a reporter that logs every 10th step of stage ``name``."""
    def report(step: int, total: int, note: str) -> None:
        if progress is not None:
            progress(step, total, note)
        elif step % 10 == 0 or step == total:
            logger.info("%s step %d/%d %s", name, step, total, note)
    return report


def stage_vae(work: str | Path, progress: StageProgress | None = None, recipe: str | None = None) -> Path:
    """Train, calibrate and write the world VAE (upstream Wan2.1 keys) to ``<work>/vae.safetensors`` with
    ``world.vae_recipe``'s ``recipe`` (``phased``, the Phantom-Wan default's, or ``subjects``, the MMDiT default's;
    default ``PHANTOM_VAE_RECIPE``, else ``phased``); resumable. Raises ``ValueError`` for an unknown recipe."""
    from phantom_core.world.vae_recipe import train_world_vae

    path = Path(work) / VAE_STAGE_FILE
    return path if path.is_file() else train_world_vae(Path(work), path, progress, recipe)


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


def write_latent_index(latent_dir: Path, files: list[str], travel: float, subjects: int | None = None,
                       pairs: str | None = None) -> Path:
    """Write ``latent_dir/index.json`` atomically (what ``cached_latents`` reads): the cache ``files`` in order, the
    newest dropped prompt's context file in ``latent_dir``, and the world's ``travel`` (and ``subjects``, the
    subjects per scene when every scene has that many; None: the world's mix, not recorded; and ``pairs``, the
    references' pair mode, ``cross`` or ``in``; None: not recorded, which readers take as ``cross``). Returns its
    path."""
    import json

    from phantom_core.loading.disk import atomic_write

    dropped = sorted(latent_dir.glob("dropped-*.safetensors"))[-1].name
    index = latent_dir / "index.json"
    with atomic_write(index) as tmp:
        world = {"travel": travel} if subjects is None else {"travel": travel, "subjects": subjects}
        world.update({} if pairs is None else {"pairs": pairs})
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
    context file, the world's travel, the pair mode). Raises ``ValueError`` for an unknown ``pair_mode``, and when
    ``work`` already holds latents of another travel than ``WORLD``'s (``PHANTOM_WORLD_TRAVEL``) or of another pair
    mode (an index without one holds cross-pair latents)."""
    import json
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from dataclasses import replace

    from phantom_core.inference.settings import WAN_NEGATIVE_PROMPT
    from phantom_core.training.cache import build_cache
    from phantom_core.world.pairs import PAIR_MODES

    if pair_mode not in PAIR_MODES:
        raise ValueError(f"pair mode is {pair_mode!r}; valid: {', '.join(PAIR_MODES)}")
    work = Path(work)
    index = work / LATENT_INDEX
    if index.is_file():
        world = json.loads(index.read_text(encoding="utf-8")).get("world", {})
        cached, pairs = world.get("travel", TRAVEL_FRACTION), world.get("pairs", "cross")
        if cached != WORLD.travel:
            raise ValueError(f"{index}: latents of a world whose subjects travel {cached} of the frame, but "
                             f"PHANTOM_WORLD_TRAVEL asks for {WORLD.travel}; use another --work folder")
        if pairs != pair_mode:
            raise ValueError(f"{index}: {pairs}-pair latents, but {pair_mode}-pair ones were "
                             "asked for; use another --work folder")
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
    return write_latent_index(work / LATENT_DIR, [p.name for p in data.files], WORLD.travel, pairs=pair_mode)


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
    report = reporter("dit", progress)
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
    from phantom_core.tiny.default import TRAINED_FILES, trained_file

    work, out = Path(work), {}
    sources = {"dit": work / DIT_STAGE_FILE, "vae": work / VAE_STAGE_FILE, "text_encoder": work / TEXT_STAGE_FILE}
    for name, relative in TRAINED_FILES.items():
        target = trained_file(relative)
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(target) as tmp:
            tmp.write_bytes(sources[name].read_bytes())
        logger.info("export %s: %s (%.1f MiB)", name, target, target.stat().st_size / 2**20)
        out[name] = target
    return out
