"""PhantomDecode: raw Wan2.1 video latents (ComfyUI LATENT) -> ComfyUI IMAGE frames.

Progress is reported per decoded latent frame (per frame of each tile when tiled) through ComfyUI's ProgressBar,
which also lets /interrupt stop the decode between frames.
"""

from __future__ import annotations

import comfy.model_management as mm
import comfy.utils
from comfy_api.latest import io
from einops import rearrange

from phantom_core.wan.vae_tiling import MIN_TILE_LATENT

from .types import CATEGORY, PhantomVAE, core

MAX_TILE = 4096  # px


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
                io.Int.Input("tile_size", default=0, min=0, max=MAX_TILE, step=32,
                             tooltip="Decode in square tiles of this many pixels to cap VRAM; 0 decodes the whole "
                                     f"frame at once (exact), else at least {8 * MIN_TILE_LATENT}. 256-512 is "
                                     "typical; smaller tiles use less memory but more time and can show faint "
                                     "seams."),
                io.Int.Input("tile_overlap", default=64, min=0, max=1024, step=8,
                             tooltip="Pixels shared by neighbouring tiles, blended smoothly; more overlap gives "
                                     "smoother seams for more compute. Must be smaller than tile_size."),
            ],
            outputs=[io.Image.Output(display_name="images")],
        )

    @classmethod
    def execute(cls, vae, latent: dict, tile_size: int = 0, tile_overlap: int = 64) -> io.NodeOutput:
        raw = latent["samples"]  # (B, 16, F, h, w) raw latents
        if raw.ndim != 5 or raw.shape[1] != 16:
            raise ValueError(f"latent has shape {tuple(raw.shape)}; Phantom Decode needs Wan2.1 video latents "
                             "[B, 16, F, h, w]")
        if 0 < tile_size < 8 * MIN_TILE_LATENT:
            raise ValueError(f"tile_size is {tile_size} px; valid: 0 (no tiling) or {8 * MIN_TILE_LATENT} to "
                             f"{MAX_TILE} px")
        if tile_size and tile_overlap >= tile_size:
            raise ValueError(f"tile_overlap is {tile_overlap} px; it must be smaller than tile_size ({tile_size} px)")
        mm.load_models_gpu([vae])
        tile = tile_size // 8 if tile_size else None  # pixels -> latent cells (spatial stride 8)
        pbar = comfy.utils.ProgressBar(raw.shape[2])  # total corrected by the first report when tiled

        def on_frame(done: int, total: int) -> None:
            mm.throw_exception_if_processing_interrupted()
            pbar.update_absolute(done, total)

        video = core(vae).decode_raw(raw.float(), tile_latent=tile, overlap_latent=tile_overlap // 8,
                                     progress=on_frame)
        video = video.clamp_(-1.0, 1.0)  # (B, 3, T, H, W) float32
        frames = rearrange((video + 1.0) / 2.0, "b c t h w -> (b t) h w c")  # (B*T, H, W, 3) in [0, 1]
        return io.NodeOutput(frames.to(mm.intermediate_device()))
