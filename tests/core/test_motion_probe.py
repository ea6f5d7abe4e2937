"""tools.motion_probe: its path and displacement arithmetic, and that it tells a DiT that reads the motion word from
one that does not (synthetic velocity models with a known clean estimate)."""

from __future__ import annotations

import pytest
import torch

from phantom_core.training.cache import LatentSample
from tools.motion_probe import displacement, latent_path, probe, reverse_motion, single_motion

FRAMES, SIDE = 5, 16


def blob_latents(motion: str, step: float = 1.5, level: float = 2.0) -> torch.Tensor:
    """``[16, F, h, w]``: a flat background of 0.3 with a 3 x 3 square of ``level`` whose corner moves ``step`` latent
    px a frame towards ``motion`` (rounded to whole px), from the centre."""
    x = torch.full((16, FRAMES, SIDE, SIDE), 0.3)
    dx, dy = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[motion]
    for f in range(FRAMES):
        cx, cy = 6 + round(dx * step * f), 6 + round(dy * step * f)
        x[:, f, cy:cy + 3, cx:cx + 3] = level
    return x


def test_latent_path_and_displacement_follow_a_moving_square():
    x = blob_latents("right", step=1.0)
    path = latent_path(x)
    assert path.shape == (FRAMES, 2)
    assert torch.allclose(path[:, 0], torch.tensor([7.0, 8, 9, 10, 11]), atol=1e-4)  # x centre of columns 6-8, ...
    assert torch.allclose(path[:, 1], torch.full((FRAMES,), 7.0), atol=1e-4)
    assert displacement(x, "right") == pytest.approx(4.0, abs=1e-4)
    assert displacement(x, "left") == pytest.approx(-4.0, abs=1e-4)
    assert displacement(blob_latents("up"), "up") == pytest.approx(6.0, abs=1e-4)


def test_captions():
    assert single_motion("a cat face moves left on a blue background") == "left"
    assert single_motion("a small red star stays still on a white background") is None
    assert single_motion("a cat moves left and a dog moves up on a red background") is None
    assert single_motion("fork and knife moves down on a black background") == "down"
    assert reverse_motion("a cat moves up on a blue background", "up") == "a cat moves down on a blue background"


class FakeDiT:
    """A velocity model whose clean estimate is a square moving the way its context's first value says
    (``reads_text``), or always the cached sample's true motion's square at rest (``reads_text=False``)."""

    def __init__(self, reads_text: bool):
        self.reads_text = reads_text

    def __call__(self, x, t, context, ref_latents):
        sigma = float(t[0]) / 1000.0
        motion = {1.0: "left", -1.0: "right"}[float(context[0, 0, 0])] if self.reads_text else "left"
        x0 = blob_latents(motion, step=1.5 if self.reads_text else 0.0)[None]
        return (x - x0) / sigma  # x_t - sigma v = x0


def test_probe_tells_a_text_reading_dit_from_one_that_ignores_the_word():
    contexts = {"left": torch.ones(4, 8), "right": -torch.ones(4, 8)}
    caption = "a cat moves left on a blue background"
    sample = LatentSample("s", blob_latents("left"), torch.zeros(16, 1, SIDE, SIDE), contexts["left"])
    encode = {reverse_motion(caption, "left"): contexts["right"]}.__getitem__
    reading = probe(FakeDiT(True), encode, [(caption, "left", sample)] * 3, sigmas=(0.9,))[0.9]
    assert reading["truth"] == pytest.approx(6.0, abs=1e-3)  # 4 frames x 1.5 px, rounded: 0, 2, 3, 4(.5->4), 6
    assert reading["own"] == pytest.approx(6.0, abs=1e-3) and reading["reversed"] == pytest.approx(-6.0, abs=1e-3)
    assert reading["effect"] == pytest.approx(6.0, abs=1e-3) and reading["share"] == 100.0
    ignoring = probe(FakeDiT(False), encode, [(caption, "left", sample)] * 3, sigmas=(0.9,))[0.9]
    assert ignoring["effect"] == pytest.approx(0.0, abs=1e-4) and ignoring["share"] == 0.0
