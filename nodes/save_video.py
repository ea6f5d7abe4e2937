"""PhantomSaveVideo: IMAGE frames -> an H.264 MP4 in ComfyUI's output folder, previewed in the UI."""

from __future__ import annotations

import os

import folder_paths
from comfy_api.latest import io, ui

from phantom_core.inference.settings import SETTING_RANGES
from phantom_core.video_io import write_mp4

from .types import CATEGORY
from .widgets import float_input, int_input


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
                float_input("fps", SETTING_RANGES["fps"], 16.0, 1.0,
                            "Frames per second (Phantom-Wan 1.3B: 16, 14B: 24)."),
                int_input("quality", SETTING_RANGES["quality"], 8,
                          "Encoder quality 0..10, 10 best (imageio-ffmpeg scale; 8 = x264 crf 10)."),
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
