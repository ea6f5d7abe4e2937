"""CLIP vision checkpoints -> open_clip's ``VisionTransformer`` keys and architecture (no open_clip import here).

Three layouts are read (ComfyUI's ``comfy/clip_vision.py`` accepts the same two first ones):

- **transformers / ComfyUI** (``models/clip_vision/clip_vision_h.safetensors``, the file Wan2.1 I2V workflows use;
  transformers' ``CLIPVisionModelWithProjection``): ``vision_model.embeddings.*``, ``vision_model.pre_layrnorm.*``,
  ``vision_model.encoder.layers.N.{layer_norm1,self_attn.{q,k,v,out}_proj,layer_norm2,mlp.fc1,mlp.fc2}.*``,
  ``vision_model.post_layernorm.*``, ``visual_projection.weight``; renamed by
  :func:`convert_transformers_clip_vision`;
- **open_clip** full checkpoints (``open_clip_model.safetensors`` / ``open_clip_pytorch_model.bin``): the
  ``visual.*`` part is kept (text tower, ``logit_scale`` ... ignored);
- **open_clip visual** alone (what ``ClipVision.state_dict()`` writes under ``visual.``).

The architecture comes from the shapes (:func:`infer_clip_vision_config`); the two values no shape holds, the head
width and the activation, come from the preset of the same shapes (ViT-H-14: 80, GELU; OpenAI ViT-L-14:
QuickGELU, as ComfyUI's ``clip_vision_config_vitl.json``), else open_clip's defaults (64, GELU).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from phantom_core.loading.keys import keep_prefixed, key_shape
from phantom_core.log import logger

_HF_LAYER = re.compile(r"vision_model\.encoder\.layers\.(\d+)\.(.+)")
_HF_NAMES = {  # transformers name -> open_clip VisionTransformer name, outside the encoder layers
    "vision_model.embeddings.class_embedding": "class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "positional_embedding",
    "vision_model.pre_layrnorm.weight": "ln_pre.weight",  # sic: transformers spells it "layrnorm"
    "vision_model.pre_layrnorm.bias": "ln_pre.bias",
    "vision_model.post_layernorm.weight": "ln_post.weight",
    "vision_model.post_layernorm.bias": "ln_post.bias",
}
_HF_LAYER_NAMES = {  # inside encoder layer N -> inside transformer.resblocks.N (q, k, v handled apart)
    "layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj", "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_HF_IGNORED = ("vision_model.embeddings.position_ids", "text_model.", "text_projection.", "logit_scale")


@dataclass(frozen=True)
class ClipVisionConfig:
    """An open_clip ViT image tower (``open_clip.transformer.VisionTransformer``, class-token pooling).

    ``width``: token width; ``layers``: residual attention blocks; ``head_width``: channels per head;
    ``patch_size`` / ``image_size``: px (square); ``mlp_dim``: MLP hidden width; ``output_dim``: width of the
    pooled, projected image embedding; ``quick_gelu``: OpenAI's ``x * sigmoid(1.702 x)`` instead of GELU.
    """

    width: int
    layers: int
    head_width: int
    patch_size: int
    image_size: int
    mlp_dim: int
    output_dim: int
    quick_gelu: bool = False

    def __post_init__(self) -> None:
        for name in ("width", "layers", "head_width", "patch_size", "image_size", "mlp_dim", "output_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"ClipVisionConfig.{name} is {getattr(self, name)}; it must be a positive integer")
        if self.width % self.head_width or self.image_size % self.patch_size:
            raise ValueError(f"ClipVisionConfig: width {self.width} must be a multiple of head_width "
                             f"{self.head_width} and image_size {self.image_size} of patch_size {self.patch_size}")

    @property
    def heads(self) -> int:
        return self.width // self.head_width

    @property
    def tokens(self) -> int:
        """Tokens per image: the class token plus one per patch (257 for ViT-H-14 at 224 px)."""
        return (self.image_size // self.patch_size) ** 2 + 1


CLIP_VISION_PRESETS: dict[str, ClipVisionConfig] = {
    # open_clip ViT-H-14 (laion2b), ComfyUI's clip_vision_h.safetensors, Wan2.1 I2V's image encoder
    "vit-h-14": ClipVisionConfig(width=1280, layers=32, head_width=80, patch_size=14, image_size=224, mlp_dim=5120,
                                 output_dim=1024),
    # OpenAI ViT-L/14 (ComfyUI's clip_vision_config_vitl.json: quick_gelu)
    "vit-l-14": ClipVisionConfig(width=1024, layers=24, head_width=64, patch_size=14, image_size=224, mlp_dim=4096,
                                 output_dim=768, quick_gelu=True),
    # open_clip ViT-bigG-14 (ComfyUI's clip_vision_g.safetensors)
    "vit-bigg-14": ClipVisionConfig(width=1664, layers=48, head_width=104, patch_size=14, image_size=224,
                                    mlp_dim=8192, output_dim=1280),
    # tests and the miniature world: 2 blocks of width 128, 32 px images in 8 px patches (17 tokens)
    "tiny": ClipVisionConfig(width=128, layers=2, head_width=64, patch_size=8, image_size=32, mlp_dim=512,
                             output_dim=64),
    # the miniature world's CLIP (phantom_core.world.clip_model): 64 px references in 16 px patches (17 tokens of
    # width 128), 3 blocks; 32 px ("tiny") would shrink the world's 128 px references 4x
    "world": ClipVisionConfig(width=128, layers=3, head_width=64, patch_size=16, image_size=64, mlp_dim=512,
                              output_dim=128),
}


def convert_transformers_clip_vision(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """transformers / ComfyUI CLIP vision keys -> open_clip ``VisionTransformer`` keys (the one renaming function).

    ``self_attn.{q,k,v}_proj.{weight,bias}`` are concatenated (q, k, v order) into ``attn.in_proj_{weight,bias}``
    (``nn.MultiheadAttention``'s packed projection); ``visual_projection.weight`` ``(out, width)`` becomes ``proj``
    ``(width, out)`` (open_clip computes ``pooled @ proj``); ``position_ids`` and a text tower are dropped. Any
    other key is kept unchanged, so that the loader's key check names it.

    Raises:
        ValueError: an encoder layer without all of its q, k and v projections.
    """
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, Tensor]] = {}
    dropped = 0
    for key, value in sd.items():
        if key.startswith(_HF_IGNORED):
            dropped += 1
        elif key in _HF_NAMES:
            out[_HF_NAMES[key]] = value
        elif key == "visual_projection.weight":
            out["proj"] = value.t().contiguous()  # (width, output_dim)
        elif m := _HF_LAYER.fullmatch(key):
            layer, rest = int(m.group(1)), m.group(2)
            if q := re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest):
                qkv.setdefault((layer, q.group(2)), {})[q.group(1)] = value
                continue
            module, _, leaf = rest.rpartition(".")
            out[f"transformer.resblocks.{layer}.{_HF_LAYER_NAMES.get(module, module)}.{leaf}"] = value
        else:
            out[key] = value
    for (layer, leaf), parts in sorted(qkv.items()):
        if sorted(parts) != ["k", "q", "v"]:
            raise ValueError(f"CLIP vision layer {layer}: self_attn has only the {sorted(parts)} projections' {leaf}")
        out[f"transformer.resblocks.{layer}.attn.in_proj_{leaf}"] = torch.cat([parts[c] for c in "qkv"])
    if dropped:
        logger.info("CLIP vision: ignored %d keys (position ids, text tower)", dropped)
    return out


def to_open_clip_visual(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Any of the three layouts (module docstring) -> open_clip ``VisionTransformer`` keys.

    Raises:
        ValueError: a state dict that is none of them (saying what its first keys are).
    """
    if any(k.startswith("vision_model.") for k in sd):
        return convert_transformers_clip_vision(sd)
    visual = keep_prefixed(sd, ("visual.",))
    if "conv1.weight" not in visual or "transformer.resblocks.0.ln_1.weight" not in visual:
        raise ValueError(f"this checkpoint is not a CLIP ViT image tower (no vision_model.* / visual.conv1 keys; "
                         f"first keys: {sorted(sd)[:5]}); expected e.g. ComfyUI's clip_vision_h.safetensors or an "
                         "open_clip ViT checkpoint")
    return visual



def infer_clip_vision_config(sd: dict[str, Tensor]) -> ClipVisionConfig:
    """The tower's architecture from an open_clip-layout state dict's shapes (see the module docstring for the
    head width and activation); returns the preset object when one is equal.

    Raises:
        ValueError: a missing or mis-shaped key, or a position table that is not a square grid plus a class token.
    """
    width, _, patch, _ = key_shape(sd, "conv1.weight", 4, "CLIP vision")
    tokens = key_shape(sd, "positional_embedding", 2, "CLIP vision")[0]
    grid = math.isqrt(tokens - 1)
    if grid * grid != tokens - 1:
        raise ValueError(f"CLIP vision state dict: positional_embedding has {tokens} rows; expected a square patch "
                         "grid plus one class token (e.g. 257 = 16 x 16 + 1)")
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"transformer\.resblocks\.(\d+)\.", k))}
    if not layers:
        raise ValueError("CLIP vision state dict has no transformer.resblocks.N.* keys")
    shapes = ClipVisionConfig(width=width, layers=max(layers) + 1, head_width=64 if width % 64 == 0 else width,
                              patch_size=patch, image_size=grid * patch,
                              mlp_dim=key_shape(sd, "transformer.resblocks.0.mlp.c_fc.weight", 2, "CLIP vision")[0],
                              output_dim=key_shape(sd, "proj", 2, "CLIP vision")[1])
    for preset in CLIP_VISION_PRESETS.values():
        if replace(preset, head_width=shapes.head_width, quick_gelu=False) == shapes:
            return preset
    logger.info("CLIP vision tower of width %d matches no preset: %d heads of %d, GELU (open_clip's defaults)",
                width, shapes.heads, shapes.head_width)
    return shapes
