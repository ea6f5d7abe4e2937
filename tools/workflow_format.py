"""The two JSON formats of a shipped workflow, written from one node list (tools/make_workflows.py describes them).

UI: LiteGraph's (version 0.4), what the frontend opens, with `widgets_values` in schema order; a linked widget keeps
its value there and gets an input entry carrying `"widget": {"name": ...}` and the link, as the frontend writes it.
API: `{"id": {"class_type", "inputs", "_meta": {"title"}}}`, what `/prompt` takes (the batch tool and scripts).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from tools.workflow_layout import saved_view


@dataclass
class Node:
    """One node of the description: enough to write both formats.

    sockets: every non-widget input in schema order (name, type); links: input name -> (node id, slot).
    widgets: widget inputs in schema order with their values (the API format's constants).
    widget_links: widget name -> (node id, slot) for a widget fed by a link instead: the API format gives the
        link, the UI format adds an input entry with `"widget": {"name"}` and keeps the value in widgets_values.
    widget_types: the type of such an input entry when it is not the link's (a combo widget's is COMBO).
    ui_after: extra UI-only widget values that follow a widget (seed's control mode, LoadImage's upload).
    """

    id: int
    type: str
    title: str
    outputs: list[tuple[str, str]]
    sockets: list[tuple[str, str]] = field(default_factory=list)
    links: dict[str, tuple[int, int]] = field(default_factory=dict)
    widgets: dict[str, Any] = field(default_factory=dict)
    widget_links: dict[str, tuple[int, int]] = field(default_factory=dict)
    widget_types: dict[str, str] = field(default_factory=dict)
    ui_after: dict[str, list[Any]] = field(default_factory=dict)
    pos: tuple[float, float] = (0.0, 0.0)
    size: tuple[float, float] = (320.0, 120.0)


def execution_order(nodes: list[Node]) -> list[Node]:
    """`nodes` sorted so that every node follows the nodes it takes inputs from (stable otherwise)."""
    by_id, done, ordered = {n.id: n for n in nodes}, set(), []

    def visit(node: Node) -> None:
        if node.id in done:
            return
        done.add(node.id)
        for src, _ in [*node.links.values(), *node.widget_links.values()]:
            visit(by_id[src])
        ordered.append(node)

    for node in nodes:
        visit(node)
    return ordered


def to_api(nodes: list[Node]) -> dict[str, dict]:
    """API format: {"id": {"class_type", "inputs": {name: constant | [source id, slot]}, "_meta": {"title"}}}."""
    api = {}
    for node in nodes:
        inputs: dict[str, Any] = {name: [str(src), slot] for name, (src, slot) in node.links.items()}
        for name, value in node.widgets.items():
            src, slot = node.widget_links.get(name, (None, None))
            inputs[name] = value if src is None else [str(src), slot]
        api[str(node.id)] = {"class_type": node.type, "inputs": inputs, "_meta": {"title": node.title}}
    return api


def to_ui(nodes: list[Node], name: str) -> dict[str, Any]:
    """LiteGraph UI format (version 0.4) with numbered links and widgets_values in schema order."""
    links: list[list[Any]] = []
    out_links: dict[tuple[int, int], list[int]] = {}
    by_id = {n.id: n for n in nodes}
    ui_nodes = []
    def link(src: int, src_slot: int, dst: int, dst_slot: int) -> int:
        links.append([len(links) + 1, src, src_slot, dst, dst_slot, by_id[src].outputs[src_slot][1]])
        out_links.setdefault((src, src_slot), []).append(len(links))
        return len(links)

    for order, node in enumerate(nodes):
        inputs = []
        for slot, (input_name, input_type) in enumerate(node.sockets):
            link_id = link(*node.links[input_name], node.id, slot) if input_name in node.links else None
            inputs.append({"name": input_name, "type": input_type, "link": link_id})
        for widget, (src, src_slot) in node.widget_links.items():  # after the sockets, as the frontend adds them
            kind = node.widget_types.get(widget, by_id[src].outputs[src_slot][1])
            inputs.append({"name": widget, "type": kind, "widget": {"name": widget},
                           "link": link(src, src_slot, node.id, len(inputs))})
        widgets_values = []
        for widget, value in node.widgets.items():
            widgets_values += [value, *node.ui_after.get(widget, [])]
        ui_nodes.append({
            "id": node.id, "type": node.type, "pos": list(node.pos), "size": list(node.size), "flags": {},
            "order": order, "mode": 0, "inputs": inputs, "outputs": [], "title": node.title,
            "properties": {"Node name for S&R": node.type}, "widgets_values": widgets_values,
        })
    for ui_node, node in zip(ui_nodes, nodes):
        ui_node["outputs"] = [{"name": out_name, "type": out_type, "slot_index": slot,
                               "links": out_links.get((node.id, slot), [])}
                              for slot, (out_name, out_type) in enumerate(node.outputs)]
    return {
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"comfyui-phantom/{name}")), "revision": 0,
        "last_node_id": max(n.id for n in nodes), "last_link_id": len(links),
        "nodes": ui_nodes, "links": links, "groups": [], "config": {},
        "extra": {"ds": saved_view([(n.pos, n.size) for n in nodes])}, "version": 0.4,
    }
