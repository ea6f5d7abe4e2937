"""``generate --block-swap N``: the video equals the one without (block swap changes where weights rest, not what is
computed; compared to 1 grey level of the 8-bit frames), the run says it swapped, and a bad N is named."""

from __future__ import annotations

import numpy as np
import pytest

from phantom_core.__main__ import main
from phantom_core.video_io import read_mp4_frames
from tests.support.files import make_tiny_files, model_args

SMALL = ["--width", "32", "--height", "32", "--frames", "5", "--steps", "2", "--seed", "3", "--no-progress"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_tiny_files(tmp_path_factory.mktemp("block_swap_cli"), seed=0, sizes=[(40, 56), (64, 30)])


def test_generate_with_block_swap_equals_without(files, capsys):
    videos = []
    for swap in ("0", "2"):
        out = files["root"] / f"swap{swap}.mp4"
        assert main(["generate", *model_args(files), "--prompt", "a thing", *SMALL, "--block-swap", swap,
                     "--out", str(out)]) == 0, capsys.readouterr().err
        videos.append(read_mp4_frames(out).astype(np.int16))
        err = capsys.readouterr().err
        assert ("2 DiT blocks swapped" in err) == (swap == "2"), err
    assert np.abs(videos[0] - videos[1]).max() <= 1


@pytest.mark.parametrize("bad", ["-1", "3"])
def test_bad_block_swap_is_named(files, capsys, bad):
    out = files["root"] / "bad.mp4"
    assert main(["generate", *model_args(files), "--prompt", "x", *SMALL, "--block-swap", bad, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"block_swap is {bad}" in err and "from 0 (off) to 2" in err, err
