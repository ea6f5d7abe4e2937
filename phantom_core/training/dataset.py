"""Training data on disk: a dataset folder or a JSONL manifest -> samples of (clip, 1-4 references, caption).

Two layouts (the README's Training section has an example of each):

    my_dataset/                       one sub-folder per sample (sorted by name)
      walk_01/
        video.mp4                     the clip (any container ffmpeg reads), or frames/0000.png, 0001.png, ...
        ref_1.png  ref_2.jpg          1-4 reference images: files whose name starts with "ref", sorted
        caption.txt                   the prompt

    my_dataset/manifest.jsonl         (or any .jsonl) one JSON object per line, paths relative to its folder:
      {"name": "walk_01", "video": "clips/walk_01.mp4", "references": ["refs/dog_2.png"], "caption": "..."}

A clip gives its first ``frames`` (4k+1) frames, each scaled to cover ``width x height`` and centre-cropped
(``references.center_crop``); references are prepared exactly as for sampling (``references.encode_references``:
letterboxed on white by default). A sample that cannot be used (unreadable video, missing or unreadable
reference, a clip too short, no caption) is reported by name with the reason and skipped: a bad file never stops
a run hours in.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from phantom_core.log import logger
from phantom_core.references import MAX_REFERENCES, center_crop, open_reference, pil_to_tensor, validate_references

MANIFEST_NAME = "manifest.jsonl"
VIDEO_NAME = "video"  # <sample>/video.<ext>
FRAMES_FOLDER = "frames"  # <sample>/frames/*.png
CAPTION_FILE = "caption.txt"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
VIDEO_SUFFIXES = (".mp4", ".mov", ".webm", ".mkv", ".avi", ".gif")


@dataclass(frozen=True)
class SampleSpec:
    """Where one sample's files are: ``video`` (a video file or a folder of frames), ``references`` (1-4)."""

    name: str
    video: Path
    references: tuple[Path, ...]
    caption: str


@dataclass(frozen=True)
class BadSample:
    """A sample that was skipped, and why."""

    name: str
    reason: str


@dataclass(frozen=True)
class RawSample:
    """One training triplet in pixels, before encoding (what a procedural generator yields too).

    ``video``: ``[3, T, H, W]`` float32 in [-1, 1], T = 4k+1, the training size; ``references``: 1-4 PIL images
    (fitted to the frame by ``encode_references``); ``caption``: the prompt.
    """

    name: str
    video: Tensor
    references: tuple[Image.Image, ...]
    caption: str


def _images_in(folder: Path, prefix: str = "") -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and p.name.lower().startswith(prefix))


def _is_under(path: Path, root: Path) -> bool:
    return path.resolve().is_relative_to(root.resolve())


def _check_spec(spec: SampleSpec, root: Path | None) -> str | None:
    """The reason ``spec`` cannot be used (files missing, outside ``root``, count of references), or None."""
    if not spec.caption.strip():
        return "the caption is empty"
    if not 1 <= len(spec.references) <= MAX_REFERENCES:
        return f"it has {len(spec.references)} references; Phantom takes 1 to {MAX_REFERENCES}"
    for path in (spec.video, *spec.references):
        if root is not None and not _is_under(path, root):
            return f"{path} is outside the dataset folder {root}"
        if not path.exists():
            return f"{path} does not exist"
    return None


def _folder_sample(folder: Path) -> SampleSpec | BadSample:
    """One ``<sample>/`` folder of the folder layout."""
    videos = sorted(p for p in folder.iterdir() if p.stem == VIDEO_NAME and p.suffix.lower() in VIDEO_SUFFIXES)
    video = videos[0] if videos else folder / FRAMES_FOLDER
    if not videos and not video.is_dir():
        return BadSample(folder.name, f"no {VIDEO_NAME}.mp4 (or other video) and no {FRAMES_FOLDER}/ folder")
    caption_file = folder / CAPTION_FILE
    if not caption_file.is_file():
        return BadSample(folder.name, f"no {CAPTION_FILE}")
    caption = caption_file.read_text(encoding="utf-8").strip()
    return SampleSpec(folder.name, video, tuple(_images_in(folder, "ref")), caption)


def _manifest_sample(line: str, number: int, base: Path) -> SampleSpec | BadSample:
    """One line of a JSONL manifest (paths relative to ``base``)."""
    try:
        entry = json.loads(line)
        refs = entry["references"]
        refs = [refs] if isinstance(refs, str) else list(refs)
        video = base / entry["video"]
        return SampleSpec(str(entry.get("name") or Path(entry["video"]).stem), video,
                          tuple(base / r for r in refs), str(entry["caption"]))
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        return BadSample(f"line {number}", f"not a sample object with video, references and caption ({err!r})")


def read_dataset(path: str | os.PathLike, contained: bool = False) -> tuple[list[SampleSpec], list[BadSample]]:
    """List a dataset's samples without decoding anything; unusable entries come back as ``BadSample``s.

    Args:
        path: a dataset folder (with ``manifest.jsonl``, else one sub-folder per sample) or a ``.jsonl`` file.
        contained: refuse (as bad samples) files outside the dataset's folder (the ComfyUI node sets it).
    Returns:
        ``(usable sample specs, bad samples)``, each in dataset order; names are unique (a repeated name is bad).
    Raises:
        ValueError: ``path`` is neither a folder nor a ``.jsonl`` file.
    """
    path = Path(path)
    if path.is_dir() and (path / MANIFEST_NAME).is_file():
        path = path / MANIFEST_NAME
    if path.is_file() and path.suffix == ".jsonl":
        lines = path.read_text(encoding="utf-8").splitlines()
        root = path.parent
        found = [_manifest_sample(line, n, root) for n, line in enumerate(lines, start=1) if line.strip()]
    elif path.is_dir():
        root = path
        found = [_folder_sample(p) for p in sorted(path.iterdir()) if p.is_dir() and not p.name.startswith(".")]
    else:
        raise ValueError(f"dataset {path}: expected a folder of samples or a .jsonl manifest (see the README)")
    good, bad, names = [], [], set()
    for item in found:
        if isinstance(item, SampleSpec):
            if item.name in names:
                item = BadSample(item.name, "another sample has the same name")
            elif (reason := _check_spec(item, root if contained else None)) is not None:
                item = BadSample(item.name, reason)
            else:
                names.add(item.name)
        (good if isinstance(item, SampleSpec) else bad).append(item)
    return good, bad


def _clip_frames(video: Path, frames: int) -> list[Image.Image]:
    """The first ``frames`` frames of a video file or a folder of frame images (fewer when the clip is short)."""
    if video.is_dir():
        files = _images_in(video)[:frames]
        return [open_reference(f) for f in files]  # RGB, EXIF orientation, alpha over white
    from phantom_core.video_io import read_mp4_frames  # imageio-ffmpeg only where clips are decoded

    return [Image.fromarray(a) for a in read_mp4_frames(video, max_frames=frames)]


def load_clip(video: str | os.PathLike, frames: int, width: int, height: int) -> Tensor:
    """A clip's first ``frames`` frames, each scaled to cover ``width x height`` and centre-cropped.

    Returns:
        ``[3, frames, height, width]`` float32 in [-1, 1].
    Raises:
        ValueError: the clip has fewer than ``frames`` frames, or cannot be decoded (the message says which).
    """
    try:
        images = _clip_frames(Path(video), frames)
    except (OSError, RuntimeError, StopIteration) as err:
        raise ValueError(f"the video {video} cannot be read: {err or type(err).__name__}") from err
    if len(images) < frames:
        raise ValueError(f"the clip has {len(images)} frames; training needs {frames} (4k+1)")
    pixels = [pil_to_tensor(center_crop(img, width, height)) for img in images]  # frames x (3, H, W)
    return torch.stack(pixels, dim=1)  # (3, T, H, W)


def load_sample(spec: SampleSpec, frames: int, width: int, height: int) -> RawSample:
    """Decode one sample: its clip (``load_clip``) and its reference images (RGB, alpha over white).

    Raises:
        ValueError: naming what is wrong (short clip, unreadable video or reference, a reference under 16 px).
    """
    video = load_clip(spec.video, frames, width, height)
    images = []
    for path in spec.references:
        try:
            images.append(open_reference(path))
        except (OSError, ValueError) as err:
            raise ValueError(f"the reference {path} cannot be read as an image: {err}") from err
    validate_references(images)
    return RawSample(spec.name, video, tuple(images), spec.caption)


def report_bad(bad: list[BadSample]) -> None:
    """Log each skipped sample with its reason (WARNING), one line each."""
    for b in bad:
        logger.warning("skipping sample %s: %s", b.name, b.reason)
