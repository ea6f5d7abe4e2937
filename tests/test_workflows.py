"""The shipped workflows: up to date with tools/make_workflows.py, UI files that the ComfyUI frontend can open
(every node type registered, sockets / outputs / widget values matching the server's schemas, consistent
links), and API files that say exactly what the UI files say."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from comfy_server import ComfyServer, comfy_server  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parents[1]
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_MODES = {"fixed", "increment", "decrement", "randomize"}
NAMES = ["phantom_1ref", "phantom_4ref"]


def load(name: str) -> dict:
    return json.loads((ROOT / "workflows" / f"{name}.json").read_text(encoding="utf-8"))


def schema_inputs(spec: dict) -> list[tuple[str, object, dict]]:
    """(name, type, options) of every input in the order the frontend lays them out."""
    out = []
    for section in ("required", "optional"):
        for name in spec["input_order"].get(section, []):
            entry = spec["input"][section][name]
            out.append((name, entry[0], entry[1] if len(entry) > 1 else {}))
    return out


def is_widget(input_type: object) -> bool:
    return isinstance(input_type, list) or input_type in WIDGET_TYPES


def split_widgets(spec: dict, values: list) -> dict[str, object]:
    """UI widgets_values -> {input name: value}, checking and dropping the UI-only extras (seed control, upload)."""
    values, out = list(values), {}
    for name, input_type, options in schema_inputs(spec):
        if not is_widget(input_type):
            continue
        assert values, f"widgets_values too short at {name}"
        out[name] = values.pop(0)
        if options.get("control_after_generate"):
            assert values.pop(0) in CONTROL_MODES, name
        if options.get("image_upload"):
            assert values.pop(0) == "image", name
    assert not values, f"widgets_values has {len(values)} values too many: {values}"
    return out


def check_value(node_type: str, name: str, input_type: object, options: dict, value: object) -> None:
    where = f"{node_type}.{name} = {value!r}"
    if input_type == "INT":
        assert isinstance(value, int) and not isinstance(value, bool), where
    elif input_type == "FLOAT":
        assert isinstance(value, (int, float)) and not isinstance(value, bool), where
    elif input_type == "STRING":
        assert isinstance(value, str), where
    elif input_type == "COMBO" or isinstance(input_type, list):
        choices = options.get("options", input_type if isinstance(input_type, list) else [])
        if not options.get("image_upload"):  # LoadImage lists whatever is in input/
            assert value in choices, f"{where} not in {choices}"
    if input_type in ("INT", "FLOAT"):
        assert options.get("min", value) <= value <= options.get("max", value), where


def test_shipped_workflows_are_generated_from_the_description() -> None:
    spec = importlib.util.spec_from_file_location("make_workflows", ROOT / "tools" / "make_workflows.py")
    tool = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = tool  # dataclasses look their module up there
    spec.loader.exec_module(tool)
    rendered = tool.render_all()
    assert sorted(rendered) == sorted(f"{n}{s}.json" for n in NAMES for s in ("", "_api"))
    stale = [f for f, text in rendered.items() if (ROOT / "workflows" / f).read_text(encoding="utf-8") != text]
    assert not stale, f"out of date (run python tools/make_workflows.py): {stale}"
    assert tool.main(["--check"]) == 0


@pytest.mark.parametrize("name", NAMES)
def test_ui_workflow_matches_server_schemas(comfy_server: ComfyServer, name: str) -> None:
    info, ui = comfy_server.object_info(), load(name)
    assert ui["version"] == 0.4 and ui["last_node_id"] == max(n["id"] for n in ui["nodes"])
    assert ui["last_link_id"] == max(link[0] for link in ui["links"])
    nodes = {n["id"]: n for n in ui["nodes"]}
    missing = {n["type"] for n in ui["nodes"]} - set(info)
    assert not missing, f"node types the frontend would report missing: {missing}"
    for node in ui["nodes"]:
        spec = info[node["type"]]
        sockets = [(n, t) for n, t, _ in schema_inputs(spec) if not is_widget(t)]
        assert [(i["name"], i["type"]) for i in node["inputs"]] == sockets, node["type"]
        assert [o["type"] for o in node["outputs"]] == spec["output"], node["type"]
        assert [o["name"] for o in node["outputs"]] == spec["output_name"], node["type"]
        widgets = split_widgets(spec, node["widgets_values"])
        for input_name, input_type, options in schema_inputs(spec):
            if input_name in widgets:
                check_value(node["type"], input_name, input_type, options, widgets[input_name])
    for link_id, src, src_slot, dst, dst_slot, link_type in ui["links"]:
        assert nodes[src]["outputs"][src_slot]["type"] == link_type == nodes[dst]["inputs"][dst_slot]["type"]
        assert nodes[dst]["inputs"][dst_slot]["link"] == link_id
        assert link_id in nodes[src]["outputs"][src_slot]["links"]
    for node in ui["nodes"]:  # every required socket is connected
        spec = info[node["type"]]
        for i in node["inputs"]:
            if i["name"] in spec["input"]["required"]:
                assert i["link"] is not None, f"{node['type']}.{i['name']} is not connected"


@pytest.mark.parametrize("name", NAMES)
def test_api_workflow_says_what_the_ui_workflow_says(comfy_server: ComfyServer, name: str) -> None:
    info, ui, api = comfy_server.object_info(), load(name), load(f"{name}_api")
    assert set(api) == {str(n["id"]) for n in ui["nodes"]}
    links = {link[0]: link for link in ui["links"]}
    for node in ui["nodes"]:
        entry = api[str(node["id"])]
        assert entry["class_type"] == node["type"]
        expected = split_widgets(info[node["type"]], node["widgets_values"])
        for i in node["inputs"]:
            if i["link"] is not None:
                _, src, src_slot, *_ = links[i["link"]]
                expected[i["name"]] = [str(src), src_slot]
        assert entry["inputs"] == expected, node["type"]
    refs = next(v for v in api.values() if v["class_type"] == "PhantomReferences")
    assert len([k for k in refs["inputs"] if k.startswith("image_")]) == int(name.split("_")[1][0])
    negative = next(v for v in api.values() if v["_meta"]["title"] == "Negative prompt")
    from phantom_core.sampler import WAN_NEGATIVE_PROMPT

    assert negative["inputs"]["text"] == WAN_NEGATIVE_PROMPT
