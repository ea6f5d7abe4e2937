"""The embedded defaults: the trained world default (committed files) and the random-weight tiny checkpoints.

``install_trained_default`` copies the trained default (``phantom_core/tiny/trained/``, made by
``make train-default``: a Phantom-Wan DiT, VAE and umT5 learned in the miniature world, see its MODEL_CARD.md)
into a ComfyUI-style models folder; the demo, the shipped workflows and ``evaluate --model default`` run it:

    <models_dir>/diffusion_models/phantom_world_dit.safetensors   DIT_PRESETS["world"], upstream Wan2.1 keys
    <models_dir>/vae/phantom_world_vae.safetensors                VAE_PRESETS["tiny"], upstream Wan2.1 VAE keys
    <models_dir>/text_encoders/phantom_world_umt5.safetensors      TEXT_ENCODER_PRESETS["tiny"] + world tokenizer

``install_trained_mmdit_default`` does the same for the second default, the paper's MMDiT trained in the same world
(``make train-default-mmdit``, ``world.mmdit_default``), once it is shipped (``trained_mmdit_shipped``): its DiT, the
world CLIP tower it reads and the VAE of its latents (``TRAINED_MMDIT_FILES["vae"]``: ``TRAINED_NEXT_VAE``, the
``subjects`` recipe's), beside the Phantom-Wan default's umT5:

    <models_dir>/diffusion_models/phantom_world_mmdit.safetensors  MMDIT_PRESETS["world"] (VAE and CLIP references)
    <models_dir>/clip_vision/phantom_world_clip.safetensors         CLIP_VISION_PRESETS["world"], open_clip keys
    <models_dir>/vae/phantom_world_vae_subjects.safetensors        VAE_PRESETS["world"], upstream Wan2.1 VAE keys

The random-weight tiny default below is what the tests use (and ``evaluate --baseline untrained``):

They let the nodes, the shipped workflows and the tests run end to end without downloading anything; the
videos they make are noise-like, not meaningful. Everything is drawn from fixed seeds, so the bytes of each
file are the same on every machine and run; `write_tiny_default` skips a file whose content hash already
matches and otherwise writes it atomically (`phantom_core.loading.disk.atomic_write`).

    <models_dir>/diffusion_models/phantom_tiny_dit.safetensors   DIT_PRESETS["tiny"], upstream Wan2.1 keys
    <models_dir>/vae/phantom_tiny_vae.safetensors                VAE_PRESETS["tiny"], upstream Wan2.1 VAE keys
    <models_dir>/text_encoders/phantom_tiny_umt5.safetensors      TEXT_ENCODER_PRESETS["tiny"], transformers
                                                                 umT5 keys + `spiece_model` (our tokenizer)
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors.torch import save
from torch import Tensor

from phantom_core.loading.disk import atomic_write
from phantom_core.log import logger
from phantom_core.tiny.text import random_text_encoder_state_dict, train_tiny_tokenizer
from phantom_core.wan.dit import DIT_PRESETS, PhantomWanDiT
from phantom_core.wan.umt5 import TEXT_ENCODER_PRESETS, write_text_encoder_checkpoint
from phantom_core.wan.vae import VAE_PRESETS, WanVAE

DIT_FILE = "diffusion_models/phantom_tiny_dit.safetensors"
VAE_FILE = "vae/phantom_tiny_vae.safetensors"
TEXT_ENCODER_FILE = "text_encoders/phantom_tiny_umt5.safetensors"
TRAINED_DIR = Path(__file__).resolve().parent / "trained"
TRAINED_FILES = {"dit": "diffusion_models/phantom_world_dit.safetensors", "vae": "vae/phantom_world_vae.safetensors",
                 "text_encoder": "text_encoders/phantom_world_umt5.safetensors"}
# the `subjects` VAE recipe's file (world.vae_recipe; MODEL_CARD.md): sharper subjects than TRAINED_FILES' VAE; the
# MMDiT default learned its last steps on its latents, so it is the MMDiT default's VAE
TRAINED_NEXT_VAE = "vae/phantom_world_vae_subjects.safetensors"
# the MMDiT default: its own DiT, CLIP tower and VAE (the VAE whose latents it learned on last: TRAINED_NEXT_VAE since
# 2026-12-07; while it named TRAINED_FILES' VAE, the two had to stay byte-identical); the umT5 is always TRAINED_FILES'
TRAINED_MMDIT_FILES = {"dit": "diffusion_models/phantom_world_mmdit.safetensors",
                       "clip_vision": "clip_vision/phantom_world_clip.safetensors",
                       "vae": TRAINED_NEXT_VAE}
TRAINED_MMDIT_CLIP_OUTPUT = "tokens"  # the CLIP features it was trained on (world.mmdit_default.CLIP_OUTPUT)
TRAINED_FORMAT = {"width": 128, "height": 128, "frames": 17}  # the world the default was trained in (fps 16)
# the defaults' guidance scales (paper Eq. 5), from the sweeps in docs/guidance_sweep.md and, for the MMDiT default,
# docs/guidance_sweep_mmdit.md (`tools.guidance_sweep`): the official 5 / 7.5 extrapolate what these small models have
# learned; 3 / 3 followed prompts best in both
TRAINED_SAMPLING = {"w_img": 3.0, "w_text": 3.0}
# what `generate --model default-mmdit` and its shipped workflows add: the per-pass step cache at threshold 0.1, 2.8x
# fewer DiT evaluations at 40.9 dB against the uncached video, the world's metrics as uncached but for the motion
# accuracy (-2 of 96 tracks), 15.6% of the tracks measured another way (0.2: 4.0x, 36.1 dB, 32.3%; 72 held-out cases,
# docs/speed_quality_mmdit.md). `evaluate` and the sweeps measure the network uncached; the Phantom-Wan default stays
# uncached (its motion is at chance there, so the cache cannot be judged on it)
TRAINED_MMDIT_SPEED = {"cache_threshold": 0.1}
SEED = 11079  # fixed: the default must be byte-identical everywhere (arXiv 2502.11079)


def random_like_upstream(shapes: Mapping[str, torch.Size], seed: int) -> dict[str, Tensor]:
    """Deterministic random float32 tensors for a state dict's shapes, scaled so activations stay O(1).

    One CPU generator walks the keys in sorted order. Matrices and convolutions: N(0, 1/fan_in) (fan_in = all
    dims but the first), which keeps each layer's output variance near its input's, including the DiT head
    that upstream initialises to zero (so the tiny model's velocity is O(1), not 0). `*modulation`:
    N(0, 1/dim) as upstream. Norm scales (`*norm*.weight`, VAE `gamma`): 1 + N(0, 0.1^2). Biases: N(0, 0.02^2).
    """
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, Tensor] = {}
    for key in sorted(shapes):
        shape = tuple(shapes[key])
        noise = torch.randn(shape, generator=gen, dtype=torch.float32)
        leaf = key.rsplit(".", 1)[-1]
        if leaf == "modulation":
            out[key] = noise / math.sqrt(shape[-1])
        elif leaf == "gamma" or ("norm" in key and leaf == "weight"):
            out[key] = 1.0 + 0.1 * noise
        elif leaf == "bias" or len(shape) == 1:
            out[key] = 0.02 * noise
        else:
            out[key] = noise / math.sqrt(math.prod(shape[1:]))
    return out


def tiny_dit_state_dict() -> dict[str, Tensor]:
    """Every parameter of the tiny Phantom-Wan DiT, random (upstream key names), float32."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in PhantomWanDiT(DIT_PRESETS["tiny"]).state_dict().items()}
    return random_like_upstream(shapes, SEED)


def tiny_vae_state_dict() -> dict[str, Tensor]:
    """Every parameter of the tiny Wan2.1 VAE, random (upstream key names), float32."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in WanVAE(VAE_PRESETS["tiny"]).state_dict().items()}
    return random_like_upstream(shapes, SEED + 1)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_sha256(path: Path) -> str | None:
    return _sha256(path.read_bytes()) if path.is_file() else None


def _install(path: Path, data: bytes) -> bool:
    """Write `data` to `path` atomically unless the file already holds exactly these bytes; True if written."""
    if _file_sha256(path) == _sha256(data):
        return False
    with atomic_write(path) as tmp:
        tmp.write_bytes(data)
    return True


def _text_encoder_bytes() -> bytes:
    """The tiny umT5 checkpoint's bytes, produced by `write_text_encoder_checkpoint` in a scratch folder."""
    spec = TEXT_ENCODER_PRESETS["tiny"]
    with tempfile.TemporaryDirectory(prefix="phantom-tiny-") as scratch:
        path = Path(scratch) / "umt5.safetensors"
        write_text_encoder_checkpoint(path, random_text_encoder_state_dict(spec, seed=SEED + 2),
                                      spiece_bytes=train_tiny_tokenizer(vocab_size=spec.vocab_size))
        return path.read_bytes()


def _safetensors_bytes(make: Callable[[], dict[str, Tensor]]) -> bytes:
    return save(make(), metadata={"format": "pt"})  # one key: safetensors writes a map in random order


def write_tiny_default(models_dir: str | os.PathLike) -> dict[str, Path]:
    """Write (or keep, when byte-identical) the tiny default checkpoints under a ComfyUI-style models folder.

    Args:
        models_dir: the `models` folder; `diffusion_models/`, `vae/` and `text_encoders/` are created in it.
    Returns:
        ``{"dit": path, "vae": path, "text_encoder": path}``.
    Raises:
        OSError: the folder cannot be written.
    """
    root = Path(models_dir)
    builders: dict[str, tuple[str, Callable[[], bytes]]] = {
        "dit": (DIT_FILE, lambda: _safetensors_bytes(tiny_dit_state_dict)),
        "vae": (VAE_FILE, lambda: _safetensors_bytes(tiny_vae_state_dict)),
        "text_encoder": (TEXT_ENCODER_FILE, _text_encoder_bytes),
    }
    paths: dict[str, Path] = {}
    for name, (relative, build) in builders.items():
        path = root / relative
        written = _install(path, build())
        logger.info("tiny default %s: %s %s", name, "wrote" if written else "up to date", path)
        paths[name] = path
    return paths


def trained_file(relative: str | os.PathLike) -> Path:
    """The committed copy of a trained default's file: ``TRAINED_DIR / <its file name>``, where ``relative`` is the
    file's path under a ComfyUI models folder (a value of ``TRAINED_FILES`` / ``TRAINED_MMDIT_FILES``). The path may
    not exist (a checkout without the weights); ``TRAINED_DIR`` is read at each call."""
    return TRAINED_DIR / Path(relative).name


def _install_trained(models_dir: str | os.PathLike, files: dict[str, str], what: str, make: str) -> dict[str, Path]:
    """Copy ``TRAINED_DIR / <file name>`` of each of ``files`` (role -> path under the models folder) into
    ``models_dir``, skipping byte-identical files; raises ``FileNotFoundError`` naming every missing file."""
    missing = [str(trained_file(relative)) for relative in files.values() if not trained_file(relative).is_file()]
    if missing:
        raise FileNotFoundError(f"the trained {what}'s files are missing: {', '.join(missing)}; `{make}` trains and "
                                "exports them (or restore them from git)")
    root, paths = Path(models_dir), {}
    for name, relative in files.items():
        path = root / relative
        written = _install(path, trained_file(relative).read_bytes())
        logger.info("trained %s %s: %s %s", what, name, "wrote" if written else "up to date", path)
        paths[name] = path
    return paths


def install_trained_default(models_dir: str | os.PathLike) -> dict[str, Path]:
    """Copy the trained world default into a ComfyUI-style models folder (skipping byte-identical files).

    Returns:
        ``{"dit": path, "vae": path, "text_encoder": path}``.
    Raises:
        FileNotFoundError: a committed file is missing from ``phantom_core/tiny/trained/`` (``make train-default``
            makes them).
    """
    return _install_trained(models_dir, TRAINED_FILES, "default", "make train-default")


def trained_mmdit_shipped() -> bool:
    """Whether the MMDiT default's own files (``TRAINED_MMDIT_FILES``) are in ``phantom_core/tiny/trained/``."""
    return all(trained_file(relative).is_file() for relative in TRAINED_MMDIT_FILES.values())


def install_trained_mmdit_default(models_dir: str | os.PathLike) -> dict[str, Path]:
    """Copy the trained MMDiT default (its DiT, CLIP tower and VAE, ``TRAINED_MMDIT_FILES``, and the Phantom-Wan
    default's umT5 it was trained with) into a ComfyUI-style models folder (skipping byte-identical files).

    Returns:
        ``{"dit": path, "clip_vision": path, "vae": path, "text_encoder": path}``.
    Raises:
        FileNotFoundError: naming the files missing from ``phantom_core/tiny/trained/`` (``make train-default-mmdit``
            makes the MMDiT's, ``make train-default`` the umT5).
    """
    shared = {"text_encoder": TRAINED_FILES["text_encoder"]}
    paths = _install_trained(models_dir, TRAINED_MMDIT_FILES, "MMDiT default", "make train-default-mmdit")
    return {**paths, **_install_trained(models_dir, shared, "default", "make train-default")}
