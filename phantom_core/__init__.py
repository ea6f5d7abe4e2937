"""phantom_core: Phantom subject-to-video (arXiv 2502.11079) on the Phantom-Wan DiT, without ComfyUI.

The public API (see docs/DESIGN.md for the layout and the tensor conventions):

    load_dit(path_or_state_dict, dtype, device) -> PhantomWanDiT   model(x, t, context, ref_latents) -> velocity
    load_mmdit(...) -> PhantomMMDiT (the paper's network)            model(x, t, context, ref_latents, ref_clip)
    load_clip_vision(path) -> ClipVision; encode_clip_references(tower, images) -> CLIP features [1, N, T, C]
    load_vae(path_or_state_dict, dtype, device) -> WanVAE          vae.encode(video) / vae.decode(latents)
    load_text_encoder(path, tokenizer, dtype, device) -> UMT5TextEncoder   enc.encode_padded(prompts)
    encode_references(vae, images, width, height, mode) -> reference latents [1, 16, N, h, w]
    make_noise(seed, video_shape, num_refs); sample_phantom(model, noise, ref_latents, context, context_neg, ...)
    write_mp4(frames, path, fps, quality)
    apply_loras(model, [(path_or_state_dict, strength), ...], merge=True) -> model   (LoRA, see phantom_core.lora)
    inject_lora(model, rank, alpha) -> adapted names; lora_state_dict(model); save_lora(path, sd, metadata)
    train(TrainConfig(...) or load_config("run.toml")) -> TrainResult   (LoRA / full fine-tune, training/)

This file is the one facade: each name below lives in exactly one module and is imported from it on first
access (PEP 562), so ``import phantom_core`` (or any of its submodules) stays cheap: a data-loader worker or a
distributed rank that needs the DiT does not pay for transformers, sentencepiece or imageio-ffmpeg.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it (its one home)
_HOMES: dict[str, str] = {
    **dict.fromkeys(["infer_dit_config", "load_dit", "preset_name", "strip_prefixes", "validate_dit_state_dict"],
                    "phantom_core.wan.load"),
    "read_state_dict": "phantom_core.loading.files",
    "inspect_checkpoint": "phantom_core.wan.inspect",
    **dict.fromkeys(["WAN21_LATENT_MEAN", "WAN21_LATENT_STD", "denormalize_latents", "normalize_latents"],
                    "phantom_core.wan.latents"),
    **dict.fromkeys(["generate", "generate_to_file", "load_clip_tower", "load_models"],
                    "phantom_core.inference.pipeline"),
    **dict.fromkeys(["GenerationSettings", "settings_from_preset", "WAN_NEGATIVE_PROMPT"],
                    "phantom_core.inference.settings"),
    **dict.fromkeys(["encode_references", "open_reference", "prepare_reference", "validate_references"],
                    "phantom_core.references"),
    **dict.fromkeys(["SAMPLER_PRESETS", "make_noise", "sample_phantom"], "phantom_core.sampling.loop"),
    **dict.fromkeys(["flow_sigmas", "model_timesteps"], "phantom_core.sampling.schedule"),
    "write_tiny_default": "phantom_core.tiny.default",
    **dict.fromkeys(["TEXT_ENCODER_PRESETS", "UMT5EncoderSpec", "UMT5TextEncoder", "load_text_encoder"],
                    "phantom_core.wan.umt5"),
    **dict.fromkeys(["probe_mp4", "read_mp4_frames", "write_mp4"], "phantom_core.video_io"),
    **dict.fromkeys(["DIT_PRESETS", "PhantomWanDiT", "WanDiTConfig"], "phantom_core.wan.dit"),
    **dict.fromkeys(["VAE_PRESETS", "WanVAE", "WanVAEConfig", "infer_vae_config", "load_vae"], "phantom_core.wan.vae"),
    **dict.fromkeys(["MMDIT_PRESETS", "MMDiTConfig"], "phantom_core.mmdit.config"),
    **dict.fromkeys(["MMDIT_LORA_TARGETS", "PhantomMMDiT"], "phantom_core.mmdit.model"),
    **dict.fromkeys(["infer_mmdit_config", "load_any_dit", "load_mmdit"], "phantom_core.mmdit.load"),
    **dict.fromkeys(["CLIP_VISION_PRESETS", "ClipVisionConfig", "convert_transformers_clip_vision"],
                    "phantom_core.mmdit.clip_keys"),
    **dict.fromkeys(["ClipVision", "encode_clip_references", "load_clip_vision"], "phantom_core.mmdit.clip"),
    "Rephraser": "phantom_core.rephrase.rephraser",
    **dict.fromkeys(["TrainConfig", "load_config"], "phantom_core.training.config"),
    **dict.fromkeys(["TrainResult", "train"], "phantom_core.training.loop"),
    "make_backend": "phantom_core.rephrase.backends",
    **dict.fromkeys(["RephraseError", "RephraseResult"], "phantom_core.rephrase.types"),
    **dict.fromkeys(["DEFAULT_TARGETS", "LoRALinear", "inject_lora", "lora_state_dict"], "phantom_core.lora.adapter"),
    **dict.fromkeys(["diff_state_dict", "lora_metadata", "save_lora"], "phantom_core.lora.files"),
    "read_lora": "phantom_core.lora.keys",
    "apply_loras": "phantom_core.lora.apply",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    """Import ``name`` from its home module on first access and cache it here (PEP 562)."""
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'phantom_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
