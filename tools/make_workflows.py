"""Generate the shipped workflows (UI and API format) from one description, so the two always agree.

    python -m tools.make_workflows            # (re)write the files of WORKFLOWS in workflows/ (+ _api.json)
    python -m tools.make_workflows --check    # exit 1 if a shipped file differs from what would be written

Each workflow: LoadImage x N -> PhantomReferences -> PhantomEncodeReferences; the three Phantom loaders (tiny
default file names), two PhantomTextEncode (prompt, Wan's negative prompt), PhantomSampler, PhantomDecode,
PhantomSaveVideo. The rephrase variant adds PhantomRephrase (references from PhantomReferences, an Ollama
endpoint by default) whose `prompt` output feeds the positive PhantomTextEncode's `text` (a widget turned into
an input); its `prompt` and `descriptions` outputs also go to a PreviewAny each ("Preview as Text"), so the
rewritten prompt can be read (and copied) on the canvas. The UI format is LiteGraph's
(version 0.4) with `widgets_values` in schema order; a linked widget keeps its value there and gets an input
entry carrying `"widget": {"name": ...}` and the link, as the frontend writes it.
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from phantom_core.settings import WAN_NEGATIVE_PROMPT

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS_DIR = ROOT / "workflows"

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
# what a user would type when the rephraser adds the appearance details (the girl_dog_camera example, shortened)
SHORT_PROMPTS = {2: "Warm sunlight over the grass. A little girl crouches beside blooming daisies next to a puppy "
                    "and, smiling, raises a toy camera to capture the moment."}
REFERENCE_IMAGES = {1: ["ref1.jpg"], 2: ["ref1.jpg", "ref2.jpg"], 4: ["ref8.jpg", "ref9.jpg", "ref10.jpg", "ref11.jpg"]}
REPHRASE_ENDPOINT = {"endpoint_url": "http://127.0.0.1:11434/v1", "endpoint_model": "qwen2.5vl:7b"}  # Ollama
WORKFLOWS = {"phantom_1ref": (1, False), "phantom_4ref": (4, False), "phantom_2ref_rephrase": (2, True)}
"""File stem -> (number of references, rephraser wired in); each gives `<stem>.json` and `<stem>_api.json`."""


@dataclass
class Node:
    """One node of the description: enough to write both formats.

    sockets: every non-widget input in schema order (name, type); links: input name -> (node id, slot).
    widgets: widget inputs in schema order with their values (the API format's constants).
    widget_links: widget name -> (node id, slot) for a widget fed by a link instead: the API format gives the
        link, the UI format adds an input entry with `"widget": {"name"}` and keeps the value in widgets_values.
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
    ui_after: dict[str, list[Any]] = field(default_factory=dict)
    pos: tuple[float, float] = (0.0, 0.0)
    size: tuple[float, float] = (320.0, 120.0)


def describe(num_refs: int, rephrase: bool = False) -> list[Node]:
    """The workflow for `num_refs` (1..4) references, with the rephraser wired in or not; in execution order.

    Raises ValueError when `num_refs` is outside 1..4 or has no example prompt / reference files for the variant.
    """
    prompts = SHORT_PROMPTS if rephrase else PROMPTS
    if not 1 <= num_refs <= 4 or num_refs not in prompts or num_refs not in REFERENCE_IMAGES:
        raise ValueError(f"num_refs is {num_refs}; the {'rephrase ' if rephrase else ''}workflows exist for "
                         f"{sorted(prompts)} references")
    width, height = 832, 480
    col = [0.0, 380.0, 760.0, 1140.0, 1520.0]
    nodes = [
        Node(1, "PhantomDiTLoader", "Phantom DiT Loader", [("model", "PHANTOM_DIT")],
             widgets={"dit_name": DEFAULT_FILES["dit"], "weight_dtype": "default"}, pos=(col[0], 0)),
        Node(2, "PhantomVAELoader", "Phantom VAE Loader", [("vae", "PHANTOM_VAE")],
             widgets={"vae_name": DEFAULT_FILES["vae"]}, pos=(col[0], 150)),
        Node(3, "PhantomTextEncoderLoader", "Phantom Text Encoder Loader", [("text_encoder", "PHANTOM_TEXT_ENCODER")],
             widgets={"text_encoder_name": DEFAULT_FILES["text_encoder"], "tokenizer": "embedded", "device": "default"}, pos=(col[0], 270)),
        Node(4, "PhantomTextEncode", "Prompt", [("conditioning", "CONDITIONING")],
             sockets=[("text_encoder", "PHANTOM_TEXT_ENCODER")], links={"text_encoder": (3, 0)},
             widgets={"text": prompts[num_refs]}, widget_links={"text": (40, 0)} if rephrase else {},
             pos=(col[1], 0), size=(340, 180)),
        Node(5, "PhantomTextEncode", "Negative prompt", [("conditioning", "CONDITIONING")],
             sockets=[("text_encoder", "PHANTOM_TEXT_ENCODER")], links={"text_encoder": (3, 0)},
             widgets={"text": WAN_NEGATIVE_PROMPT}, pos=(col[1], 220), size=(340, 180)),
    ]
    images = [Node(10 + k, "LoadImage", f"Reference {k + 1}", [("IMAGE", "IMAGE"), ("MASK", "MASK")],
                   widgets={"image": REFERENCE_IMAGES[num_refs][k]}, ui_after={"image": ["image"]},
                   pos=(col[0] + 340.0 * k, 460), size=(320, 330)) for k in range(num_refs)]
    ref_sockets = [(f"image_{k}", "IMAGE") for k in range(1, 5)] + [(f"mask_{k}", "MASK") for k in range(1, 5)]
    nodes += images + [
        Node(20, "PhantomReferences", "Phantom References", [("references", "PHANTOM_REFERENCES")],
             sockets=ref_sockets,
             links={f"{kind}_{k + 1}": (10 + k, slot) for k in range(num_refs)
                    for kind, slot in (("image", 0), ("mask", 1))},  # Load Image's IMAGE and MASK
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
                      "solver": "unipc", "w_img": 5.0, "w_text": 7.5, "seed": 42, "preset": "custom"},
             ui_after={"seed": ["fixed"]}, pos=(col[2], 0), size=(320, 380)),
        Node(31, "PhantomDecode", "Phantom Decode", [("images", "IMAGE")],
             sockets=[("vae", "PHANTOM_VAE"), ("latent", "LATENT")], links={"vae": (2, 0), "latent": (30, 0)},
             widgets={"tile_size": 0, "tile_overlap": 64}, pos=(col[3], 0), size=(260, 130)),
        Node(32, "PhantomSaveVideo", "Phantom Save Video", [],
             sockets=[("images", "IMAGE")], links={"images": (31, 0)},
             widgets={"fps": 16.0, "quality": 8, "filename_prefix": "Phantom"}, pos=(col[4], 0), size=(400, 480)),
    ]
    if rephrase:
        nodes += rephrase_nodes(prompts[num_refs], (col[3], 500), (col[4], 520), (col[4], 760))
    return execution_order(nodes)


def rephrase_nodes(prompt: str, pos: tuple[float, float], prompt_preview_pos: tuple[float, float],
                   preview_pos: tuple[float, float]) -> list[Node]:
    """PhantomRephrase (id 40; references from node 20; an Ollama endpoint, no API key), a PreviewAny (42)
    showing the rewritten prompt and one (41) showing the descriptions. Node 4 (the positive prompt) takes
    output 0 through `widget_links`."""
    widgets = {"prompt": prompt, "backend": "openai-compatible", **REPHRASE_ENDPOINT, "api_key_env": "",
               "local_model": "none", "language": "auto", "max_new_tokens": 512, "temperature": 0.0, "seed": 0,
               "timeout_s": 120.0, "strict": True, **{f"hint_{k}": "" for k in range(1, 5)}, "keep_loaded": False}
    return [
        Node(40, "PhantomRephrase", "Phantom Rephrase Prompt", [("prompt", "STRING"), ("descriptions", "STRING")],
             sockets=[("references", "PHANTOM_REFERENCES"), *[(f"image_{k}", "IMAGE") for k in range(1, 5)]],
             links={"references": (20, 0)}, widgets=widgets,
             pos=pos, size=(360, 560)),
        Node(42, "PreviewAny", "Rewritten prompt", [], sockets=[("source", "*")], links={"source": (40, 0)},
             pos=prompt_preview_pos, size=(400, 220)),
        Node(41, "PreviewAny", "Subject descriptions", [], sockets=[("source", "*")], links={"source": (40, 1)},
             pos=preview_pos, size=(400, 200)),
    ]


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
            inputs.append({"name": widget, "type": by_id[src].outputs[src_slot][1], "widget": {"name": widget},
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
        "extra": {"ds": {"scale": 0.75, "offset": [40, 40]}}, "version": 0.4,
    }


def render_all() -> dict[str, str]:
    """File name -> JSON text of every shipped workflow."""
    files = {}
    for name, (num_refs, rephrase) in WORKFLOWS.items():
        nodes = describe(num_refs, rephrase)
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
        sys.stderr.write(f"out of date: {', '.join(stale)}; run python -m tools.make_workflows\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
