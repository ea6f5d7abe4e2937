"""PhantomRephrase: rewrite the prompt so that every reference subject is named with its appearance.

A thin adapter over `phantom_core.rephraser` (see there for the instructions, the answer rule, the retry and
the cache). Local models are folders under ComfyUI's `models/LLM` (registered here if ComfyUI does not know
the name). The endpoint's API key is read from the environment variable NAMED by `api_key_env`; the key
itself never enters the workflow, the outputs or the history.
"""

from __future__ import annotations

import os

import folder_paths
from comfy_api.latest import io, ui

from phantom_core.references import tensor_to_pil
from phantom_core.rephrase_backends import BACKENDS, make_backend
from phantom_core.rephraser import MAX_REFERENCES, Rephraser

from .types import CATEGORY, PhantomReferences

LLM_FOLDER = "LLM"
NO_MODEL = "none"
LANGUAGES = ["auto", "english", "chinese"]

if LLM_FOLDER not in folder_paths.folder_names_and_paths:
    folder_paths.add_model_folder_path(LLM_FOLDER, os.path.join(folder_paths.models_dir, LLM_FOLDER))


def local_model_folders() -> list[str]:
    """Names of the sub-folders of every `models/LLM` path that hold a config.json (sorted, unique)."""
    names = {name for base in folder_paths.get_folder_paths(LLM_FOLDER) if os.path.isdir(base)
             for name in os.listdir(base) if os.path.isfile(os.path.join(base, name, "config.json"))}
    return sorted(names)


def local_model_path(name: str) -> str:
    """`models/LLM/<name>` as a full path ("" for "none"). Raises ValueError naming `local_model`."""
    if name == NO_MODEL:
        return ""
    for base in folder_paths.get_folder_paths(LLM_FOLDER):
        if os.path.isfile(os.path.join(base, name, "config.json")):
            return os.path.join(base, name)
    raise ValueError(f"local_model {name!r} is not a model folder under models/{LLM_FOLDER} "
                     f"(found: {', '.join(local_model_folders()) or 'none'})")


def gather_images(references: dict | None, batches: list) -> list:
    """PIL images from our references output or the IMAGE inputs (a batch gives one reference per image)."""
    if references is not None and any(b is not None for b in batches):
        raise ValueError("connect either `references` or image_1..image_4, not both")
    tensors = references["images"] if references is not None else [img for b in batches if b is not None
                                                                    for img in b]
    if not tensors:
        raise ValueError("no reference image: connect `references` or at least image_1")
    return [tensor_to_pil(t[..., :3]) for t in tensors]


class PhantomRephrase(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        img_tip = "Reference image (a batch counts as one reference per image); 1 to 4 references in total."
        hint_tip = "Optional words about reference {k} (e.g. 'the grandmother', 'red scarf'), used by the model."
        return io.Schema(
            node_id="PhantomRephrase",
            display_name="Phantom Rephrase Prompt",
            category=CATEGORY,
            description="Rewrites the prompt with a vision-language model so that every reference subject is "
                        "named with a short appearance description (Phantom paper, Sec. 3.3). Identical "
                        "inputs reuse the cached answer.",
            inputs=[
                io.String.Input("prompt", multiline=True, tooltip="The prompt to rewrite."),
                io.Combo.Input("backend", options=list(BACKENDS), default="openai-compatible",
                               tooltip="openai-compatible: a chat-completions server (Ollama, vLLM, llama.cpp, "
                                       "hosted). local: a model folder under models/LLM."),
                io.String.Input("endpoint_url", default="", placeholder="http://127.0.0.1:11434/v1",
                                tooltip="Base URL of the OpenAI-compatible server (…/v1)."),
                io.String.Input("endpoint_model", default="", placeholder="qwen2.5vl:7b",
                                tooltip="Model name on that server (a vision-language model)."),
                io.String.Input("api_key_env", default="", placeholder="OPENAI_API_KEY",
                                tooltip="NAME of the environment variable holding the API key (never the key "
                                        "itself); empty for local servers without a key."),
                io.Combo.Input("local_model", options=[NO_MODEL, *local_model_folders()], default=NO_MODEL,
                               tooltip="A transformers vision-language instruct model folder in models/LLM "
                                       "(e.g. Qwen2.5-VL-3B-Instruct); loaded once, on the GPU if any."),
                io.Combo.Input("language", options=LANGUAGES, default="auto",
                               tooltip="Language of the descriptions and the rewritten prompt; auto = the "
                                       "prompt's language."),
                io.Int.Input("max_new_tokens", default=512, min=16, max=4096,
                             tooltip="Upper bound on the answer's length, in tokens."),
                io.Float.Input("temperature", default=0.0, min=0.0, max=2.0, step=0.05,
                               tooltip="0 = greedy (deterministic); above 0 samples with `seed`."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=False,
                             tooltip="Sampling seed (temperature > 0); fixed, so re-queueing hits the cache."),
                io.Float.Input("timeout_s", default=120.0, min=1.0, max=600.0, step=1.0,
                               tooltip="Endpoint only: seconds to wait per request; 2 retries on transient "
                                       "faults."),
                io.Boolean.Input("strict", default=True,
                                 tooltip="On: an answer that drops a reference subject is retried once, then an "
                                         "error. Off: use it anyway (for small models)."),
                PhantomReferences.Input("references", optional=True,
                                        tooltip="From Phantom References (instead of image_1..image_4)."),
                *[io.Image.Input(f"image_{k}", optional=True, tooltip=img_tip) for k in range(1, 5)],
                *[io.String.Input(f"hint_{k}", optional=True, default="", tooltip=hint_tip.format(k=k))
                  for k in range(1, MAX_REFERENCES + 1)],
            ],
            outputs=[io.String.Output(display_name="prompt", tooltip="The rewritten prompt (to the text encoder)."),
                     io.String.Output(display_name="descriptions",
                                      tooltip="One line per reference: 'k: description'.")],
        )

    @classmethod
    def execute(cls, prompt: str, backend: str, endpoint_url: str, endpoint_model: str, api_key_env: str,
                local_model: str, language: str, max_new_tokens: int, temperature: float, seed: int,
                timeout_s: float, strict: bool, references: dict | None = None, image_1=None, image_2=None,
                image_3=None, image_4=None, hint_1: str = "", hint_2: str = "", hint_3: str = "",
                hint_4: str = "") -> io.NodeOutput:
        images = gather_images(references, [image_1, image_2, image_3, image_4])
        hints = [hint_1, hint_2, hint_3, hint_4][:len(images)]
        chat = make_backend(backend, endpoint_url=endpoint_url, endpoint_model=endpoint_model,
                            api_key_env=api_key_env, timeout_s=timeout_s, local_path=local_model_path(local_model),
                            max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
        result = Rephraser(chat, strict=strict).rephrase(prompt, images, hints=hints, language=language)
        descriptions = "\n".join(f"{k}: {d}" for k, d in enumerate(result.descriptions, start=1))
        shown = result.prompt + ("\n\n" + descriptions if any(result.descriptions) else "")
        return io.NodeOutput(result.prompt, descriptions, ui=ui.PreviewText(shown))


REPHRASE_NODES: list[type[io.ComfyNode]] = [PhantomRephrase]
