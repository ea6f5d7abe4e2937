"""MP4 export (H.264, yuv420p) through imageio-ffmpeg's bundled ffmpeg, written atomically; probing and reading back.

A failed write never leaves a half-written MP4: frames go to a temporary file in the destination folder, which
replaces the destination only after ffmpeg has finished successfully (`phantom_core.loading.disk.atomic_write`:
the MP4 gets the permissions a plain file write gives, 0o644 under umask 022).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import torch
from torch import Tensor

from phantom_core.loading.disk import atomic_write
from phantom_core.log import logger

Frames = np.ndarray | Tensor | Iterable[np.ndarray | Tensor]


def _frame_to_uint8(frame: np.ndarray | Tensor, index: int) -> np.ndarray:
    """One frame -> C-contiguous uint8 ``[H, W, 3]``; floats (tensor or array) are read as [0, 1] and clamped."""
    if isinstance(frame, Tensor):
        frame = frame.detach().cpu()
        frame = frame.float().numpy() if frame.is_floating_point() else frame.numpy()
    frame = np.asarray(frame)
    if frame.ndim != 3 or frame.shape[-1] != 3:
        raise ValueError(f"frames: frame {index} has shape {frame.shape}; expected [H, W, 3] (RGB, channels last)")
    if np.issubdtype(frame.dtype, np.floating):
        if not np.isfinite(frame).all():
            raise ValueError(f"frames: frame {index} contains NaN or infinite values")
        frame = np.round(np.clip(frame, 0.0, 1.0) * 255.0).astype(np.uint8)
    elif frame.dtype != np.uint8:
        raise ValueError(f"frames: frame {index} has dtype {frame.dtype}; expected uint8 (0..255) or float (0..1)")
    return np.ascontiguousarray(frame)


def _iter_frames(frames: Frames) -> Iterator[np.ndarray]:
    """Yield uint8 ``[H, W, 3]`` frames from a ``[T, H, W, 3]`` array/tensor or any iterable of frames."""
    if isinstance(frames, (np.ndarray, Tensor)) and frames.ndim != 4:
        raise ValueError(f"frames: got shape {tuple(frames.shape)}; expected [T, H, W, 3]")
    for i, frame in enumerate(frames):
        yield _frame_to_uint8(frame, i)


def _pad_even(frame: np.ndarray) -> np.ndarray:
    """yuv420p needs even sizes: replicate the last row / column when H or W is odd (content is never scaled)."""
    h, w = frame.shape[:2]
    if h % 2 == 0 and w % 2 == 0:
        return frame
    return np.ascontiguousarray(np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge"))


def _check_settings(fps: float, quality: float | None) -> None:
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps <= 0:
        raise ValueError(f"fps: got {fps!r}; expected a number > 0 (frames per second, e.g. 16)")
    if quality is not None and (isinstance(quality, bool) or not isinstance(quality, (int, float))
                                or not 0 <= quality <= 10):
        raise ValueError(f"quality: got {quality!r}; expected 0..10 (imageio scale, 10 best; 8 -> x264 crf 10)")


def write_mp4(frames: Frames, path: str | os.PathLike, fps: float = 16, quality: float | None = 8) -> Path:
    """Encode RGB frames to an H.264 (libx264, yuv420p) MP4 at ``path``, atomically.

    Args:
        frames: ``[T, H, W, 3]`` uint8 numpy array or float tensor/array in [0, 1], or an iterable of such
            ``[H, W, 3]`` frames (streamed; consumed once). Odd H/W are padded to even by edge replication.
        fps: frames per second, > 0 (Wan2.1 renders at 16).
        quality: 0..10 on imageio's scale (x264 crf = int((1 - quality / 10) * 51)); None leaves x264's default.
    Returns the path. Raises ``ValueError`` for bad frames / settings (no file is written) and re-raises any
    error of the frame source or ffmpeg after deleting the temporary file.
    """
    _check_settings(fps, quality)
    path = Path(path)
    with atomic_write(path, suffix=".part.mp4") as tmp:  # ffmpeg picks the container from the extension
        count, size = _encode(_iter_frames(frames), str(tmp), fps, quality)
    logger.info("wrote %s: %d frames %dx%d at %g fps", path, count, size[0], size[1], fps)
    return path


def _encode(frames: Iterator[np.ndarray], target: str, fps: float, quality: float | None) -> tuple[int, tuple]:
    """Stream frames into ffmpeg writing ``target``; returns (frame count, (width, height) as encoded)."""
    first = next(frames, None)
    if first is None:
        raise ValueError("frames: got no frames; a video needs at least one")
    first = _pad_even(first)
    size = (first.shape[1], first.shape[0])  # (W, H)
    writer = imageio_ffmpeg.write_frames(
        target, size, pix_fmt_in="rgb24", pix_fmt_out="yuv420p", fps=fps, quality=quality, codec="libx264",
        macro_block_size=1, ffmpeg_log_level="error", output_params=["-movflags", "+faststart"])
    writer.send(None)  # start ffmpeg
    count = 0
    try:
        for frame in _chain(first, frames):
            frame = _pad_even(frame)
            if (frame.shape[1], frame.shape[0]) != size:
                raise ValueError(f"frames: frame {count} is {frame.shape[1]}x{frame.shape[0]}, "
                                 f"the first frame is {size[0]}x{size[1]}; all frames must have one size")
            writer.send(frame)
            count += 1
    finally:
        writer.close()  # waits for ffmpeg; raises if ffmpeg failed
    return count, size


def _chain(first: np.ndarray, rest: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
    yield first
    yield from rest


def probe_mp4(path: str | os.PathLike) -> dict:
    """``{"frames": int, "width": int, "height": int, "fps": float}`` of a video (frames counted by decoding)."""
    reader = imageio_ffmpeg.read_frames(str(path))
    try:
        meta = next(reader)
    finally:
        reader.close()
    frames, _seconds = imageio_ffmpeg.count_frames_and_secs(str(path))
    width, height = meta["size"]
    return {"frames": int(frames), "width": int(width), "height": int(height), "fps": float(meta["fps"])}


def read_mp4_frames(path: str | os.PathLike) -> np.ndarray:
    """Decode a video -> uint8 ``[T, H, W, 3]`` RGB (for tests and the CLI; holds the whole video in memory)."""
    reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
    try:
        width, height = next(reader)["size"]
        frames = [np.frombuffer(buf, dtype=np.uint8).reshape(height, width, 3) for buf in reader]
    finally:
        reader.close()
    if not frames:
        return np.zeros((0, height, width, 3), dtype=np.uint8)
    return np.stack(frames)


def to_uint8_frames(video: Tensor) -> np.ndarray:
    """A decoded ``[3, T, H, W]`` (or ``[1, 3, T, H, W]``) video in [-1, 1] -> uint8 ``[T, H, W, 3]``."""
    if video.dim() == 5 and video.shape[0] == 1:
        video = video[0]
    if video.dim() != 4 or video.shape[0] != 3:
        raise ValueError(f"video: got shape {tuple(video.shape)}; expected [3, T, H, W] in [-1, 1]")
    pixels = (video.detach().float().cpu().clamp(-1, 1) + 1) * 127.5  # (3, T, H, W) in [0, 255]
    return pixels.round().to(torch.uint8).permute(1, 2, 3, 0).contiguous().numpy()  # (T, H, W, 3)
