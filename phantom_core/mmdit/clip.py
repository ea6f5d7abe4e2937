"""CLIP reference features ``F_ref,c`` (Phantom, arXiv 2502.11079, Eq. 1) through an open_clip image tower.

Each reference image is composited over white, letterboxed into the tower's square input on white (open_clip's
``image_transform(resize_mode="longest", fill_color=255)``: bicubic, the whole subject kept, nothing cropped),
normalised with OpenAI CLIP's mean / std, and encoded alone. Two outputs (``CLIP_OUTPUTS``):

- ``"tokens"``: the penultimate block's output, class token first, ``(tokens, width)`` per image (257 x 1280 for
  ViT-H-14), what Wan2.1 image-to-video feeds its DiT (``clip.visual(..., use_31_block=True)``) and ComfyUI's
  ``CLIPVisionEncode`` calls ``penultimate_hidden_states``;
- ``"pooled"``: the projected image embedding, ``(1, output_dim)`` per image (1024 for ViT-H-14).

The MMDiT projects either to its width (``clip_embedder``; its ``clip_dim`` must be the chosen output's width).
open_clip is imported here only inside the functions that build a tower or a transform (it loads transformers).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Literal

import torch
from PIL import Image
from torch import Tensor, nn

from phantom_core.loading.files import read_state_dict
from phantom_core.loading.keys import errors_name_file, key_problems
from phantom_core.log import logger
from phantom_core.mmdit.clip_keys import ClipVisionConfig, infer_clip_vision_config, to_open_clip_visual
from phantom_core.references import to_rgb, validate_references

ClipOutput = Literal["tokens", "pooled"]
CLIP_OUTPUTS: tuple[ClipOutput, ...] = ("tokens", "pooled")
WHITE_FILL = 255  # letterbox padding, as the references' VAE frames (phantom_core.references.letterbox)


def build_vision_tower(config: ClipVisionConfig, device: torch.device | str | None = None) -> nn.Module:
    """An open_clip ``VisionTransformer`` for ``config`` (random init; on ``device``, e.g. ``"meta"`` to allocate
    nothing before ``load_state_dict(assign=True)``)."""
    from open_clip.transformer import LayerNorm, QuickGELU, VisionTransformer

    with torch.device(device or "cpu"):
        return VisionTransformer(
            image_size=config.image_size, patch_size=config.patch_size, width=config.width, layers=config.layers,
            heads=config.heads, mlp_ratio=(config.mlp_dim + 0.5) / config.width,  # int(width * ratio) == mlp_dim
            output_dim=config.output_dim, act_layer=QuickGELU if config.quick_gelu else nn.GELU,
            norm_layer=LayerNorm)


class ClipVision(nn.Module):
    """A CLIP image tower (open_clip ``VisionTransformer`` as ``.visual``, open_clip key names) and its inputs.

    Build with :func:`load_clip_vision`; ``encode_images`` runs the tower, ``preprocess`` makes its input.
    """

    def __init__(self, config: ClipVisionConfig, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.config = config
        self.visual = build_vision_tower(config, device)

    def output_width(self, output: ClipOutput) -> int:
        """Feature width of an output: the tower width for ``"tokens"``, ``output_dim`` for ``"pooled"``."""
        return self.config.width if output == "tokens" else self.config.output_dim

    def preprocess(self, images: Sequence[Image.Image]) -> Tensor:
        """PIL images (any mode; transparency over white) -> ``(N, 3, S, S)`` float32 normalised pixels."""
        from open_clip.transform import image_transform

        transform = image_transform(self.config.image_size, is_train=False, resize_mode="longest",
                                    fill_color=WHITE_FILL)
        return torch.stack([transform(to_rgb(image)) for image in images])  # (N, 3, S, S)

    def encode_images(self, pixels: Tensor, output: ClipOutput = "tokens") -> Tensor:
        """``(N, 3, S, S)`` normalised pixels -> ``(N, tokens, width)`` penultimate-block tokens (class token
        first) or ``(N, 1, output_dim)`` pooled embeddings; float32. ValueError for an unknown ``output``."""
        if output not in CLIP_OUTPUTS:
            raise ValueError(f"CLIP output is {output!r}; valid: {', '.join(CLIP_OUTPUTS)}")
        param = self.visual.conv1.weight
        x = pixels.to(device=param.device, dtype=param.dtype)
        if output == "pooled":
            return self.visual(x).float().unsqueeze(1)  # (N, 1, output_dim)
        if self.config.layers < 2:
            raise ValueError("CLIP output 'tokens' is the penultimate block's; this tower has only 1 block")
        out = self.visual.forward_intermediates(x, indices=[-2], stop_early=True, intermediates_only=True,
                                                output_fmt="NLC", output_extra_tokens=True)
        cls, patches = out["image_intermediates_prefix"][0], out["image_intermediates"][0]  # (N, 1, W), (N, P, W)
        return torch.cat([cls, patches], dim=1).float()  # (N, 1 + P, W)


def load_clip_vision(path_or_state_dict: str | os.PathLike | dict[str, Tensor],
                     dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> ClipVision:
    """Load a CLIP image tower from ComfyUI's ``models/clip_vision`` files or open_clip checkpoints.

    Args:
        path_or_state_dict: a file ``read_state_dict`` reads (safetensors, ``.bin`` / ``.pth``) or a state dict,
            in any layout of ``clip_keys`` (transformers / ComfyUI, open_clip, open_clip ``visual`` alone).
        dtype: float weight dtype. device: where the weights go.

    Returns:
        ``ClipVision`` in eval mode, frozen.

    Raises:
        ValueError: naming the file, for a checkpoint that is not a CLIP ViT tower or has missing / unexpected /
            mis-shaped keys.
    """
    sd = read_state_dict(path_or_state_dict) if not isinstance(path_or_state_dict, dict) else path_or_state_dict
    with errors_name_file(path_or_state_dict):
        sd = to_open_clip_visual(sd)
        config = infer_clip_vision_config(sd)
        tower = ClipVision(config, device="meta")
        want = {k.removeprefix("visual."): tuple(v.shape) for k, v in tower.state_dict().items()}
        if problems := key_problems(want, sd):
            raise ValueError("CLIP vision state dict does not match its inferred architecture "
                             f"({config}): " + "; ".join(problems))
    tower.visual.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in sd.items()}, assign=True)
    logger.info("loaded CLIP vision tower (width %d, %d blocks, %d px) as %s on %s", config.width, config.layers,
                config.image_size, dtype, device)
    return tower.eval().requires_grad_(False)


@torch.no_grad()
def encode_clip_references(tower: ClipVision, images: Sequence[Image.Image], output: ClipOutput = "tokens"
                           ) -> Tensor:
    """CLIP features of 1..4 reference images, each encoded alone -> ``(1, N, T, C)`` float32 on the tower's device.

    ``T, C``: ``(tokens, width)`` for ``"tokens"`` (257 x 1280 for ViT-H-14), ``(1, output_dim)`` for ``"pooled"``.
    Raises ``ValueError`` for 0 or more than 4 images, an image under 16 px, or an unknown ``output``.
    """
    validate_references(images)
    return tower.encode_images(tower.preprocess(images), output).unsqueeze(0)  # (1, N, T, C)

