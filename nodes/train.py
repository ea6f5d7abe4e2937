"""PhantomTrainLoRA: train a Phantom LoRA inside ComfyUI (phantom_core.training), save it to models/loras.

Boundary work only: resolve the dataset folder (strictly inside ComfyUI's input or models folder) and the LoRA
file name, cache the data with the connected VAE and text encoder (through ComfyUI's memory manager), free the
GPU, train a trainable copy of the connected DiT, report progress and the loss, stop on Cancel (the last
checkpoint is kept, so `resume` continues from it), free the GPU again. Outputs ComfyUI's own LORA_MODEL (the
LoRA state dict, in the layout its Save LoRA node writes) and LOSS_MAP (`{"loss": [per-step losses]}`, for its
Plot Loss Graph node), and the saved file's name under models/loras (for Phantom Load LoRA).

The name's type is ``STRING,COMBO`` (a union, as ComfyUI writes several types): a string for any STRING input, and
linkable to a combo widget such as Phantom Load LoRA's ``lora_name``, which a plain STRING is not (ComfyUI 0.3.75's
/prompt check and the frontend's LiteGraph.isValidConnection both compare types, and a V3 combo input's is COMBO).
That link is what lets one workflow train and then sample with the new file: the loader runs after the trainer,
and its validator, which checks only values typed in (not linked ones), does not refuse a file not yet written.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

import comfy.model_management as mm
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io
from safetensors.torch import load_file

from phantom_core.loading.disk import resolve_inside
from phantom_core.loading.fp8 import is_fp8
from phantom_core.training.cache import module_fingerprint
from phantom_core.training.config import TRAIN_RANGES as R
from phantom_core.training.config import TrainConfig
from phantom_core.training.loop import TrainResult, prepare_dataset, train
from phantom_core.training.model import base_dtype
from phantom_core.wan.load import load_dit

from .types import CATEGORY, PhantomDiT, PhantomTextEncoder, PhantomVAE, core
from .widgets import float_input, int_input, show_on_node

LoraModel = io.Custom("LORA_MODEL")  # ComfyUI's type (comfy_extras/nodes_train.py): {key: tensor}
LossMap = io.Custom("LOSS_MAP")  # ComfyUI's type: {"loss": [float, ...]}
LoraFileName = io.Custom("STRING,COMBO")  # a str: into STRING inputs and combo widgets alike (module docstring)
MODELS_PREFIX = "models/"  # a dataset name starting with this is looked up under ComfyUI's models folder
RUNS_FOLDER = "phantom_training"  # <output>/phantom_training/<lora name>/: checkpoints, log, loss plot, cache


def path_inside(root: str | os.PathLike, name: str, input_name: str, where: str) -> Path:
    """``name`` inside ``root`` by the project's one rule (``loading.disk.resolve_inside``: no absolute path, no
    ``..``, no symbolic link leading out): the resolved path when it exists, else where it will be created (its
    nearest existing parent checked by the same rule). Raises ValueError naming ``input_name``."""
    found = resolve_inside([root], name, input_name, where=where)
    if found is not None:
        return found
    parent = PurePosixPath(name.replace("\\", "/")).parent
    while str(parent) != "." and resolve_inside([root], str(parent), input_name, where=where) is None:
        parent = parent.parent
    return Path(os.path.realpath(root), name)


def dataset_folder(name: str) -> Path:
    """The dataset folder: ``name`` under ComfyUI's input folder, or, for ``models/<path>``, under its models
    folder. Raises ValueError naming `dataset` when it is outside them or not an existing folder there."""
    if name.replace("\\", "/").startswith(MODELS_PREFIX):
        path = path_inside(folder_paths.models_dir, name[len(MODELS_PREFIX):], "dataset", "ComfyUI's models folder")
    else:
        path = path_inside(folder_paths.get_input_directory(), name, "dataset", "ComfyUI's input folder")
    if not path.is_dir():
        raise ValueError(f"dataset {name!r}: no folder {path} (a folder of samples under ComfyUI's input folder, "
                         f"or {MODELS_PREFIX}<folder> under its models folder; see the README)")
    return path


def lora_file(name: str) -> tuple[Path, str]:
    """``(path, name as listed)`` of the LoRA to write under models/loras (``.safetensors`` appended)."""
    name = name if name.endswith(".safetensors") else f"{name}.safetensors"
    return path_inside(folder_paths.get_folder_paths("loras")[0], name, "lora_name", "models/loras"), name


def trainable_copy(patcher, config: TrainConfig, device: torch.device):
    """A trainable DiT with the weights of ComfyUI's model (copied: ComfyUI's own tensors are inference tensors,
    frozen and shared with the sampler), on ``device``; fp8 weights are dequantized."""
    dtype = base_dtype(config, device)
    keep = ("scale_weight", "scale_input", "scaled_fp8")  # fp8 weights and their scales: load_dit dequantizes
    state = {k: v.detach().clone() if is_fp8(v.dtype) or k.endswith(keep)
             else v.detach().to(device=device, dtype=dtype, copy=True) for k, v in core(patcher).state_dict().items()}
    return load_dit(state, dtype=dtype, device=device, trainable=True)


def run_training(config: TrainConfig, model, vae, text_encoder, node_id: str | None) -> TrainResult:
    """Cache the data (VAE + text encoder through ComfyUI's memory manager), free the GPU, train, report."""
    if (vae is None) != (text_encoder is None):
        raise ValueError("connect both vae and text_encoder (to encode the dataset), or neither (to train from a "
                         "latent cache made by an earlier run with the same lora_name)")
    encoders = fingerprints = None
    if vae is not None:
        fingerprints = {"vae": module_fingerprint(core(vae)), "text_encoder": module_fingerprint(core(text_encoder))}

        def encoders():
            mm.load_models_gpu([vae, text_encoder])
            return core(vae), core(text_encoder)
    data, _ = prepare_dataset(config, encoders, fingerprints, contained=True)
    mm.unload_all_models()  # the GPU is the trainer's until the end
    mm.soft_empty_cache()
    dit = trainable_copy(model, config, mm.get_torch_device())
    bar = comfy.utils.ProgressBar(config.steps)

    def on_step(step: int, total: int, loss: float) -> None:
        mm.throw_exception_if_processing_interrupted()
        bar.update_absolute(step, total)
        show_on_node(f"step {step}/{total}  loss {loss:.4f}", node_id)

    return train(config, dataset=data, model=dit, callback=on_step)


class PhantomTrainLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PhantomTrainLoRA",
            display_name="Phantom Train LoRA",
            category=CATEGORY,
            description="Trains a LoRA of the Phantom-Wan DiT on a dataset of clips, reference images and captions "
                        "(rectified flow with Phantom's reference conditioning) and saves it to models/loras.",
            is_output_node=True,
            inputs=[
                PhantomDiT.Input("model", tooltip="From Phantom DiT Loader; trained as a copy (the loaded model "
                                                  "stays as it is, without LoRAs applied to it by other nodes)."),
                io.String.Input("dataset", default="phantom_dataset",
                                tooltip="Dataset folder under ComfyUI's input folder (or models/<folder>): one "
                                        "sub-folder per sample with video.mp4 (or frames/), ref_*.png and "
                                        "caption.txt, or a manifest.jsonl (README, Training)."),
                io.String.Input("lora_name", default="phantom_lora",
                                tooltip="File written under models/loras (.safetensors added); its run folder "
                                        "(checkpoints, log, loss plot, latent cache) is output/phantom_training/"
                                        "<lora_name>/. The same name with resume continues a run."),
                int_input("steps", R["steps"], 500, "Optimizer steps."),
                float_input("learning_rate", R["learning_rate"], 1e-4, 1e-5, "AdamW learning rate."),
                int_input("rank", R["lora_rank"], 16, "LoRA rank."),
                float_input("alpha", R["lora_alpha"], 16.0, 0.5, "LoRA alpha: the update is scaled by alpha / rank."),
                int_input("batch_size", R["batch_size"], 1, "Samples per optimizer step."),
                int_input("width", R["width"], 832, "Training width in px (clips are scaled and centre-cropped)."),
                int_input("height", R["height"], 480, "Training height in px."),
                int_input("frames", R["frames"], 81, "Frames per clip, 4k+1 (each clip's first frames)."),
                int_input("seed", R["seed"], 0, "Seed of the data order, timesteps, noise and dropout."),
                float_input("text_dropout", R["text_dropout"], 0.2, 0.01,
                            "Probability that a sample trains without its text (empty prompt)."),
                float_input("reference_dropout", R["reference_dropout"], 0.1, 0.01,
                            "Probability that a sample trains with all-zero references (and, when below "
                            "text_dropout, without text too: the guidance's v_neg pass)."),
                int_input("checkpoint_every", R["checkpoint_every"], 100,
                          "Write a checkpoint every N steps (and at the end)."),
                io.Boolean.Input("resume", default=False,
                                 tooltip="Continue from the latest checkpoint of this lora_name's run."),
                PhantomVAE.Input("vae", optional=True,
                                 tooltip="Encodes the clips and references once (with text_encoder); leave both "
                                         "unconnected to train from an earlier run's latent cache."),
                PhantomTextEncoder.Input("text_encoder", optional=True, tooltip="Encodes the captions once."),
            ],
            outputs=[LoraModel.Output(display_name="lora", tooltip="The LoRA weights (ComfyUI's Save LoRA)."),
                     LossMap.Output(display_name="loss_map", tooltip="Per-step losses (ComfyUI's Plot Loss Graph)."),
                     LoraFileName.Output(display_name="lora_name",
                                         tooltip="The saved file under models/loras: into Phantom Load LoRA's "
                                                 "lora_name (or any text input).")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, dataset: str, lora_name: str, steps: int, learning_rate: float, rank: int, alpha: float,
                batch_size: int, width: int, height: int, frames: int, seed: int, text_dropout: float,
                reference_dropout: float, checkpoint_every: int, resume: bool, vae=None,
                text_encoder=None) -> io.NodeOutput:
        folder = dataset_folder(dataset)
        out, name = lora_file(lora_name)
        runs = Path(folder_paths.get_output_directory()) / RUNS_FOLDER
        runs.mkdir(parents=True, exist_ok=True)
        run_dir = path_inside(runs, name.removesuffix(".safetensors"), "lora_name", f"output/{RUNS_FOLDER}")
        config = TrainConfig(dataset=str(folder), out=str(out), run_dir=str(run_dir), mode="lora", steps=steps,
                             learning_rate=learning_rate, lora_rank=rank, lora_alpha=alpha, batch_size=batch_size,
                             width=width, height=height, frames=frames, seed=seed, text_dropout=text_dropout,
                             reference_dropout=reference_dropout, checkpoint_every=checkpoint_every, resume=resume,
                             device=str(mm.get_torch_device()))
        try:
            with torch.inference_mode(False), torch.enable_grad():
                result = run_training(config, model, vae, text_encoder, cls.hidden.unique_id)
        finally:
            mm.soft_empty_cache()  # the trained copy and the optimizer are gone: the GPU is free for sampling
        return io.NodeOutput(load_file(str(out)), {"loss": result.losses}, name)
