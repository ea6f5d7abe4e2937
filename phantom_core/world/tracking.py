"""Locate a subject in every frame of a video by template matching (normalised cross-correlation).

Two templates per subject (``subject_templates``):

- ``truth``: the subject as the prompt wants it: the ground-truth frame 0 cropped around its box with a ring of
  ``RING_FRACTION`` of its size, every pixel that is not the subject's (the background, another subject) painted
  with the *output's* border colour (``SubjectCut.over``): the prompt's scale, wherever the output puts the
  subject and whatever background it draws (a wrong background is the background metric's failure, not the
  tracker's);
- ``reference``: the subject as the reference shows it: the prepared reference (letterboxed on white, W x H)
  cropped the same way around the subject's box there: the reference's scale, pose, lighting and white surround.

``track`` matches both in every frame and keeps, per frame, the centre of whichever peaks higher. The peak values
are kept too: ``metrics.copy_paste`` compares them (does the output look like the reference or like the prompt?).

NCC here is the zero-normalised cross-correlation over all pixels and the three channels of the window (one mean
per window, so colour matters): ``sum(f' * t') / sqrt(sum(f'^2) * sum(t'^2))`` with ``f'``, ``t'`` the window and
the template minus their means (Lewis 1995, "Fast normalized cross-correlation": the numerator by FFT, the window
sums by integral images). Flat windows (no variance) score 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RING_FRACTION = 0.1
_FLAT = 1e-6  # window variance (per pixel and channel, in 0..255 units squared) below which a window is flat


@dataclass(frozen=True)
class Template:
    """A float64 ``[h, w, 3]`` template (0..255) and the subject centre's offset (x, y) from its top-left corner."""

    pixels: np.ndarray
    centre: tuple[float, float]


@dataclass(frozen=True)
class Track:
    """Per frame: the subject's centre (float64 ``[T, 2]``, x y px) and the peak NCC of each template ``[T]``."""

    centres: np.ndarray
    truth_peak: np.ndarray
    reference_peak: np.ndarray


@dataclass(frozen=True)
class SubjectCut:
    """A subject cut from a ground-truth frame: float64 ``[h, w, 3]`` pixels, the bool ``[h, w]`` mask of the
    pixels that belong to it (anything that differs from the background), the centre's offset (x, y)."""

    pixels: np.ndarray
    keep: np.ndarray
    centre: tuple[float, float]

    def over(self, colour: np.ndarray | tuple[float, float, float]) -> Template:
        """The subject over a flat ``colour`` (its surround and ring painted): a template."""
        fill = np.asarray(colour, dtype=np.float64)
        return Template(np.where(self.keep[..., None], self.pixels, fill), self.centre)


def crop_around(array: np.ndarray, box: np.ndarray, ring: int, fill: float | tuple) -> np.ndarray:
    """``array`` (``[H, W]`` or ``[H, W, C]``) around ``box`` (x0, y0, x1, y1) plus ``ring`` px on every side;
    what lies outside the array is ``fill``. Returns float64 (bool for a bool array)."""
    height, width = array.shape[:2]
    x0, y0, x1, y1 = (int(v) for v in box)
    dtype = bool if array.dtype == bool else np.float64
    out = np.empty((y1 - y0 + 2 * ring, x1 - x0 + 2 * ring) + array.shape[2:], dtype=dtype)
    out[:] = fill
    sx0, sy0, sx1, sy1 = max(0, x0 - ring), max(0, y0 - ring), min(width, x1 + ring), min(height, y1 + ring)
    out[sy0 - (y0 - ring):sy1 - (y0 - ring), sx0 - (x0 - ring):sx1 - (x0 - ring)] = array[sy0:sy1, sx0:sx1]
    return out


def crop_template(image: np.ndarray, box: np.ndarray, ring: int, fill: tuple[int, int, int]) -> Template:
    """A template: ``image`` (uint8 ``[H, W, 3]``) around ``box`` plus ``ring`` px, ``fill`` outside the image."""
    x0, y0, x1, y1 = (int(v) for v in box)
    return Template(crop_around(image, box, ring, fill), ((x1 - x0) / 2.0 + ring, (y1 - y0) / 2.0 + ring))


def cut_subject(frame: np.ndarray, box: np.ndarray, ring: int, keep: np.ndarray) -> SubjectCut:
    """The subject in ``box`` of ``frame`` (uint8 ``[H, W, 3]``): its pixels where ``keep`` (bool ``[H, W]``)."""
    x0, y0, x1, y1 = (int(v) for v in box)
    return SubjectCut(crop_around(frame, box, ring, 0.0), crop_around(keep, box, ring, False),
                      ((x1 - x0) / 2.0 + ring, (y1 - y0) / 2.0 + ring))


def ring_px(box: np.ndarray) -> int:
    """The ring around a box: RING_FRACTION of its longer side, at least 2 px."""
    return max(2, round(RING_FRACTION * max(int(box[2] - box[0]), int(box[3] - box[1]))))


class FrameSpectrum:
    """Frames padded with a colour, their Fourier transforms and integral images, shared by every template.

    ``frames``: ``[T, H, W, 3]`` (0..255); ``pad`` px of colour ``outside`` on every side; the transform size is the
    padded size rounded up to a fast FFT length (the extra rows and columns are never read by a valid window).
    """

    def __init__(self, frames: np.ndarray, pad: int, outside: tuple[int, int, int]) -> None:
        from scipy import fft

        t_count, height, width, _ = frames.shape
        self.pad, self.height, self.width = pad, height + 2 * pad, width + 2 * pad
        self.shape = (fft.next_fast_len(self.height, real=True), fft.next_fast_len(self.width, real=True))
        padded = np.empty((t_count, self.height, self.width, 3), dtype=np.float64)
        padded[:] = np.array(outside, dtype=np.float64)
        padded[:, pad:pad + height, pad:pad + width] = frames
        self.spectrum = fft.rfft2(padded, s=self.shape, axes=(1, 2))  # (T, H', W'/2+1, 3)
        self.sums = _integral(padded.sum(axis=3))  # (T, H+1, W+1)
        self.squares = _integral((padded**2).sum(axis=3))

    def ncc(self, template: np.ndarray) -> np.ndarray:
        """Zero-normalised cross-correlation of ``template`` ``[h, w, 3]`` at every valid window position.

        Returns float64 ``[T, H-h+1, W-w+1]`` (padded H, W) in [-1, 1]; (t, y, x) scores the window whose top-left
        is (x, y) in the padded frame. Raises ``ValueError`` when the template is larger than the padded frames.
        """
        from scipy import fft

        h, w, _ = template.shape
        if h > self.height or w > self.width:
            raise ValueError(f"template is {w}x{h} px but the padded frames are {self.width}x{self.height}")
        t0 = template - template.mean()  # zero mean over the window and the channels
        t_energy = float((t0**2).sum())
        out_shape = (len(self.spectrum), self.height - h + 1, self.width - w + 1)
        if t_energy <= _FLAT * t0.size:
            return np.zeros(out_shape)
        kernel = np.conj(fft.rfft2(t0, s=self.shape, axes=(0, 1)))  # (H', W'/2+1, 3)
        product = (self.spectrum * kernel[None]).sum(axis=3)  # channels summed: the transform is linear
        numerator = fft.irfft2(product, s=self.shape, axes=(1, 2))[:, :out_shape[1], :out_shape[2]]
        n = 3 * h * w
        sums, squares = _windows(self.sums, h, w), _windows(self.squares, h, w)
        variance = np.maximum(squares - sums**2 / n, 0.0)
        flat = variance <= _FLAT * n
        out = numerator / np.sqrt(np.where(flat, 1.0, variance) * t_energy)
        return np.where(flat, 0.0, np.clip(out, -1.0, 1.0))


def _integral(values: np.ndarray) -> np.ndarray:
    """Integral images of ``values`` ``[T, H, W]`` -> ``[T, H+1, W+1]`` (a zero row and column first)."""
    return np.pad(values.cumsum(axis=1).cumsum(axis=2), ((0, 0), (1, 0), (1, 0)))


def _windows(table: np.ndarray, h: int, w: int) -> np.ndarray:
    """Sums over every h x w window from an integral image ``[T, H+1, W+1]`` -> ``[T, H-h+1, W-w+1]``."""
    return table[:, h:, w:] - table[:, :-h, w:] - table[:, h:, :-w] + table[:, :-h, :-w]


def _peaks(spectrum: FrameSpectrum, template: Template) -> tuple[np.ndarray, np.ndarray]:
    """(centres ``[T, 2]`` of the best window per frame, in unpadded px; its NCC ``[T]``)."""
    maps = spectrum.ncc(template.pixels)  # (T, H', W')
    flat = maps.reshape(len(maps), -1)
    best = flat.argmax(axis=1)
    ys, xs = np.divmod(best, maps.shape[2])
    centres = np.stack([xs + template.centre[0], ys + template.centre[1]], axis=1) - spectrum.pad
    return centres.astype(np.float64), flat[np.arange(len(flat)), best]


def tracking_pad(templates: list[Template]) -> int:
    """Half the largest template's longer side: the padding ``track`` needs so that any template, even one larger
    than a frame (a reference filling 90% of it, plus its ring), can be centred anywhere in the frame."""
    return max(max(t.pixels.shape[:2]) for t in templates) // 2 + 1


def track(spectrum: FrameSpectrum, truth: Template, reference: Template | None = None) -> Track:
    """Track one subject through the frames of ``spectrum`` with its two templates (see the module docstring).

    Pad the frames (``FrameSpectrum``) with the output's border colour by ``tracking_pad`` of all templates,
    so a subject touching the frame's edge is still found where its ring lies outside the frame. Without a
    reference template only the truth template is used and ``reference_peak`` is all -1.
    """
    centres, truth_peak = _peaks(spectrum, truth)
    reference_peak = np.full(len(centres), -1.0)
    if reference is not None:
        ref_centres, reference_peak = _peaks(spectrum, reference)
        better = reference_peak > truth_peak
        centres = np.where(better[:, None], ref_centres, centres)
    return Track(centres, truth_peak, reference_peak)
