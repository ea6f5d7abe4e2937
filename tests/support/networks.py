"""The CLIP tower's random weights and its independent oracle (transformers), and safetensors files for the
networks' tests (random DiT / MMDiT weights: ``tests.support.weights.random_state_dict``).

Every floating tensor random, so that a swapped or missing tensor changes the output.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from phantom_core.mmdit.clip_keys import ClipVisionConfig


def random_clip_state_dict(config: ClipVisionConfig, seed: int = 0, quick_gelu: bool = False) -> dict[str, Tensor]:
    """A transformers ``CLIPVisionModelWithProjection`` of ``config``'s shapes (ComfyUI's ``models/clip_vision``
    layout) with every tensor random: LayerNorm weights ``1 + N(0, 0.1^2)``, biases ``N(0, 0.05^2)``, matrices
    ``N(0, 1 / fan_in)``, embeddings ``N(0, 0.2^2)``. Returns its state dict (fp32)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, v in transformers_clip(config, None, quick_gelu).state_dict().items():
        if not v.is_floating_point():
            sd[key] = v.clone()
        elif "norm" in key and key.endswith("weight"):
            sd[key] = 1.0 + 0.1 * torch.randn(v.shape, generator=g)
        elif key.endswith("bias"):
            sd[key] = 0.05 * torch.randn(v.shape, generator=g)
        elif "embedding" in key:
            sd[key] = 0.2 * torch.randn(v.shape, generator=g)
        else:
            sd[key] = torch.randn(v.shape, generator=g) / math.sqrt(math.prod(v.shape[1:]))
    return sd


def transformers_clip(config: ClipVisionConfig, sd: dict[str, Tensor] | None, quick_gelu: bool = False) -> nn.Module:
    """transformers' ``CLIPVisionModelWithProjection`` of ``config`` holding ``sd`` (the independent oracle; its own
    init when ``sd`` is None), in eval mode."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    hf = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=config.width, intermediate_size=config.mlp_dim, num_hidden_layers=config.layers,
        num_attention_heads=config.heads, image_size=config.image_size, patch_size=config.patch_size,
        projection_dim=config.output_dim, hidden_act="quick_gelu" if quick_gelu else "gelu"))
    if sd is not None:
        hf.load_state_dict(sd, strict=True)
    return hf.eval()


def save_safetensors(sd: dict[str, Tensor], path: Path) -> Path:
    """``sd`` (contiguous copies) as a safetensors file at ``path`` (parents created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path
