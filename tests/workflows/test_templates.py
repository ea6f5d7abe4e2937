"""Where the shipped workflows sit and how they look: only UI workflows where ComfyUI's Templates browser looks
(listed by a real server, with their thumbnails), the API files beside them in api/, the example photos and the
example training dataset they name shipped in example_inputs/ (the dataset exactly what its generator writes), and
a layout that reads left to right without overlaps, in view. The MMDiT workflow has no thumbnail until its default is
trained and shipped (`make train-default-mmdit`): its thumbnail checks skip until then."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
import requests
from PIL import Image

from phantom_core.training.dataset import read_dataset
from phantom_core.video_io import read_mp4_frames
from tools.comfy_launcher import ComfyServer
from tools.make_example_dataset import COUNT, DATASET_DIR, size_bytes, write_example_dataset
from tools.make_workflows import (
    API_DIR,
    INPUTS_DIR,
    TEMPLATES_DIR,
    TRAIN_DATASET,
    WORKFLOWS,
    api_path,
    thumbnail_path,
    ui_path,
    workflow_weights_shipped,
)
from tools.workflow_layout import FRONTEND_CHROME, SCALE_RANGE, TITLE_H, layout_problems

MODULE = "ComfyUI-Phantom"  # the extension's folder in custom_nodes/ (tools/comfy_launcher.py)
MAX_BYTES = 100_000
MAX_DATASET_BYTES = 500_000  # the example dataset (about 70 KB) ships in the repository: keep it small


def ui(stem: str) -> dict:
    return json.loads(ui_path(stem).read_text(encoding="utf-8"))


def test_templates_folder_holds_only_ui_workflows_and_their_thumbnails() -> None:
    titles = sorted(spec.title for spec in WORKFLOWS.values())
    drawn = [spec.title for stem, spec in WORKFLOWS.items() if workflow_weights_shipped(stem)]
    files = sorted(p.name for p in TEMPLATES_DIR.iterdir())
    assert files == sorted([f"{t}.json" for t in titles] + [f"{t}.jpg" for t in drawn] + ["api"])
    assert sorted(p.name for p in API_DIR.iterdir()) == sorted(api_path(s).name for s in WORKFLOWS)
    for stem in WORKFLOWS:
        assert ui(stem)["version"] == 0.4  # a UI workflow; the API files have no version and no nodes list
        assert "nodes" not in json.loads(api_path(stem).read_text(encoding="utf-8"))


@pytest.mark.parametrize("stem", list(WORKFLOWS))
def test_thumbnail_is_a_small_square_jpeg(stem: str) -> None:
    if not workflow_weights_shipped(stem):
        pytest.skip(f"{stem}: its embedded default is not shipped yet (make train-default-mmdit, then make thumbnails)")
    path = thumbnail_path(stem)
    assert path.stat().st_size <= MAX_BYTES, f"{path.name}: {path.stat().st_size} bytes"
    with Image.open(path) as image:
        assert image.format == "JPEG" and image.mode == "RGB"
        assert image.width == image.height >= 256, image.size  # the browser's cards are square


def test_example_inputs_are_the_photos_the_workflows_name() -> None:
    named = {node["widgets_values"][0] for stem in WORKFLOWS for node in ui(stem)["nodes"]
             if node["type"] == "LoadImage"}
    shipped = {p.name for p in INPUTS_DIR.glob("*.jpg")}
    assert named == shipped
    readme = (INPUTS_DIR / "README.md").read_text(encoding="utf-8")
    for name in sorted(shipped):
        path = INPUTS_DIR / name
        assert path.stat().st_size <= MAX_BYTES, f"{name}: {path.stat().st_size} bytes"
        with Image.open(path) as image:
            assert image.format == "JPEG" and min(image.size) >= 256, (name, image.size)
        assert f"`{name}`" in readme, f"{name}: source and licence not given in example_inputs/README.md"


def files_under(folder: Path) -> list[Path]:
    return sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file())


def test_example_dataset_is_what_its_generator_writes(tmp_path: Path) -> None:
    named = {node["widgets_values"][0] for stem in WORKFLOWS for node in ui(stem)["nodes"]
             if node["type"] == "PhantomTrainLoRA"}
    assert named == {TRAIN_DATASET} and DATASET_DIR == INPUTS_DIR / TRAIN_DATASET
    fresh = write_example_dataset(tmp_path / TRAIN_DATASET)
    assert files_under(fresh) == files_under(DATASET_DIR)
    for rel in files_under(DATASET_DIR):
        if rel.suffix == ".mp4":  # lossless, but another ffmpeg build may write other bytes for the same frames
            assert np.array_equal(read_mp4_frames(fresh / rel), read_mp4_frames(DATASET_DIR / rel)), rel
        else:
            assert (fresh / rel).read_bytes() == (DATASET_DIR / rel).read_bytes(), rel
    assert size_bytes(DATASET_DIR) <= MAX_DATASET_BYTES, size_bytes(DATASET_DIR)
    # what Phantom Train LoRA reads: every sample usable, each a 128x128 17-frame clip with one reference
    good, bad = read_dataset(DATASET_DIR, contained=True)
    assert len(good) == COUNT and not bad, bad
    assert all(len(spec.references) == 1 and spec.caption.endswith("background") for spec in good)
    assert all(read_mp4_frames(spec.video).shape == (17, 128, 128, 3) for spec in good)  # the workflow's size
    assert f"`{TRAIN_DATASET}/`" in (INPUTS_DIR / "README.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("stem", list(WORKFLOWS))
def test_layout_reads_left_to_right_without_overlaps(stem: str) -> None:
    workflow = ui(stem)
    nodes = {n["id"]: (n["title"], (n["pos"], n["size"])) for n in workflow["nodes"]}
    links = [(src, dst) for _, src, _, dst, _, _ in workflow["links"]]
    assert layout_problems(nodes, links, margin=20.0) == []


@pytest.mark.parametrize("stem", list(WORKFLOWS))
def test_saved_view_puts_every_title_inside_the_canvas(stem: str) -> None:
    ds = ui(stem)["extra"]["ds"]
    scale, (ox, oy) = ds["scale"], ds["offset"]
    assert SCALE_RANGE[0] <= scale <= SCALE_RANGE[1]
    for node in ui(stem)["nodes"]:  # screen px = (canvas + offset) * scale (LiteGraph's DragAndScale)
        x, y = (node["pos"][0] + ox) * scale, (node["pos"][1] - TITLE_H + oy) * scale
        assert x >= FRONTEND_CHROME["left"] + 20 and y >= FRONTEND_CHROME["top"] + 20, (node["title"], x, y)


def test_server_lists_only_the_ui_workflows_as_templates(comfy_server: ComfyServer) -> None:
    listed = requests.get(f"{comfy_server.url}/workflow_templates", timeout=30).json()
    assert sorted(listed[MODULE]) == sorted(spec.title for spec in WORKFLOWS.values())
    base = f"{comfy_server.url}/api/workflow_templates/{MODULE}"
    for stem, spec in WORKFLOWS.items():  # what the frontend fetches when a card is shown and clicked
        workflow = requests.get(f"{base}/{quote(spec.title)}.json", timeout=30)
        assert workflow.ok and workflow.json()["version"] == 0.4
        if not workflow_weights_shipped(stem):  # no thumbnail until the MMDiT default is trained
            continue
        thumbnail = requests.get(f"{base}/{quote(spec.title)}.jpg", timeout=30)
        assert thumbnail.ok and thumbnail.headers["Content-Type"] == "image/jpeg"
