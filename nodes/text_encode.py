"""PhantomTextEncode: a prompt -> ComfyUI CONDITIONING through the umT5 encoder.

The output has ComfyUI's own layout, `[[cond [1, 512, text_dim], {}]]`, the same as CLIPTextEncode with a
`wan` CLIPLoader, so PhantomSampler takes either.
"""

from __future__ import annotations

import comfy.model_management as mm
from comfy_api.latest import io

from .types import CATEGORY, PhantomTextEncoder, core


class PhantomTextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PhantomTextEncode",
            display_name="Phantom Text Encode",
            category=CATEGORY,
            description="Encodes a prompt with umT5 into a [1, 512, text_dim] CONDITIONING (zero-padded).",
            inputs=[
                PhantomTextEncoder.Input("text_encoder", tooltip="From Phantom Text Encoder Loader."),
                io.String.Input("text", multiline=True, dynamic_prompts=True,
                                tooltip="The prompt (or, wired to negative, the negative prompt)."),
            ],
            outputs=[io.Conditioning.Output(display_name="conditioning")],
        )

    @classmethod
    def execute(cls, text_encoder, text: str) -> io.NodeOutput:
        mm.load_models_gpu([text_encoder])
        cond = core(text_encoder).encode_padded([text])  # (1, 512, text_dim); ComfyUI runs in inference_mode
        cond = cond.float().to(mm.intermediate_device())
        return io.NodeOutput([[cond, {}]])
