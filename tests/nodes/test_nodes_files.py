"""The loader nodes on the file formats people have, through a real headless ComfyUI (issue: "the files people
actually have"): a scaled-fp8 DiT runs and stays 8-bit, a sharded index is listed and loads, and a wrong file
(a VAE or text encoder picked as the DiT, a truncated file, a non-checkpoint) fails on the node itself with a
message naming the file and the problem, before any sampling, and writes nothing."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from phantom_core.loading.fp8 import quantize_state_dict
from phantom_core.video_io import probe_mp4
from phantom_core.wan.umt5 import SPIECE_KEY
from tests.support.comfy import history_error
from tools.comfy_launcher import ComfyServer
from tools.make_workflows import api_path

ROOT = Path(__file__).resolve().parents[2]
DIT_NODE, VAE_NODE, TEXT_ENCODER_NODE = "1", "2", "3"
SAMPLER_NODE, SAVE_NODE, ENCODE_REFS_NODE = "30", "32", "21"
HTML = "<!DOCTYPE html><html><body><h1>Access denied</h1></body></html>\n"


def tiny_prompt(server: ComfyServer, examples_dir: Path, dit_name: str, prefix: str,
                inputs: dict[str, dict] | None = None) -> dict:
    """The shipped 1-reference API workflow at 32x32, 1 frame, 2 steps, with `dit_name` as the DiT and
    `inputs` ({node id: {input: value}}) changed."""
    prompt = json.loads(api_path("phantom_1ref").read_text(encoding="utf-8"))
    prompt = copy.deepcopy(prompt)
    prompt["10"]["inputs"]["image"] = server.upload_image(examples_dir / "ref1.jpg")
    prompt[DIT_NODE]["inputs"]["dit_name"] = dit_name
    for node, values in (inputs or {}).items():
        prompt[node]["inputs"] |= values
    prompt[ENCODE_REFS_NODE]["inputs"] |= {"width": 32, "height": 32}
    prompt[SAMPLER_NODE]["inputs"] |= {"width": 32, "height": 32, "frames": 1, "steps": 2}
    prompt[SAVE_NODE]["inputs"]["filename_prefix"] = prefix
    return prompt


@pytest.fixture(scope="module")
def dit_folder(comfy_server: ComfyServer) -> Path:
    return comfy_server.base / "models" / "diffusion_models"


def test_scaled_fp8_dit_runs_through_the_nodes(comfy_server: ComfyServer, examples_dir: Path, dit_folder: Path):
    sd = load_file(dit_folder / "phantom_tiny_dit.safetensors")
    linears = [k for k, v in sd.items() if k.startswith("blocks.") and k.endswith(".weight") and v.ndim == 2]
    save_file(quantize_state_dict(sd, linears), dit_folder / "tiny_fp8_scaled.safetensors")
    entry = comfy_server.run(tiny_prompt(comfy_server, examples_dir, "tiny_fp8_scaled.safetensors", "fp8"))
    assert entry["status"]["status_str"] == "success", history_error(entry) + comfy_server.log()
    [video] = [Path(comfy_server.output_dir, v["subfolder"], v["filename"])
               for out in entry["outputs"].values() for v in out.get("images", []) + out.get("videos", [])
               if v["filename"].endswith(".mp4")] or [None]
    assert video is not None and probe_mp4(video)["frames"] == 1
    assert "weights torch.float8_e4m3fn" in comfy_server.log(40000), "the DiT loader did not keep fp8 weights"


def test_sharded_index_is_listed_and_loads(comfy_server: ComfyServer, examples_dir: Path, dit_folder: Path):
    sd = load_file(dit_folder / "phantom_tiny_dit.safetensors")
    shard_dir = dit_folder / "tiny_sharded"
    shard_dir.mkdir(exist_ok=True)
    keys = sorted(sd)
    halves = {"tiny-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "tiny-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    weight_map = {}
    for name, part in halves.items():
        save_file({k: sd[k] for k in part}, shard_dir / name)
        weight_map |= {k: name for k in part}
    index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in sd.values())},
             "weight_map": weight_map}
    (shard_dir / "tiny.safetensors.index.json").write_text(json.dumps(index), encoding="utf-8")
    options = comfy_server.object_info()["PhantomDiTLoader"]["input"]["required"]["dit_name"]
    listed = options[1]["options"] if isinstance(options[0], str) else options[0]
    assert "tiny_sharded/tiny.safetensors.index.json" in listed
    entry = comfy_server.run(tiny_prompt(comfy_server, examples_dir, "tiny_sharded/tiny.safetensors.index.json",
                                         "sharded"))
    assert entry["status"]["status_str"] == "success", history_error(entry) + comfy_server.log()


def write_bad_files(dit_folder: Path, models: Path) -> dict[str, str]:
    """name in models/diffusion_models -> the problem its error must state (besides naming the file)."""
    vae = models / "vae" / "phantom_tiny_vae.safetensors"
    te = models / "text_encoders" / "phantom_tiny_umt5.safetensors"
    (dit_folder / "a_vae.safetensors").write_bytes(vae.read_bytes())
    (dit_folder / "a_text_encoder.safetensors").write_bytes(te.read_bytes())
    dit = (dit_folder / "phantom_tiny_dit.safetensors").read_bytes()
    (dit_folder / "truncated.safetensors").write_bytes(dit[: len(dit) // 2])
    (dit_folder / "not_a_checkpoint.safetensors").write_bytes(b"hello, this is not a checkpoint" * 10)
    return {"a_vae.safetensors": "is a VAE", "a_text_encoder.safetensors": "text encoder",
            "truncated.safetensors": "is truncated", "not_a_checkpoint.safetensors": "not a safetensors file"}


def assert_fails_on(server: ComfyServer, prompt: dict, node_type: str, name: str, phrase: str) -> None:
    """Running `prompt` fails on `node_type` with an error naming file `name` and saying `phrase`; no output."""
    before = server.output_files()
    entry = server.run(prompt)
    error = history_error(entry)
    assert entry["status"]["status_str"] == "error", f"{name} was accepted"
    assert error.startswith(f"{node_type}:"), f"{name}: the error is not on {node_type}: {error}"
    assert name in error, f"the error does not name the file {name}: {error!r}"
    assert phrase in error, f"{name}: {error!r} does not say {phrase!r}"
    assert "weights_only=False" not in error, error
    assert server.output_files() == before, f"{name} left an output file"


def test_wrong_files_fail_on_the_loader_node(comfy_server: ComfyServer, examples_dir: Path, dit_folder: Path):
    bad = write_bad_files(dit_folder, comfy_server.base / "models")
    for name, phrase in bad.items():
        prompt = tiny_prompt(comfy_server, examples_dir, name, f"bad_{name}")
        assert_fails_on(comfy_server, prompt, "PhantomDiTLoader", name, phrase)
    # a forced weight dtype takes another path through the loader (no stored-format probe): same error
    prompt = tiny_prompt(comfy_server, examples_dir, "truncated.safetensors", "bad_fp16",
                         {DIT_NODE: {"weight_dtype": "fp16"}})
    assert_fails_on(comfy_server, prompt, "PhantomDiTLoader", "truncated.safetensors", "is truncated")


def test_wrong_vae_and_text_encoder_files_fail_on_their_node(comfy_server: ComfyServer, examples_dir: Path):
    models = comfy_server.base / "models"
    vae = (models / "vae" / "phantom_tiny_vae.safetensors").read_bytes()
    (models / "vae" / "truncated_vae.safetensors").write_bytes(vae[: len(vae) // 3])
    (models / "vae" / "a_dit_as_vae.safetensors").write_bytes(
        (models / "diffusion_models" / "phantom_tiny_dit.safetensors").read_bytes())
    te = (models / "text_encoders" / "phantom_tiny_umt5.safetensors").read_bytes()
    (models / "text_encoders" / "truncated_umt5.safetensors").write_bytes(te[: len(te) - 100])
    (models / "text_encoders" / "access_denied.pth").write_text(HTML)
    cases = [(VAE_NODE, "vae_name", "PhantomVAELoader", "truncated_vae.safetensors", "is truncated"),
             (VAE_NODE, "vae_name", "PhantomVAELoader", "a_dit_as_vae.safetensors", "not a Wan2.1 VAE"),
             (TEXT_ENCODER_NODE, "text_encoder_name", "PhantomTextEncoderLoader", "truncated_umt5.safetensors",
              "is truncated"),
             (TEXT_ENCODER_NODE, "text_encoder_name", "PhantomTextEncoderLoader", "access_denied.pth",
              "is not a PyTorch checkpoint: it is an HTML page")]
    for node, field, node_type, name, phrase in cases:
        prompt = tiny_prompt(comfy_server, examples_dir, "phantom_tiny_dit.safetensors", f"bad_{name}",
                             {node: {field: name}})
        assert_fails_on(comfy_server, prompt, node_type, name, phrase)


def test_fp16_vae_cpu_text_encoder_and_nested_tokenizer(comfy_server: ComfyServer, examples_dir: Path):
    """A VAE stored in fp16, the text encoder on the CPU, and a tokenizer in a downloaded google/umt5-xxl
    folder (two levels deep) with a text encoder file that has none embedded: listed, and the workflow runs."""
    models = comfy_server.base / "models"
    vae = load_file(models / "vae" / "phantom_tiny_vae.safetensors")
    save_file({k: v.half() for k, v in vae.items()}, models / "vae" / "tiny_vae_fp16.safetensors")
    te = load_file(models / "text_encoders" / "phantom_tiny_umt5.safetensors")
    spiece = models / "text_encoders" / "google" / "umt5-xxl" / "spiece.model"
    spiece.parent.mkdir(parents=True, exist_ok=True)
    spiece.write_bytes(te.pop(SPIECE_KEY).numpy().tobytes())
    save_file(te, models / "text_encoders" / "tiny_umt5_no_tokenizer.safetensors")
    tokenizer = os.path.join("google", "umt5-xxl", "spiece.model")
    options = comfy_server.object_info()["PhantomTextEncoderLoader"]["input"]["required"]["tokenizer"]
    listed = options[1]["options"] if isinstance(options[0], str) else options[0]
    assert tokenizer in listed, listed
    prompt = tiny_prompt(comfy_server, examples_dir, "phantom_tiny_dit.safetensors", "fp16_vae",
                         {VAE_NODE: {"vae_name": "tiny_vae_fp16.safetensors"},
                          TEXT_ENCODER_NODE: {"text_encoder_name": "tiny_umt5_no_tokenizer.safetensors",
                                              "tokenizer": tokenizer, "device": "cpu"}})
    entry = comfy_server.run(prompt)
    assert entry["status"]["status_str"] == "success", history_error(entry) + comfy_server.log()
    videos = [v for out in entry["outputs"].values() for v in out.get("images", []) + out.get("videos", [])
              if v["filename"].endswith(".mp4")]
    assert len(videos) == 1


def test_gguf_dit_is_listed_and_runs_packed(comfy_server: ComfyServer, examples_dir: Path, dit_folder: Path):
    """A ComfyUI-GGUF style file (mixed K-quants) is offered by the DiT loader, stays packed with weight_dtype
    "default", and samples."""
    from tests.support.gguf_files import write_gguf

    sd = load_file(dit_folder / "phantom_tiny_dit.safetensors")
    big = lambda k, v: v.ndim == 2 and v.shape[-1] % 256 == 0 and v.numel() > 4096  # noqa: E731
    write_gguf(dit_folder / "tiny-Q5_K_M.gguf", sd, lambda k, v: ("Q6_K" if "ffn.2" in k else "Q5_K")
               if big(k, v) else "F32")
    options = comfy_server.object_info()["PhantomDiTLoader"]["input"]["required"]["dit_name"]
    assert "tiny-Q5_K_M.gguf" in json.dumps(options)
    entry = comfy_server.run(tiny_prompt(comfy_server, examples_dir, "tiny-Q5_K_M.gguf", "gguf"))
    assert entry["status"]["status_str"] == "success", history_error(entry) + comfy_server.log()
    assert "loaded GGUF DiT tiny" in comfy_server.log(40000), "the DiT loader did not keep the GGUF blocks packed"
