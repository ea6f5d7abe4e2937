"""The rephraser's back-ends behind `rephrase_types.ChatBackend`, and `make_backend`, which builds one from flat
settings (what the ComfyUI node and the CLI have).

- `rephrase_local.LocalVLMBackend` ("local"): a transformers vision-language instruct checkpoint in a folder,
  loaded once and cached, moved off the GPU (or dropped, or kept) after each rephrase.
- `rephrase_endpoint.EndpointBackend` ("openai-compatible"): any OpenAI-compatible `/chat/completions` server,
  with a total deadline per request, bounded retries of transient faults, and the API key only ever read from
  the environment variable named by `api_key_env`.

The public names of both modules (and `ChatBackend`) are re-exported here for existing callers.
"""

from __future__ import annotations

from collections.abc import Callable

from phantom_core.inference.settings import Range
from phantom_core.rephrase.endpoint import EndpointBackend, EndpointConfig
from phantom_core.rephrase.local import LocalConfig, LocalVLMBackend

BACKENDS = ("openai-compatible", "local")
# what make_backend accepts; the rephrase node's widgets declare exactly these min / max
REPHRASE_RANGES: dict[str, Range] = {
    "max_new_tokens": Range(16, 4096, 1, "upper bound on the answer's length, tokens"),
    "temperature": Range(0.0, 2.0, meaning="0 = greedy"),
    "seed": Range(0, 2**31 - 1, 1, "sampling seed of the rephraser"),
    "timeout_s": Range(1.0, 600.0, meaning="seconds for the whole rephrase on an endpoint"),
}


def make_backend(backend: str, *, endpoint_url: str = "", endpoint_model: str = "", api_key_env: str = "",
                 timeout_s: float = 120.0, max_retries: int = 2, local_path: str = "", max_new_tokens: int = 512,
                 temperature: float = 0.0, seed: int = 0, device: str = "auto", after_use: str = "offload",
                 free_memory: Callable[[int, str], None] | None = None,
                 after_offload: Callable[[], None] | None = None) -> EndpointBackend | LocalVLMBackend:
    """Build the back-end named `backend` ("openai-compatible" | "local") from flat settings.

    `device`, `after_use`, `free_memory`, `after_offload`: local back-end only (see `LocalVLMBackend`,
    `LocalConfig`).
    Raises ValueError naming the missing or invalid setting (no endpoint URL, no model folder, ...).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend is {backend!r}; valid: {', '.join(BACKENDS)}")
    for name, value in (("max_new_tokens", max_new_tokens), ("temperature", temperature), ("seed", seed),
                        ("timeout_s", timeout_s)):
        REPHRASE_RANGES[name].check(name, value)
    if backend == "local":
        if not local_path.strip():
            raise ValueError("no rephraser back-end configured: backend is 'local' but no model folder is given "
                             "(put a vision-language model folder under models/LLM)")
        return LocalVLMBackend(LocalConfig(local_path, max_new_tokens, temperature, seed, device=device,
                                           after_use=after_use),
                               free_memory=free_memory, after_offload=after_offload)
    if not endpoint_url.strip():
        raise ValueError("no rephraser back-end configured: backend is 'openai-compatible' but endpoint_url is "
                         "empty (e.g. http://127.0.0.1:11434/v1 for Ollama)")
    return EndpointBackend(EndpointConfig(endpoint_url.strip(), endpoint_model.strip(), api_key_env.strip(),
                                          timeout_s, max_retries, max_tokens=max_new_tokens,
                                          temperature=temperature, seed=seed))
