"""Generation settings: every choice that determines a Phantom-Wan video besides the model files and the machine.

``GenerationSettings`` (a frozen dataclass, validated on creation), the sampler presets applied to it, and the
seed convention (-1 = draw at random, recorded once drawn). Used by the pipeline, the CLI and the JSON sidecar.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from dataclasses import dataclass
from typing import Any, NamedTuple

from phantom_core.log import logger
from phantom_core.references import REFERENCE_MODES, SIZE_MULTIPLE
from phantom_core.sampling.loop import SAMPLER_PRESETS, SOLVERS
from phantom_core.wan.latents import latent_shape

RANDOM_SEED = -1
MAX_SEED = 2**64 - 1  # ComfyUI's seed widget maximum; make_noise accepts [0, 2**64)
MAX_SIZE = 16384  # px per side, ComfyUI's MAX_RESOLUTION
MAX_FRAMES = 1 + 4 * 1024  # 4097 frames, 256 s at 16 fps: far beyond what fits in memory today


class Range(NamedTuple):
    """The values a numeric setting accepts: ``low`` to ``high`` inclusive; an integer setting (int ``low``) also
    only ``low + k * step``. ``meaning`` says what the value is, for messages."""

    low: int | float
    high: int | float
    step: int = 1
    meaning: str = ""

    def error(self, name: str, value: Any) -> str | None:
        """The message for a ``value`` outside the range (or of the wrong type), naming ``name``; else None."""
        integer = isinstance(self.low, int)
        numeric = isinstance(value, int) if integer else isinstance(value, (int, float)) and math.isfinite(value)
        if numeric and not isinstance(value, bool) and self.low <= value <= self.high \
                and (not integer or (value - self.low) % self.step == 0):
            return None
        grid = f", {self.low} + a multiple of {self.step}" if integer and self.step > 1 else ""
        kind = "an integer" if integer else "a number"
        note = f" ({self.meaning})" if self.meaning else ""
        return f"{name}: got {value!r}; expected {kind} from {self.low} to {self.high}{grid}{note}"

    def check(self, name: str, value: Any) -> None:
        """Raise ValueError with `error`'s message unless ``value`` is in the range."""
        if (message := self.error(name, value)) is not None:
            raise ValueError(message)


# what GenerationSettings accepts; the nodes' widgets declare exactly these min / max (/ step for integers), which
# tests/nodes/test_validation.py compares through ComfyUI's /object_info
SETTING_RANGES: dict[str, Range] = {
    "width": Range(SIZE_MULTIPLE, MAX_SIZE, SIZE_MULTIPLE, f"px, a multiple of {SIZE_MULTIPLE}: VAE stride 8 x DiT "
                                                           "patch 2"),
    "height": Range(SIZE_MULTIPLE, MAX_SIZE, SIZE_MULTIPLE, f"px, a multiple of {SIZE_MULTIPLE}"),
    "frames": Range(1, MAX_FRAMES, 4, "4k+1 frames, as the Wan VAE needs: 1, 5, 9, ..., 81"),
    "steps": Range(1, 1000, 1, "sampling steps, official 50"),
    "seed": Range(0, MAX_SEED, 1, "or -1 for a random seed"),
    "quality": Range(0, 10, 1, "imageio scale, 10 best"),
    "shift": Range(0.1, 100.0, meaning="flow time shift, official 5.0"),
    "w_img": Range(0.0, 100.0, meaning="reference-image guidance, official 5.0, paper 3.0"),
    "w_text": Range(0.0, 100.0, meaning="text guidance, official 7.5"),
    "fps": Range(1.0, 120.0, meaning="frames per second, Wan renders at 16"),
    "image_guidance_start": Range(0.0, 1.0, meaning="fraction of the steps where the v_neg pass starts, official 0"),
    "image_guidance_end": Range(0.0, 1.0, meaning="fraction of the steps where the v_neg pass ends, official 1"),
    "cache_threshold": Range(0.0, 1.0, meaning="step-cache threshold, 0 = off (official)"),
}
LORA_STRENGTH = Range(-10.0, 10.0, meaning="1.0 = as trained, 0 = off, negative inverts")  # CLI, node, apply_loras

# Wan2.1's default negative prompt (upstream ``configs/shared_config.py``: ``sample_neg_prompt``), used when the
# user gives none. Roughly: garish colours, overexposed, static, blurry details, subtitles, style, artwork,
# painting, still frame, greyish, worst/low quality, JPEG artefacts, ugly, mutilated, extra fingers, badly drawn
# hands/face, deformed, disfigured, malformed limbs, fused fingers, motionless, cluttered background, three legs,
# many people in the background, walking backwards.
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，"
    "最差质量，低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，"
    "画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，"
    "杂乱的背景，三条腿，背景人很多，倒着走"
)


@dataclass(frozen=True)
class GenerationSettings:
    """Every setting that determines a generated video (with the model files and the machine).

    Units: ``width``/``height`` in px (multiples of 16), ``frames`` video frames (4k + 1), ``fps`` frames per
    second, ``quality`` imageio's 0..10 scale (8 -> x264 crf 10). ``seed`` -1 means "draw one at random"
    (:func:`resolve_seed` records the drawn value). The defaults are the official Phantom-Wan ones.

    Raises:
        ValueError: naming the field, the value received and what is valid.
    """

    prompt: str
    negative_prompt: str = WAN_NEGATIVE_PROMPT
    width: int = 832
    height: int = 480
    frames: int = 81
    steps: int = 50
    shift: float = 5.0
    solver: str = "unipc"
    w_img: float = 5.0
    w_text: float = 7.5
    seed: int = RANDOM_SEED
    fps: float = 16.0
    quality: int = 8
    ref_mode: str = "letterbox"
    image_guidance_start: float = 0.0  # the v_neg pass runs for steps i with start <= i / steps < end ...
    image_guidance_end: float = 1.0  # ... and w_img = 1 outside (sampling.loop.sample_phantom)
    cache_threshold: float = 0.0  # sampling.cache.StepCache threshold; 0 computes every pass of every step

    def __post_init__(self) -> None:
        for name in ("prompt", "negative_prompt"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name}: got {getattr(self, name)!r}; expected a string")
        for name, limits in SETTING_RANGES.items():
            if not (name == "seed" and self.seed == RANDOM_SEED):
                limits.check(name, getattr(self, name))
        check_image_guidance_window(self.image_guidance_start, self.image_guidance_end)
        for name, valid in (("solver", SOLVERS), ("ref_mode", REFERENCE_MODES)):
            if getattr(self, name) not in valid:
                raise ValueError(f"{name}: got {getattr(self, name)!r}; valid values are {', '.join(valid)}")

    @property
    def latent_shape(self) -> tuple[int, int, int, int, int]:
        """``(1, 16, F, h, w)`` of the video latents (``wan.latents.latent_shape``)."""
        return latent_shape(self.frames, self.height, self.width)

    def to_json(self) -> dict[str, Any]:
        """The settings as a JSON-ready dict (field name -> value)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> GenerationSettings:
        """Inverse of :meth:`to_json`. Raises ``ValueError`` naming unknown fields or a missing prompt."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"generation settings: unknown fields {unknown}; known fields are {sorted(known)}")
        if "prompt" not in data:
            raise ValueError("generation settings: 'prompt' is missing")
        return cls(**data)


def settings_from_preset(name: str, **overrides: Any) -> GenerationSettings:
    """Settings with a sampler preset (``"official"`` or ``"paper"``, see ``SAMPLER_PRESETS``) applied.

    ``overrides`` (any :class:`GenerationSettings` field; ``prompt`` is required) win over the preset.
    Raises ``ValueError`` for an unknown preset or field.
    """
    if name not in SAMPLER_PRESETS:
        raise ValueError(f"preset: got {name!r}; valid presets are {', '.join(SAMPLER_PRESETS)}")
    return GenerationSettings.from_json({**SAMPLER_PRESETS[name], **overrides})


def resolve_seed(settings: GenerationSettings) -> GenerationSettings:
    """Replace a seed of -1 by a random one in [0, 2**53) (exact in any JSON reader); others unchanged."""
    if settings.seed != RANDOM_SEED:
        return settings
    seed = secrets.randbelow(2**53)
    logger.info("seed -1: drew random seed %d", seed)
    return dataclasses.replace(settings, seed=seed)


def check_image_guidance_window(start: float, end: float) -> None:
    """Raise ``ValueError`` naming ``image_guidance_start`` unless ``start < end`` (each already in its range)."""
    if not start < end:
        raise ValueError(f"image_guidance_start {start} must be below image_guidance_end {end} (fractions of the "
                         "steps; official 0 and 1)")
