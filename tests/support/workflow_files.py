"""Helpers of the workflow tests: read a shipped workflow, find its nodes, read the video a run saved."""

from __future__ import annotations

import json

import numpy as np

from phantom_core.video_io import probe_mp4, read_mp4_frames
from tests.support.comfy import history_error
from tools.comfy_launcher import ComfyServer
from tools.make_workflows import api_path, ui_path


def load(name: str) -> dict:
    """The UI workflow of stem `name`, or the API one for `<stem>_api`."""
    path = api_path(name.removesuffix("_api")) if name.endswith("_api") else ui_path(name)
    return json.loads(path.read_text(encoding="utf-8"))


def by_class(api: dict, class_type: str) -> list[str]:
    """The ids of an API workflow's nodes of `class_type`, in file order."""
    return [k for k, v in api.items() if v["class_type"] == class_type]


def saved_frames(server: ComfyServer, entry: dict) -> np.ndarray:
    """The frames ``(T, H, W, 3)`` uint8 of the MP4 a successful run saved (checked: 5 frames of 64 x 64)."""
    assert entry["status"]["status_str"] == "success", history_error(entry) + server.log()
    (result,) = [image for out in entry["outputs"].values() for image in out.get("images", [])
                 if image["filename"].endswith(".mp4")]  # Phantom Save Video's (Plot Loss Graph shows a PNG)
    path = server.output_dir / result["subfolder"] / result["filename"]
    meta = probe_mp4(path)
    assert (meta["frames"], meta["width"], meta["height"]) == (5, 64, 64), meta
    return read_mp4_frames(path)
