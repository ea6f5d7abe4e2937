"""Generation settings: every choice that determines a Phantom-Wan video besides the model files and the machine.

``GenerationSettings`` (a frozen dataclass, validated on creation), the sampler presets applied to it, and the
seed convention (-1 = draw at random, recorded once drawn). Used by the pipeline, the CLI and the JSON sidecar.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from dataclasses import dataclass
from typing import Any

from phantom_core.log import logger
from phantom_core.references import REFERENCE_MODES, SIZE_MULTIPLE
from phantom_core.sampling.loop import SAMPLER_PRESETS, SOLVERS
from phantom_core.wan.latents import latent_shape

RANDOM_SEED = -1
MAX_SEED = 2**64 - 1  # ComfyUI's seed widget maximum; make_noise accepts [0, 2**64)

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

    def __post_init__(self) -> None:
        for name in ("prompt", "negative_prompt"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name}: got {getattr(self, name)!r}; expected a string")
        size = f"a positive multiple of {SIZE_MULTIPLE} px (VAE stride 8 x DiT patch 2)"
        _check_int("width", self.width, size, SIZE_MULTIPLE, step=SIZE_MULTIPLE)
        _check_int("height", self.height, size, SIZE_MULTIPLE, step=SIZE_MULTIPLE)
        _check_int("frames", self.frames, "4k + 1 frames, as the Wan VAE needs (1, 5, 9, ..., 81)", 1, step=4)
        _check_int("steps", self.steps, "an integer >= 1 (official: 50)", 1)
        _check_int("seed", self.seed, f"-1 (random) or an integer in [0, {MAX_SEED}]", RANDOM_SEED, MAX_SEED)
        _check_int("quality", self.quality, "an integer 0..10 (10 best)", 0, 10)
        _check_number("shift", self.shift, "a number > 0 (official: 5.0)", positive=True)
        _check_number("w_img", self.w_img, "a finite number (official: 5.0, paper: 3.0)")
        _check_number("w_text", self.w_text, "a finite number (official: 7.5)")
        _check_number("fps", self.fps, "a number > 0 (Wan renders at 16)", positive=True)
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


def _check_int(name: str, value: Any, valid: str, minimum: int, maximum: int | None = None, step: int = 1) -> None:
    """``value`` must be an int in [minimum, maximum] with ``(value - minimum) % step == 0``."""
    ok = not isinstance(value, bool) and isinstance(value, int) and value >= minimum
    if not ok or (maximum is not None and value > maximum) or (value - minimum) % step:
        raise ValueError(f"{name}: got {value!r}; expected {valid}")


def _check_number(name: str, value: Any, valid: str, positive: bool = False) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or (positive and value <= 0):
        raise ValueError(f"{name}: got {value!r}; expected {valid}")


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
