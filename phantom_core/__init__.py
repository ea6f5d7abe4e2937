"""phantom_core: Phantom subject-to-video (arXiv 2502.11079) on the Phantom-Wan DiT, without ComfyUI.

The public API (see docs/DESIGN.md for the tensor conventions):

    load_dit(path_or_state_dict, dtype, device) -> PhantomWanDiT   model(x, t, context, ref_latents) -> velocity
    load_vae(path_or_state_dict, dtype, device) -> WanVAE          vae.encode(video) / vae.decode(latents)
    load_text_encoder(path, tokenizer, dtype, device) -> UMT5TextEncoder   enc.encode_padded(prompts)
    encode_references(vae, images, width, height, mode) -> reference latents [1, 16, N, h, w]
    make_noise(seed, video_shape, num_refs); sample_phantom(model, noise, ref_latents, context, context_neg, ...)
    write_mp4(frames, path, fps, quality)
"""

__version__ = "0.1.0"

from phantom_core.checkpoint import (
    infer_dit_config,
    load_dit,
    preset_name,
    read_state_dict,
    strip_prefixes,
    validate_dit_state_dict,
)
from phantom_core.inspect_checkpoint import inspect_checkpoint
from phantom_core.latent_norm import WAN21_LATENT_MEAN, WAN21_LATENT_STD, denormalize_latents, normalize_latents
from phantom_core.pipeline import generate, generate_to_file, load_models
from phantom_core.settings import GenerationSettings, settings_from_preset
from phantom_core.references import encode_references, open_reference, prepare_reference, validate_references
from phantom_core.sampler import SAMPLER_PRESETS, WAN_NEGATIVE_PROMPT, make_noise, sample_phantom
from phantom_core.schedule import flow_sigmas, model_timesteps
from phantom_core.tiny_default import write_tiny_default
from phantom_core.text_encoder import TEXT_ENCODER_PRESETS, UMT5EncoderSpec, UMT5TextEncoder, load_text_encoder
from phantom_core.video_io import probe_mp4, read_mp4_frames, write_mp4
from phantom_core.wan_dit import DIT_PRESETS, PhantomWanDiT, WanDiTConfig
from phantom_core.wan_vae import VAE_PRESETS, WanVAE, WanVAEConfig, infer_vae_config, load_vae

__all__ = [
    "GenerationSettings", "generate", "generate_to_file", "inspect_checkpoint", "load_models", "settings_from_preset",
    "DIT_PRESETS", "PhantomWanDiT", "SAMPLER_PRESETS", "TEXT_ENCODER_PRESETS", "UMT5EncoderSpec",
    "UMT5TextEncoder", "VAE_PRESETS", "WAN21_LATENT_MEAN", "WAN21_LATENT_STD", "WAN_NEGATIVE_PROMPT",
    "WanDiTConfig", "WanVAE", "WanVAEConfig", "denormalize_latents", "encode_references", "flow_sigmas",
    "infer_dit_config", "infer_vae_config", "load_dit", "load_text_encoder", "load_vae", "make_noise",
    "model_timesteps", "normalize_latents", "open_reference", "prepare_reference", "preset_name", "probe_mp4",
    "read_mp4_frames", "read_state_dict", "sample_phantom", "strip_prefixes", "validate_dit_state_dict",
    "validate_references", "write_mp4", "write_tiny_default",
]
