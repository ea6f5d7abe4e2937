"""What the world's VAE trains on (``default_model`` phases 1-4): batches of world clips and frames, each a pure
function of the step (``training.vae.train_vae`` calls ``batch_fn(step)``; a resumed run sees the same batches).

Every tensor is in [-1, 1], ``[B, 3, T, H, W]``; the samples come from the training split only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from phantom_core.world.dataset import sample_tensors
from phantom_core.world.sample import WorldConfig, make_sample
from phantom_core.world.subjects import split_subjects


@dataclass(frozen=True)
class VAEData:
    """How the VAE's batches are drawn from the world: ``clips`` crops of ``clip_frames`` frames and ``frames``
    single-frame crops (references and video frames), ``crop`` px square, from training samples of ``seed``."""

    clips: int = 4
    clip_frames: int = 5
    frames: int = 4
    crop: int = 64
    seed: int = 0


def _crop(x: Tensor, size: int, rng: np.random.Generator) -> Tensor:
    """A random ``size`` x ``size`` crop of ``x [..., H, W]``."""
    h, w = x.shape[-2:]
    top, left = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    return x[..., top : top + size, left : left + size]


def _step_samples(data: VAEData, config: WorldConfig, pool: list, step: int) -> tuple[np.random.Generator, list]:
    """Step ``step``'s crop generator and its ``max(clips, frames)`` training samples, each with its tensors
    (``[(WorldSample, WorldItem)]``); the samples use their own seeds, so drawing them first leaves ``rng`` as is."""
    per_step = max(data.clips, data.frames)
    drawn = [make_sample("train", data.seed, step * per_step + i, config, pool=pool) for i in range(per_step)]
    return np.random.default_rng([data.seed, step]), [(sample, sample_tensors(sample)) for sample in drawn]


def vae_batches(data: VAEData, config: WorldConfig):
    """``batch_fn(step) -> [clips [clips, 3, clip_frames, crop, crop], frames [frames, 3, 1, crop, crop]]`` in
    [-1, 1], a pure function of ``step`` (``training.vae.train_vae``)."""
    pool = split_subjects("train", config.sources)

    def batch(step: int) -> list[Tensor]:
        rng, drawn = _step_samples(data, config, pool, step)
        clips, frames = [], []
        for i, (_, item) in enumerate(drawn):
            video = item.video  # (3, T, H, W)
            if i < data.clips:
                start = int(rng.integers(0, video.shape[1] - data.clip_frames + 1))
                clips.append(_crop(video[:, start : start + data.clip_frames], data.crop, rng))
            if i < data.frames:
                if rng.random() < 0.5:  # a prepared reference (letterboxed on white)
                    frame = item.references[int(rng.integers(0, item.references.shape[0]))][:, None]
                else:
                    frame = video[:, int(rng.integers(0, video.shape[1])) : None][:, :1]
                frames.append(_crop(frame, data.crop, rng))
        return [torch.stack(clips), torch.stack(frames)]

    return batch


def subject_clip_batches(data: VAEData, config: WorldConfig):
    """Phase-4 batches: ``clips`` 9-frame clips (causal chunks 0-2: the third chunk's cache comes from a regular
    chunk, as that of every later chunk does) at ``crop`` px, each crop centred (+-8 px) on one subject's centre
    in the clip's middle frame, plus ``frames`` prepared references (centre crops). Phase 2's 32 px crops mostly
    showed background, so the later chunks had barely learned subjects: the tiny VAE lost small subjects from
    frame ~4 on, and a DiT trained on its latents never saw a subject move."""
    pool = split_subjects("train", config.sources)

    def batch(step: int) -> list[Tensor]:
        rng, drawn = _step_samples(data, config, pool, step)
        clips, frames = [], []
        for i, (sample, item) in enumerate(drawn):
            video = item.video  # (3, T, H, W) in [-1, 1]
            h, w = video.shape[-2:]
            if i < data.clips:
                start = int(rng.integers(0, video.shape[1] - data.clip_frames + 1))
                k = int(rng.integers(0, len(sample.subjects)))
                cx, cy = sample.truth.centres[k, start + data.clip_frames // 2] + rng.integers(-8, 9, size=2)
                left = int(np.clip(round(cx - data.crop / 2), 0, w - data.crop))
                top = int(np.clip(round(cy - data.crop / 2), 0, h - data.crop))
                clips.append(video[:, start : start + data.clip_frames, top : top + data.crop, left : left + data.crop])
            if i < data.frames:
                ref = item.references[int(rng.integers(0, len(sample.references)))]  # (3, H, W)
                top, left = (h - data.crop) // 2, (w - data.crop) // 2
                frames.append(ref[:, None, top : top + data.crop, left : left + data.crop])
        return [torch.stack(clips), torch.stack(frames)]

    return batch
