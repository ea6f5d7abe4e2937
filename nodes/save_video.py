"""PhantomSaveVideo: IMAGE frames -> an H.264 MP4 in ComfyUI's output folder, previewed in the UI."""

from __future__ import annotations

import os

import folder_paths
from comfy_api.latest import io, ui

from phantom_core.video_io import write_mp4

from .types import CATEGORY


class PhantomSaveVideo(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PhantomSaveVideo",
            display_name="Phantom Save Video",
            category=CATEGORY,
            description="Writes the frames as an MP4 (H.264, yuv420p) into ComfyUI's output folder.",
            inputs=[
                io.Image.Input("images", tooltip="Video frames [T, H, W, 3], e.g. from Phantom Decode."),
                io.Float.Input("fps", default=16.0, min=1.0, max=120.0, step=1.0,
                               tooltip="Frames per second (Phantom-Wan 1.3B: 16, 14B: 24)."),
                io.Int.Input("quality", default=8, min=1, max=10,
                             tooltip="Encoder quality, 10 best (imageio-ffmpeg scale)."),
                io.String.Input("filename_prefix", default="Phantom",
                                tooltip="Output name prefix, may hold a subfolder (video/Phantom); numbered as usual."),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, images, fps: float, quality: int, filename_prefix: str) -> io.NodeOutput:
        height, width = images.shape[1], images.shape[2]
        folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(
            filename_prefix, folder_paths.get_output_directory(), width, height)
        file = f"{name}_{counter:05}_.mp4"
        write_mp4(images, os.path.join(folder, file), fps=fps, quality=quality)
        return io.NodeOutput(ui=ui.PreviewVideo([ui.SavedResult(file, subfolder, io.FolderType.output)]))
