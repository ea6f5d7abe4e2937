"""API-format prompts built here (not read from workflows/), so node tests do not depend on the shipped files."""

from __future__ import annotations

TINY_MODELS = {"dit_name": "phantom_tiny_dit.safetensors", "vae_name": "phantom_tiny_vae.safetensors",
               "text_encoder_name": "phantom_tiny_umt5.safetensors"}


def pipeline_prompt(images: list[str], *, size: int = 32, frames: int = 1, steps: int = 2, seed: int = 1,
                    prefix: str = "phantom_test", **inputs: dict) -> dict:
    """The whole node chain on the tiny default: LoadImage x N -> PhantomReferences -> PhantomEncodeReferences ->
    PhantomSampler -> PhantomDecode -> PhantomSaveVideo, at `size` x `size` px. Node ids are the class names'
    short forms ("dit", "vae", "te", "pos", "neg", "img1".., "refs", "enc", "sampler", "decode", "save");
    `inputs` = {node id: {input: value}} changes any input."""
    prompt = {
        "dit": {"class_type": "PhantomDiTLoader", "inputs": {"dit_name": TINY_MODELS["dit_name"],
                                                             "weight_dtype": "default"}},
        "vae": {"class_type": "PhantomVAELoader", "inputs": {"vae_name": TINY_MODELS["vae_name"]}},
        "te": {"class_type": "PhantomTextEncoderLoader",
               "inputs": {"text_encoder_name": TINY_MODELS["text_encoder_name"], "tokenizer": "embedded",
                          "device": "default"}},
        "pos": {"class_type": "PhantomTextEncode", "inputs": {"text_encoder": ["te", 0], "text": "a subject"}},
        "neg": {"class_type": "PhantomTextEncode", "inputs": {"text_encoder": ["te", 0], "text": "blurry"}},
        "refs": {"class_type": "PhantomReferences", "inputs": {"mode": "letterbox"}},
        "enc": {"class_type": "PhantomEncodeReferences",
                "inputs": {"vae": ["vae", 0], "references": ["refs", 0], "width": size, "height": size}},
        "sampler": {"class_type": "PhantomSampler",
                    "inputs": {"model": ["dit", 0], "positive": ["pos", 0], "negative": ["neg", 0],
                               "reference_latents": ["enc", 0], "width": size, "height": size, "frames": frames,
                               "steps": steps, "shift": 5.0, "solver": "euler", "w_img": 5.0, "w_text": 7.5,
                               "seed": seed, "preset": "custom"}},
        "decode": {"class_type": "PhantomDecode",
                   "inputs": {"vae": ["vae", 0], "latent": ["sampler", 0], "tile_size": 0, "tile_overlap": 64}},
        "save": {"class_type": "PhantomSaveVideo",
                 "inputs": {"images": ["decode", 0], "fps": 16.0, "quality": 8, "filename_prefix": prefix}},
    }
    for k, name in enumerate(images, start=1):
        prompt[f"img{k}"] = {"class_type": "LoadImage", "inputs": {"image": name}}
        prompt["refs"]["inputs"][f"image_{k}"] = [f"img{k}", 0]
    for node, values in inputs.items():
        prompt[node]["inputs"] |= values
    return prompt
