"""Video producers for ``evaluate``: a sample -> uint8 video ``[T, H, W, 3]`` in the sample's format.

- ``truth_video``: the ground truth itself (the metrics' sanity check: it must score perfectly);
- ``noise_video``: uniform noise from the sample's seed and index (it must score badly);
- ``empty_video``: the prompted background alone, every frame, no subject: the floor of subject fidelity (what a
  model that draws the right background and no subject scores in the subject's region) and of motion;
- ``paste_video``: "paste the reference, static, in the centre": each reference's subject with its surround, cut
  from the prepared reference (letterboxed on white) at the reference's scale, pasted on white in the centre of
  its strip of the frame (the frame split into N equal vertical strips; shrunk only when it does not fit), the
  same in every frame. With one reference this is the prepared reference itself, unchanged;
- ``model_producer``: Phantom sampling with a velocity model (Phantom-Wan DiT or MMDiT, with its CLIP vision tower
  when it reads CLIP features), a VAE and a text encoder (``pipeline.generate``);
- ``vae_reconstruction``: the VAE's reconstruction of the ground truth (the fidelity ceiling of a latent model).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image

from phantom_core.world.metrics import prepared_references
from phantom_core.world.sample import WorldSample
from phantom_core.world.tracking import ring_px

VideoProducer = Callable[[WorldSample], np.ndarray]


def truth_video(sample: WorldSample) -> np.ndarray:
    return sample.video.copy()


def noise_video(sample: WorldSample) -> np.ndarray:
    rng = np.random.default_rng([sample.seed, sample.index, 7])
    return rng.integers(0, 256, size=sample.video.shape, dtype=np.uint8)


def empty_video(sample: WorldSample) -> np.ndarray:
    """The empty-scene baseline (module docstring): uint8 ``[T, H, W, 3]`` of the truth's background colour."""
    return np.broadcast_to(np.asarray(sample.truth.background_rgb, dtype=np.uint8), sample.video.shape).copy()


def paste_video(sample: WorldSample) -> np.ndarray:
    """The paste baseline (module docstring)."""
    fmt = sample.config.video
    references = prepared_references(sample)
    if len(references) == 1:
        frame = references[0]
    else:
        canvas = Image.new("RGB", (fmt.width, fmt.height), (255, 255, 255))
        strip = fmt.width // len(references)
        for k, (ref, box) in enumerate(zip(references, sample.ref_boxes)):
            ring = ring_px(box)
            x0, y0 = max(0, int(box[0]) - ring), max(0, int(box[1]) - ring)
            cut = Image.fromarray(ref[y0:int(box[3]) + ring, x0:int(box[2]) + ring])
            scale = min(1.0, strip / cut.width, fmt.height / cut.height)
            if scale < 1.0:
                cut = cut.resize((max(1, int(cut.width * scale)), max(1, int(cut.height * scale))),
                                 Image.Resampling.LANCZOS)
            canvas.paste(cut, (k * strip + (strip - cut.width) // 2, (fmt.height - cut.height) // 2))
        frame = np.asarray(canvas)
    return np.repeat(frame[None], fmt.frames, axis=0)


def _to_uint8(video: torch.Tensor) -> np.ndarray:
    """``[1, 3, T, H, W]`` in [-1, 1] -> uint8 ``[T, H, W, 3]`` (as ``video_io.to_uint8_frames``, without ffmpeg)."""
    pixels = (video[0].detach().float().cpu().clamp(-1, 1) + 1) * 127.5  # (3, T, H, W)
    return pixels.round().to(torch.uint8).permute(1, 2, 3, 0).contiguous().numpy()


def sample_pixels(sample: WorldSample) -> torch.Tensor:
    """The ground-truth video as float32 ``[1, 3, T, H, W]`` in [-1, 1]."""
    video = torch.from_numpy(sample.video).permute(3, 0, 1, 2).float()  # (3, T, H, W) in 0..255
    return (video / 127.5 - 1.0)[None]


def vae_reconstruction(vae: Any) -> VideoProducer:
    """A producer: ``vae.decode(vae.encode(ground truth))`` on the VAE's device."""
    device = next(vae.parameters()).device

    @torch.no_grad()
    def produce(sample: WorldSample) -> np.ndarray:
        return _to_uint8(vae.decode(vae.encode(sample_pixels(sample).to(device))))

    return produce


def model_producer(dit: Any, vae: Any, text_encoder: Any, *, clip_vision: Any = None, clip_output: str = "tokens",
                   prompt_form: str = "named", **settings: Any) -> VideoProducer:
    """A producer running ``pipeline.generate`` on each sample's references and prompt.

    ``settings``: ``GenerationSettings`` fields (steps, shift, solver, w_img, w_text, negative_prompt); the size,
    frames and fps are the sample's, and the noise seed is the sample's index (the case set fixes both).
    ``clip_vision`` / ``clip_output``: the CLIP vision tower and its features for an MMDiT with a CLIP branch
    (``generate``'s; checked here, before the first sample: ``ValueError`` naming ``clip_vision`` when it is missing
    or does not fit). ``prompt_form``: each case's prompt as ``grammar.prompt_in_form`` writes it (``named``: the
    case's own prompt; ``generic``: no subject described; ``ValueError`` for another form, before the first sample).
    """
    from phantom_core.inference.pipeline import check_clip_vision, generate
    from phantom_core.inference.settings import GenerationSettings
    from phantom_core.world.grammar import check_prompt_form, prompt_in_form

    check_clip_vision(dit, clip_vision, clip_output)
    check_prompt_form(prompt_form)

    def produce(sample: WorldSample) -> np.ndarray:
        fmt = sample.config.video
        prompt = prompt_in_form(sample.scene, prompt_form)
        run = GenerationSettings(prompt=prompt, width=fmt.width, height=fmt.height, frames=fmt.frames,
                                 fps=fmt.fps, seed=sample.index, **settings)
        return _to_uint8(generate(dit, vae, text_encoder, list(sample.references), run, clip_vision=clip_vision,
                                  clip_output=clip_output))

    return produce
