"""Reference images for Phantom: load, fit to the video frame, VAE-encode each one as its own 1-frame latent.

Upstream (Phantom ``generate.py`` ``load_ref_images`` + ``Phantom_Wan_S2V.get_vae_latents``): every reference
is converted to RGB, resized with LANCZOS to fit inside the W x H frame keeping its aspect ratio, centred on white,
turned into pixels in [-1, 1] and VAE-encoded alone as a 1-frame video; the latents are stacked on the time axis.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Literal, Protocol

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor, nn

from phantom_core.log import logger

MAX_REFERENCES = 4  # the Phantom-Wan checkpoints were trained with 1 to 4 references
MIN_REFERENCE_SIDE = 16  # px; smaller images carry no usable subject detail (and cannot be resized sensibly)
SIZE_MULTIPLE = 16  # frame width/height: VAE stride 8 x DiT patch 2
WHITE = (255, 255, 255)
# A reference whose pixels vary less than this (standard deviation over all pixels and RGB channels, on the 0..1
# scale: ~5 of 255 levels) is blank or nearly uniform: no subject for the model to keep. Photos, even of one
# subject on a studio backdrop, lie far above (> 0.1); an all-white 16-bit PNG as ComfyUI's Load Image reads it,
# a black or a fully transparent image lie at 0.
UNIFORM_STD = 0.02
FitMode = Literal["letterbox", "crop"]
REFERENCE_MODES: tuple[FitMode, ...] = ("letterbox", "crop")  # official Phantom first (the default)


class ReferenceEncoder(Protocol):
    """What ``encode_references`` needs of a VAE: ``encode([B,3,T,H,W] in [-1,1]) -> [B,16,F,H/8,W/8]``."""

    def encode(self, video: Tensor) -> Tensor: ...


def open_reference(path: str | os.PathLike) -> Image.Image:
    """Open any image PIL reads -> RGB, EXIF orientation applied (as ComfyUI's LoadImage), alpha over white."""
    with Image.open(path) as img:
        img.load()
        return to_rgb(ImageOps.exif_transpose(img))


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy of ``image``; transparency (RGBA, LA, PA, palette with a transparent index) composited over white.

    16-bit / 32-bit greyscale ("I;16", "I") is rescaled to 8 bit instead of clipped; float ("F") is taken as 0..255.
    """
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        scale = 1.0 if image.mode == "F" else 1 / 257
        grey = np.clip(np.asarray(image, dtype=np.float64) * scale, 0, 255).round().astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, WHITE + (255,)), rgba).convert("RGB")
    return image.convert("RGB")


def letterbox(image: Image.Image, width: int, height: int) -> Image.Image:
    """Fit inside ``width x height`` keeping the aspect ratio (LANCZOS), centred on white; exactly W x H.

    Reproduces upstream ``load_ref_images``: the fitted side is the frame's, the other is ``int()``-truncated,
    and the padding puts ``delta // 2`` before and the remainder after.
    """
    image_ratio, frame_ratio = image.width / image.height, width / height
    if image_ratio > frame_ratio:  # wider than the frame: full width, bars top and bottom
        new_w, new_h = width, int(width / image_ratio)
    else:  # taller (or equal): full height, bars left and right
        new_w, new_h = int(height * image_ratio), height
    resized = image.resize((max(new_w, 1), max(new_h, 1)), Image.Resampling.LANCZOS)
    dw, dh = width - resized.width, height - resized.height
    return ImageOps.expand(resized, (dw // 2, dh // 2, dw - dw // 2, dh - dh // 2), fill=WHITE)


def center_crop(image: Image.Image, width: int, height: int) -> Image.Image:
    """Scale to cover ``width x height`` and centre-crop (LANCZOS); exactly W x H.

    Crop box as ComfyUI's ``common_upscale(..., crop="center")`` used by its native Phantom node: cut the
    excess of the longer relative side, ``round()`` of half the excess on each side, then resize.
    """
    image_ratio, frame_ratio = image.width / image.height, width / height
    x = y = 0
    if image_ratio > frame_ratio:
        x = round((image.width - image.width * (frame_ratio / image_ratio)) / 2)
    elif image_ratio < frame_ratio:
        y = round((image.height - image.height * (image_ratio / frame_ratio)) / 2)
    box = (x, y, image.width - x, image.height - y)
    return image.resize((width, height), Image.Resampling.LANCZOS, box=box)


def pil_to_tensor(image: Image.Image) -> Tensor:
    """RGB PIL image -> float32 ``[3, H, W]`` in [-1, 1] (upstream ``to_tensor(img).sub_(0.5).div_(0.5)``)."""
    pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy())  # (H, W, 3) uint8
    return pixels.permute(2, 0, 1).float().div(255.0).sub(0.5).div(0.5)  # (3, H, W) in [-1, 1]


def prepare_reference(image: Image.Image, width: int, height: int, mode: FitMode = "letterbox") -> Tensor:
    """One reference image -> float32 ``[3, height, width]`` in [-1, 1].

    ``mode="letterbox"`` (official Phantom): fit inside, white bars. ``mode="crop"`` (ComfyUI's native node):
    cover and centre-crop. Transparency is composited over white first. Raises ``ValueError`` for a bad mode
    or a non-positive size.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"reference frame size: got {width}x{height}; width and height must be positive")
    fit = {"letterbox": letterbox, "crop": center_crop}.get(mode)
    if fit is None:
        raise ValueError(f"reference mode: got {mode!r}; valid modes are {' and '.join(map(repr, REFERENCE_MODES))}")
    return pil_to_tensor(fit(to_rgb(image), width, height))  # (3, H, W)


def tensor_to_pil(image: Tensor) -> Image.Image:
    """ComfyUI IMAGE ``[H, W, C]`` (or ``[1, H, W, C]``) float in [0, 1], C = 3 or 4 -> PIL RGB / RGBA."""
    if image.dim() == 4 and image.shape[0] == 1:
        image = image[0]
    if image.dim() != 3 or image.shape[-1] not in (3, 4):
        raise ValueError(f"image tensor: got shape {tuple(image.shape)}; expected [H, W, 3] or [H, W, 4]")
    array = (image.detach().float().cpu().clamp(0, 1) * 255.0).round().to(torch.uint8).numpy()
    return Image.fromarray(array, mode="RGBA" if array.shape[-1] == 4 else "RGB")


def validate_references(images: Sequence[Image.Image]) -> None:
    """Check 1..4 references, each at least 16 px on a side; ``ValueError`` naming the count or the image."""
    count = len(images)
    if not 1 <= count <= MAX_REFERENCES:
        raise ValueError(f"references: got {count} images; Phantom takes 1 to {MAX_REFERENCES} reference images")
    for i, image in enumerate(images, start=1):
        if min(image.size) < MIN_REFERENCE_SIDE:
            raise ValueError(f"reference image {i} is {image.width}x{image.height} px; references must be at "
                             f"least {MIN_REFERENCE_SIDE} px on each side")


def uniform_reference_warning(image: Image.Image, name: str) -> str | None:
    """A warning naming ``name`` when ``image`` (alpha composited over white) is blank or nearly uniform (pixel
    standard deviation below `UNIFORM_STD`), else None. The model would see no subject in such a reference."""
    pixels = np.asarray(to_rgb(image), dtype=np.float32) / 255.0  # (H, W, 3) in [0, 1]
    std = float(pixels.std())
    if std >= UNIFORM_STD:
        return None
    mean = float(pixels.mean())
    looks = "white" if mean > 0.9 else "black" if mean < 0.1 else "one flat colour"
    return (f"{name} is blank or nearly uniform ({looks}: pixel std {std:.3f} < {UNIFORM_STD} on the 0..1 scale), "
            "so the video model sees no subject in it; check the file (ComfyUI's Load Image reads a 16-bit "
            "greyscale PNG as all white and fills a truncated file with black: save it as an 8-bit PNG or JPEG)")


def _check_frame_size(width: int, height: int) -> None:
    for name, value in (("width", width), ("height", height)):
        if value <= 0 or value % SIZE_MULTIPLE:
            raise ValueError(f"{name}: got {value}; the video {name} must be a positive multiple of {SIZE_MULTIPLE}")


def encode_references(vae: ReferenceEncoder, images: Sequence[Image.Image], width: int, height: int,
                      mode: FitMode = "letterbox") -> Tensor:
    """Prepare and VAE-encode each reference on its own -> normalized latents ``[1, 16, N, height/8, width/8]``.

    Each image becomes a 1-frame video ``[1, 3, 1, H, W]`` in [-1, 1] (on the VAE's device and dtype when the VAE
    is an ``nn.Module``); the N one-frame latents are concatenated on the time axis (upstream order).
    Raises ``ValueError`` for 0 or more than 4 images, an image under 16 px, or a size not a multiple of 16.
    """
    validate_references(images)
    _check_frame_size(width, height)
    device, dtype = _vae_placement(vae)
    latents = []
    for image in images:
        pixels = prepare_reference(image, width, height, mode)  # (3, H, W)
        video = pixels[None, :, None].to(device=device, dtype=dtype)  # (1, 3, 1, H, W)
        latents.append(vae.encode(video))  # (1, 16, 1, H/8, W/8)
    out = torch.cat(latents, dim=2)  # (1, 16, N, H/8, W/8)
    logger.debug("encoded %d reference(s) at %dx%d (%s) -> %s", len(images), width, height, mode, tuple(out.shape))
    return out


def _vae_placement(vae: ReferenceEncoder) -> tuple[torch.device, torch.dtype]:
    if isinstance(vae, nn.Module):
        param = next(vae.parameters(), None)
        if param is not None:
            return param.device, param.dtype
    return torch.device("cpu"), torch.float32
