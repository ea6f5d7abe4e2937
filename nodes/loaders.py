"""Loader nodes: the DiT (Phantom-Wan or the paper's MMDiT), the Wan2.1 VAE, the umT5 text encoder and a CLIP
vision tower (for the MMDiT's CLIP reference features), from ComfyUI's model folders.

Each loader reads the checkpoint onto ComfyUI's offload device and returns it wrapped in a
`comfy.model_patcher.ModelPatcher`; the consuming node calls `comfy.model_management.load_models_gpu` so
ComfyUI's memory manager moves it to the load device (and evicts other models) when it is needed. The DiT is
built with ComfyUI's layer namespace `comfy.ops.disable_weight_init` (plain torch layers that ComfyUI can also
run with weights streamed from the offload device), so a model larger than free VRAM still loads partially.
"""

from __future__ import annotations

import comfy.model_management as mm
import comfy.ops
import folder_paths
import torch
from comfy.patcher_extension import CallbacksMP
from comfy_api.latest import io

from phantom_core.loading.fp8 import WEIGHT_DTYPES, is_fp8
from phantom_core.mmdit.clip import load_clip_vision
from phantom_core.mmdit.load import load_any_dit
from phantom_core.wan.block_swap import block_list, check_block_swap, enable_block_swap
from phantom_core.wan.inspect import stored_format
from phantom_core.wan.umt5 import load_text_encoder
from phantom_core.wan.vae import load_vae

from .files import dit_files, model_error, model_path, tokenizer_files
from .types import CATEGORY, PhantomClipVision, PhantomDiT, PhantomTextEncoder, PhantomVAE, core, manage

EMBEDDED = "embedded"
MAX_BLOCK_SWAP = 64  # the widget's maximum; execute checks the loaded DiT's own block count (add_block_swap)
TEXT_ENCODER_DEVICES = ["default", "cpu"]


def tokenizer_path(name: str) -> str | None:
    """None for the checkpoint's embedded tokenizer, else the full path. ValueError naming `tokenizer`."""
    return None if name == EMBEDDED else model_path("tokenizers", "tokenizer", name)


def pick_dtype(choice: str, load_device: torch.device) -> torch.dtype:
    """Resolve a weight-dtype choice; "default" is bf16 where `load_device` supports it, else fp32.

    Raises ValueError naming `weight_dtype` for an unknown choice.
    """
    if choice == "default":
        return torch.bfloat16 if mm.should_use_bf16(load_device) else torch.float32
    if choice not in WEIGHT_DTYPES:
        raise ValueError(f"weight_dtype is {choice!r}; valid: default, {', '.join(WEIGHT_DTYPES)}")
    return WEIGHT_DTYPES[choice]


def pick_dtypes(choice: str, path: str, load_device: torch.device) -> tuple[torch.dtype | None, torch.dtype]:
    """(weight dtype for the core loader, compute dtype) for a weight-dtype choice and a checkpoint.

    "default" keeps an fp8 / scaled-fp8 file 8-bit and a GGUF file block-quantized (None: the stored format; a 14B
    DiT stays ~14 GB in fp8, less in Q4_K) and loads any other in bf16 where `load_device` supports it, else fp32.
    An fp8 choice stores the Linear weights in fp8 and computes in bf16 / fp32. Raises ValueError naming
    `weight_dtype`.
    """
    compute = pick_dtype("default", load_device)
    if choice == "default":
        keep_stored = path.lower().endswith(".gguf") or stored_format(path).fp8_dtype is not None
        return (None if keep_stored else compute), compute
    dtype = pick_dtype(choice, load_device)
    return dtype, (compute if is_fp8(dtype) else dtype)


def add_block_swap(patcher, blocks: object) -> None:
    """Swap the last `blocks` blocks of the DiT in `patcher` (`wan.block_swap`) each time ComfyUI loads it: after
    ComfyUI has placed the weights (its LoRA patches applied), an ON_LOAD callback moves those blocks' weights to
    pinned CPU memory, from where each forward streams them in. Raises ValueError naming `block_swap` and the
    valid range (ComfyUI does not validate a V3 node's inputs)."""
    n = check_block_swap(blocks, len(block_list(core(patcher))))
    if n:
        patcher.add_callback(CallbacksMP.ON_LOAD, lambda p, *_: enable_block_swap(core(p), n))


class PhantomDiTLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PhantomDiTLoader",
            display_name="Phantom DiT Loader",
            category=CATEGORY,
            description="Loads a Phantom-Wan diffusion transformer (official .safetensors/.pth layout or ComfyUI's), "
                        "or a Phantom MMDiT (the paper's network), recognised by its keys.",
            inputs=[
                io.Combo.Input("dit_name", options=dit_files(),
                               tooltip="Phantom-Wan DiT checkpoint from models/diffusion_models: .safetensors, "
                                       ".pth, or the *.safetensors.index.json of a sharded one (official 14B); or "
                                       "a Phantom MMDiT checkpoint (joint_blocks.* keys)."),
                io.Combo.Input("weight_dtype", options=["default", *WEIGHT_DTYPES], default="default",
                               tooltip="Weight precision. default: an fp8 file stays fp8 (computed in bf16, scales "
                                       "applied); others bf16 where the device supports it, else fp32. fp8_*: "
                                       "store the Linear weights in 8 bits (half of bf16's memory)."),
                io.Int.Input("block_swap", default=0, min=0, max=MAX_BLOCK_SWAP, optional=True,
                             tooltip="Blocks kept in CPU memory and streamed to the GPU just before each runs, the "
                                     "next one prefetched (0 = off; at most the DiT's blocks: 30 for 1.3B, 40 for "
                                     "14B). Less VRAM, slower steps: e.g. the 14B in fp8 at 832x480x81 with 4 "
                                     "references needs about 12 to fit 24 GB."),
            ],
            outputs=[PhantomDiT.Output(display_name="model")],
        )

    @classmethod
    def validate_inputs(cls, dit_name: str | None = None) -> bool | str:
        return model_error("diffusion_models", "dit_name", dit_name) or True

    @classmethod
    def execute(cls, dit_name: str, weight_dtype: str, block_swap: int = 0) -> io.NodeOutput:
        path = model_path("diffusion_models", "dit_name", dit_name)
        load_device, offload_device = mm.get_torch_device(), mm.unet_offload_device()
        dtype, compute_dtype = pick_dtypes(weight_dtype, path, load_device)
        model = load_any_dit(path, dtype=dtype, device=offload_device, ops=comfy.ops.disable_weight_init,
                             compute_dtype=compute_dtype)
        patcher = manage(model, load_device, offload_device)
        add_block_swap(patcher, block_swap)
        return io.NodeOutput(patcher)


class PhantomVAELoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PhantomVAELoader",
            display_name="Phantom VAE Loader",
            category=CATEGORY,
            description="Loads the Wan2.1 video VAE (Wan2.1_VAE.pth / .safetensors).",
            inputs=[
                io.Combo.Input("vae_name", options=folder_paths.get_filename_list("vae"),
                               tooltip="Wan2.1 VAE checkpoint from models/vae."),
            ],
            outputs=[PhantomVAE.Output(display_name="vae")],
        )

    @classmethod
    def validate_inputs(cls, vae_name: str | None = None) -> bool | str:
        return model_error("vae", "vae_name", vae_name) or True

    @classmethod
    def execute(cls, vae_name: str) -> io.NodeOutput:
        path = model_path("vae", "vae_name", vae_name)
        load_device, offload_device = mm.vae_device(), mm.vae_offload_device()
        vae = load_vae(path, dtype=pick_dtype("default", load_device), device=offload_device)
        return io.NodeOutput(manage(vae, load_device, offload_device))


class PhantomTextEncoderLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PhantomTextEncoderLoader",
            display_name="Phantom Text Encoder Loader",
            category=CATEGORY,
            description="Loads the umT5 text encoder (with its sentencepiece tokenizer) used by Wan2.1.",
            inputs=[
                io.Combo.Input("text_encoder_name", options=folder_paths.get_filename_list("text_encoders"),
                               tooltip="umT5 encoder checkpoint from models/text_encoders."),
                io.Combo.Input("tokenizer", options=[EMBEDDED, *tokenizer_files()], default=EMBEDDED,
                               tooltip="embedded: the sentencepiece model stored in the checkpoint (ComfyUI's umT5 "
                                       "files, the tiny default); else a spiece.model of google/umt5-xxl anywhere "
                                       "under models/text_encoders, e.g. google/umt5-xxl/spiece.model (needed for "
                                       "Wan's original .pth)."),
                io.Combo.Input("device", options=TEXT_ENCODER_DEVICES, default="default",
                               tooltip="default: ComfyUI's text-encoder device (the GPU when there is one). cpu: "
                                       "keep the encoder on the CPU so the GPU stays free for the DiT."),
            ],
            outputs=[PhantomTextEncoder.Output(display_name="text_encoder")],
        )

    @classmethod
    def validate_inputs(cls, text_encoder_name: str | None = None, tokenizer: str | None = None) -> bool | str:
        return (model_error("text_encoders", "text_encoder_name", text_encoder_name)
                or (None if tokenizer in (None, EMBEDDED) else model_error("tokenizers", "tokenizer", tokenizer))
                or True)

    @classmethod
    def execute(cls, text_encoder_name: str, tokenizer: str = EMBEDDED, device: str = "default") -> io.NodeOutput:
        path = model_path("text_encoders", "text_encoder_name", text_encoder_name)
        if device not in TEXT_ENCODER_DEVICES:
            raise ValueError(f"device is {device!r}; valid: {', '.join(TEXT_ENCODER_DEVICES)}")
        on_cpu = device == "cpu"
        load_device = torch.device("cpu") if on_cpu else mm.text_encoder_device()
        offload_device = torch.device("cpu") if on_cpu else mm.text_encoder_offload_device()
        # stored dtype kept (a 5.7 B encoder is never upcast wholesale); layers upcast per forward when needed
        encoder = load_text_encoder(path, tokenizer=tokenizer_path(tokenizer), dtype=None, device=offload_device,
                                    compute_dtype=pick_dtype("default", load_device))
        return io.NodeOutput(manage(encoder, load_device, offload_device))


class PhantomCLIPVisionLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PhantomCLIPVisionLoader",
            display_name="Phantom CLIP Vision Loader",
            category=CATEGORY,
            description="Loads a CLIP image tower (open_clip ViT) for the MMDiT's CLIP reference features.",
            inputs=[
                io.Combo.Input("clip_vision_name", options=folder_paths.get_filename_list("clip_vision"),
                               tooltip="CLIP vision checkpoint from models/clip_vision: ComfyUI's "
                                       "clip_vision_h.safetensors (ViT-H-14, as Wan2.1 I2V uses) or an open_clip "
                                       "ViT checkpoint (open_clip_model.safetensors)."),
            ],
            outputs=[PhantomClipVision.Output(display_name="clip_vision")],
        )

    @classmethod
    def validate_inputs(cls, clip_vision_name: str | None = None) -> bool | str:
        return model_error("clip_vision", "clip_vision_name", clip_vision_name) or True

    @classmethod
    def execute(cls, clip_vision_name: str) -> io.NodeOutput:
        path = model_path("clip_vision", "clip_vision_name", clip_vision_name)
        load_device, offload_device = mm.text_encoder_device(), mm.text_encoder_offload_device()
        tower = load_clip_vision(path, dtype=pick_dtype("default", load_device), device=offload_device)
        return io.NodeOutput(manage(tower, load_device, offload_device))
