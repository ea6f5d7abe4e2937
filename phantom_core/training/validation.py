"""Validation during training: every N steps, sample a fixed prompt + references and save the video.

The same sampler as generation (``sampling.loop.sample_from_seed``: the seed's CPU noise, Phantom's three-pass
guidance), so a validation video is what a user would get from the checkpoint with these settings. The prompt,
the negative prompt and the references are encoded once, when the run starts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from phantom_core.inference.settings import GenerationSettings
from phantom_core.log import logger
from phantom_core.references import encode_references, open_reference
from phantom_core.sampling.loop import sample_from_seed
from phantom_core.training.config import TrainConfig


class Validator:
    """Encodes the validation prompt and references once; ``run(model, step, folder)`` writes one MP4.

    Args:
        config: the run (``validation_*`` fields, ``width``, ``height``, ``frames``, ``ref_mode``).
        vae: ``WanVAE`` (encodes the references now, decodes each validation video).
        text_encoder: ``UMT5TextEncoder`` (used now only).
        device: where the contexts and reference latents live (the training device).
    Raises:
        ValueError: a reference image cannot be read, or the settings are invalid.
    """

    def __init__(self, config: TrainConfig, vae: nn.Module, text_encoder: nn.Module, device: torch.device) -> None:
        self.settings = GenerationSettings(
            prompt=config.validation_prompt, width=config.width, height=config.height, frames=config.frames,
            steps=config.validation_steps, solver=config.validation_solver, w_img=config.validation_w_img,
            w_text=config.validation_w_text, seed=config.validation_seed, ref_mode=config.ref_mode)
        images = []
        for path in config.validation_references:
            try:
                images.append(open_reference(path))
            except OSError as err:
                raise ValueError(f"validation reference {path} cannot be read as an image: {err}") from err
        with torch.no_grad():
            context, context_neg = text_encoder.encode([self.settings.prompt, self.settings.negative_prompt])
            refs = encode_references(vae, images, config.width, config.height, config.ref_mode)  # (1,16,N,h,w)
        self.context, self.context_neg = context[None].to(device), context_neg[None].to(device)  # (1, L, D)
        self.refs: Tensor = refs.to(device)
        self.ref_clip: Tensor | None = None  # (1, N, T, C): the CLIP features an MMDiT with a CLIP branch reads
        if config.clip_vision:
            from phantom_core.training.clip_features import file_clip_features

            encode = file_clip_features(config.clip_vision, config.clip_output, device).load()
            self.ref_clip = encode(images)[None].to(device)
        self.vae = vae

    @torch.no_grad()
    def run(self, model: nn.Module, step: int, folder: Path, autocast: Callable[[], contextlib.AbstractContextManager],
            write: bool = True) -> Path | None:
        """Sample with ``model`` (every rank calls it: an FSDP model needs all of them) and, when ``write``
        (rank 0), decode and write ``<folder>/step_NNNNNN.mp4``. The model is put back in train mode."""
        from phantom_core.video_io import to_uint8_frames, write_mp4  # imageio-ffmpeg only where videos are written

        s = self.settings
        model.eval()
        try:
            with autocast():
                latents = sample_from_seed(model, s.seed, s.latent_shape, self.refs, self.context, self.context_neg,
                                           steps=s.steps, shift=s.shift, solver=s.solver, w_img=s.w_img,
                                           w_text=s.w_text, ref_clip=self.ref_clip)  # (1, 16, F, h, w) normalized
        finally:
            model.train()
        if not write:
            return None
        param = next(self.vae.parameters())
        video = self.vae.decode(latents.to(param.device))  # (1, 3, T, H, W) in [-1, 1]
        path = write_mp4(to_uint8_frames(video), folder / f"step_{step:06d}.mp4", fps=s.fps, quality=s.quality)
        logger.info("validation video %s", path)
        return path
