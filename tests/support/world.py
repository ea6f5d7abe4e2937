"""The miniature world at test size, and ways to make deliberately wrong videos of a sample."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from phantom_core.world.grammar import Scene
from phantom_core.world.render import VideoFormat, layout, render_video
from phantom_core.world.sample import WorldConfig, WorldSample, make_sample

# 64 px, 9 frames, the subject sources that need no font: what CI has
SMALL = WorldConfig(video=VideoFormat(width=64, height=64, frames=9), sources=("photo", "shape"))


def small_sample(index: int, count: int | None = None, split: str = "test", seed: int = 3) -> WorldSample:
    return make_sample(split, seed, index, SMALL, count=count)


def rerender(sample: WorldSample, scene: Scene, seed: int = 0, cutouts: list | None = None) -> np.ndarray:
    """A video of ``scene`` with the sample's subjects, or ``cutouts`` (one per clause of ``scene``), in a fresh
    layout: uint8 ``[T, H, W, 3]``."""
    cutouts = [s.image() for s in sample.subjects] if cutouts is None else cutouts
    for attempt in range(20):
        boxes = layout(scene, cutouts, sample.config.video, np.random.default_rng([seed, attempt]))
        if boxes is not None:
            return render_video(scene, cutouts, boxes, sample.config.video)[0]
    raise AssertionError(f"no layout for {scene.prompt}")


def swapped_motions(sample: WorldSample) -> Scene:
    """The sample's scene with the motions of its first two subjects exchanged."""
    subjects = list(sample.scene.subjects)
    a, b = subjects[0], subjects[1]
    subjects[0], subjects[1] = replace(a, motion=b.motion), replace(b, motion=a.motion)
    return replace(sample.scene, subjects=tuple(subjects))
