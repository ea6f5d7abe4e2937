"""Where the shipped workflows sit and how they look: only UI workflows where ComfyUI's Templates browser looks
(listed by a real server, with their thumbnails), the API files beside them in api/, the example photos they
name shipped in example_inputs/, and a layout that reads left to right without overlaps, in view."""

from __future__ import annotations

import json
from urllib.parse import quote

import pytest
import requests
from PIL import Image

from tools.comfy_launcher import ComfyServer
from tools.make_workflows import API_DIR, INPUTS_DIR, TEMPLATES_DIR, WORKFLOWS, api_path, thumbnail_path, ui_path
from tools.workflow_layout import FRONTEND_CHROME, SCALE_RANGE, TITLE_H, layout_problems

MODULE = "ComfyUI-Phantom"  # the extension's folder in custom_nodes/ (tools/comfy_launcher.py)
MAX_BYTES = 100_000


def ui(stem: str) -> dict:
    return json.loads(ui_path(stem).read_text(encoding="utf-8"))


def test_templates_folder_holds_only_ui_workflows_and_their_thumbnails() -> None:
    titles = sorted(spec.title for spec in WORKFLOWS.values())
    files = sorted(p.name for p in TEMPLATES_DIR.iterdir())
    assert files == sorted([f"{t}.json" for t in titles] + [f"{t}.jpg" for t in titles] + ["api"])
    assert sorted(p.name for p in API_DIR.iterdir()) == sorted(api_path(s).name for s in WORKFLOWS)
    for stem in WORKFLOWS:
        assert ui(stem)["version"] == 0.4  # a UI workflow; the API files have no version and no nodes list
        assert "nodes" not in json.loads(api_path(stem).read_text(encoding="utf-8"))


@pytest.mark.parametrize("stem", list(WORKFLOWS))
def test_thumbnail_is_a_small_square_jpeg(stem: str) -> None:
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
    for spec in WORKFLOWS.values():  # what the frontend fetches when a card is shown and clicked
        workflow = requests.get(f"{base}/{quote(spec.title)}.json", timeout=30)
        assert workflow.ok and workflow.json()["version"] == 0.4
        thumbnail = requests.get(f"{base}/{quote(spec.title)}.jpg", timeout=30)
        assert thumbnail.ok and thumbnail.headers["Content-Type"] == "image/jpeg"
