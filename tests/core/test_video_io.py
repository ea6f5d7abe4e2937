"""MP4 export: round trip through ffmpeg, atomic writes, input validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from phantom_core.video_io import probe_mp4, read_mp4_frames, to_uint8_frames, write_mp4


def gradient(t: int = 9, h: int = 48, w: int = 64) -> np.ndarray:
    """Smooth moving colour gradient, uint8 [T, H, W, 3]."""
    y, x = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    frames = []
    for i in range(t):
        shift = i / max(t - 1, 1)
        red = 0.5 + 0.4 * np.sin(2 * np.pi * (x + shift))  # travels right, no hard edge
        frames.append(np.stack([red, y * 0.8 + 0.1, np.full_like(x, 0.5)], -1))
    return np.round(np.stack(frames) * 255).astype(np.uint8)


def test_round_trip_uint8(tmp_path):
    frames = gradient()
    path = write_mp4(frames, tmp_path / "clip.mp4", fps=16, quality=8)
    assert path.exists() and path.stat().st_size > 0
    assert probe_mp4(path) == {"frames": 9, "width": 64, "height": 48, "fps": 16.0}
    back = read_mp4_frames(path)
    assert back.shape == frames.shape and back.dtype == np.uint8
    err = np.abs(back.astype(np.int16) - frames.astype(np.int16))
    # yuv420p halves chroma resolution: ~2 levels mean error even at crf 0 on this gradient
    assert err.mean() < 3.0 and np.percentile(err, 99) <= 10, (err.mean(), err.max())
    assert list(tmp_path.iterdir()) == [path]  # no temporary left behind


def test_round_trip_float_tensor_fractional_fps_and_odd_size(tmp_path):
    frames = torch.from_numpy(gradient(t=5, h=33, w=47)).float() / 255.0
    path = write_mp4(frames, tmp_path / "odd.mp4", fps=12.5, quality=10)
    info = probe_mp4(path)
    assert (info["frames"], info["width"], info["height"]) == (5, 48, 34)  # padded to even by edge replication
    assert info["fps"] == pytest.approx(12.5)
    back = read_mp4_frames(path)
    assert np.abs(back[:, :33, :47].astype(float) - frames.numpy() * 255).mean() < 3.0
    assert np.abs(back[:, 33].astype(float) - back[:, 32].astype(float)).mean() < 3.0  # replicated edge row


def test_colours_keep_their_channels(tmp_path):
    flat = np.empty((3, 32, 32, 3), np.uint8)
    flat[...] = (200, 30, 90)
    back = read_mp4_frames(write_mp4(flat, tmp_path / "flat.mp4"))
    np.testing.assert_allclose(back.reshape(-1, 3).mean(0), (200, 30, 90), atol=3)


def test_overwrite_is_atomic_and_failing_source_leaves_nothing(tmp_path):
    target = tmp_path / "out.mp4"

    def failing_frames():
        yield from gradient(t=3)
        raise RuntimeError("decoder exploded")

    with pytest.raises(RuntimeError, match="decoder exploded"):
        write_mp4(failing_frames(), target)
    assert list(tmp_path.iterdir()) == []

    write_mp4(gradient(t=3), target)
    before = target.read_bytes()
    with pytest.raises(RuntimeError, match="decoder exploded"):
        write_mp4(failing_frames(), target)
    assert target.read_bytes() == before and list(tmp_path.iterdir()) == [target]
    write_mp4(iter(list(gradient(t=4))), target)  # an iterable of frames streams too
    assert probe_mp4(target)["frames"] == 4


@pytest.mark.parametrize(
    ("frames", "kwargs", "match"),
    [
        (np.zeros((4, 16, 16), np.uint8), {}, r"shape \(4, 16, 16\).*\[T, H, W, 3\]"),
        (np.zeros((4, 16, 16, 4), np.uint8), {}, r"frame 0 has shape \(16, 16, 4\)"),
        (np.zeros((0, 16, 16, 3), np.uint8), {}, "no frames"),
        (np.zeros((2, 16, 16, 3), np.int32), {}, "dtype int32"),
        (np.full((2, 16, 16, 3), np.nan, np.float32), {}, "NaN"),
        ([np.zeros((16, 16, 3), np.uint8), np.zeros((18, 16, 3), np.uint8)], {}, "frame 1 is 16x18"),
        (gradient(t=2), {"fps": 0}, "fps: got 0"),
        (gradient(t=2), {"fps": float("nan")}, "fps: got nan"),
        (gradient(t=2), {"quality": 11}, "quality: got 11.*0..10"),
    ],
)
def test_bad_inputs_raise_and_write_nothing(tmp_path, frames, kwargs, match):
    with pytest.raises(ValueError, match=match):
        write_mp4(frames, tmp_path / "bad.mp4", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_to_uint8_frames_layout():
    video = torch.linspace(-1, 1, 3 * 2 * 4 * 5).reshape(1, 3, 2, 4, 5)
    frames = to_uint8_frames(video)
    assert frames.shape == (2, 4, 5, 3) and frames.dtype == np.uint8
    assert frames[0, 0, 0, 0] == 0 and frames[-1, -1, -1, -1] == 255
    assert frames[1, 2, 3, 1] == round((video[0, 1, 1, 2, 3].item() + 1) * 127.5)
    with pytest.raises(ValueError, match=r"\[3, T, H, W\]"):
        to_uint8_frames(torch.zeros(4, 2, 4, 5))
