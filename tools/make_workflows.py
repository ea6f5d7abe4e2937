"""Generate the shipped workflows (UI and API format) from one description, so the two always agree.

    python -m tools.make_workflows            # (re)write example_workflows/*.json and example_workflows/api/*.json
    python -m tools.make_workflows --check    # exit 1 if a shipped file differs from what would be written

Where the files go: ComfyUI's Templates browser lists every `*.json` directly in a custom node's
`example_workflows/` folder (ComfyUI 0.3.75 app/custom_node_manager.py globs `<node>/example_workflows/*.json`,
not sub-folders) under the file name, and shows `<name>.jpg` beside it as the thumbnail (frontend 1.32:
`/api/workflow_templates/<node>/<name>.jpg`). So the UI workflows sit there, named by their readable title
(`Phantom 1 reference.json`), and the API-format files, which the frontend cannot open, in
`example_workflows/api/` (`phantom_1ref_api.json`, for the batch tool and scripts). The thumbnails are written by
`python -m tools.make_thumbnails`; the reference photos the workflows name are in `example_inputs/`.

Each workflow: LoadImage x N -> PhantomReferences -> PhantomEncodeReferences; the three Phantom loaders (tiny
default file names), two PhantomTextEncode (prompt, Wan's negative prompt), PhantomSampler, PhantomDecode,
PhantomSaveVideo. The training variant trains a LoRA first: Phantom Train LoRA (the three loaders; the example
dataset of example_inputs/, written by tools.make_example_dataset) -> its loss into ComfyUI's Plot Loss Graph, its
file name into Phantom Load LoRA's `lora_name` (a combo widget turned into an input), whose model feeds the sampler;
the link also makes the sampling wait for the training. The rephrase variant types the prompt into a String
(Multiline) node titled "Prompt", which feeds PhantomRephrase (references from PhantomReferences, an Ollama endpoint
by default); the rewritten prompt feeds the positive PhantomTextEncode's `text` (a widget turned into an input, left
empty in the UI so no stale text shows), and both rephraser outputs go to a PreviewAny each ("Preview as Text"). The
MMDiT variant runs the second embedded default (the paper's MMDiT, `make train-default-mmdit`): its DiT file, and
Phantom CLIP Vision Loader -> Phantom CLIP Encode References (tokens) between the reference latents and the
sampler; its thumbnail and its runs wait for the trained files (`workflow_weights_shipped`). The UI format is
LiteGraph's (version 0.4); tools/workflow_format.py writes both formats from one node list.

Layout (tools/workflow_layout.py): columns left to right in reading order, every link from a column to a later
one, node sizes above what the frontend computes, and a saved view (`extra.ds`) that puts the first column
inside the canvas, clear of the frontend's top bar and side bar.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from phantom_core.inference.settings import WAN_NEGATIVE_PROMPT
from phantom_core.tiny.default import (
    TRAINED_MMDIT_CLIP_OUTPUT,
    TRAINED_MMDIT_FILES,
    TRAINED_MMDIT_SPEED,
    TRAINED_SAMPLING,
    trained_mmdit_shipped,
)
from tools.workflow_format import Node, execution_order, to_api, to_ui
from tools.workflow_layout import place

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES_DIR = ROOT / "example_workflows"
API_DIR = TEMPLATES_DIR / "api"
INPUTS_DIR = ROOT / "example_inputs"

DEFAULT_FILES = {  # the trained embedded default (phantom_core/tiny/trained/, MODEL_CARD.md there)
    "dit": "phantom_world_dit.safetensors",
    "vae": "phantom_world_vae.safetensors",
    "text_encoder": "phantom_world_umt5.safetensors",
}
# the MMDiT default (beside DEFAULT_FILES' umT5): phantom_world_mmdit, phantom_world_clip and its VAE (today the same
# file as DEFAULT_FILES')
MMDIT_FILES = {role: Path(relative).name for role, relative in TRAINED_MMDIT_FILES.items()}
# the default's world: 128 x 128 px, 17 frames at 16 fps (phantom_core.world); real Phantom-Wan: 832 x 480 x 81
SIZE = {"width": 128, "height": 128, "frames": 17}
# the shipped photos of example_inputs/ (scikit-image's astronaut, cat, coffee and rocket; licences there)
REFERENCE_IMAGES = {1: ["phantom_astronaut.jpg"], 2: ["phantom_astronaut.jpg", "phantom_cat.jpg"],
                    4: ["phantom_astronaut.jpg", "phantom_cat.jpg", "phantom_coffee.jpg", "phantom_rocket.jpg"]}
PROMPTS = {  # in the miniature world's grammar (docs/WORLD.md), which the default was trained on: the k-th clause
    # is the k-th reference; with real Phantom-Wan weights, describe each subject's appearance instead
    1: "an astronaut moves right on a blue background",
    2: "an astronaut moves right and a cat moves up on a blue background",  # also `make demo`'s (tools.demo)
    4: "an astronaut moves left and a cat moves right and an espresso cup moves up and a rocket moves down on a "
       "black background",
}
# what a user would type when the rephraser adds the appearance details
SHORT_PROMPTS = {2: "the astronaut moves right and the cat moves up on a green background"}
REPHRASE_ENDPOINT = {"endpoint_url": "http://127.0.0.1:11434/v1", "endpoint_model": "qwen2.5vl:7b"}  # Ollama
TRAIN_DATASET = "phantom_world_lora"  # example_inputs/<this>/ (tools.make_example_dataset), copied into input/
TRAIN_SETTINGS = {  # Phantom Train LoRA's widgets, in schema order: a short run on the example dataset, at its size
    "dataset": TRAIN_DATASET, "lora_name": "phantom_world_lora", "steps": 100, "learning_rate": 5e-4, "rank": 16,
    "alpha": 16.0, "batch_size": 1, **SIZE, "seed": 0, "text_dropout": 0.2, "reference_dropout": 0.1,
    "checkpoint_every": 50, "resume": False,
}


@dataclass(frozen=True)
class Workflow:
    """One shipped workflow: its references, whether the rephraser is wired in, its title (the UI file's name,
    which the Templates browser shows), whether it trains a LoRA first and samples with it, and whether it runs
    the MMDiT default (with the references' CLIP features)."""

    num_refs: int
    rephrase: bool
    title: str
    train: bool = False
    mmdit: bool = False


WORKFLOWS = {
    "phantom_1ref": Workflow(1, False, "Phantom 1 reference"),
    "phantom_4ref": Workflow(4, False, "Phantom 4 references"),
    "phantom_2ref_rephrase": Workflow(2, True, "Phantom 2 references with rephraser"),
    "phantom_train_lora": Workflow(1, False, "Phantom train LoRA", train=True),
    "phantom_mmdit_1ref": Workflow(1, False, "Phantom MMDiT 1 reference", mmdit=True),
    "phantom_mmdit_2ref": Workflow(2, False, "Phantom MMDiT 2 references", mmdit=True),  # `make demo`'s
}
"""Stem -> workflow; each gives `example_workflows/<title>.json` and `example_workflows/api/<stem>_api.json`."""


def ui_path(stem: str) -> Path:
    """The UI workflow of `stem` (a key of WORKFLOWS), as the Templates browser lists it."""
    return TEMPLATES_DIR / f"{WORKFLOWS[stem].title}.json"


def api_path(stem: str) -> Path:
    """The API-format workflow of `stem` (a key of WORKFLOWS)."""
    return API_DIR / f"{stem}_api.json"


def thumbnail_path(stem: str) -> Path:
    """The Templates browser's thumbnail of `stem`: `<title>.jpg` beside the UI file."""
    return TEMPLATES_DIR / f"{WORKFLOWS[stem].title}.jpg"


def workflow_weights_shipped(stem: str) -> bool:
    """Whether the embedded default that `stem` runs is shipped (the MMDiT's waits for `make train-default-mmdit`);
    until then the workflow has no thumbnail and is not run."""
    return not WORKFLOWS[stem].mmdit or trained_mmdit_shipped()


def describe(num_refs: int, rephrase: bool = False, train: bool = False, mmdit: bool = False) -> list[Node]:
    """The workflow for `num_refs` (1..4) references, with the rephraser wired in or not, training a LoRA first
    or not, on the Phantom-Wan or the MMDiT default, laid out; in execution order.

    Raises ValueError when `num_refs` is outside 1..4 or has no example prompt / reference files for the variant.
    """
    prompts = SHORT_PROMPTS if rephrase else PROMPTS
    if not 1 <= num_refs <= 4 or num_refs not in prompts or num_refs not in REFERENCE_IMAGES:
        raise ValueError(f"num_refs is {num_refs}; the {'rephrase ' if rephrase else ''}workflows exist for "
                         f"{sorted(prompts)} references")
    width, height = SIZE["width"], SIZE["height"]
    model = (52, 0) if train else (1, 0)  # the sampler's DiT: through Phantom Load LoRA when the workflow trains
    nodes = [
        Node(1, "PhantomDiTLoader", "Phantom DiT Loader", [("model", "PHANTOM_DIT")],
             widgets={"dit_name": (MMDIT_FILES if mmdit else DEFAULT_FILES)["dit"], "weight_dtype": "default",
                      "block_swap": 0}, size=(400, 130)),
        Node(2, "PhantomVAELoader", "Phantom VAE Loader", [("vae", "PHANTOM_VAE")],
             widgets={"vae_name": (MMDIT_FILES if mmdit else DEFAULT_FILES)["vae"]}, size=(400, 80)),
        Node(3, "PhantomTextEncoderLoader", "Phantom Text Encoder Loader", [("text_encoder", "PHANTOM_TEXT_ENCODER")],
             widgets={"text_encoder_name": DEFAULT_FILES["text_encoder"], "tokenizer": "embedded", "device": "default"},
             size=(400, 130)),
        Node(4, "PhantomTextEncode", "Encode rewritten prompt" if rephrase else "Prompt", [("conditioning", "CONDITIONING")],
             sockets=[("text_encoder", "PHANTOM_TEXT_ENCODER")], links={"text_encoder": (3, 0)},
             widgets={"text": "" if rephrase else prompts[num_refs]}, widget_links={"text": (40, 0)} if rephrase else {},
             size=(380, 110) if rephrase else (420, 220)),
        Node(5, "PhantomTextEncode", "Negative prompt", [("conditioning", "CONDITIONING")],
             sockets=[("text_encoder", "PHANTOM_TEXT_ENCODER")], links={"text_encoder": (3, 0)},
             widgets={"text": WAN_NEGATIVE_PROMPT}, size=(420, 200)),
    ]
    nodes += [Node(10 + k, "LoadImage", f"Reference {k + 1}", [("IMAGE", "IMAGE"), ("MASK", "MASK")],
                   widgets={"image": REFERENCE_IMAGES[num_refs][k]}, ui_after={"image": ["image"]},
                   size=(340, 360)) for k in range(num_refs)]  # the frontend needs 326 high with the photo
    ref_sockets = [(f"image_{k}", "IMAGE") for k in range(1, 5)] + [(f"mask_{k}", "MASK") for k in range(1, 5)]
    nodes += [
        Node(20, "PhantomReferences", "Phantom References", [("references", "PHANTOM_REFERENCES")],
             sockets=ref_sockets,
             links={f"{kind}_{k + 1}": (10 + k, slot) for k in range(num_refs)
                    for kind, slot in (("image", 0), ("mask", 1))},  # Load Image's IMAGE and MASK
             widgets={"mode": "letterbox"}, size=(300, 240)),
        Node(21, "PhantomEncodeReferences", "Phantom Encode References", [("reference_latents", "PHANTOM_REF_LATENTS")],
             sockets=[("vae", "PHANTOM_VAE"), ("references", "PHANTOM_REFERENCES")],
             links={"vae": (2, 0), "references": (20, 0)}, widgets={"width": width, "height": height},
             size=(300, 130)),
        Node(30, "PhantomSampler", "Phantom Sampler", [("latent", "LATENT")],
             sockets=[("model", "PHANTOM_DIT"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                      ("reference_latents", "PHANTOM_REF_LATENTS")],
             links={"model": model, "positive": (4, 0), "negative": (5, 0), "reference_latents": (22 if mmdit else 21, 0)},
             widgets={"width": width, "height": height, "frames": SIZE["frames"], "steps": 50, "shift": 5.0,
                      "solver": "unipc", **TRAINED_SAMPLING, "seed": 42, "preset": "custom",
                      "image_guidance_start": 0.0, "image_guidance_end": 1.0, "cache_threshold": 0.0,
                      "attention": "auto", "compile": False, "batch_passes": "auto",
                      **(TRAINED_MMDIT_SPEED if mmdit else {})},  # the MMDiT default's step cache, as `generate`'s
             ui_after={"seed": ["fixed"]}, size=(320, 490)),
        Node(31, "PhantomDecode", "Phantom Decode", [("images", "IMAGE")],
             sockets=[("vae", "PHANTOM_VAE"), ("latent", "LATENT")], links={"vae": (2, 0), "latent": (30, 0)},
             widgets={"tile_size": 0, "tile_overlap": 64}, size=(280, 130)),
        Node(32, "PhantomSaveVideo", "Phantom Save Video", [],
             sockets=[("images", "IMAGE")], links={"images": (31, 0)},
             widgets={"fps": 16.0, "quality": 8, "filename_prefix": "Phantom"}, size=(400, 460)),
    ]
    if rephrase:
        nodes += rephrase_nodes(prompts[num_refs])
    if train:
        nodes += train_nodes()
    if mmdit:
        nodes += mmdit_nodes()
    by_id = {n.id: n for n in nodes}
    layout = columns(num_refs, rephrase, train, mmdit)
    for node_id, (x, y) in place(layout, {i: n.size for i, n in by_id.items()}).items():
        by_id[node_id].pos = (x, y)
    return execution_order(nodes)


def columns(num_refs: int, rephrase: bool, train: bool = False, mmdit: bool = False) -> list[list[list[int]]]:
    """The layout (see tools.workflow_layout.place): columns left to right, each one or two stacks of node ids.

    Reading order: the model loaders above the reference photos -> the prompts above PhantomReferences (in
    line with the photos, so their wires run straight right) -> the rephraser / the reference latents -> the
    sampler -> decode -> save. With the rephraser: the typed prompt and the negative prompt, then the rephraser
    above the reference latents, then the encoder of the rewritten prompt above the two text previews. Training:
    the trainer above PhantomReferences, then Phantom Load LoRA and the loss plot above the reference latents,
    then the prompts, so the graph reads train -> LoRA -> sample. MMDiT: the CLIP vision loader under the model
    loaders, the CLIP encoder in a column of its own after the reference latents.
    """
    photos = [10 + k for k in range(num_refs)]
    tail = [[[30]], [[31]], [[32]]]
    if train:
        return [[[1, 2, 3], photos], [[50], [20]], [[52, 51], [21]], [[4, 5]], *tail]
    if rephrase:
        return [[[1, 2, 3], photos], [[43, 5], [20]], [[40, 21]], [[4, 42, 41]], *tail]
    if mmdit:
        return [[[1, 2, 3, 6], photos], [[4, 5], [20]], [[], [21]], [[], [22]], *tail]
    return [[[1, 2, 3], photos], [[4, 5], [20]], [[], [21]], *tail]


def mmdit_nodes() -> list[Node]:
    """Phantom CLIP Vision Loader (6, the MMDiT default's tower) and Phantom CLIP Encode References (22: the
    references of node 20 added to the latents of node 21, the features the default was trained on); node 30 (the
    sampler) takes 22's output."""
    return [
        Node(6, "PhantomCLIPVisionLoader", "Phantom CLIP Vision Loader", [("clip_vision", "PHANTOM_CLIP_VISION")],
             widgets={"clip_vision_name": MMDIT_FILES["clip_vision"]}, size=(400, 80)),
        Node(22, "PhantomCLIPEncodeReferences", "Phantom CLIP Encode References",
             [("reference_latents", "PHANTOM_REF_LATENTS")],
             sockets=[("clip_vision", "PHANTOM_CLIP_VISION"), ("references", "PHANTOM_REFERENCES"),
                      ("reference_latents", "PHANTOM_REF_LATENTS")],
             links={"clip_vision": (6, 0), "references": (20, 0), "reference_latents": (21, 0)},
             widgets={"clip_output": TRAINED_MMDIT_CLIP_OUTPUT}, size=(320, 130)),
    ]


def rephrase_nodes(prompt: str) -> list[Node]:
    """The prompt typed into a String (Multiline) node (43, title "Prompt"), PhantomRephrase (40; references
    from node 20; an Ollama endpoint, no API key; its `prompt` widget fed by 43), a PreviewAny (42) showing the
    rewritten prompt and one (41) showing the descriptions. Node 4 (the positive encoder) takes output 0."""
    widgets = {"prompt": "", "backend": "openai-compatible", **REPHRASE_ENDPOINT, "api_key_env": "",
               "local_model": "none", "language": "auto", "max_new_tokens": 512, "temperature": 0.0, "seed": 0,
               "timeout_s": 120.0, "strict": True, **{f"hint_{k}": "" for k in range(1, 5)}, "keep_loaded": False}
    return [
        Node(43, "PrimitiveStringMultiline", "Prompt", [("STRING", "STRING")], widgets={"value": prompt},
             size=(420, 220)),
        Node(40, "PhantomRephrase", "Phantom Rephrase Prompt", [("prompt", "STRING"), ("descriptions", "STRING")],
             sockets=[("references", "PHANTOM_REFERENCES"), *[(f"image_{k}", "IMAGE") for k in range(1, 5)]],
             links={"references": (20, 0)}, widgets=widgets, widget_links={"prompt": (43, 0)}, size=(400, 620)),
        Node(42, "PreviewAny", "Rewritten prompt", [], sockets=[("source", "*")], links={"source": (40, 0)},
             size=(380, 220)),
        Node(41, "PreviewAny", "Subject descriptions", [], sockets=[("source", "*")], links={"source": (40, 1)},
             size=(380, 180)),
    ]


def train_nodes() -> list[Node]:
    """Phantom Train LoRA (50: the three loaders, TRAIN_SETTINGS), ComfyUI's Plot Loss Graph (51) on its
    LOSS_MAP, and Phantom Load LoRA (52) on the DiT loader's model, its `lora_name` combo fed by the trainer's
    file name output (a STRING that a combo accepts too), so the sampling runs after the training, with its file.
    The combo keeps the name the training writes. Node 30 (the sampler) takes 52's model."""
    lora_file = f"{TRAIN_SETTINGS['lora_name']}.safetensors"
    return [
        Node(50, "PhantomTrainLoRA", "Phantom Train LoRA",
             [("lora", "LORA_MODEL"), ("loss_map", "LOSS_MAP"), ("lora_name", "STRING,COMBO")],
             sockets=[("model", "PHANTOM_DIT"), ("vae", "PHANTOM_VAE"), ("text_encoder", "PHANTOM_TEXT_ENCODER")],
             links={"model": (1, 0), "vae": (2, 0), "text_encoder": (3, 0)}, widgets=dict(TRAIN_SETTINGS),
             ui_after={"seed": ["fixed"]}, size=(360, 500)),
        Node(51, "LossGraphNode", "Plot Loss Graph", [], sockets=[("loss", "LOSS_MAP")], links={"loss": (50, 1)},
             widgets={"filename_prefix": f"{TRAIN_SETTINGS['lora_name']}_loss"}, size=(400, 360)),
        Node(52, "PhantomLoadLoRA", "Phantom Load LoRA", [("model", "PHANTOM_DIT")],
             sockets=[("model", "PHANTOM_DIT")], links={"model": (1, 0)},
             widgets={"lora_name": lora_file, "strength": 1.0}, widget_links={"lora_name": (50, 2)},
             widget_types={"lora_name": "COMBO"}, size=(360, 100)),
    ]


def render_all() -> dict[str, str]:
    """Path relative to example_workflows/ -> JSON text, for every shipped workflow (UI and API format)."""
    files = {}
    for stem, spec in WORKFLOWS.items():
        nodes = describe(spec.num_refs, spec.rephrase, spec.train, spec.mmdit)
        files[str(ui_path(stem).relative_to(TEMPLATES_DIR))] = \
            json.dumps(to_ui(nodes, stem), indent=2, ensure_ascii=False) + "\n"
        files[str(api_path(stem).relative_to(TEMPLATES_DIR))] = \
            json.dumps(to_api(nodes), indent=2, ensure_ascii=False) + "\n"
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only verify that the shipped files are up to date")
    parser.add_argument("--out", type=Path, default=TEMPLATES_DIR, help="output folder (default: example_workflows/)")
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
