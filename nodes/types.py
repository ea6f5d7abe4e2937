"""The custom ComfyUI socket types that carry Phantom objects between our nodes.

Every model object travels wrapped in ComfyUI's `comfy.model_patcher.ModelPatcher`, so ComfyUI's memory
manager can load it to the GPU and offload it again. The patcher's `.model` is a `ManagedModule` holding our
module: ModelPatcher writes its bookkeeping (`device`, `model_lowvram`, ...) onto the module it manages, and
that must not collide with properties of our core classes (e.g. a read-only `device`).
"""

from __future__ import annotations

import comfy.model_patcher
import torch
from comfy_api.latest import io


class ManagedModule(torch.nn.Module):
    """The module ComfyUI's ModelPatcher manages: our core module as `.inner`, plus the patcher's attributes."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner


def manage(module: torch.nn.Module, load_device: torch.device, offload_device: torch.device):
    """Wrap an eval-mode, frozen `module` in a ModelPatcher (weights stay on `offload_device` until loaded)."""
    module.eval().requires_grad_(False)
    return comfy.model_patcher.ModelPatcher(ManagedModule(module), load_device=load_device,
                                            offload_device=offload_device)


def core(patcher) -> torch.nn.Module:
    """The phantom_core module inside a PHANTOM_DIT / PHANTOM_VAE / PHANTOM_TEXT_ENCODER / PHANTOM_CLIP_VISION
    patcher."""
    return patcher.model.inner

PhantomDiT = io.Custom("PHANTOM_DIT")
"""A ModelPatcher managing `phantom_core.wan.dit.PhantomWanDiT` or `phantom_core.mmdit.model.PhantomMMDiT` (see
`core`): either velocity model."""

PhantomVAE = io.Custom("PHANTOM_VAE")
"""A ModelPatcher managing `phantom_core.wan.vae.WanVAE`."""

PhantomTextEncoder = io.Custom("PHANTOM_TEXT_ENCODER")
"""A ModelPatcher managing `phantom_core.wan.umt5.UMT5TextEncoder`."""

PhantomReferences = io.Custom("PHANTOM_REFERENCES")
"""`{"images": list of [H, W, 3] (or [H, W, 4] RGBA: alpha from a mask) float 0..1 CPU tensors (1..4), "mode":
"letterbox" | "crop"}`."""

PhantomRefLatents = io.Custom("PHANTOM_REF_LATENTS")
"""`{"samples": raw VAE latents [1, 16, N, h, w] float, "width": px, "height": px}` (N references), plus, when a
CLIP vision tower was given, `"clip": [1, N, T, C] float CLIP features` and `"clip_output": "tokens" | "pooled"`."""

PhantomClipVision = io.Custom("PHANTOM_CLIP_VISION")
"""A ModelPatcher managing `phantom_core.mmdit.clip.ClipVision` (an open_clip image tower)."""

CATEGORY = "Phantom"
"""The "Add Node" menu category of every Phantom node."""
