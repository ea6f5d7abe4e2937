"""What the nodes tell the user, through a real headless ComfyUI: PhantomReferences says when an input holds several
frames (an animated GIF through Load Image) and when a reference is blank (an all-white image, as Load Image makes of
a 16-bit greyscale PNG); Phantom Decode reports progress per latent frame of each tile; Save Video's MP4 gets the
permissions a plain file write gives; the rephrase node's text inputs carry defaults and hints."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from phantom_core.inference.settings import SETTING_RANGES
from tests.support.comfy import Watched, history_error, watch
from tests.support.prompts import pipeline_prompt
from tools.comfy_launcher import ComfyServer


@pytest.fixture(scope="module")
def run(comfy_server: ComfyServer, tmp_path_factory) -> tuple[Watched, dict]:
    """One tiny run: image_1 a 2-frame animated GIF, image_2 all white; 64 x 64 px, 5 frames (2 latent frames),
    decoded in 32 px tiles; the sampler's shift at its widget minimum. (what the websocket said, history entry)"""
    folder = tmp_path_factory.mktemp("feedback")
    rng = np.random.default_rng(5)
    frames = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(2)]
    frames[0].save(folder / "moving.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    Image.new("RGB", (64, 64), (255, 255, 255)).save(folder / "white.png")
    images = [comfy_server.upload_image(folder / "moving.gif"), comfy_server.upload_image(folder / "white.png")]
    prompt = pipeline_prompt(images, size=64, frames=5, prefix="feedback", seed=11,
                             sampler={"shift": SETTING_RANGES["shift"].low},
                             decode={"tile_size": 32, "tile_overlap": 8})
    seen = watch(comfy_server, prompt)
    prompt_id = next(m["data"]["prompt_id"] for m in seen.messages if m["type"] == "execution_start")
    entry = comfy_server.wait(prompt_id)
    assert entry["status"]["status_str"] == "success", history_error(entry) + comfy_server.log()
    return seen, entry


def test_references_say_when_an_input_has_frames_or_is_blank(run, comfy_server: ComfyServer) -> None:
    seen, entry = run
    [(node, text)] = [t for t in seen.texts if t[0] == "refs"]
    lines = text.splitlines()
    assert lines[0] == "image_1 holds 2 frames: each becomes a reference"
    assert lines[1].startswith("image_2 is blank or nearly uniform (white: pixel std 0.000") and len(lines) == 2
    assert "16-bit greyscale PNG" in lines[1]
    assert entry["outputs"]["refs"]["text"] == [text]  # also in the history, for API clients
    assert "PhantomReferences: image_2 is blank or nearly uniform" in comfy_server.log(200000)  # the phantom logger


def test_decode_reports_progress_per_latent_frame_of_each_tile(run) -> None:
    seen, _ = run
    progress = seen.progress("decode")
    total = progress[-1][1]
    assert total > 2 and total % 2 == 0, progress  # several tiles x 2 latent frames
    assert progress == [(k, total) for k in range(1, total + 1)], progress


def test_saved_video_has_the_mode_of_a_plain_file_write(run, comfy_server: ComfyServer) -> None:
    _, entry = run
    [video] = entry["outputs"]["save"]["images"]
    path = comfy_server.output_dir / video["subfolder"] / video["filename"]
    umask = os.umask(0)
    os.umask(umask)  # the server inherited this process's umask
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask, oct(path.stat().st_mode)
    assert not [p.name for p in path.parent.iterdir() if p.name.startswith(".")]  # no temporary left


def test_rephrase_text_inputs_have_defaults_and_hints(comfy_server: ComfyServer) -> None:
    spec = comfy_server.object_info()["PhantomRephrase"]["input"]["required"]
    assert spec["prompt"][1]["default"] == ""  # the node library showed "prompt: undefined"
    hints = {"endpoint_url": "http://127.0.0.1:11434/v1", "endpoint_model": "qwen2.5vl:7b",
             "api_key_env": "OPENAI_API_KEY"}
    for name, example in hints.items():  # the frontend does not draw the placeholder: the tooltip carries it
        assert spec[name][1]["placeholder"] == example and example in spec[name][1]["tooltip"], name


def test_a_reference_batch_of_white_frames_names_each_frame(comfy_server: ComfyServer, tmp_path: Path) -> None:
    """Labels inside a batch name the frame; a uniform grey (not white or black) is called one flat colour."""
    Image.new("RGB", (48, 48), (120, 120, 120)).save(tmp_path / "grey.png")
    name = comfy_server.upload_image(tmp_path / "grey.png")
    prompt = pipeline_prompt([name], prefix="feedback_grey")
    prompt["pair"] = {"class_type": "ImageBatch", "inputs": {"image1": ["img1", 0], "image2": ["img1", 0]}}
    prompt["refs"]["inputs"]["image_1"] = ["pair", 0]
    entry = comfy_server.run(prompt)
    assert entry["status"]["status_str"] == "success", history_error(entry)
    [text] = entry["outputs"]["refs"]["text"]
    assert text.splitlines()[0] == "image_1 holds 2 frames: each becomes a reference"
    assert [line.split(" is ")[0] for line in text.splitlines()[1:]] == ["image_1 frame 1", "image_1 frame 2"]
    assert "(one flat colour: pixel std" in text
