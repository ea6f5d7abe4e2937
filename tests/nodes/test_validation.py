"""Validation that holds at /prompt: every widget's range equals what the core accepts (read back from ComfyUI's
/object_info), and an input a node checks itself (`validate_inputs`, which makes ComfyUI skip its own type and
range check) is still refused when out of range or of the wrong type, with a message naming it."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from phantom_core.inference.settings import LORA_STRENGTH, RANDOM_SEED, SETTING_RANGES, GenerationSettings, Range
from phantom_core.lora.apply import check_strength
from phantom_core.rephrase.backends import REPHRASE_RANGES, make_backend
from phantom_core.training.config import TRAIN_RANGES, TrainConfig
from phantom_core.wan.vae_tiling import MIN_TILE_LATENT, check_tiling
from tests.support.comfy import history_error
from tests.support.prompts import pipeline_prompt
from tools.comfy_launcher import ComfyServer

TRAIN_FIELDS = {"rank": "lora_rank", "alpha": "lora_alpha"}  # Train LoRA widget -> TrainConfig field
# (node, input) -> the core range it must equal
CORE_RANGES: dict[tuple[str, str], tuple[str, Range]] = {
    **{("PhantomSampler", name): ("settings", SETTING_RANGES[name])
       for name in ("width", "height", "frames", "steps", "shift", "w_img", "w_text", "seed")},
    **{("PhantomEncodeReferences", name): ("settings", SETTING_RANGES[name]) for name in ("width", "height")},
    **{("PhantomSaveVideo", name): ("settings", SETTING_RANGES[name]) for name in ("fps", "quality")},
    ("PhantomLoadLoRA", "strength"): ("lora", LORA_STRENGTH),
    **{("PhantomRephrase", name): ("rephrase", limits) for name, limits in REPHRASE_RANGES.items()},
    **{("PhantomTrainLoRA", name): ("training", TRAIN_RANGES[TRAIN_FIELDS.get(name, name)])
       for name in ("steps", "learning_rate", "rank", "alpha", "batch_size", "width", "height", "frames", "seed",
                    "text_dropout", "reference_dropout", "checkpoint_every")},
}
NODE_ONLY = {("PhantomDecode", "tile_size"), ("PhantomDecode", "tile_overlap"),  # checked below on their own
             *(("PhantomSampler", name) for name in ("image_guidance_start", "image_guidance_end", "cache_threshold")),
             ("PhantomDiTLoader", "block_swap")}  # against the loaded DiT's block count: tests/core/test_block_swap_node.py


def numeric_inputs(info: dict) -> dict[tuple[str, str], dict]:
    """(node, input) -> options of every INT / FLOAT input of every Phantom node."""
    out = {}
    for node, spec in info.items():
        if node.startswith("Phantom"):
            for name, (kind, options) in {**spec["input"]["required"], **spec["input"].get("optional", {})}.items():
                if kind in ("INT", "FLOAT"):
                    out[(node, name)] = options | {"type": kind}
    return out


def core_accepts(where: str, name: str, value) -> bool:
    """Does the core take `value` for setting `name` (GenerationSettings, apply_loras' strength check, TrainConfig,
    or the rephraser's make_backend)?"""
    try:
        if where == "settings":
            GenerationSettings("p", **{name: value})
        elif where == "lora":
            check_strength(value, 0)
            name = "strength"
        elif where == "training":
            name = TRAIN_FIELDS.get(name, name)
            TrainConfig(**{name: value})
        else:
            make_backend("openai-compatible", endpoint_url="http://127.0.0.1:9/v1", endpoint_model="m",
                         **{name: value})
    except ValueError as err:
        assert name in str(err), err
        return False
    return True


def test_every_widget_range_equals_what_the_core_accepts(comfy_server: ComfyServer) -> None:
    widgets = numeric_inputs(comfy_server.object_info())
    assert set(widgets) == set(CORE_RANGES) | NODE_ONLY, "a numeric widget without a stated core range"
    for (node, name), (where, limits) in CORE_RANGES.items():
        options = widgets[(node, name)]
        assert (options["min"], options["max"]) == (limits.low, limits.high), (node, name, options)
        if options["type"] == "INT":
            assert options["step"] == limits.step, (node, name, options)
        below = limits.low - (limits.step if options["type"] == "INT" else 1e-3)
        if (where, name) == ("settings", "seed"):
            below = RANDOM_SEED - 1  # -1 is the settings' "draw one" sentinel; the node's widget draws itself
        above = limits.high + (limits.step if options["type"] == "INT" else 1e-3)
        assert core_accepts(where, name, limits.low) and core_accepts(where, name, limits.high), (node, name)
        assert not core_accepts(where, name, below) and not core_accepts(where, name, above), (node, name)
    assert widgets[("PhantomSampler", "shift")]["min"] > 0  # the sampler's schedule needs shift > 0
    tile, overlap = widgets[("PhantomDecode", "tile_size")], widgets[("PhantomDecode", "tile_overlap")]
    assert tile["min"] == 0 and tile["step"] == 8 * MIN_TILE_LATENT  # 0 = untiled, then multiples of 32 px
    assert check_tiling(tile["max"] // 8, overlap["max"] // 8) == (tile["max"] // 8,) * 2
    assert check_tiling(MIN_TILE_LATENT, overlap["min"]) == (MIN_TILE_LATENT,) * 2
    # the image-guidance window and the step cache: the settings' ranges (start < end is checked jointly)
    for name in ("image_guidance_start", "image_guidance_end", "cache_threshold"):
        options, limits = widgets[("PhantomSampler", name)], SETTING_RANGES[name]
        assert (options["min"], options["max"]) == (limits.low, limits.high), (name, options)
    assert core_accepts("settings", "cache_threshold", 1.0) and not core_accepts("settings", "cache_threshold", -0.1)
    GenerationSettings("p", image_guidance_start=0.0, image_guidance_end=1.0)  # the widget defaults
    with pytest.raises(ValueError, match="image_guidance_start"):
        GenerationSettings("p", image_guidance_start=0.6, image_guidance_end=0.5)


@pytest.fixture(scope="module")
def image(comfy_server: ComfyServer, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("validation") / "ref.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(path)
    return comfy_server.upload_image(path)


def refusal(server: ComfyServer, prompt: dict, node: str) -> str:
    r = server.queue(prompt)
    assert r.status_code == 400, f"accepted: {json.dumps(prompt[node]['inputs'])[:500]}"
    return " | ".join(f"{e['message']}: {e.get('details', '')}" for e in r.json()["node_errors"][node]["errors"])


@pytest.mark.parametrize(("value", "words"), [
    (1000001, "frames: got 1000001; expected an integer from 1 to 4097"), (1, None),
    ("five", "frames: got 'five'; expected an integer"), (6, "4k+1"), (0, "from 1 to 4097"),
    (4.5, "got 4;"),  # ComfyUI truncates a number to int before any validator sees it
])
def test_frames_is_type_and_range_checked_at_prompt(comfy_server: ComfyServer, image: str, value, words) -> None:
    prompt = pipeline_prompt([image], sampler={"frames": value})
    if words is None:  # a valid value passes and runs (waited for: other tests compare the output folder)
        entry = comfy_server.run(pipeline_prompt([image], sampler={"frames": value}, prefix="valid_frames"))
        assert entry["status"]["status_str"] == "success", comfy_server.log()
        return
    message = refusal(comfy_server, prompt, "sampler")
    assert words in message and "not supported between" not in message, message


def test_every_numeric_input_refuses_a_word_and_a_value_past_its_max(comfy_server: ComfyServer, image: str) -> None:
    """Over the whole node chain: whoever checks (ComfyUI or our validator), the error names the input."""
    widgets = numeric_inputs(comfy_server.object_info())
    prompt = pipeline_prompt([image])
    checked = 0
    for node_id, node in prompt.items():
        for name in node["inputs"]:
            options = widgets.get((node["class_type"], name))
            if options is None:
                continue
            past = options["max"] + (options.get("step") or 1)
            for value in ("five", past):
                bad = pipeline_prompt([image], **{node_id: {name: value}})
                message = refusal(comfy_server, bad, node_id)
                assert name in message, (node["class_type"], name, value, message)
                checked += 1
    assert checked == 2 * 14  # sampler 8, encode references 2, decode 2, save video 2


def test_unlisted_combo_values_fail_on_their_node_naming_the_input(comfy_server: ComfyServer, image: str) -> None:
    """ComfyUI checks no V3 combo at /prompt: a value outside the list fails on its node (before the sampler loads
    the DiT), naming the input and the valid values."""
    for node, name, value, words in [("sampler", "solver", "ddim", "solver is 'ddim'; valid: unipc, euler"),
                                     ("refs", "mode", "fit", "mode is 'fit'; valid: letterbox, crop"),
                                     ("sampler", "attention", "xformers",
                                      "attention: got 'xformers'; valid: auto, sdpa, flash, sage, math")]:
        entry = comfy_server.run(pipeline_prompt([image], prefix=f"bad_{name}", **{node: {name: value}}))
        assert entry["status"]["status_str"] == "error" and words in history_error(entry), history_error(entry)
