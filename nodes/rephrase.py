"""PhantomRephrase: rewrite the prompt so that every reference subject is named with its appearance.

A thin adapter over `phantom_core.rephrase.rephraser` (see there for the instructions, the answer rule, the retry and
the cache). Local models are folders under ComfyUI's `models/LLM` (`nodes.files`: listed, and resolved strictly
inside it). The endpoint's API key is read from the environment variable NAMED by `api_key_env`; the key
itself never enters the workflow, the outputs or the history.

The rewritten text is shown on the node through `PromptServer.send_progress_text` (the bundled frontend draws
that text on any node; it renders a `ui` "text" output only on PreviewAny). A local model is put on the GPU
after asking ComfyUI to free what it needs (`free_memory`, which unloads ComfyUI's loaded models, our Phantom
models included, only until that much is free, unlike `unload_all_models`, which would evict everything and make
every later node reload), and is moved back to the CPU after the rephrase unless
`keep_loaded` is on.
"""

from __future__ import annotations

import comfy.model_management as mm
import torch
from comfy_api.latest import io, ui

from phantom_core.log import logger
from phantom_core.references import MAX_REFERENCES, tensor_to_pil, to_rgb
from phantom_core.rephrase.backends import BACKENDS, REPHRASE_RANGES, make_backend
from phantom_core.rephrase.rephraser import Rephraser

from .files import LLM_FOLDER, local_model_folders, model_error, model_path
from .types import CATEGORY, PhantomReferences
from .widgets import float_input, int_input, show_on_node

NO_MODEL = "none"
LANGUAGES = ["auto", "english", "chinese"]


def local_model_path(name: str) -> str:
    """`models/LLM/<name>` as a full path ("" for "none"). Raises ValueError naming `local_model`."""
    return "" if name == NO_MODEL else model_path(LLM_FOLDER, "local_model", name)


def gather_images(references: dict | None, batches: list, hints: list[str]) -> tuple[list, list[str]]:
    """(PIL images, one hint per image) from our references output or the IMAGE inputs.

    hint_k belongs to input k: with `references`, to reference k; with image_1..image_4, to every image of the
    batch on image_k (a batch gives one reference per image), so an empty image_1 does not shift hint_2 onto
    image_2's place. A hint whose input is empty is ignored with a warning. Images with an alpha channel (our
    references from a masked Load Image) are composited over white, as the video model sees them.
    """
    if references is not None and any(b is not None for b in batches):
        raise ValueError("connect either `references` or image_1..image_4, not both")
    if references is not None:
        groups = [([t], hint) for t, hint in zip(references["images"], hints)]
        unused = [k for k in range(len(references["images"]) + 1, len(hints) + 1) if hints[k - 1].strip()]
    else:
        groups = [(list(b), hint) for b, hint in zip(batches, hints) if b is not None]
        unused = [k for k, (b, hint) in enumerate(zip(batches, hints), start=1) if b is None and hint.strip()]
    if unused:
        logger.warning("PhantomRephrase: hint_%d is set but reference %d is not connected; it is ignored",
                       unused[0], unused[0])
    pairs = [(to_rgb(tensor_to_pil(t)), hint) for tensors, hint in groups for t in tensors]  # alpha over white
    if not pairs:
        raise ValueError("no reference image: connect `references` or at least image_1")
    return [image for image, _ in pairs], [hint for _, hint in pairs]


def free_comfy_memory(bytes_needed: int, device: str) -> None:
    """Before the local model goes to a GPU: let ComfyUI unload loaded models until `bytes_needed` are free on
    that device (nothing to do on the CPU)."""
    dev = torch.device(device)
    if dev.type == "cpu":
        return
    if dev.type == "cuda" and dev.index is None:  # ComfyUI's loaded models carry an indexed device ("cuda:0")
        dev = torch.device("cuda", torch.cuda.current_device())
    logger.info("PhantomRephrase: asking ComfyUI to free %.2f GiB on %s", bytes_needed / 2**30, dev)
    mm.free_memory(bytes_needed, dev)


class PhantomRephrase(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        img_tip = "Reference image (a batch counts as one reference per image); 1 to 4 references in total."
        hint_tip = ("Optional words about the subject of image_{k} (every image of a batch there), or of reference "
                    "{k} with `references` (e.g. 'the grandmother', 'red scarf'); used by the model.")
        return io.Schema(
            node_id="PhantomRephrase",
            display_name="Phantom Rephrase Prompt",
            category=CATEGORY,
            description="Rewrites the prompt with a vision-language model so that every reference subject is "
                        "named with a short appearance description (Phantom, arXiv 2502.11079). Identical "
                        "inputs reuse the cached answer.",
            inputs=[
                io.String.Input("prompt", multiline=True, default="",
                                tooltip="The prompt to rewrite, e.g. 'a man walks his dog in the park'."),
                io.Combo.Input("backend", options=list(BACKENDS), default="openai-compatible",
                               tooltip="openai-compatible: a chat-completions server (Ollama, vLLM, llama.cpp, "
                                       "hosted). local: a model folder under models/LLM."),
                io.String.Input("endpoint_url", default="", placeholder="http://127.0.0.1:11434/v1",
                                tooltip="Base URL of the OpenAI-compatible server, ending in /v1, e.g. "
                                        "http://127.0.0.1:11434/v1 (Ollama) or http://127.0.0.1:8000/v1 (vLLM). "
                                        "Empty with backend 'local'."),
                io.String.Input("endpoint_model", default="", placeholder="qwen2.5vl:7b",
                                tooltip="Model name on that server, a vision-language model, e.g. qwen2.5vl:7b "
                                        "(Ollama) or Qwen/Qwen2.5-VL-7B-Instruct (vLLM)."),
                io.String.Input("api_key_env", default="", placeholder="OPENAI_API_KEY",
                                tooltip="NAME of the environment variable holding the API key, e.g. OPENAI_API_KEY "
                                        "(never the key itself); empty for local servers without a key."),
                io.Combo.Input("local_model", options=[NO_MODEL, *local_model_folders()], default=NO_MODEL,
                               tooltip="A transformers vision-language instruct model folder in models/LLM "
                                       "(e.g. Qwen2.5-VL-3B-Instruct); loaded once, on the GPU if any."),
                io.Combo.Input("language", options=LANGUAGES, default="auto",
                               tooltip="Language of the descriptions and the rewritten prompt. auto: Chinese "
                                       "if the prompt is mostly Chinese, else English."),
                int_input("max_new_tokens", REPHRASE_RANGES["max_new_tokens"], 512,
                          "Upper bound on the answer's length, in tokens."),
                float_input("temperature", REPHRASE_RANGES["temperature"], 0.0, 0.05,
                            "0 = greedy (deterministic); above 0 samples with `seed`."),
                int_input("seed", REPHRASE_RANGES["seed"], 0,
                          "Sampling seed (temperature > 0); fixed, so re-queueing hits the cache.",
                          control_after_generate=False),
                float_input("timeout_s", REPHRASE_RANGES["timeout_s"], 120.0, 1.0,
                            "Endpoint only: the most seconds the whole rephrase may take, every request and retry "
                            "included (up to 2 retries of transient faults, 1 of an unusable answer); then the node "
                            "fails with a time-limit error."),
                io.Boolean.Input("strict", default=True,
                                 tooltip="On: an answer that drops a reference subject is retried once, then an "
                                         "error. Off: use it anyway (for small models)."),
                PhantomReferences.Input("references", optional=True,
                                        tooltip="From Phantom References (instead of image_1..image_4)."),
                *[io.Image.Input(f"image_{k}", optional=True, tooltip=img_tip) for k in range(1, 5)],
                *[io.String.Input(f"hint_{k}", optional=True, default="", tooltip=hint_tip.format(k=k))
                  for k in range(1, MAX_REFERENCES + 1)],
                io.Boolean.Input("keep_loaded", optional=True, default=False,
                                 tooltip="Local model only. Off: after the rephrase the model moves to the CPU "
                                         "(GPU memory goes back to the video model). On: it stays on the GPU, "
                                         "faster for the next new prompt but holding that memory."),
            ],
            hidden=[io.Hidden.unique_id],
            outputs=[io.String.Output(display_name="prompt", tooltip="The rewritten prompt (to the text encoder)."),
                     io.String.Output(display_name="descriptions",
                                      tooltip="One line per reference: 'k: description'.")],
        )

    @classmethod
    def validate_inputs(cls, backend: str | None = None, local_model: str | None = None) -> bool | str:
        # ComfyUI checks no V3 combo: a local model must be a listed folder, resolved inside models/LLM
        if backend not in (None, "local") or local_model == NO_MODEL:
            return True
        return model_error(LLM_FOLDER, "local_model", local_model) or True

    @classmethod
    def execute(cls, prompt: str, backend: str, endpoint_url: str, endpoint_model: str, api_key_env: str,
                local_model: str, language: str, max_new_tokens: int, temperature: float, seed: int,
                timeout_s: float, strict: bool, references: dict | None = None, image_1=None, image_2=None,
                image_3=None, image_4=None, hint_1: str = "", hint_2: str = "", hint_3: str = "",
                hint_4: str = "", keep_loaded: bool = False) -> io.NodeOutput:
        images, hints = gather_images(references, [image_1, image_2, image_3, image_4],
                                      [hint_1, hint_2, hint_3, hint_4])
        local_path = local_model_path(local_model) if backend == "local" else ""
        chat = make_backend(backend, endpoint_url=endpoint_url, endpoint_model=endpoint_model,
                            api_key_env=api_key_env, timeout_s=timeout_s, local_path=local_path,
                            max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                            device=str(mm.get_torch_device()), after_use="keep" if keep_loaded else "offload",
                            free_memory=free_comfy_memory, after_offload=mm.soft_empty_cache)
        time_limit = timeout_s if backend == "openai-compatible" else None
        result = Rephraser(chat, strict=strict, time_limit_s=time_limit).rephrase(prompt, images, hints=hints,
                                                                                  language=language)
        descriptions = "\n".join(f"{k}: {d}" for k, d in enumerate(result.descriptions, start=1))
        shown = result.prompt + ("\n\n" + descriptions if any(result.descriptions) else "")
        show_on_node(shown, cls.hidden.unique_id)
        return io.NodeOutput(result.prompt, descriptions, ui=ui.PreviewText(shown))


REPHRASE_NODES: list[type[io.ComfyNode]] = [PhantomRephrase]
