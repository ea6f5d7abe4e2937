"""PhantomLoadLoRA: one LoRA file from ComfyUI's models/loras applied to a PHANTOM_DIT at a strength.

The LoRA becomes weight patches on a clone of the DiT's ModelPatcher (`ModelPatcher.add_patches`, as ComfyUI's own
LoraLoaderModelOnly does): ComfyUI's memory manager adds them to the weights when it loads the model and restores
the base weights when it unloads or switches models, so the loaded DiT is never changed and nodes chain (each adds
its patches to a new clone). Full-weight deltas on parameters ComfyUI's patcher skips (`blocks.N.modulation`) become
object patches of the same patcher. Reading and checking the file (any layout `phantom_core.lora.keys` reads; keys of no
module and shapes of another model size are refused) is `phantom_core.lora`.
"""

from __future__ import annotations

import os

import folder_paths
import torch
from comfy.weight_adapter.lora import LoRAAdapter
from comfy_api.latest import io

from phantom_core.lora.apply import WeightPatch, check_lora
from phantom_core.lora.keys import read_lora

from .types import CATEGORY, PhantomDiT, core

FOLDER = "loras"


def lora_name_error(name: str | None) -> str | None:
    """The message for a `lora_name` that is not a file listed in models/loras, else None.

    Minimal containment check (a shared path-containment helper is planned; this one is local until it lands):
    no absolute path, no `..` component, and the name must be one of ComfyUI's own listing of the folder.
    """
    if name is None:
        return None
    parts = name.replace("\\", "/").split("/")
    if os.path.isabs(name) or name.startswith(("/", "\\")) or ".." in parts:
        return f"lora_name is {name!r}; it must be a file name inside models/{FOLDER} (no absolute path, no '..')"
    available = folder_paths.get_filename_list(FOLDER)
    if name not in available:
        return (f"lora_name is {name!r}, which is not in models/{FOLDER} "
                f"(available: {', '.join(available[:10]) or 'none'})")
    return None


def lora_path(name: str) -> str:
    """Full path of `name` inside a models/loras folder; ValueError naming `lora_name` otherwise (including a
    symlink or listing entry that resolves outside every models/loras folder)."""
    if (message := lora_name_error(name)) is not None:
        raise ValueError(message)
    path = folder_paths.get_full_path_or_raise(FOLDER, name)
    bases = [os.path.realpath(b) for b in folder_paths.get_folder_paths(FOLDER)]
    real = os.path.realpath(path)
    if not any(os.path.commonpath([real, b]) == b for b in bases):
        raise ValueError(f"lora_name is {name!r}, which resolves outside models/{FOLDER} ({real})")
    return path


def comfy_patches(patches: list[WeightPatch], prefix: str) -> dict[str, object]:
    """Our weight patches as ComfyUI patches keyed by the patcher's state-dict keys (`prefix` + our key).

    Low-rank pairs become ComfyUI's `LoRAAdapter` (it adds `alpha / rank * up @ down`: alpha is set to
    `factor * rank`, so the factor, strength included, comes out); full deltas ComfyUI's `("diff", (delta,))`.
    ComfyUI adds a patch to the *stored* tensor, so for a scaled-fp8 layer the delta is divided by its
    `scale_weight` (the layer multiplies the stored tensor by it).
    """
    out: dict[str, object] = {}
    for p in patches:
        factor = p.factor / (p.stored_scale or 1.0)
        if p.diff is not None:
            out[prefix + p.key] = ("diff", (p.diff.float() * factor,))
        else:
            rank = p.down.shape[0]
            out[prefix + p.key] = LoRAAdapter(set(), (p.up, p.down, factor * rank, None, None, None))
    return out


def skipped_by_patcher(patcher, key: str) -> bool:
    """True when ComfyUI's ModelPatcher would never apply a weight patch on `key`: it patches only the
    parameters of modules without parameter-holding children, so a parameter of a module that also has
    submodules (`blocks.N.modulation`, `head.modulation`) is skipped (silently, in its own LoRA loader too)."""
    owner = patcher.model.get_submodule(key.rpartition(".")[0])
    return any(True for _ in owner.children())


def add_to_patcher(patcher, patches: list[WeightPatch], prefix: str) -> None:
    """Add `patches` to `patcher` (a clone): weight patches where ComfyUI applies them, and for the parameters it
    skips an object patch holding the patched parameter (set when the model is loaded, restored when unloaded;
    built on any earlier object patch of the chain)."""
    skipped = [skipped_by_patcher(patcher, prefix + p.key) for p in patches]
    wanted = comfy_patches([p for p, skip in zip(patches, skipped) if not skip], prefix)
    applied = set(patcher.add_patches(wanted, 1.0))
    if missing := sorted(set(wanted) - applied):  # an internal invariant: check_lora found these keys
        raise RuntimeError(f"ModelPatcher did not take the patches for {missing[:5]}")
    for p in (p for p, skip in zip(patches, skipped) if skip):
        current = patcher.get_model_object(prefix + p.key)
        new = current.detach().float() + p.delta(current.device, current.shape)
        patcher.add_object_patch(prefix + p.key, torch.nn.Parameter(new.to(current.dtype), requires_grad=False))


class PhantomLoadLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PhantomLoadLoRA",
            display_name="Phantom Load LoRA",
            category=CATEGORY,
            description="Applies a LoRA from models/loras to a Phantom-Wan DiT at a strength, as ComfyUI weight "
                        "patches (the loaded weights stay untouched; chain several nodes for several LoRAs).",
            inputs=[
                PhantomDiT.Input("model", tooltip="From Phantom DiT Loader (or another Phantom Load LoRA)."),
                io.Combo.Input("lora_name", options=folder_paths.get_filename_list(FOLDER),
                               tooltip="LoRA file in models/loras for Wan2.1 T2V / Phantom-Wan of this size: "
                                       "ComfyUI, kohya / musubi, diffusion-pipe, ai-toolkit or diffusers layout."),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="1.0: as trained; 0: off; negative inverts the LoRA's effect."),
            ],
            outputs=[PhantomDiT.Output(display_name="model")],
        )

    @classmethod
    def validate_inputs(cls, lora_name: str | None = None) -> bool | str:
        return lora_name_error(lora_name) or True

    @classmethod
    def execute(cls, model, lora_name: str, strength: float) -> io.NodeOutput:
        path = lora_path(lora_name)
        try:
            patches = check_lora(read_lora(path), core(model), strength)
        except ValueError as err:
            raise ValueError(f"lora_name {lora_name!r}: {err}") from None
        patched = model.clone()
        add_to_patcher(patched, patches, prefix="inner.")  # the patcher manages types.ManagedModule(.inner = DiT)
        return io.NodeOutput(patched)
