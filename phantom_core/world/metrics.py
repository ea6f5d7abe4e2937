"""The metrics of one video against its world sample's ground truth (``score_video``). Definitions:

- **tracking**: each subject is located per frame by ``tracking.track`` (its truth and reference templates).
- **subject fidelity** (PSNR dB, SSIM): the output around the *tracked* centre against the ground truth around the
  true box (the box plus 3 px, the box's size), over the subject's pixels (the ground-truth mask), averaged over
  frames. Placement is free in the world (the prompt does not say where a subject starts), so fidelity is measured
  where the subject is, not where the ground truth put it. Identical pixels give ``PSNR_CAP`` (100 dB).
  skimage.metrics' ``structural_similarity`` (Wang et al. 2004, 7x7 windows) gives the SSIM map.
- **motion direction**: the displacement from the mean centre of the first ``k = max(1, T // 8)`` frames to that
  of the last ``k``; ``still`` when it is below ``STILL_FRACTION`` (0.1) of the frame on both axes (in units of
  width and height), else the axis with the larger relative displacement and its sign; ``absent`` when the output
  is flat where the subject was tracked (every channel's pixel std under ``FLAT_STD``, 2 of 255, in the fidelity
  region) in at least half of the frames: nothing drawn there, so no motion, ``still`` included, can be right.
  Correct when it equals the prompt's motion.
- **trajectory error** (% of the frame): the mean distance between the tracked and the true centres after removing
  their mean offset (start positions are free), x in units of width and y of height, times 100.
- **background**: the per-channel median of a border band (``BORDER_FRACTION`` of the shorter side, all frames),
  classified as the nearest background colour within ``BACKGROUND_TOLERANCE`` (RGB distance) or ``other``.
- **swap** (scenes of several subjects): some subject k performs another subject j's prompted motion instead of
  its own while j, drawn, does not perform it (the motion went to the wrong subject; a subject that merely stays
  still beside a still or an ``absent`` one is static, not swapped).
- **placement** (scenes of several subjects): each subject's tracked path lies where its own true path does:
  matching the tracked mean centres to the true ones (x in units of width, y of height) by the least total distance
  gives every subject its own (never when a subject is ``absent``). In the anchored layout the first subject named
  is the highest, so a subject drawn with another's look in its place fails it; with a swap, it says whether the
  looks (placement wrong) or the motions (placement right) went to the wrong place.
- **copy-paste**: a case copies its references' context rather than following the prompt when some subject's
  reference template matches the output better than its truth template (mean peak NCC over the frames) and at least
  ``COPY_MIN_NCC`` (its scale, pose, lighting or white surround around the subject), or when the output's background
  measures the references' white letterbox (``REFERENCE_SURROUND``) where the prompt asks for another colour
  (``surround_copied``; since 2026-12-07: an in-pair model painted every case white and the template rule, which
  needs a subject drawn, counted 1 of 72). **static**: a subject prompted to move measures ``still`` (or is
  ``absent``).
- **appearance stability**: SSIM between the tracked subject regions of consecutive frames (ground-truth mask of
  frame 0), averaged; 1 = unchanged.
- **subject presence** (first / last frames, % of the truth's): the share of a frame's pixels farther than
  ``PRESENCE_DISTANCE`` (RGB distance) from the video's own border colour (``foreground_share``: whatever stands out
  of the background), over the first and the last ``k`` frames (``k`` as for motion), as a percentage of the same
  share in the ground truth; ``nan`` when the truth's share there is below ``PRESENCE_MIN`` (a subject that hardly
  stands out of its background). 100 = as much subject as the truth; a subject that fades into the background
  falls from the first to the last frames; noise over the whole frame is far above 100.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import permutations

import numpy as np

from phantom_core.references import WHITE, prepare_reference
from phantom_core.world.grammar import BACKGROUND_COLOURS
from phantom_core.world.sample import WorldSample
from phantom_core.world.tracking import (
    FrameSpectrum,
    SubjectCut,
    Template,
    Track,
    crop_template,
    cut_subject,
    ring_px,
    track,
    tracking_pad,
)

PSNR_CAP = 100.0
STILL_FRACTION = 0.1
ABSENT = "absent"  # the measured motion of a subject where the output draws nothing (module docstring)
FLAT_STD = 2.0  # pixel std (0..255) under which a region is flat
BORDER_FRACTION = 0.08
BACKGROUND_TOLERANCE = 60.0
COPY_MIN_NCC = 0.6
REFERENCE_SURROUND = next(name for name, rgb in BACKGROUND_COLOURS.items()
                          if rgb == WHITE)  # the background named as the references' letterbox fill (references.WHITE)
FIDELITY_PAD = 3
PRESENCE_DISTANCE = 48.0
PRESENCE_MIN = 0.005


@dataclass(frozen=True)
class SubjectScore:
    """One subject's measurements in one video (see the module docstring)."""

    prompted: str
    measured: str
    psnr: float
    ssim: float
    trajectory_error: float
    stability: float
    copy_paste: bool
    swapped: bool = False

    @property
    def static(self) -> bool:
        return self.prompted != "still" and self.measured in ("still", ABSENT)


@dataclass(frozen=True)
class CaseScore:
    """One video's measurements: per subject, plus the background classification."""

    subjects: tuple[SubjectScore, ...]
    background: str
    measured_background: str
    presence_start: float = float("nan")
    presence_end: float = float("nan")
    placed: bool | None = None  # several subjects: each where its own path is (``placement_kept``); None for one

    @property
    def background_correct(self) -> bool:
        return self.background == self.measured_background

    @property
    def swapped(self) -> bool:
        return any(s.swapped for s in self.subjects)

    @property
    def surround_copied(self) -> bool:
        """The output's background is the references' white surround where the prompt asks for another colour."""
        return self.measured_background == REFERENCE_SURROUND != self.background

    @property
    def copy_paste(self) -> bool:
        return self.surround_copied or any(s.copy_paste for s in self.subjects)


def prepared_references(sample: WorldSample) -> list[np.ndarray]:
    """Each reference as the pipeline sees it (letterboxed on white at the video size): uint8 ``[H, W, 3]``."""
    fmt = sample.config.video
    out = []
    for image in sample.references:
        pixels = prepare_reference(image, fmt.width, fmt.height, "letterbox")  # (3, H, W) in [-1, 1]
        out.append(((pixels.permute(1, 2, 0).numpy() + 1.0) * 127.5).round().clip(0, 255).astype(np.uint8))
    return out


def subject_templates(sample: WorldSample) -> list[tuple[SubjectCut, Template]]:
    """Per subject: its cut from the ground truth (the truth template over any colour) and its reference template
    (``tracking`` module docstring)."""
    truth, out = sample.truth, []
    references = prepared_references(sample)
    frame = sample.video[0]
    differs = np.any(frame != np.array(truth.background_rgb, dtype=np.uint8), axis=2)  # (H, W)
    for k in range(len(truth.names)):
        box = truth.boxes[k, 0]
        keep = differs & ~np.any(np.delete(truth.masks[:, 0], k, axis=0), axis=0)  # its pixels, not another's
        ref_box = sample.ref_boxes[k]
        out.append((cut_subject(frame, box, ring_px(box), keep),
                    crop_template(references[k], ref_box, ring_px(ref_box), WHITE)))
    return out


def classify_motion(centres: np.ndarray, width: int, height: int) -> str:
    """``left|right|up|down|still`` from centres ``[T, 2]`` (module docstring)."""
    k = max(1, len(centres) // 8)
    dx, dy = (centres[-k:].mean(axis=0) - centres[:k].mean(axis=0)) / np.array([width, height])
    if max(abs(dx), abs(dy)) < STILL_FRACTION:
        return "still"
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def border_colour(video: np.ndarray) -> np.ndarray:
    """float64 ``[3]``: the per-channel median of the border band of ``video`` (uint8 ``[T, H, W, 3]``)."""
    band = max(2, round(BORDER_FRACTION * min(video.shape[1:3])))
    border = np.concatenate([video[:, :band].reshape(-1, 3), video[:, -band:].reshape(-1, 3),
                             video[:, band:-band, :band].reshape(-1, 3), video[:, band:-band, -band:].reshape(-1, 3)])
    return np.median(border.astype(np.float64), axis=0)


def classify_background(video: np.ndarray) -> str:
    """The named background colour of the border band of ``video`` (uint8 ``[T, H, W, 3]``), or ``other``."""
    return _named_background(border_colour(video))


def foreground_share(video: np.ndarray) -> np.ndarray:
    """float64 ``[T]``: per frame, the share of pixels of ``video`` (uint8 ``[T, H, W, 3]``) farther than
    ``PRESENCE_DISTANCE`` (RGB distance) from its border colour (``border_colour``)."""
    distance = np.linalg.norm(video.astype(np.float64) - border_colour(video), axis=3)  # (T, H, W)
    return (distance > PRESENCE_DISTANCE).mean(axis=(1, 2))


def presence(output: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """(first, last) subject presence of ``output`` against ``truth`` (uint8 ``[T, H, W, 3]`` each), % of the
    truth's foreground share over the first and the last ``max(1, T // 8)`` frames (module docstring)."""
    k = max(1, len(truth) // 8)
    mine, theirs = foreground_share(output), foreground_share(truth)
    ends = []
    for part in (slice(0, k), slice(len(truth) - k, len(truth))):
        base = float(theirs[part].mean())
        ends.append(100.0 * float(mine[part].mean()) / base if base >= PRESENCE_MIN else float("nan"))
    return ends[0], ends[1]


def _named_background(median: np.ndarray) -> str:
    names = list(BACKGROUND_COLOURS)
    distances = [np.linalg.norm(median - np.array(BACKGROUND_COLOURS[n], dtype=np.float64)) for n in names]
    best = int(np.argmin(distances))
    return names[best] if distances[best] <= BACKGROUND_TOLERANCE else "other"


def _region(centre: np.ndarray, size: tuple[int, int], shape: tuple[int, int]) -> tuple[int, int]:
    """Top-left (x, y) of a ``size`` (w, h) region centred at ``centre``, shifted to lie inside ``shape`` (H, W)."""
    x = int(round(centre[0] - size[0] / 2.0))
    y = int(round(centre[1] - size[1] / 2.0))
    return int(np.clip(x, 0, shape[1] - size[0])), int(np.clip(y, 0, shape[0] - size[1]))


def masked_psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """PSNR (dB, peak 255) of ``a`` vs ``b`` (``[h, w, 3]``) over ``mask`` ``[h, w]``; ``PSNR_CAP`` if identical."""
    error = ((a.astype(np.float64) - b.astype(np.float64)) ** 2)[mask].mean()
    return PSNR_CAP if error <= 255.0**2 * 10 ** (-PSNR_CAP / 10) else float(10 * np.log10(255.0**2 / error))


def masked_ssim(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """Mean of skimage's SSIM map of ``a`` vs ``b`` (``[h, w, 3]``, data range 255) over ``mask`` ``[h, w]``."""
    from skimage.metrics import structural_similarity

    side = min(a.shape[:2])
    win = min(7, side if side % 2 else side - 1)
    if win < 3:
        return float("nan")
    _, full = structural_similarity(a.astype(np.float64), b.astype(np.float64), win_size=win, channel_axis=2,
                                    data_range=255.0, full=True)
    return float(full.mean(axis=2)[mask].mean())


def _fidelity(output: np.ndarray, sample: WorldSample, k: int,
              centres: np.ndarray) -> tuple[float, float, float, float]:
    """(PSNR, SSIM, stability, drawn) of subject ``k`` at its tracked ``centres`` (module docstring); ``drawn``: the
    share of frames whose region there is not flat (some channel's pixel std at least ``FLAT_STD``)."""
    truth, video = sample.truth, sample.video
    shape = video.shape[1:3]
    psnrs, ssims, crops = [], [], []
    for t in range(len(video)):
        x0, y0, x1, y1 = (int(v) for v in truth.boxes[k, t])
        gx0, gy0 = max(0, x0 - FIDELITY_PAD), max(0, y0 - FIDELITY_PAD)
        gx1, gy1 = min(shape[1], x1 + FIDELITY_PAD), min(shape[0], y1 + FIDELITY_PAD)
        size = (gx1 - gx0, gy1 - gy0)
        mask = truth.masks[k, t, gy0:gy1, gx0:gx1]
        ox, oy = _region(centres[t] + np.array([(gx0 + gx1) / 2 - (x0 + x1) / 2, (gy0 + gy1) / 2 - (y0 + y1) / 2]),
                         size, shape)
        crop = output[t, oy:oy + size[1], ox:ox + size[0]]
        psnrs.append(masked_psnr(crop, video[t, gy0:gy1, gx0:gx1], mask))
        ssims.append(masked_ssim(crop, video[t, gy0:gy1, gx0:gx1], mask))
        crops.append((crop, mask))
    drawn = float(np.mean([crop.reshape(-1, 3).std(axis=0).max() >= FLAT_STD for crop, _ in crops]))
    first_mask = crops[0][1]
    stability = [masked_ssim(crops[t][0], crops[t + 1][0], first_mask) for t in range(len(crops) - 1)
                 if crops[t][0].shape == crops[t + 1][0].shape == first_mask.shape + (3,)]
    return (float(np.mean(psnrs)), float(np.nanmean(ssims)), float(np.mean(stability)) if stability else float("nan"),
            drawn)


def is_swapped(prompted: tuple[str, ...] | list[str], measured: list[str], k: int) -> bool:
    """Subject ``k`` performs the prompted motion of another subject ``j`` instead of its own, and ``j``, drawn,
    does not perform it (the motion went from ``j`` to ``k``; a ``j`` that is ``ABSENT`` lost its subject, not its
    motion)."""
    if measured[k] == prompted[k]:
        return False
    return any(measured[k] == prompted[j] and measured[j] not in (prompted[j], ABSENT)
               for j in range(len(prompted)) if j != k)


def placement_kept(tracked: list[np.ndarray], truth_centres: np.ndarray, width: int, height: int) -> bool | None:
    """Several subjects: True when assigning the tracked paths to the true ones by least total distance between
    mean centres (x / ``width``, y / ``height``) gives every subject its own (ties count for it); None for one.

    ``tracked``: per subject, float ``[T, 2]`` (x, y) px; ``truth_centres``: float ``[S, T, 2]`` px.
    """
    if len(tracked) < 2:
        return None
    scale = np.array([width, height], dtype=np.float64)
    ours = [np.asarray(c, dtype=np.float64).mean(axis=0) / scale for c in tracked]
    theirs = [c.mean(axis=0) / scale for c in np.asarray(truth_centres, dtype=np.float64)]
    cost = np.array([[np.linalg.norm(o - t) for t in theirs] for o in ours])  # (S, S)
    own = float(np.trace(cost))
    return all(own <= sum(cost[k, j] for k, j in enumerate(perm)) + 1e-12 for perm in permutations(range(len(ours))))


def _copy_paste(track_: Track) -> bool:
    reference, truth = float(track_.reference_peak.mean()), float(track_.truth_peak.mean())
    return reference > truth and reference >= COPY_MIN_NCC


def score_video(output: np.ndarray, sample: WorldSample,
                templates: list[tuple[SubjectCut, Template]] | None = None) -> CaseScore:
    """Every metric of ``output`` (uint8 ``[T, H, W, 3]``, the sample's format) against ``sample``'s ground truth.

    ``templates``: ``subject_templates(sample)`` when already made (they depend on the sample only).

    Raises:
        ValueError: ``output`` does not have the sample's shape.
    """
    if output.shape != sample.video.shape or output.dtype != np.uint8:
        raise ValueError(f"output video: got {output.dtype} {tuple(output.shape)}; expected uint8 "
                         f"{tuple(sample.video.shape)} (T, H, W, 3) like the sample")
    fmt, truth = sample.config.video, sample.truth
    templates = subject_templates(sample) if templates is None else templates
    surround = border_colour(output)
    pairs = [(cut.over(surround), ref_t) for cut, ref_t in templates]
    spectrum = FrameSpectrum(output, tracking_pad([t for pair in pairs for t in pair]), surround)
    rows, tracked = [], []
    for k, (truth_t, ref_t) in enumerate(pairs):
        track_ = track(spectrum, truth_t, ref_t)
        tracked.append(track_.centres)
        error = (track_.centres - truth.centres[k]) / np.array([fmt.width, fmt.height])  # (T, 2)
        error = 100.0 * float(np.linalg.norm(error - error.mean(axis=0), axis=1).mean())
        psnr, ssim, stability, drawn = _fidelity(output, sample, k, track_.centres)
        motion = classify_motion(track_.centres, fmt.width, fmt.height) if drawn > 0.5 else ABSENT
        rows.append((motion, psnr, ssim, error, stability, _copy_paste(track_)))
    measured = [row[0] for row in rows]
    subjects = [SubjectScore(truth.motions[k], motion, psnr, ssim, error, stability, copied,
                             is_swapped(truth.motions, measured, k))
                for k, (motion, psnr, ssim, error, stability, copied) in enumerate(rows)]
    placed = placement_kept(tracked, truth.centres, fmt.width, fmt.height)
    if placed and ABSENT in measured:  # a subject found nowhere is in no place, its own or another's
        placed = False
    return CaseScore(tuple(subjects), truth.background, _named_background(surround), *presence(output, sample.video),
                     placed=placed)
