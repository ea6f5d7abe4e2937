"""Reference preparation: upstream letterbox geometry, crop mode, transparency, validation, per-image VAE encoding."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from phantom_core.references import (
    encode_references,
    open_reference,
    prepare_reference,
    tensor_to_pil,
    to_rgb,
    validate_references,
)

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def solid(w: int, h: int, color=RED, mode: str = "RGB") -> Image.Image:
    return Image.new(mode, (w, h), color)


def is_white(x: torch.Tensor) -> bool:
    return bool((x == 1.0).all())


def is_color(x: torch.Tensor, rgb) -> bool:
    want = torch.tensor(rgb, dtype=torch.float32).div(255).sub(0.5).div(0.5).view(3, 1, 1)
    return bool(torch.allclose(x, want.expand_as(x), atol=1e-6))


class StubVAE:
    """Records what it is asked to encode; 'encodes' by 8x average pooling and tiling to 16 channels."""

    def __init__(self):
        self.calls: list[torch.Tensor] = []

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        self.calls.append(video.clone())
        b, c, t, h, w = video.shape
        pooled = torch.nn.functional.avg_pool3d(video, (1, 8, 8))  # (B, 3, T, h, w)
        return torch.cat([pooled] * 5 + [pooled[:, :1]], dim=1)  # (B, 16, T, h, w)


# ---------------------------------------------------------------------------------------------- geometry


def test_letterbox_portrait_centres_with_white_side_bars():
    # 90x200 into 64x48: full height 48, width int(48 * 0.45) = 21, padding 43 split 21 | 22
    x = prepare_reference(solid(90, 200), 64, 48)
    assert x.shape == (3, 48, 64) and x.dtype == torch.float32
    assert is_white(x[:, :, :21]) and is_white(x[:, :, 42:])
    assert is_color(x[:, :, 21:42], RED)


def test_letterbox_landscape_centres_with_white_top_bottom_bars():
    # 210x71 into 64x48: full width 64, height int(64 / (210/71)) = 21, padding 27 split 13 | 14
    x = prepare_reference(solid(210, 71, BLUE), 64, 48)
    assert x.shape == (3, 48, 64)
    assert is_white(x[:, :13]) and is_white(x[:, 34:])
    assert is_color(x[:, 13:34], BLUE)


def test_same_aspect_fills_the_frame_and_range_is_minus_one_to_one():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8))
    x = prepare_reference(img, 64, 48)
    assert x.min() >= -1 and x.max() <= 1 and x.min() < -0.9 and x.max() > 0.9
    same = prepare_reference(img, 128, 96)  # no resize at all: exact pixels
    torch.testing.assert_close(same, torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 127.5 - 1)


def test_crop_mode_covers_and_centre_crops():
    # red | green | blue thirds of a 2:1 image; a square crop keeps the middle (green) half, no bars
    arr = np.zeros((100, 200, 3), dtype=np.uint8)
    arr[:, :50], arr[:, 50:150], arr[:, 150:] = RED, GREEN, BLUE
    x = prepare_reference(Image.fromarray(arr), 48, 48, mode="crop")
    assert x.shape == (3, 48, 48)
    assert is_color(x[:, :, 4:44], GREEN)
    assert not is_white(x[:, :, :2]) and x[0].max() < -0.5  # no red and no white bars anywhere
    letterboxed = prepare_reference(Image.fromarray(arr), 48, 48)
    assert is_white(letterboxed[:, :12]) and is_color(letterboxed[:, 12:36, :8], RED)


def test_transparency_is_composited_over_white():
    arr = np.zeros((32, 32, 4), dtype=np.uint8)
    arr[:, :16] = (0, 0, 255, 255)  # opaque blue
    arr[:, 16:24] = (0, 0, 0, 0)  # fully transparent black -> white
    arr[:, 24:] = (0, 0, 255, 128)  # half-transparent blue
    x = prepare_reference(Image.fromarray(arr, "RGBA"), 32, 32)
    assert is_color(x[:, :, :16], BLUE) and is_white(x[:, :, 16:24])
    assert is_color(x[:, :, 24:], (127, 127, 255))
    palette = Image.new("P", (16, 16), 0)
    palette.putpalette([0, 0, 0] * 256)
    palette.info["transparency"] = 0
    assert is_white(prepare_reference(palette, 16, 16))
    grey16 = Image.fromarray(np.full((16, 16), 65535, dtype=np.uint16))
    assert np.asarray(to_rgb(grey16)).min() == 255  # rescaled, not clipped to garbage


def test_tensor_to_pil_and_open_reference(tmp_path):
    rgba = torch.rand(20, 30, 4)
    img = tensor_to_pil(rgba)
    assert img.mode == "RGBA" and img.size == (30, 20)
    np.testing.assert_allclose(np.asarray(img) / 255.0, rgba.numpy(), atol=0.5 / 255 + 1e-6)
    assert tensor_to_pil(torch.rand(1, 20, 30, 3)).mode == "RGB"
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        tensor_to_pil(torch.rand(20, 30, 2))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    solid(40, 20).save(tmp_path / "rotated.jpg", exif=exif)
    opened = open_reference(tmp_path / "rotated.jpg")
    assert opened.size == (20, 40) and opened.mode == "RGB"


# ---------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize("count", [0, 5])
def test_reference_count_errors(count):
    with pytest.raises(ValueError, match=rf"got {count} images.*1 to 4"):
        validate_references([solid(64, 64)] * count)


def test_small_reference_and_bad_sizes_are_named():
    with pytest.raises(ValueError, match=r"reference image 2 is 10x40 px.*at least 16"):
        validate_references([solid(64, 64), solid(10, 40)])
    validate_references([solid(16, 16)] * 4)
    with pytest.raises(ValueError, match="width: got 830.*multiple of 16"):
        encode_references(StubVAE(), [solid(64, 64)], 830, 480)
    with pytest.raises(ValueError, match="height: got 0"):
        encode_references(StubVAE(), [solid(64, 64)], 832, 0)
    with pytest.raises(ValueError, match="'letterbox' and 'crop'"):
        prepare_reference(solid(64, 64), 32, 32, mode="stretch")


# ---------------------------------------------------------------------------------------------- encoding


def test_each_reference_is_encoded_on_its_own_in_order():
    vae = StubVAE()
    images = [solid(90, 200, RED), solid(210, 71, BLUE), solid(64, 64, GREEN)]
    out = encode_references(vae, images, 64, 48)
    assert out.shape == (1, 16, 3, 6, 8)
    assert len(vae.calls) == 3
    for i, (call, image) in enumerate(zip(vae.calls, images)):
        assert call.shape == (1, 3, 1, 48, 64) and call.dtype == torch.float32
        torch.testing.assert_close(call[0, :, 0], prepare_reference(image, 64, 48))
        torch.testing.assert_close(out[:, :, i : i + 1], StubVAE().encode(call))


def test_real_photo_at_832x480(examples_dir):
    cases = json.loads((examples_dir / "cases.json").read_text())["cases"]
    refs = [open_reference(examples_dir / name) for name in cases[0]["refs"]]
    vae = StubVAE()
    out = encode_references(vae, refs, 832, 480)
    assert out.shape == (1, 16, len(refs), 60, 104)
    # ref12.jpg is 384x832 (portrait): height 480, width int(480 * 384 / 832) = 221, bars 305 | 306
    photo = open_reference(examples_dir / "ref12.jpg")
    assert photo.size == (384, 832)
    x = prepare_reference(photo, 832, 480)
    assert x.shape == (3, 480, 832)
    assert is_white(x[:, :, :305]) and is_white(x[:, :, 526:])
    expected = np.asarray(photo.resize((221, 480), Image.Resampling.LANCZOS), dtype=np.float32) / 127.5 - 1
    torch.testing.assert_close(x[:, :, 305:526], torch.from_numpy(expected).permute(2, 0, 1))
    crop = prepare_reference(photo, 832, 480, mode="crop")
    assert crop.shape == (3, 480, 832) and crop.std() > 0.1 and not is_white(crop[:, :, :8])
