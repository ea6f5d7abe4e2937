"""LoRAs for the tests: a model's adapters with random (non-zero) weights, in ComfyUI's layout."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from phantom_core.lora.adapter import inject_lora, lora_modules, lora_state_dict


def random_lora(model: nn.Module, rank: int = 4, alpha: float = 2.0, seed: int = 0, std: float = 0.05,
                targets: list[str] | None = None) -> dict[str, Tensor]:
    """Inject adapters into ``model`` (in place), draw every ``lora_up`` ~ N(0, std^2) from ``seed`` (``lora_down``
    keeps its seeded init) and return ``lora_state_dict(model)``: a LoRA that changes the output."""
    g = torch.Generator().manual_seed(seed)
    kwargs = {} if targets is None else {"targets": targets}
    inject_lora(model, rank, alpha, generator=g, **kwargs)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_up.weight.copy_(std * torch.randn(m.lora_up.weight.shape, generator=g))
    return lora_state_dict(model)
