"""PhantomReferences (collect 1..4 subject images), PhantomEncodeReferences (each -> its own 1-frame latent) and
PhantomCLIPEncodeReferences (each -> its CLIP features too, for the paper's MMDiT).

Phantom conditions on every reference image as a separate single-frame VAE latent appended after the video
latents on the time axis; see `phantom_core.references`. The paper's MMDiT also reads each reference's CLIP
features (`phantom_core.mmdit.clip`). They are added by a node of their own, chained after Phantom Encode
References on the same references, so that node and the workflows built on it stay as they are; it checks that
both encode the same number of references, and carries the CLIP features inside the reference latents, so the two
encodings of each reference travel together to the sampler.
"""

from __future__ import annotations

import comfy.model_management as mm
import torch
from comfy_api.latest import io, ui

from phantom_core.inference.settings import SETTING_RANGES
from phantom_core.log import logger
from phantom_core.mmdit.clip import CLIP_OUTPUTS, encode_clip_references
from phantom_core.references import (
    MAX_REFERENCES,
    REFERENCE_MODES,
    encode_references,
    tensor_to_pil,
    uniform_reference_warning,
    validate_references,
)
from phantom_core.wan.latents import denormalize_latents

from .types import CATEGORY, PhantomClipVision, PhantomRefLatents, PhantomVAE, core
from .types import PhantomReferences as PhantomReferencesType
from .widgets import int_input, show_on_node


def with_alpha(batch: torch.Tensor, mask: torch.Tensor | None, name: str) -> torch.Tensor:
    """IMAGE `[B, H, W, C]` + ComfyUI MASK (`[B, H, W]` / `[H, W]`, 1 = transparent, as LoadImage gives it)
    -> `[B, H, W, 4]` RGBA (alpha = 1 - mask), or `[B, H, W, 3]` without a usable mask.

    LoadImage returns a 64x64 all-zero mask for an image without alpha: a mask of another size that is all
    zero means "opaque". Raises ValueError naming `name` for a non-zero mask of another size.
    """
    rgb = batch[..., :3].cpu()
    if mask is None:
        return rgb
    mask = mask.cpu().float()
    mask = mask.expand(rgb.shape[0], *mask.shape) if mask.ndim == 2 else mask  # (B, h, w)
    if mask.shape != rgb.shape[:3]:
        if not mask.any():
            return rgb
        raise ValueError(f"{name} is {tuple(mask.shape)} but its image is {tuple(rgb.shape[:3])} (B, H, W); "
                         "connect the MASK output of the same Load Image node")
    return torch.cat([rgb, (1.0 - mask).unsqueeze(-1)], dim=-1)  # (B, H, W, 4)


def split_references(batches: list[torch.Tensor | None],
                     masks: list[torch.Tensor | None]) -> list[tuple[str, torch.Tensor]]:
    """IMAGE batches `[B, H, W, C]` (None = unconnected) and their optional MASKs -> `(label, [H, W, 3 or 4])` per
    image, in input order (4 channels: alpha from the mask, composited over white downstream). The label names
    the input: "image_2", or "image_1 frame 3" for an image of a batch."""
    return [(f"image_{k}" if len(batch) == 1 else f"image_{k} frame {i}", img)
            for k, (batch, mask) in enumerate(zip(batches, masks), start=1) if batch is not None
            for i, img in enumerate(with_alpha(batch, mask, f"mask_{k}"), start=1)]


def reference_notes(batches: list[torch.Tensor | None], labelled: list[tuple[str, torch.Tensor]]) -> list[str]:
    """What the user should know about the references: an input holding several frames (an animated GIF through
    Load Image, or a batch), and each blank or nearly uniform image (`uniform_reference_warning`)."""
    notes = [f"image_{k} holds {len(batch)} frames: each becomes a reference"
             for k, batch in enumerate(batches, start=1) if batch is not None and len(batch) > 1]
    warnings = (uniform_reference_warning(tensor_to_pil(img), label) for label, img in labelled)
    return notes + [w for w in warnings if w is not None]


class PhantomReferences(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        tip = "Subject reference image(s); a batch counts as one reference per image. 1 to 4 in total."
        mask_tip = ("Optional MASK of the same input (Load Image's MASK output): transparent parts of the reference "
                    "are composited over white, as the official code does for cut-out subjects.")
        return io.Schema(
            node_id="PhantomReferences",
            display_name="Phantom References",
            category=CATEGORY,
            description="Collects 1 to 4 subject reference images, in order, for Phantom subject-to-video. Says "
                        "on the node when an input holds several frames or an image is blank or nearly uniform.",
            inputs=[
                io.Image.Input("image_1", tooltip=tip),
                *[io.Image.Input(f"image_{k}", optional=True, tooltip=tip) for k in range(2, MAX_REFERENCES + 1)],
                io.Combo.Input("mode", options=list(REFERENCE_MODES), default=REFERENCE_MODES[0],
                               tooltip="letterbox: fit inside the frame and pad white (official Phantom); "
                                       "crop: scale to cover the frame and centre-crop."),
                *[io.Mask.Input(f"mask_{k}", optional=True, tooltip=mask_tip) for k in range(1, MAX_REFERENCES + 1)],
            ],
            hidden=[io.Hidden.unique_id],
            outputs=[PhantomReferencesType.Output(display_name="references")],
        )

    @classmethod
    def execute(cls, image_1, mode: str, image_2=None, image_3=None, image_4=None, mask_1=None, mask_2=None,
                mask_3=None, mask_4=None) -> io.NodeOutput:
        if mode not in REFERENCE_MODES:  # ComfyUI checks no V3 combo
            raise ValueError(f"mode is {mode!r}; valid: {', '.join(REFERENCE_MODES)}")
        batches = [image_1, image_2, image_3, image_4]
        labelled = split_references(batches, [mask_1, mask_2, mask_3, mask_4])
        if not 1 <= len(labelled) <= MAX_REFERENCES:
            raise ValueError(f"references: got {len(labelled)} images in total over image_1..image_4; "
                             f"Phantom takes 1 to {MAX_REFERENCES} reference images")
        images = [img for _, img in labelled]
        validate_references([tensor_to_pil(img) for img in images])
        notes = reference_notes(batches, labelled)
        for note in notes:
            logger.warning("PhantomReferences: %s", note)
        if notes:
            show_on_node("\n".join(notes), cls.hidden.unique_id)
        return io.NodeOutput({"images": images, "mode": mode}, ui=ui.PreviewText("\n".join(notes)) if notes else None)


class PhantomEncodeReferences(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PhantomEncodeReferences",
            display_name="Phantom Encode References",
            category=CATEGORY,
            description="Resizes each reference to the video size and VAE-encodes it as its own 1-frame latent.",
            inputs=[
                PhantomVAE.Input("vae", tooltip="From Phantom VAE Loader."),
                PhantomReferencesType.Input("references", tooltip="From Phantom References."),
                int_input("width", SETTING_RANGES["width"], 832,
                          "Video width in px (multiple of 16); must equal the sampler's width."),
                int_input("height", SETTING_RANGES["height"], 480,
                          "Video height in px (multiple of 16); must equal the sampler's height."),
            ],
            outputs=[PhantomRefLatents.Output(display_name="reference_latents")],
        )

    @classmethod
    def execute(cls, vae, references: dict, width: int, height: int) -> io.NodeOutput:
        mm.load_models_gpu([vae])
        pils = [tensor_to_pil(img) for img in references["images"]]
        latents = encode_references(core(vae), pils, width, height, references["mode"])  # (1, 16, N, h, w) normalized
        raw = denormalize_latents(latents.float()).to(mm.intermediate_device())
        return io.NodeOutput({"samples": raw, "width": width, "height": height})


class PhantomCLIPEncodeReferences(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PhantomCLIPEncodeReferences",
            display_name="Phantom CLIP Encode References",
            category=CATEGORY,
            description="Adds each reference's CLIP features to its VAE latents, for a Phantom MMDiT (the paper's "
                        "network reads both; Phantom-Wan ignores the CLIP features).",
            inputs=[
                PhantomClipVision.Input("clip_vision", tooltip="From Phantom CLIP Vision Loader."),
                PhantomReferencesType.Input("references",
                                            tooltip="From Phantom References: the same node that feeds Phantom "
                                                    "Encode References."),
                PhantomRefLatents.Input("reference_latents", tooltip="From Phantom Encode References."),
                io.Combo.Input("clip_output", options=list(CLIP_OUTPUTS), default=CLIP_OUTPUTS[0],
                               tooltip="tokens: the penultimate block's tokens (257 x 1280 for ViT-H-14, as Wan "
                                       "I2V); pooled: the projected image embedding (1 x 1024). Must match what "
                                       "the MMDiT was trained on. Each image is letterboxed on white."),
            ],
            outputs=[PhantomRefLatents.Output(display_name="reference_latents")],
        )

    @classmethod
    def execute(cls, clip_vision, references: dict, reference_latents: dict, clip_output: str) -> io.NodeOutput:
        if clip_output not in CLIP_OUTPUTS:  # ComfyUI checks no V3 combo
            raise ValueError(f"clip_output is {clip_output!r}; valid: {', '.join(CLIP_OUTPUTS)}")
        n_latents, n_images = reference_latents["samples"].shape[2], len(references["images"])
        if n_latents != n_images:
            raise ValueError(f"reference_latents hold {n_latents} references but references has {n_images} images; "
                             "connect the same Phantom References node to both encoders")
        mm.load_models_gpu([clip_vision])
        pils = [tensor_to_pil(img) for img in references["images"]]
        clip = encode_clip_references(core(clip_vision), pils, clip_output)  # (1, N, T, C) float32
        clip = clip.to(mm.intermediate_device())
        return io.NodeOutput(reference_latents | {"clip": clip, "clip_output": clip_output})
