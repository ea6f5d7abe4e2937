"""The model a run trains and the file it leaves: a DiT from a checkpoint or from scratch, full or LoRA.

- ``dit = "path"``: the checkpoint, loaded trainable: a Phantom MMDiT when its keys are an MMDiT's, else a
  Phantom-Wan DiT (``mmdit.load.load_any_dit``); ``dit = "scratch:<preset>"``: the preset built on the meta
  device, allocated on the CPU and initialised as upstream Wan2.1 (``PhantomWanDiT.init_weights``) from the run
  seed, then moved to the device: the same weights on any device; ``dit = "scratch:mmdit-<preset>"``: the same
  for ``MMDIT_PRESETS[preset]`` (``PhantomMMDiT.init_weights``, SD3's init).
- ``mode = "full"``: every weight is trained, kept in float32 (bf16 autocast computes on CUDA).
  ``mode = "lora"``: the DiT is frozen (bf16 on CUDA, to halve its memory; float32 on the CPU) and LoRA adapters
  on the named Linears (``phantom_core.lora.inject_lora``) are the only trainable parameters.
- The final file: the whole DiT with upstream key names (an MMDiT: the layout ``load_mmdit`` reads) (full),
  or the LoRA in ComfyUI's format (``lora_up`` / ``lora_down`` / ``alpha`` under ``diffusion_model.``;
  ``phantom_core.lora.save_lora``), with metadata.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from phantom_core.loading.disk import atomic_write
from phantom_core.log import logger
from phantom_core.lora.adapter import DEFAULT_TARGETS, inject_lora, lora_modules, lora_state_dict
from phantom_core.lora.files import lora_metadata, save_lora
from phantom_core.mmdit.config import MMDIT_PRESETS
from phantom_core.mmdit.load import load_any_dit, mmdit_preset_name
from phantom_core.mmdit.model import MMDIT_LORA_TARGETS, PhantomMMDiT
from phantom_core.training.cache import Encoders, file_fingerprint
from phantom_core.training.config import MMDIT_PREFIX, SCRATCH_PREFIX, TrainConfig
from phantom_core.wan.dit import DIT_PRESETS, PhantomWanDiT
from phantom_core.wan.load import preset_name
from phantom_core.wan.umt5 import load_text_encoder
from phantom_core.wan.vae import load_vae

INIT_STREAM = 0x1417  # keeps the from-scratch init apart from every other use of the run seed
LORA_STREAM = 0x10A  # and the LoRA down-projections' init


def base_dtype(config: TrainConfig, device: torch.device) -> torch.dtype:
    """The stored dtype of the DiT's own weights: float32, except a frozen (LoRA-mode) DiT on CUDA in bf16."""
    if config.mode == "lora" and device.type == "cuda" and config.precision != "fp32":
        return torch.bfloat16
    return torch.float32


def check_preset(preset: str) -> None:
    """Raise ``ValueError`` (listing the valid names) unless ``preset`` is a ``DIT_PRESETS`` name or
    ``mmdit-<MMDIT_PRESETS name>``."""
    if preset not in DIT_PRESETS and preset.removeprefix(MMDIT_PREFIX) not in MMDIT_PRESETS:
        valid = [*DIT_PRESETS, *(MMDIT_PREFIX + name for name in MMDIT_PRESETS)]
        raise ValueError(f"dit is {SCRATCH_PREFIX}{preset}; valid presets: {', '.join(valid)}")


def scratch_model(preset: str, seed: int, device: torch.device, dtype: torch.dtype = torch.float32
                  ) -> PhantomWanDiT | PhantomMMDiT:
    """``DIT_PRESETS[preset]`` initialised as upstream Wan2.1 from ``seed`` on the CPU (``mmdit-<name>``:
    ``MMDIT_PRESETS[name]``, initialised as SD3), then moved to ``device``.

    Raises:
        ValueError: an unknown preset (the valid names listed).
    """
    check_preset(preset)
    if preset.startswith(MMDIT_PREFIX) and preset not in DIT_PRESETS:
        model = PhantomMMDiT(MMDIT_PRESETS[preset.removeprefix(MMDIT_PREFIX)], device="meta").to_empty(device="cpu")
    else:
        model = PhantomWanDiT(DIT_PRESETS[preset], device="meta").to_empty(device="cpu")
    model.init_weights(torch.Generator().manual_seed(seed * 0x10000 + INIT_STREAM))
    return model.to(device=device, dtype=dtype).train().requires_grad_(True)


def build_model(config: TrainConfig, device: torch.device) -> PhantomWanDiT | PhantomMMDiT:
    """The DiT named by ``config.dit`` on ``device``, trainable (train mode, gradients on), in ``base_dtype``.

    Raises:
        ValueError: an unknown ``scratch:`` preset, or what ``load_dit`` raises for a bad checkpoint.
    """
    dtype = base_dtype(config, device)
    if config.dit.startswith(SCRATCH_PREFIX):
        return scratch_model(config.dit.removeprefix(SCRATCH_PREFIX), config.seed, device, dtype)
    return load_any_dit(config.dit, dtype=dtype, device=device, trainable=True)


def make_trainable(model: nn.Module, config: TrainConfig) -> list[str]:
    """Prepare ``model`` for ``config.mode`` and return the names of its trainable parameters.

    full: every parameter trains. lora: every parameter is frozen, then LoRA adapters are injected on the
    target Linears (their parameters are the trainable ones). Gradient checkpointing is switched on as configured.
    """
    model.train()
    if config.mode == "full":
        model.requires_grad_(True)
    else:
        device = next(model.parameters()).device
        generator = torch.Generator(device=device).manual_seed(config.seed * 0x10000 + LORA_STREAM)
        default = MMDIT_LORA_TARGETS if isinstance(model, PhantomMMDiT) else DEFAULT_TARGETS
        wrapped = inject_lora(model, config.lora_rank, config.lora_alpha, targets=config.lora_targets or default,
                              dropout=config.lora_dropout, generator=generator)  # freezes the rest
        logger.info("LoRA rank %d alpha %g on %d Linears", config.lora_rank, config.lora_alpha, len(wrapped))
    if hasattr(model, "enable_gradient_checkpointing"):
        model.enable_gradient_checkpointing(config.gradient_checkpointing)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("%s training: %d tensors, %d parameters", config.mode, len(names), count)
    return names


def base_model_name(model: nn.Module, config: TrainConfig) -> str:
    """What the run started from: the DiT preset's name (e.g. ``phantom-wan-1.3b``) when the model is one, else
    ``config.dit`` (a path or ``scratch:<preset>``), else ``custom``."""
    cfg = getattr(model, "config", None)
    name = None if cfg is None else mmdit_preset_name(cfg) if isinstance(model, PhantomMMDiT) else preset_name(cfg)
    return name or config.dit or "custom"


def gathered_lora(model: nn.Module, weights: dict[str, Tensor], prefix: str = "diffusion_model.") -> dict[str, Tensor]:
    """``lora_state_dict``'s layout built from full adapter tensors gathered by name (``weights``, e.g. from
    ``get_model_state_dict``): under FSDP the modules hold only shards, so ``lora_state_dict(model)`` cannot read
    them. ``model``'s adapters give the names and alphas."""
    sd: dict[str, Tensor] = {}
    for name, m in lora_modules(model).items():
        for part in ("lora_up", "lora_down"):
            sd[f"{prefix}{name}.{part}.weight"] = weights[f"{name}.{part}.weight"].detach().float().cpu().contiguous()
        sd[f"{prefix}{name}.alpha"] = torch.tensor(m.alpha, dtype=torch.float32)
    return sd


def save_output(model: nn.Module, weights: dict[str, Tensor] | None, config: TrainConfig, path: str | Path,
                steps: int) -> Path:
    """Write the run's final file atomically, with metadata (base model, steps, the settings as JSON):

    - ``mode = "full"``: the DiT's state dict (upstream keys), ``weights`` when given (gathered), else the model's;
    - ``mode = "lora"``: the adapters in ComfyUI's layout (``lora_state_dict``, or ``gathered_lora`` from
      ``weights`` for an FSDP-sharded model), written by ``save_lora``.
    Returns the path.
    """
    base = base_model_name(model, config)
    if config.mode == "full":
        tensors = {k: v.detach().cpu().contiguous() for k, v in (weights or model.state_dict()).items()}
        metadata = {"base_model": base, "steps": str(steps), "settings": json.dumps(config.to_json())}
        with atomic_write(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
        return Path(path)
    state = gathered_lora(model, weights) if weights is not None else lora_state_dict(model)
    return save_lora(path, state, lora_metadata(config.lora_rank, config.lora_alpha, base, steps,
                                                config.to_json()))


def file_encoders(config: TrainConfig, device: torch.device) -> tuple[Encoders | None, dict[str, str] | None]:
    """The VAE and text encoder of ``config`` as ``(encoders, fingerprints)`` for ``cache.build_cache``: loaded
    from their files on ``device`` only when called (VAE float32; umT5 in its stored dtype, computing in bf16 on
    CUDA, float32 on the CPU), fingerprinted by file stamps. ``(None, None)`` when either file is not given."""
    if not (config.vae and config.text_encoder):
        return None, None
    fingerprints = {"vae": file_fingerprint(config.vae),
                    "text_encoder": file_fingerprint(config.text_encoder) + (
                        file_fingerprint(config.tokenizer) if config.tokenizer else "")}

    def load() -> tuple[Any, Any]:
        vae = load_vae(config.vae, dtype=torch.float32, device=device)
        compute = torch.bfloat16 if device.type == "cuda" else torch.float32
        text_encoder = load_text_encoder(config.text_encoder, config.tokenizer or None, dtype=None, device=device,
                                         compute_dtype=compute)
        return vae, text_encoder

    return load, fingerprints
