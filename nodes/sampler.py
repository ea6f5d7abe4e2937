"""PhantomSampler: noise -> video latents with Phantom's three-pass guidance (paper Eq. 5), on either DiT.

Boundary conversions only: ComfyUI CONDITIONING -> text context tensors, raw reference latents -> normalized
ones (and the references' CLIP features to a Phantom MMDiT that reads them, `mmdit.inputs.clip_features_for`), the
result back to ComfyUI's raw-latent LATENT dict. The loop itself is `phantom_core.sampling.loop`.

The DiT is loaded through ComfyUI's `model_management.load_models_gpu` with the memory our forward needs beside the
weights (`load_for_sampling`): ComfyUI's own Wan estimate (`BaseModel.memory_required`, used by its samplers) sees
only the video latents, while our forward attends over the reference tokens too and batches the guidance passes.
"""

from __future__ import annotations

from functools import partial

import comfy.latent_formats
import comfy.model_management as mm
import comfy.utils
import latent_preview
import torch
from comfy_api.latest import io

from phantom_core.inference.settings import SETTING_RANGES, check_image_guidance_window
from phantom_core.mmdit.inputs import clip_features_for
from phantom_core.mmdit.memory import mmdit_sampling_activation_bytes
from phantom_core.mmdit.model import PhantomMMDiT
from phantom_core.sampling.cache import StepCache
from phantom_core.sampling.loop import BATCH_PASSES, SAMPLER_PRESETS, SOLVERS, check_batch_passes, sample_from_seed
from phantom_core.wan.attention import ATTENTION_CHOICES, check_attention, use_attention
from phantom_core.wan.block_compile import set_compiled
from phantom_core.wan.dit import PhantomWanDiT
from phantom_core.wan.latents import denormalize_latents, latent_shape, normalize_latents
from phantom_core.wan.memory import sampling_activation_bytes

from .types import CATEGORY, PhantomDiT, PhantomRefLatents, core
from .widgets import float_input, int_input


def conditioning_to_context(conditioning: list, name: str, text_dim: int) -> torch.Tensor:
    """ComfyUI CONDITIONING `[[cond [1, L, D], {...}]]` -> context `[1, L, D]` float (the DiT keeps the first
    512 tokens itself, as Wan does).

    Raises ValueError naming `name` when there is not exactly one entry or D differs from the DiT's text_dim.
    """
    if len(conditioning) != 1:
        raise ValueError(f"{name} holds {len(conditioning)} conditioning entries; PhantomSampler takes exactly one "
                         "(from Phantom Text Encode or CLIPTextEncode with a wan CLIPLoader)")
    cond = conditioning[0][0]  # (1, L, D)
    if cond.ndim != 3 or cond.shape[0] != 1 or cond.shape[-1] != text_dim:
        raise ValueError(f"{name} conditioning has shape {tuple(cond.shape)}; this DiT needs [1, L, {text_dim}] "
                         "(umT5 text features of the matching size)")
    return cond.float()


def sampler_preset(preset: str) -> dict:
    """The settings a preset overrides ({} for "custom"); ValueError naming `preset` for an unknown one."""
    if preset == "custom":
        return {}
    if preset not in SAMPLER_PRESETS:
        raise ValueError(f"preset is {preset!r}; valid: custom, {', '.join(SAMPLER_PRESETS)}")
    return dict(SAMPLER_PRESETS[preset])


def check_size(reference_latents: dict, width: int, height: int) -> None:
    """Raise ValueError when the sampler's width/height differ from those the references were encoded at."""
    ref_w, ref_h = reference_latents["width"], reference_latents["height"]
    if (ref_w, ref_h) != (width, height):
        raise ValueError(f"width x height is {width}x{height} but reference_latents were encoded at {ref_w}x{ref_h}; "
                         "set Phantom Encode References to the same size")


def load_for_sampling(model, frames: int, height: int, width: int, num_refs: int, w_img: float,
                      w_text: float, batch_passes: str = "auto", clip_tokens: int = 0) -> None:
    """Have ComfyUI load the DiT patcher `model` to its device, keeping free what one sampling step needs beside the
    weights (the references' tokens counted: `wan.memory.sampling_activation_bytes` for a Phantom-Wan DiT,
    `mmdit.memory.mmdit_sampling_activation_bytes` with `clip_tokens` CLIP tokens per reference for a Phantom MMDiT):
    `memory_required` (other models are evicted for it) is the batched guidance passes' need unless `batch_passes`
    is "off"; `minimum_memory_required` (what a partial load leaves free) is one pass's unless it is "on" (with
    "auto" the sampler runs the passes one at a time when the batch does not fit)."""
    dit = core(model)
    batched = one = 0
    if isinstance(dit, PhantomWanDiT):
        need = partial(sampling_activation_bytes, dit.config, frames, height, width, num_refs,
                       dtype=dit.compute_dtype)
    elif isinstance(dit, PhantomMMDiT):
        need = partial(mmdit_sampling_activation_bytes, dit.config, frames, height, width, num_refs,
                       dtype=dit.compute_dtype, clip_tokens=clip_tokens)
    else:
        need = None
    if need is not None:
        # w_img = w_text = 1 leaves Eq. 5 one pass: the need of the passes run one at a time
        batched, one = need(w_img=w_img, w_text=w_text), need(w_img=1.0, w_text=1.0)
    mm.load_models_gpu([model], memory_required=one if batch_passes == "off" else batched,
                       minimum_memory_required=batched if batch_passes == "on" else one)


class PhantomSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PhantomSampler",
            display_name="Phantom Sampler",
            category=CATEGORY,
            description="Generates a video of the reference subjects following the prompt (Phantom-Wan or the "
                        "Phantom MMDiT).",
            inputs=[
                PhantomDiT.Input("model", tooltip="From Phantom DiT Loader (a Phantom-Wan DiT or a Phantom MMDiT)."),
                io.Conditioning.Input("positive", tooltip="The prompt, [1, L, 4096] umT5 features."),
                io.Conditioning.Input("negative", tooltip="The negative prompt, [1, L, 4096] umT5 features."),
                PhantomRefLatents.Input("reference_latents",
                                        tooltip="From Phantom Encode References (or Phantom CLIP Encode References, "
                                                "for an MMDiT)."),
                int_input("width", SETTING_RANGES["width"], 832,
                          "Video width in px (multiple of 16); must equal the references' width."),
                int_input("height", SETTING_RANGES["height"], 480,
                          "Video height in px (multiple of 16); must equal the references' height."),
                int_input("frames", SETTING_RANGES["frames"], 81, "Number of video frames, 4k+1 (81 = 5 s at 16 fps)."),
                int_input("steps", SETTING_RANGES["steps"], 50, "Sampling steps (official: 50)."),
                float_input("shift", SETTING_RANGES["shift"], 5.0, 0.1,
                            "Flow time shift of the sigma schedule (official: 5.0)."),
                io.Combo.Input("solver", options=list(SOLVERS), default=SOLVERS[0],
                               tooltip="unipc: UniPC bh2 as the official code; euler: flow Euler as the paper."),
                float_input("w_img", SETTING_RANGES["w_img"], 5.0, 0.1,
                            "Reference-image guidance scale (official 5.0, paper 3.0)."),
                float_input("w_text", SETTING_RANGES["w_text"], 7.5, 0.1, "Text guidance scale (official 7.5)."),
                int_input("seed", SETTING_RANGES["seed"], 42,
                          "Seed of the initial noise (CPU generator: the same video on any device).",
                          control_after_generate=True),
                io.Combo.Input("preset", options=["custom", *SAMPLER_PRESETS], default="custom",
                               tooltip="custom: use the settings above. official: UniPC, 50 steps, shift 5, w_img 5, "
                                       "w_text 7.5 (the Phantom-Wan release). paper: Euler, 50 steps, shift 5, "
                                       "w_img 3, w_text 7.5 (arXiv 2502.11079). A preset overrides steps, shift, "
                                       "solver, w_img and w_text."),
                float_input("image_guidance_start", SETTING_RANGES["image_guidance_start"], 0.0, 0.01,
                            "Fraction of the steps where the reference-image guidance pass (v_neg) starts; "
                            "outside [start, end) w_img acts as 1 and the step runs one DiT pass fewer. Official: "
                            "0.", optional=True),
                float_input("image_guidance_end", SETTING_RANGES["image_guidance_end"], 1.0, 0.01,
                            "Fraction of the steps where the v_neg pass ends (official: 1).", optional=True),
                float_input("cache_threshold", SETTING_RANGES["cache_threshold"], 0.0, 0.01,
                            "Step cache (EasyCache rule, one state per guidance pass): reuse a pass's output while "
                            "its predicted change stays under this; 0 = off (official). Larger is faster and "
                            "further from the uncached video (README, Speed).", optional=True),
                io.Combo.Input("attention", options=list(ATTENTION_CHOICES), default="auto", optional=True,
                               tooltip="Attention kernel of the DiT. auto: FlashAttention, else SageAttention, when "
                                       "installed and the GPU and dtype fit (else PyTorch SDPA), unless the "
                                       "PHANTOM_ATTENTION environment variable names one; sdpa: PyTorch's; flash / "
                                       "sage: refused when not installed; math: the slow float32 reference."),
                io.Boolean.Input("compile", default=False, optional=True,
                                 tooltip="torch.compile each transformer block (regional compilation): the first "
                                         "run compiles for a while, later runs are faster. Needs Triton on the GPU "
                                         "(a C++ compiler on the CPU). Off by default."),
                io.Combo.Input("batch_passes", options=list(BATCH_PASSES), default="auto", optional=True,
                               tooltip="The guidance passes of a step as one batched forward. auto: batched unless "
                                       "the batch would not fit the free GPU memory (then one at a time); on; off: "
                                       "one at a time (a third of the activation memory, slower). Same video."),
            ],
            outputs=[io.Latent.Output(display_name="latent")],
        )

    @classmethod
    def validate_inputs(cls, frames: int | None = None) -> bool | str:
        # declaring `frames` here makes ComfyUI skip its own type and range check: the Range does all three
        return (frames is not None and SETTING_RANGES["frames"].error("frames", frames)) or True

    @classmethod
    def execute(cls, model, positive, negative, reference_latents: dict, width: int, height: int, frames: int,
                steps: int, shift: float, solver: str, w_img: float, w_text: float, seed: int,
                preset: str = "custom", image_guidance_start: float = 0.0, image_guidance_end: float = 1.0,
                cache_threshold: float = 0.0, attention: str = "auto", compile: bool = False,
                batch_passes: str = "auto") -> io.NodeOutput:
        SETTING_RANGES["frames"].check("frames", frames)
        check_attention(attention, "attention")  # ComfyUI checks no V3 combo
        check_batch_passes(str(batch_passes))  # ComfyUI checks no V3 combo: a word, never a bool, reaches here
        for name, value in (("image_guidance_start", image_guidance_start), ("image_guidance_end", image_guidance_end),
                            ("cache_threshold", cache_threshold)):
            SETTING_RANGES[name].check(name, value)
        check_image_guidance_window(image_guidance_start, image_guidance_end)
        settings = dict(steps=steps, shift=shift, solver=solver, w_img=w_img, w_text=w_text)
        settings |= sampler_preset(preset)
        if settings["solver"] not in SOLVERS:  # ComfyUI checks no V3 combo: refuse before the DiT loads
            raise ValueError(f"solver is {solver!r}; valid: {', '.join(SOLVERS)}")
        check_size(reference_latents, width, height)
        dit = core(model)
        context = conditioning_to_context(positive, "positive", dit.config.text_dim)  # (1, L1, D)
        context_neg = conditioning_to_context(negative, "negative", dit.config.text_dim)  # (1, L2, D)
        ref_clip = clip_features_for(dit, reference_latents.get("clip"))  # (1, N, T, C) or None
        load_for_sampling(model, frames, height, width, reference_latents["samples"].shape[2], settings["w_img"],
                          settings["w_text"], batch_passes, clip_tokens=0 if ref_clip is None else ref_clip.shape[2])
        device = model.load_device
        refs = normalize_latents(reference_latents["samples"].float()).to(device)  # (1, 16, N, h, w)
        pbar = comfy.utils.ProgressBar(settings["steps"])
        previewer = latent_preview.get_previewer(device, comfy.latent_formats.Wan21())  # None unless enabled

        def on_step(step: int, total: int, x0_pred: torch.Tensor) -> None:
            mm.throw_exception_if_processing_interrupted()
            # x0_pred is normalized, i.e. ComfyUI's Wan21 model space: its previewers apply as they are
            preview = previewer.decode_latent_to_preview_image("JPEG", x0_pred) if previewer else None
            pbar.update_absolute(step + 1, total, preview)

        cache = StepCache(cache_threshold) if cache_threshold > 0 else None
        window = (image_guidance_start, image_guidance_end)
        set_compiled(dit, compile)  # in place: the loaded model is shared with later runs
        with use_attention(None if attention == "auto" else attention):  # "auto": $PHANTOM_ATTENTION may choose
            latents = sample_from_seed(dit, seed, latent_shape(frames, height, width), refs, context.to(device),
                                       context_neg.to(device), **settings, callback=on_step, cache=cache,
                                       model_dtype=dit.compute_dtype, image_guidance_window=window,
                                       batch_passes=batch_passes,
                                       ref_clip=None if ref_clip is None else ref_clip.to(device))  # (1,16,F,h,w)
        raw = denormalize_latents(latents.float()).to(mm.intermediate_device())  # (1, 16, F, h, w)
        return io.NodeOutput({"samples": raw})
