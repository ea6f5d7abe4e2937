"""The shipped workflows: up to date with tools/make_workflows.py, UI files that the ComfyUI frontend can open
(every node type registered, sockets / outputs / widget values matching the server's schemas, consistent
links, linked widgets marked as such), and API files that say exactly what the UI files say. The rephrase
variant is queued end to end, its endpoint pointed at a recording chat-completions server on 127.0.0.1, and the
training variant trains a LoRA on the shipped example dataset and samples with it (the MMDiT variant:
test_workflow_mmdit.py; the server need not list its model files until its default is shipped). Where they sit and
how they look is in test_templates.py."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from phantom_core.tiny.default import trained_mmdit_shipped
from phantom_core.training.runlog import read_log
from tests.support.chat import good_answer
from tests.support.comfy import history_error
from tests.support.prompts import TINY_MODELS
from tests.support.workflow_files import by_class, load, saved_frames
from tools.comfy_launcher import ComfyServer
from tools.make_workflows import (
    DEFAULT_FILES,
    INPUTS_DIR,
    MMDIT_FILES,
    TEMPLATES_DIR,
    TRAIN_DATASET,
    TRAIN_SETTINGS,
    WORKFLOWS,
)

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_MODES = {"fixed", "increment", "decrement", "randomize"}
NAMES = ["phantom_1ref", "phantom_4ref", "phantom_2ref_rephrase", "phantom_train_lora", "phantom_mmdit_1ref",
         "phantom_mmdit_2ref"]
# model files a workflow names before they are shipped: the server cannot list them yet
UNSHIPPED = set() if trained_mmdit_shipped() else set(MMDIT_FILES.values()) - set(DEFAULT_FILES.values())
SEED_NAMES = ("seed", "noise_seed")  # INT widgets the frontend gives a control widget even when not asked to


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


def has_control(name: str, input_type: object, options: dict) -> bool:
    """Whether the frontend adds a control_after_generate widget: as asked, else for INT `seed` / `noise_seed`
    (ComfyUI frontend useIntWidget: `control_after_generate ?? ['seed', 'noise_seed'].includes(name)`)."""
    if input_type != "INT":
        return False
    asked = options.get("control_after_generate")
    return bool(asked) if asked is not None else name in SEED_NAMES


def split_widgets(spec: dict, values: list) -> dict[str, object]:
    """UI widgets_values -> {input name: value}, checking and dropping the UI-only extras (seed control, upload)."""
    values, out = list(values), {}
    for name, input_type, options in schema_inputs(spec):
        if not is_widget(input_type):
            continue
        assert values, f"widgets_values too short at {name}"
        out[name] = values.pop(0)
        if has_control(name, input_type, options):
            assert values.pop(0) in CONTROL_MODES, name
        if options.get("image_upload"):
            assert values.pop(0) == "image", name
    assert not values, f"widgets_values has {len(values)} values too many: {values}"
    return out


def accepts(input_type: str, link_type: str) -> bool:
    """Whether an input of `input_type` takes a link of `link_type`, as the frontend decides
    (LiteGraph.isValidConnection: equal, "*", or one shared type of a comma-separated union such as STRING,COMBO)."""
    return "*" in (input_type, link_type) or bool(set(input_type.split(",")) & set(link_type.split(",")))


def check_value(node_type: str, name: str, input_type: object, options: dict, value: object,
                linked: bool = False) -> None:
    """`value` fits the widget; a linked widget's combo value is only kept (the link gives the value), so it need
    not be listed yet (Phantom Load LoRA names the file the training writes)."""
    where = f"{node_type}.{name} = {value!r}"
    if input_type == "INT":
        assert isinstance(value, int) and not isinstance(value, bool), where
    elif input_type == "FLOAT":
        assert isinstance(value, (int, float)) and not isinstance(value, bool), where
    elif input_type == "STRING":
        assert isinstance(value, str), where
    elif input_type == "COMBO" or isinstance(input_type, list):
        choices = options.get("options", input_type if isinstance(input_type, list) else [])
        if not options.get("image_upload") and not linked and value not in UNSHIPPED:  # LoadImage: input/'s files
            assert value in choices, f"{where} not in {choices}"
    if input_type in ("INT", "FLOAT"):
        assert options.get("min", value) <= value <= options.get("max", value), where


def test_shipped_workflows_are_generated_from_the_description() -> None:
    from tools import make_workflows as tool

    rendered = tool.render_all()
    assert sorted(tool.WORKFLOWS) == sorted(NAMES)
    assert sorted(rendered) == sorted([f"{tool.WORKFLOWS[n].title}.json" for n in NAMES]
                                      + [f"api/{n}_api.json" for n in NAMES])
    stale = [f for f, text in rendered.items() if (TEMPLATES_DIR / f).read_text(encoding="utf-8") != text]
    assert not stale, f"out of date (run python -m tools.make_workflows): {stale}"
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
        plain = [i for i in node["inputs"] if "widget" not in i]
        assert [(i["name"], i["type"]) for i in plain] == sockets, node["type"]
        assert node["inputs"][:len(plain)] == plain, f"{node['type']}: widget inputs come after the sockets"
        widget_types = {n: ("COMBO" if isinstance(t, list) else t) for n, t, _ in schema_inputs(spec) if is_widget(t)}
        for i in node["inputs"][len(plain):]:  # a widget turned into an input: named, typed, and linked
            assert i["widget"] == {"name": i["name"]} and i["link"] is not None, (node["type"], i)
            assert widget_types.get(i["name"]) == i["type"], (node["type"], i)
        assert [o["type"] for o in node["outputs"]] == spec["output"], node["type"]
        assert [o["name"] for o in node["outputs"]] == spec["output_name"], node["type"]
        widgets = split_widgets(spec, node["widgets_values"])
        linked = {i["name"] for i in node["inputs"][len(plain):]}
        for input_name, input_type, options in schema_inputs(spec):
            if input_name in widgets:
                check_value(node["type"], input_name, input_type, options, widgets[input_name], input_name in linked)
    for link_id, src, src_slot, dst, dst_slot, link_type in ui["links"]:
        assert nodes[src]["outputs"][src_slot]["type"] == link_type
        assert accepts(nodes[dst]["inputs"][dst_slot]["type"], link_type), (nodes[dst]["type"], dst_slot, link_type)
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
    assert len([k for k in refs["inputs"] if k.startswith("image_")]) == WORKFLOWS[name].num_refs
    negative = next(v for v in api.values() if v["_meta"]["title"] == "Negative prompt")
    from phantom_core.inference.settings import WAN_NEGATIVE_PROMPT

    assert negative["inputs"]["text"] == WAN_NEGATIVE_PROMPT


# ------------------------------------------------------------------------------------------ rephrase variant
REPHRASE = "phantom_2ref_rephrase"
DESCRIPTIONS = ["a smiling woman astronaut with short curly brown hair in an orange launch suit",
                "a tabby cat with green eyes"]
REWRITTEN = ("A smiling woman astronaut with short curly brown hair in an orange launch suit sits on a sofa and "
             "gently strokes a tabby cat with green eyes on her lap. Soft window light.")


def test_rephrase_variant_wiring() -> None:
    ui, api = load(REPHRASE), load(f"{REPHRASE}_api")
    (rephrase,), (refs,), (typed,) = (by_class(api, t) for t in ("PhantomRephrase", "PhantomReferences",
                                                                   "PrimitiveStringMultiline"))
    r = api[rephrase]["inputs"]
    # typed prompt -> rephraser -> the positive encoder; the negative one keeps Wan's negative prompt
    assert api[typed]["_meta"]["title"] == "Prompt" and api[typed]["inputs"]["value"].strip()
    assert r["prompt"] == [typed, 0]
    assert r["references"] == [refs, 0] and not any(k.startswith("image_") for k in r)
    (positive,) = [k for k in by_class(api, "PhantomTextEncode") if api[k]["inputs"]["text"] == [rephrase, 0]]
    sampler = api[by_class(api, "PhantomSampler")[0]]["inputs"]
    assert sampler["positive"] == [positive, 0]
    # both outputs are shown as text on the canvas: the rewritten prompt and the descriptions
    assert sorted(api[p]["inputs"]["source"] for p in by_class(api, "PreviewAny")) == [[rephrase, 0], [rephrase, 1]]
    assert r["keep_loaded"] is False  # a local model gives the GPU back to the video model
    assert (r["backend"], r["endpoint_url"], r["api_key_env"]) == ("openai-compatible", "http://127.0.0.1:11434/v1", "")
    assert r["endpoint_model"] and r["strict"] is True
    assert len(by_class(api, "LoadImage")) == 2
    # UI: each linked widget is an input carrying the link and shows no stale text
    nodes = {str(n["id"]): n for n in ui["nodes"]}
    for node_id, widget, source in ((positive, "text", rephrase), (rephrase, "prompt", typed)):
        (entry,) = [i for i in nodes[node_id]["inputs"] if i["name"] == widget]
        link = next(link for link in ui["links"] if link[0] == entry["link"])
        assert entry["widget"] == {"name": widget} and link[1:3] == [int(source), 0]
    assert nodes[positive]["widgets_values"] == [""] and nodes[rephrase]["widgets_values"][0] == ""
    # every node comes after the nodes it takes inputs from
    order = {n["id"]: n["order"] for n in ui["nodes"]}
    assert all(order[src] < order[dst] for _, src, _, dst, _, _ in ui["links"])


def rephrase_prompt(endpoint: str, prefix: str) -> dict:
    """The shipped API rephrase workflow (its example photos are in the server's input/) at a tiny size,
    pointed at `endpoint`."""
    prompt = copy.deepcopy(load(f"{REPHRASE}_api"))
    for node in prompt.values():
        if node["class_type"] in ("PhantomEncodeReferences", "PhantomSampler"):
            node["inputs"] |= {"width": 64, "height": 64}
        if node["class_type"] == "PhantomSampler":
            node["inputs"] |= {"frames": 5, "steps": 2, "solver": "euler"}
        elif node["class_type"] == "PhantomRephrase":
            node["inputs"] |= {"endpoint_url": endpoint, "timeout_s": 30.0}
        elif node["class_type"] == "PhantomSaveVideo":
            node["inputs"]["filename_prefix"] = prefix
    return prompt


def test_rephrase_workflow_end_to_end(comfy_server: ComfyServer, chat_server) -> None:
    rec = chat_server([{"content": good_answer(DESCRIPTIONS, REWRITTEN)}])
    prompt = rephrase_prompt(rec.url, "wf_rephrase")
    (rephrase,), (typed,) = by_class(prompt, "PhantomRephrase"), by_class(prompt, "PrimitiveStringMultiline")
    short = prompt[typed]["inputs"]["value"]
    previews = {v["inputs"]["source"][1]: k for k, v in prompt.items() if v["class_type"] == "PreviewAny"}
    preview, prompt_preview = previews[1], previews[0]
    entry = comfy_server.run(prompt)
    frames = saved_frames(comfy_server, entry)
    # the model was asked once, with both references and the user's short prompt, without a key
    (request,) = rec.requests
    content = request["json"]["messages"][1]["content"]
    assert sum(part["type"] == "image_url" for part in content) == 2
    assert short in json.dumps(request["json"], ensure_ascii=False)
    assert "Authorization" not in request["headers"]
    shown = entry["outputs"][rephrase]["text"][0]
    assert shown.split("\n\n")[0] == REWRITTEN
    assert entry["outputs"][preview]["text"][0] == "\n".join(f"{k}: {d}" for k, d in enumerate(DESCRIPTIONS, 1))
    assert entry["outputs"][prompt_preview]["text"][0] == REWRITTEN
    # the rewritten prompt reached the text encoder: typing it in by hand gives the same video, the short
    # prompt another one
    for text, same in ((REWRITTEN, True), (short, False)):
        direct = copy.deepcopy(prompt)
        (positive,) = [k for k, v in direct.items() if v["inputs"].get("text") == [rephrase, 0]]
        for node_id in (rephrase, preview, prompt_preview, typed):
            del direct[node_id]
        direct[positive]["inputs"]["text"] = text
        next(v for v in direct.values() if v["class_type"] == "PhantomSaveVideo")["inputs"]["filename_prefix"] = \
            f"wf_direct_{same}"
        other = saved_frames(comfy_server, comfy_server.run(direct))
        assert np.array_equal(other, frames) == same
        if not same:
            assert np.abs(other.astype(int) - frames.astype(int)).mean() > 1
    assert len(rec.requests) == 1


# ------------------------------------------------------------------------------------------ training variant
TRAIN = "phantom_train_lora"


def test_train_variant_wiring() -> None:
    ui, api = load(TRAIN), load(f"{TRAIN}_api")
    (dit,), (vae,), (text,), (train,), (graph,), (lora,), (sampler,) = (by_class(api, t) for t in (
        "PhantomDiTLoader", "PhantomVAELoader", "PhantomTextEncoderLoader", "PhantomTrainLoRA", "LossGraphNode",
        "PhantomLoadLoRA", "PhantomSampler"))
    t = api[train]["inputs"]
    assert (t["model"], t["vae"], t["text_encoder"]) == ([dit, 0], [vae, 0], [text, 0])
    assert t["dataset"] == TRAIN_DATASET and (INPUTS_DIR / TRAIN_DATASET / "manifest.jsonl").is_file()
    assert (t["width"], t["height"], t["frames"]) == (128, 128, 17)  # the example dataset's format
    assert api[graph]["inputs"]["loss"] == [train, 1]
    # the trained file's name (output 2) is what Phantom Load LoRA loads, on the loaded DiT, into the sampler
    assert api[lora]["inputs"]["lora_name"] == [train, 2] and api[lora]["inputs"]["model"] == [dit, 0]
    assert api[sampler]["inputs"]["model"] == [lora, 0]
    nodes = {str(n["id"]): n for n in ui["nodes"]}
    (entry,) = [i for i in nodes[lora]["inputs"] if i["name"] == "lora_name"]
    assert entry["type"] == "COMBO" and entry["widget"] == {"name": "lora_name"}
    assert nodes[lora]["widgets_values"][0] == f"{t['lora_name']}.safetensors"  # the file the training writes
    order = {n["id"]: n["order"] for n in ui["nodes"]}
    assert all(order[src] < order[dst] for _, src, _, dst, _, _ in ui["links"])


def train_prompt(lora_name: str, strength: float) -> dict:
    """The shipped API training workflow on the tiny random default (every block reaches its output; the trained
    default's quality is not what this checks): 2 training steps on the example dataset at 64x64, 5 frames (the
    clips cut and scaled: encoding them whole takes most of a minute here; test_templates checks them at the
    shipped size) with a learning rate that moves the LoRA visibly in 2 steps, into `lora_name`; sampled at 64x64,
    5 frames, 2 steps with the LoRA at `strength`, the sampler's latent saved too."""
    prompt = copy.deepcopy(load(f"{TRAIN}_api"))
    for node in prompt.values():
        node["inputs"] |= {k: v for k, v in TINY_MODELS.items() if k in node["inputs"]}
        if node["class_type"] in ("PhantomEncodeReferences", "PhantomSampler"):
            node["inputs"] |= {"width": 64, "height": 64}
        if node["class_type"] == "PhantomSampler":
            node["inputs"] |= {"frames": 5, "steps": 2, "solver": "euler"}
        elif node["class_type"] == "PhantomTrainLoRA":
            node["inputs"] |= {"steps": 2, "learning_rate": 0.01, "checkpoint_every": 2, "lora_name": lora_name,
                               "width": 64, "height": 64, "frames": 5}
        elif node["class_type"] == "PhantomLoadLoRA":
            node["inputs"]["strength"] = strength
        elif node["class_type"] == "PhantomSaveVideo":
            node["inputs"]["filename_prefix"] = f"wf_{lora_name}_{strength:g}"
    (sampler,) = by_class(prompt, "PhantomSampler")
    prompt["900"] = {"class_type": "SaveLatent", "inputs": {"samples": [sampler, 0],
                                                            "filename_prefix": f"wf_{lora_name}_{strength:g}"}}
    return prompt


def saved_latent(server: ComfyServer, entry: dict) -> torch.Tensor:
    [saved] = entry["outputs"]["900"]["latents"]
    return load_file(server.output_dir / saved["subfolder"] / saved["filename"])["latent_tensor"]


def test_train_workflow_end_to_end(comfy_server: ComfyServer) -> None:
    shipped = INPUTS_DIR / TRAIN_DATASET
    copied = comfy_server.base / "input" / TRAIN_DATASET  # by ComfyServer.prepare, as the photos
    assert sorted(p.relative_to(copied) for p in copied.rglob("*")) == \
        sorted(p.relative_to(shipped) for p in shipped.rglob("*"))
    prompt = train_prompt("wf_train_lora", 1.0)
    entry = comfy_server.run(prompt, timeout_s=300)
    frames = saved_frames(comfy_server, entry)
    assert frames.shape == (5, 64, 64, 3)
    # the LoRA file the training wrote, with the shipped rank, after the 2 steps
    lora = comfy_server.base / "models" / "loras" / "wf_train_lora.safetensors"
    with safe_open(str(lora), framework="pt") as f:
        meta = f.metadata()
    assert (meta["rank"], meta["steps"]) == (str(TRAIN_SETTINGS["rank"]), "2")
    run = comfy_server.output_dir / "phantom_training" / "wf_train_lora"
    cached = sorted((run / "cache").glob("0*.safetensors"))  # <sample name>-<key>.safetensors: all six samples
    assert [p.name.split("-")[0] for p in cached] == [f"{i:06d}" for i in range(6)]
    assert load_file(cached[0])["latents"].shape == (16, 2, 8, 8)  # 5 frames of 64x64
    log = read_log(run / "log.jsonl")
    assert [r["step"] for r in log] == [1, 2] and all(np.isfinite(r["loss"]) for r in log)
    (graph,) = by_class(prompt, "LossGraphNode")
    assert entry["outputs"][graph]["images"], "Plot Loss Graph drew nothing"
    # the sampler ran with that LoRA: at strength 0 (the training is cached: same inputs) the latent differs
    with_lora = saved_latent(comfy_server, entry)
    off = comfy_server.run(train_prompt("wf_train_lora", 0.0), timeout_s=300)
    assert off["status"]["status_str"] == "success", history_error(off) + comfy_server.log()
    without = saved_latent(comfy_server, off)
    assert (with_lora - without).abs().max() > 1e-3 * without.abs().max()
    assert [r["step"] for r in read_log(run / "log.jsonl")] == [1, 2]  # not trained again

