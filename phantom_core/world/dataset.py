"""The world as training data: an indexable dataset, and the same samples written to disk for the trainer.

``WorldDataset(split, seed, config, length)[i]`` is ``make_sample(split, seed, i, config)`` as tensors:

    WorldItem(video      float32 [3, T, H, W] in [-1, 1],
              references float32 [N, 3, H, W] in [-1, 1]   (prepared as the pipeline does: letterboxed on white),
              caption    str                              (the canonical prompt),
              truth      WorldTruth                       (boxes, centres, masks, background, motions))

On disk (``write_world_dataset``): a folder with ``manifest.jsonl`` (one JSON object per sample, paths relative to
the folder), ``clips/NNNNNN.mp4`` (H.264, ``quality`` 10: x264 crf 0, yuv420p) or ``clips/NNNNNN/FFF.png`` (one PNG
per frame, lossless), ``refs/NNNNNN_K.png`` (the reference images as given to a model: RGBA cut-outs for cross-pair,
RGB crops for in-pair) and ``truth/NNNNNN.npz`` (``masks`` bool [S, T, H, W], ``boxes`` int64 [S, T, 4]).
Manifest fields::

    name, video, references (list), caption        the training core's manifest fields (a clip, 1-4 references,
                                                   a caption: phantom_core/training/dataset.py)
    clip, refs                                     the same paths as video and references, under the issue's names
    split, seed, index, pair_mode                  where the sample comes from (make_sample(split, seed, index))
    width, height, frames, fps
    subjects, sources, motions, sizes              per subject, in reference order
    background, background_rgb
    boxes                                          per subject and frame [x0, y0, x1, y1] (px, exclusive ends)
    ref_boxes, ref_variants                        the subject's box in each prepared reference; how it differs
    truth                                          the .npz with the masks

The folder is built under a temporary name beside ``folder`` and renamed into place at the end, so a failure
leaves no half-written dataset.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from phantom_core.references import prepare_reference
from phantom_core.world.render import WorldTruth
from phantom_core.world.sample import WorldConfig, WorldSample, make_sample

CLIP_FORMATS = ("mp4", "frames")


class WorldItem(NamedTuple):
    video: Tensor
    references: Tensor
    caption: str
    truth: WorldTruth


def sample_tensors(sample: WorldSample) -> WorldItem:
    """A sample as tensors (see the module docstring)."""
    fmt = sample.config.video
    video = torch.from_numpy(sample.video).permute(3, 0, 1, 2).float().div(127.5).sub(1.0)  # (3, T, H, W)
    refs = torch.stack([prepare_reference(r, fmt.width, fmt.height, "letterbox") for r in sample.references])
    return WorldItem(video, refs, sample.prompt, sample.truth)  # refs: (N, 3, H, W)


class WorldDataset(torch.utils.data.Dataset):
    """Samples ``0 .. length-1`` of ``split`` for ``seed`` (deterministic, any order, any worker).

    Args:
        split: ``train`` (never a held-out subject) or ``test`` (held-out subjects only).
        seed: integer >= 0; sample i is ``make_sample(split, seed, i, config)``.
        config: video format, pair mode (``cross`` / ``in``), subjects per scene, subject sources.
        length: the number of samples ``len()`` reports (the world itself is unbounded).
    """

    def __init__(self, split: str = "train", seed: int = 0, config: WorldConfig = WorldConfig(),
                 length: int = 10_000) -> None:
        if not isinstance(length, int) or length < 1:
            raise ValueError(f"length: got {length!r}; expected an integer >= 1")
        self.split, self.seed, self.config, self.length = split, seed, config, length
        make_sample(split, seed, 0, config)  # fail now (bad split, no subjects), not in a worker

    def __len__(self) -> int:
        return self.length

    def sample(self, index: int) -> WorldSample:
        """Sample ``index`` with its PIL references and uint8 video (``IndexError`` outside 0..length-1)."""
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} outside 0..{self.length - 1}")
        return make_sample(self.split, self.seed, index, self.config)

    def __getitem__(self, index: int) -> WorldItem:
        return sample_tensors(self.sample(index))


def _record(sample: WorldSample, name: str, clip: str, refs: list[str]) -> dict:
    fmt, truth = sample.config.video, sample.truth
    return {
        "name": name, "video": clip, "references": refs,  # the training core's manifest fields
        "clip": clip, "refs": refs, "caption": sample.prompt,
        "split": sample.split, "seed": sample.seed, "index": sample.index, "pair_mode": sample.config.pair_mode,
        "width": fmt.width, "height": fmt.height, "frames": fmt.frames, "fps": fmt.fps,
        "subjects": list(truth.names), "sources": [s.source for s in sample.subjects],
        "motions": list(truth.motions), "sizes": list(truth.sizes),
        "background": truth.background, "background_rgb": list(truth.background_rgb),
        "boxes": truth.boxes.tolist(), "ref_boxes": sample.ref_boxes.tolist(),
        "ref_variants": list(sample.ref_variants), "truth": f"truth/{name}.npz",
    }


def _write_sample(root: Path, sample: WorldSample, clip_format: str) -> dict:
    from phantom_core.video_io import write_mp4

    name = f"{sample.index:06d}"
    if clip_format == "mp4":
        clip = f"clips/{name}.mp4"
        write_mp4(sample.video, root / clip, fps=sample.config.video.fps, quality=10)
    else:
        clip = f"clips/{name}"
        (root / clip).mkdir(parents=True)
        for t, frame in enumerate(sample.video):
            Image.fromarray(frame).save(root / clip / f"{t:03d}.png")
    refs = []
    for k, image in enumerate(sample.references):
        refs.append(f"refs/{name}_{k}.png")
        image.save(root / refs[-1])
    np.savez_compressed(root / "truth" / f"{name}.npz", masks=sample.truth.masks, boxes=sample.truth.boxes)
    return _record(sample, name, clip, refs)


def write_world_dataset(folder: str | os.PathLike, split: str, seed: int, count: int,
                        config: WorldConfig = WorldConfig(), clip_format: str = "mp4") -> Path:
    """Write samples ``0 .. count-1`` of ``split`` / ``seed`` as a folder dataset (module docstring); returns it.

    Raises:
        ValueError: ``folder`` exists and is not empty, a bad ``count`` or ``clip_format`` (before writing).
    """
    root = Path(folder)
    if clip_format not in CLIP_FORMATS:
        raise ValueError(f"clip_format: got {clip_format!r}; valid formats are {', '.join(CLIP_FORMATS)}")
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"count: got {count!r}; expected an integer >= 1")
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise ValueError(f"dataset folder {root} exists and is not empty; choose a new folder")
    root.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".tmp", dir=root.parent))
    try:
        for sub in ("clips", "refs", "truth"):
            (scratch / sub).mkdir()
        lines = [json.dumps(_write_sample(scratch, make_sample(split, seed, i, config), clip_format))
                 for i in range(count)]
        (scratch / "manifest.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        os.chmod(scratch, 0o777 & ~_umask())  # mkdtemp makes 0700; a dataset is an ordinary folder
        if root.exists():
            root.rmdir()
        os.replace(scratch, root)
    finally:
        if scratch.exists():
            shutil.rmtree(scratch)
    return root


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
