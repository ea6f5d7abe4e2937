"""PhantomDecode: raw Wan2.1 video latents (ComfyUI LATENT) -> ComfyUI IMAGE frames."""

from __future__ import annotations

import comfy.model_management as mm
from comfy_api.latest import io
from einops import rearrange

from .types import CATEGORY, PhantomVAE, core


class PhantomDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PhantomDecode",
            display_name="Phantom Decode",
            category=CATEGORY,
            description="Decodes video latents [1, 16, F, h, w] with the Wan VAE into 1 + 4(F-1) frames per latent.",
            inputs=[
                PhantomVAE.Input("vae", tooltip="From Phantom VAE Loader."),
                io.Latent.Input("latent", tooltip="Raw Wan2.1 video latents, e.g. from Phantom Sampler."),
            ],
            outputs=[io.Image.Output(display_name="images")],
        )

    @classmethod
    def execute(cls, vae, latent: dict) -> io.NodeOutput:
        raw = latent["samples"]  # (B, 16, F, h, w) raw latents
        if raw.ndim != 5 or raw.shape[1] != 16:
            raise ValueError(f"latent has shape {tuple(raw.shape)}; Phantom Decode needs Wan2.1 video latents "
                             "[B, 16, F, h, w]")
        mm.load_models_gpu([vae])
        video = core(vae).decode_raw(raw.float()).clamp_(-1.0, 1.0)  # (B, 3, T, H, W) float32
        frames = rearrange((video + 1.0) / 2.0, "b c t h w -> (b t) h w c")  # (B*T, H, W, 3) in [0, 1]
        return io.NodeOutput(frames.to(mm.intermediate_device()))
