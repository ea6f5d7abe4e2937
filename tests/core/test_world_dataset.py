"""The world as the trainer's data: an indexable dataset of tensors and the folder / JSONL format on disk."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from phantom_core.references import prepare_reference
from phantom_core.video_io import read_mp4_frames
from phantom_core.world.dataset import WorldDataset, write_world_dataset
from phantom_core.world.grammar import parse_prompt
from phantom_core.world.sample import WorldConfig
from tests.support.world import SMALL


def test_items_are_tensors_in_the_pipeline_conventions():
    data = WorldDataset("train", seed=1, config=SMALL, length=5)
    video, refs, caption, truth = data[3]
    fmt = SMALL.video
    assert video.shape == (3, fmt.frames, fmt.height, fmt.width) and video.dtype == torch.float32
    assert refs.shape == (len(truth.names), 3, fmt.height, fmt.width)
    assert video.min() >= -1.0 and video.max() <= 1.0
    sample = data.sample(3)
    torch.testing.assert_close(refs[0], prepare_reference(sample.references[0], fmt.width, fmt.height), rtol=0,
                               atol=0)
    torch.testing.assert_close(video, torch.from_numpy(sample.video).permute(3, 0, 1, 2).float() / 127.5 - 1,
                               rtol=0, atol=1e-6)
    assert parse_prompt(caption) == sample.scene and len(data) == 5
    torch.testing.assert_close(data[3].video, video, rtol=0, atol=0)  # deterministic
    with pytest.raises(IndexError):
        data[5]
    with pytest.raises(ValueError, match="split"):
        WorldDataset("val", config=SMALL)


def test_dataset_folder_holds_clips_refs_captions_and_truth(tmp_path):
    root = write_world_dataset(tmp_path / "world", "train", 2, 3, SMALL, clip_format="frames")
    lines = [json.loads(line) for line in (root / "manifest.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and sorted(p.name for p in tmp_path.iterdir()) == ["world"]
    data = WorldDataset("train", seed=2, config=SMALL, length=3)
    for record in lines:
        sample = data.sample(record["index"])
        assert record["caption"] == sample.prompt and record["subjects"] == list(sample.truth.names)
        assert (record["video"], record["references"]) == (record["clip"], record["refs"])
        frames = np.stack([np.asarray(Image.open(p)) for p in sorted((root / record["clip"]).iterdir())])
        np.testing.assert_array_equal(frames, sample.video)  # PNG frames are lossless
        refs = [Image.open(root / p) for p in record["refs"]]
        np.testing.assert_array_equal(np.asarray(refs[0]), np.asarray(sample.references[0]))
        truth = np.load(root / record["truth"])
        np.testing.assert_array_equal(truth["masks"], sample.truth.masks)
        assert record["boxes"] == sample.truth.boxes.tolist() and record["pair_mode"] == "cross"
        assert root.stat().st_mode & 0o777 != 0o700


def test_mp4_clips_decode_close_to_the_video(tmp_path):
    config = WorldConfig(video=SMALL.video, sources=SMALL.sources, pair_mode="in")
    root = write_world_dataset(tmp_path / "w", "train", 0, 1, config)
    record = json.loads((root / "manifest.jsonl").read_text())
    frames = read_mp4_frames(root / record["clip"])
    sample = WorldDataset("train", 0, config, 1).sample(0)
    assert frames.shape == sample.video.shape and record["ref_variants"] == ["in-pair"] * len(record["refs"])
    error = np.abs(frames.astype(float) - sample.video).mean()
    assert error < 6.0  # x264 at crf 0 in yuv420p: chroma subsampling only


def test_writing_refuses_a_non_empty_folder_and_leaves_nothing_on_failure(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        write_world_dataset(tmp_path / "taken", "train", 0, 1, SMALL)
    with pytest.raises(ValueError, match="split"):
        write_world_dataset(tmp_path / "bad", "nope", 0, 1, SMALL)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
