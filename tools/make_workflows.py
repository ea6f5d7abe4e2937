"""Generate the shipped workflows (UI and API format) from one description, so the two always agree.

    python tools/make_workflows.py            # (re)write workflows/phantom_{1,4}ref{,_api}.json
    python tools/make_workflows.py --check    # exit 1 if a shipped file differs from what would be written

Each workflow: LoadImage x N -> PhantomReferences -> PhantomEncodeReferences; the three Phantom loaders (tiny
default file names), two PhantomTextEncode (prompt, Wan's negative prompt), PhantomSampler, PhantomDecode,
PhantomSaveVideo. The UI format is LiteGraph's (version 0.4) with `widgets_values` in schema order.
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS_DIR = ROOT / "workflows"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from phantom_core.sampler import WAN_NEGATIVE_PROMPT  # noqa: E402

DEFAULT_FILES = {
    "dit": "phantom_tiny_dit.safetensors",
    "vae": "phantom_tiny_vae.safetensors",
    "text_encoder": "phantom_tiny_umt5.safetensors",
}
PROMPTS = {  # our English renderings of the published example prompts (../shared/data/phantom_examples)
    1: "Warm sunlight spills over the grass. A little girl with twin pigtails, a green bow and a light green "
       "dress crouches beside blooming daisies, smiling and raising a toy camera.",
    4: "Slow-motion shot of a woman with long golden hair in a brown swimsuit with polka-dot mesh long sleeves, "
       "holding a layered cocktail garnished with an orange slice and a strawberry with a green straw, "
       "sunbathing on a beach with palm trees and a lounge chair, smiling in the sun as waves brush the sand.",
}
REFERENCE_IMAGES = {1: ["ref1.jpg"], 4: ["ref8.jpg", "ref9.jpg", "ref10.jpg", "ref11.jpg"]}


@dataclass
class Node:
    """One node of the description: enough to write both formats.

    sockets: every non-widget input in schema order (name, type); links: input name -> (node id, slot).
    widgets: widget inputs in schema order with their values (the API format's constants).
    ui_after: extra UI-only widget values that follow a widget (seed's control mode, LoadImage's upload).
    """

    id: int
    type: str
    title: str
    outputs: list[tuple[str, str]]
    sockets: list[tuple[str, str]] = field(default_factory=list)
    links: dict[str, tuple[int, int]] = field(default_factory=dict)
    widgets: dict[str, Any] = field(default_factory=dict)
    ui_after: dict[str, list[Any]] = field(default_factory=dict)
    pos: tuple[float, float] = (0.0, 0.0)
    size: tuple[float, float] = (320.0, 120.0)


def describe(num_refs: int) -> list[Node]:
    """The workflow for `num_refs` (1..4) references, nodes in execution order."""
    if not 1 <= num_refs <= 4:
        raise ValueError(f"num_refs is {num_refs}; a workflow holds 1 to 4 references")
    width, height = 832, 480
    col = [0.0, 380.0, 760.0, 1140.0, 1520.0]
    nodes = [
        Node(1, "PhantomDiTLoader", "Phantom DiT Loader", [("model", "PHANTOM_DIT")],
             widgets={"dit_name": DEFAULT_FILES["dit"], "weight_dtype": "default"}, pos=(col[0], 0)),
        Node(2, "PhantomVAELoader", "Phantom VAE Loader", [("vae", "PHANTOM_VAE")],
             widgets={"vae_name": DEFAULT_FILES["vae"]}, pos=(col[0], 150)),
        Node(3, "PhantomTextEncoderLoader", "Phantom Text Encoder Loader", [("text_encoder", "PHANTOM_TEXT_ENCODER")],
             widgets={"text_encoder_name": DEFAULT_FILES["text_encoder"], "tokenizer": "embedded"}, pos=(col[0], 270)),
        Node(4, "PhantomTextEncode", "Prompt", [("conditioning", "CONDITIONING")],
             sockets=[("text_encoder", "PHANTOM_TEXT_ENCODER")], links={"text_encoder": (3, 0)},
             widgets={"text": PROMPTS[num_refs]}, pos=(col[1], 0), size=(340, 180)),
        Node(5, "PhantomTextEncode", "Negative prompt", [("conditioning", "CONDITIONING")],
             sockets=[("text_encoder", "PHANTOM_TEXT_ENCODER")], links={"text_encoder": (3, 0)},
             widgets={"text": WAN_NEGATIVE_PROMPT}, pos=(col[1], 220), size=(340, 180)),
    ]
    images = [Node(10 + k, "LoadImage", f"Reference {k + 1}", [("IMAGE", "IMAGE"), ("MASK", "MASK")],
                   widgets={"image": REFERENCE_IMAGES[num_refs][k]}, ui_after={"image": ["image"]},
                   pos=(col[0] + 340.0 * k, 460), size=(320, 330)) for k in range(num_refs)]
    ref_sockets = [(f"image_{k}", "IMAGE") for k in range(1, 5)]
    nodes += images + [
        Node(20, "PhantomReferences", "Phantom References", [("references", "PHANTOM_REFERENCES")],
             sockets=ref_sockets, links={f"image_{k + 1}": (10 + k, 0) for k in range(num_refs)},
             widgets={"mode": "letterbox"}, pos=(col[1], 850), size=(300, 150)),
        Node(21, "PhantomEncodeReferences", "Phantom Encode References", [("reference_latents", "PHANTOM_REF_LATENTS")],
             sockets=[("vae", "PHANTOM_VAE"), ("references", "PHANTOM_REFERENCES")],
             links={"vae": (2, 0), "references": (20, 0)}, widgets={"width": width, "height": height},
             pos=(col[2], 850), size=(300, 130)),
        Node(30, "PhantomSampler", "Phantom Sampler", [("latent", "LATENT")],
             sockets=[("model", "PHANTOM_DIT"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                      ("reference_latents", "PHANTOM_REF_LATENTS")],
             links={"model": (1, 0), "positive": (4, 0), "negative": (5, 0), "reference_latents": (21, 0)},
             widgets={"width": width, "height": height, "frames": 81, "steps": 50, "shift": 5.0,
                      "solver": "unipc", "w_img": 5.0, "w_text": 7.5, "seed": 42},
             ui_after={"seed": ["fixed"]}, pos=(col[2], 0), size=(320, 380)),
        Node(31, "PhantomDecode", "Phantom Decode", [("images", "IMAGE")],
             sockets=[("vae", "PHANTOM_VAE"), ("latent", "LATENT")], links={"vae": (2, 0), "latent": (30, 0)},
             widgets={"tile_size": 0, "tile_overlap": 64}, pos=(col[3], 0), size=(260, 130)),
        Node(32, "PhantomSaveVideo", "Phantom Save Video", [],
             sockets=[("images", "IMAGE")], links={"images": (31, 0)},
             widgets={"fps": 16.0, "quality": 8, "filename_prefix": "Phantom"}, pos=(col[4], 0), size=(400, 480)),
    ]
    return nodes


def to_api(nodes: list[Node]) -> dict[str, dict]:
    """API format: {"id": {"class_type", "inputs": {name: constant | [source id, slot]}, "_meta": {"title"}}}."""
    api = {}
    for node in nodes:
        inputs: dict[str, Any] = {name: [str(src), slot] for name, (src, slot) in node.links.items()}
        inputs |= node.widgets
        api[str(node.id)] = {"class_type": node.type, "inputs": inputs, "_meta": {"title": node.title}}
    return api


def to_ui(nodes: list[Node], name: str) -> dict[str, Any]:
    """LiteGraph UI format (version 0.4) with numbered links and widgets_values in schema order."""
    links: list[list[Any]] = []
    out_links: dict[tuple[int, int], list[int]] = {}
    by_id = {n.id: n for n in nodes}
    ui_nodes = []
    for order, node in enumerate(nodes):
        inputs = []
        for slot, (input_name, input_type) in enumerate(node.sockets):
            link_id = None
            if input_name in node.links:
                src, src_slot = node.links[input_name]
                link_id = len(links) + 1
                links.append([link_id, src, src_slot, node.id, slot, by_id[src].outputs[src_slot][1]])
                out_links.setdefault((src, src_slot), []).append(link_id)
            inputs.append({"name": input_name, "type": input_type, "link": link_id})
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
        "extra": {"ds": {"scale": 0.75, "offset": [40, 40]}}, "version": 0.4,
    }


def render_all() -> dict[str, str]:
    """File name -> JSON text of every shipped workflow."""
    files = {}
    for num_refs in (1, 4):
        nodes = describe(num_refs)
        name = f"phantom_{num_refs}ref"
        files[f"{name}.json"] = json.dumps(to_ui(nodes, name), indent=2, ensure_ascii=False) + "\n"
        files[f"{name}_api.json"] = json.dumps(to_api(nodes), indent=2, ensure_ascii=False) + "\n"
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only verify that the shipped files are up to date")
    parser.add_argument("--out", type=Path, default=WORKFLOWS_DIR, help="output folder (default: workflows/)")
    args = parser.parse_args(argv)
    stale = []
    for file, text in render_all().items():
        path = args.out / file
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(file)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    if stale:
        sys.stderr.write(f"out of date: {', '.join(stale)}; run python tools/make_workflows.py\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
