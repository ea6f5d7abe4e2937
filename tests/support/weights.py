"""Random weights for the core tests' tiny networks (the parity tests load them into ours and ComfyUI's)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from phantom_core.wan.vae import WanVAE, WanVAEConfig


def random_vae_state_dict(cfg: WanVAEConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every tensor random: conv weights ~ N(0, 1/fan_in), biases ~ N(0, 0.05^2), RMS gammas ~ 1 + N(0, 0.1^2)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = WanVAE(cfg, device="meta").state_dict()
    sd = {}
    for key, ref in shapes.items():
        noise = torch.randn(ref.shape, generator=gen)
        if key.endswith("gamma"):
            sd[key] = 1.0 + 0.1 * noise
        elif key.endswith("bias"):
            sd[key] = 0.05 * noise
        else:
            sd[key] = noise / math.sqrt(math.prod(ref.shape[1:]))
    return sd


def reference_linear_fp32(layer: nn.Module, x: Tensor) -> Tensor:
    """The maths of a (scaled-fp8) Linear in float32, read straight from ``layer.weight`` / ``.bias`` /
    ``.scale_weight``: ``x (..., in)`` -> ``(..., out)`` float32: the independent reference ``run_fp32`` (which
    goes through the layer's own call, hooks and adapters) is tested against."""
    w = layer.weight.to(device=x.device, dtype=torch.float32)
    if (scale := getattr(layer, "scale_weight", None)) is not None:
        w = w * scale.to(device=x.device, dtype=torch.float32)
    b = None if layer.bias is None else layer.bias.to(device=x.device, dtype=torch.float32)
    return F.linear(x.float(), w, b)


def random_state_dict(model: nn.Module, seed: int = 0, scale: float = 0.1) -> dict[str, Tensor]:
    """``model``'s state dict (a meta-device build will do) with every float tensor random, float32: norm weights
    (``*norm*`` / ``.ln_*`` / the MMDiT's ``clip_embedder.0`` LayerNorm) ~ ``1 + N(0, (2 scale)^2)``, everything
    else, zero-initialised heads included, ~ ``N(0, scale^2)``; integer buffers (the MMDiT's ``window_size`` /
    ``text_len``) and the MMDiT's ``reference_key_mask`` threshold kept as they are."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, v in model.state_dict().items():
        if not v.is_floating_point() or key == "reference_key_mask":
            sd[key] = v.clone()
            continue
        r = torch.randn(v.shape, generator=g)
        is_norm = ("norm" in key or ".ln_" in key or "embedder.0" in key) and key.endswith("weight")
        sd[key] = 1.0 + 2 * scale * r if is_norm else scale * r
    return sd


def random_dit_state_dict(config, seed: int = 0) -> dict[str, Tensor]:
    """Every parameter of a ``PhantomWanDiT(config)`` random (:func:`random_state_dict`: norm weights
    ~ 1 + N(0, 0.2^2), everything else ~ N(0, 0.1^2)), float32."""
    from phantom_core.wan.dit import PhantomWanDiT

    return random_state_dict(PhantomWanDiT(config, device="meta"), seed)


def trained_like_mmdit(config, seed: int = 0):
    """A ``PhantomMMDiT(config)`` in eval mode, initialised as for training (``init_weights`` from ``seed``), then
    every parameter moved by N(0, 0.05^2) (seed + 1), so that adaLN-Zero's zero gates and head do not make the
    velocity 0 and hide what a test looks for."""
    from phantom_core.mmdit.model import PhantomMMDiT

    model = PhantomMMDiT(config, device="meta").to_empty(device="cpu")
    model.init_weights(torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1)
    for p in model.parameters():
        p.data.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()
