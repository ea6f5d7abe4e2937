"""ComfyUI V3 adapters for phantom_core (registered through `comfy_entrypoint` in the repository root)."""

from __future__ import annotations

from comfy_api.latest import io

from .decode import PhantomDecode
from .loaders import PhantomCLIPVisionLoader, PhantomDiTLoader, PhantomTextEncoderLoader, PhantomVAELoader
from .lora import PhantomLoadLoRA
from .references import PhantomCLIPEncodeReferences, PhantomEncodeReferences, PhantomReferences
from .rephrase import REPHRASE_NODES
from .sampler import PhantomSampler
from .save_video import PhantomSaveVideo
from .text_encode import PhantomTextEncode
from .train import PhantomTrainLoRA

PHANTOM_NODES: list[type[io.ComfyNode]] = [
    PhantomDiTLoader,
    PhantomVAELoader,
    PhantomTextEncoderLoader,
    PhantomLoadLoRA,
    PhantomCLIPVisionLoader,
    PhantomTextEncode,
    PhantomReferences,
    PhantomEncodeReferences,
    PhantomCLIPEncodeReferences,
    PhantomSampler,
    PhantomDecode,
    PhantomSaveVideo,
    *REPHRASE_NODES,
    PhantomTrainLoRA,
]
