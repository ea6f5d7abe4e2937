"""The rephraser's two back-ends behind `rephraser.ChatBackend`: a local transformers VLM, an HTTP endpoint.

- `LocalVLMBackend`: a vision-language instruct checkpoint in a folder (e.g. Qwen2.5-VL-3B-Instruct under
  ComfyUI's `models/LLM`), loaded once through `AutoModelForImageTextToText` / `AutoProcessor` and cached;
  on the GPU when there is one; greedy decoding unless `temperature > 0` (then sampling seeded by `seed`).
- `EndpointBackend`: any OpenAI-compatible `/chat/completions` server (Ollama, vLLM, llama.cpp, hosted);
  images go as base64 PNG data URLs; every request has a timeout; connection errors, timeouts, 408, 429 and
  5xx are retried a bounded number of times. The API key is read from the environment variable *named* by
  `api_key_env` at call time: it is never stored on the object, logged, hashed or put in an error message.

`make_backend` builds either from flat settings (what the ComfyUI node and the CLI have).
"""

from __future__ import annotations

import base64
import io
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import requests
import torch

from .log import logger
from .rephraser import RephraseError, UnusableAnswer

BACKENDS = ("openai-compatible", "local")


# ------------------------------------------------------------------------------------------- endpoint
@dataclass(frozen=True)
class EndpointConfig:
    """An OpenAI-compatible chat-completions endpoint. `base_url` e.g. "http://127.0.0.1:11434/v1"."""

    base_url: str
    model: str
    api_key_env: str = ""  # NAME of the environment variable holding the key; "" = send no key
    timeout_s: float = 120.0  # per connect / per read, seconds
    max_retries: int = 2  # extra attempts after the first, for transient faults only
    retry_backoff_s: float = 1.0  # wait before retry k is backoff * 2**(k-1)
    max_tokens: int = 512
    temperature: float = 0.0
    seed: int = 0


class EndpointBackend:
    def __init__(self, config: EndpointConfig):
        if not config.base_url.startswith(("http://", "https://")):
            raise ValueError(f"endpoint_url is {config.base_url!r}; it must be an http:// or https:// URL such as "
                             "http://127.0.0.1:11434/v1")
        if not config.model.strip():
            raise ValueError("endpoint model is empty; give the model name the server serves (e.g. qwen2.5vl:7b)")
        if config.timeout_s <= 0 or config.max_retries < 0:
            raise ValueError(f"endpoint timeout_s={config.timeout_s} / max_retries={config.max_retries}; "
                             "timeout must be > 0 and retries >= 0")
        self.config = config
        url = config.base_url.rstrip("/")
        self.url = url if url.endswith("/chat/completions") else url + "/chat/completions"
        self.label = f"OpenAI-compatible endpoint {self.url} (model {config.model!r})"

    def settings(self) -> dict[str, Any]:
        cfg = asdict(self.config)
        for k in ("api_key_env", "timeout_s", "max_retries", "retry_backoff_s"):  # do not change the answer
            cfg.pop(k)
        return {"backend": "openai-compatible", "url": self.url, **cfg}

    def chat(self, messages: list[dict]) -> str:
        body = {"model": self.config.model, "messages": [_openai_message(m) for m in messages],
                "max_tokens": self.config.max_tokens, "temperature": self.config.temperature,
                "seed": self.config.seed, "stream": False}
        key = self._api_key()
        headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
        data = self._post(body, headers, key)
        return self._answer_text(data, key)

    def _api_key(self) -> str:
        name = self.config.api_key_env.strip()
        if not name:
            return ""
        key = os.environ.get(name, "")
        if not key:
            raise RephraseError(f"{self.label}: environment variable {name} (api_key_env) is not set or empty")
        return key

    def _post(self, body: dict, headers: dict[str, str], key: str) -> dict:
        cfg, attempts, reason = self.config, self.config.max_retries + 1, ""
        for attempt in range(1, attempts + 1):
            if attempt > 1:
                time.sleep(cfg.retry_backoff_s * 2 ** (attempt - 2))
            try:
                resp = requests.post(self.url, json=body, headers=headers,
                                     timeout=(min(cfg.timeout_s, 10.0), cfg.timeout_s))
            except requests.Timeout:
                reason = f"timed out after {cfg.timeout_s:g} s"
            except requests.ConnectionError as err:
                reason = f"cannot connect ({type(err).__name__}; is the server running at {self.url}?)"
            else:
                if resp.ok:
                    try:
                        return resp.json()
                    except ValueError:
                        raise RephraseError(f"{self.label}: the reply is not JSON: "
                                            f"{_redact(resp.text[:300], key)!r}") from None
                reason = f"HTTP {resp.status_code}: {_redact(resp.text[:300], key)!r}"
                if resp.status_code not in (408, 429) and resp.status_code < 500:
                    raise RephraseError(f"{self.label}: {reason}")
            logger.warning("rephraser: %s: %s (attempt %d of %d)", self.label, reason, attempt, attempts)
        raise RephraseError(f"{self.label}: {reason} (gave up after {attempts} attempts)")

    def _answer_text(self, data: dict, key: str) -> str:
        try:
            choice = data["choices"][0]
            message = choice["message"]
        except (KeyError, IndexError, TypeError):
            raise RephraseError(f"{self.label}: the reply has no choices[0].message: "
                                f"{_redact(str(data)[:300], key)!r}") from None
        content = message.get("content") or ""
        if isinstance(content, list):  # some servers answer with content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if message.get("refusal") or choice.get("finish_reason") == "content_filter":
            raise UnusableAnswer(f"the model refused ({message.get('refusal') or 'content filter'})", content)
        return str(content)


def _openai_message(message: dict) -> dict:
    """`build_messages` item -> OpenAI chat message (images -> data-URL `image_url` parts)."""
    content = message["content"]
    if isinstance(content, str):
        return {"role": message["role"], "content": content}
    parts = [{"type": "image_url", "image_url": {"url": image_data_url(c["image"])}} if c["type"] == "image"
             else {"type": "text", "text": c["text"]} for c in content]
    return {"role": message["role"], "content": parts}


def image_data_url(image) -> str:
    """PIL image -> "data:image/png;base64,..." (lossless, deterministic)."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _redact(text: str, key: str) -> str:
    return text.replace(key, "***") if key else text


# ---------------------------------------------------------------------------------------------- local
@dataclass(frozen=True)
class LocalConfig:
    """A local transformers vision-language model folder (config.json, weights, processor files)."""

    path: str
    max_new_tokens: int = 512
    temperature: float = 0.0  # 0 = greedy decoding
    seed: int = 0  # used only when sampling (temperature > 0)
    device: str = "auto"  # "auto" = cuda when available, else cpu
    dtype: str = "auto"  # "auto" = bf16 on a GPU that supports it, else fp32; or fp32 | fp16 | bf16


_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_LOADED: dict[tuple[str, str, str], tuple[Any, Any]] = {}


def unload_local_models() -> None:
    """Drop the cached local model(s) (they are reloaded on the next use)."""
    _LOADED.clear()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class LocalVLMBackend:
    def __init__(self, config: LocalConfig):
        path = Path(config.path).expanduser()
        if not (path / "config.json").is_file():
            raise ValueError(f"local model folder {str(path)!r} has no config.json; give a transformers "
                             "vision-language model folder (e.g. Qwen2.5-VL-3B-Instruct)")
        if config.dtype not in ("auto", *_DTYPES):
            raise ValueError(f"local dtype is {config.dtype!r}; valid: auto, {', '.join(_DTYPES)}")
        self.config, self.path = config, path.resolve()
        self.label = f"local model {path.name!r}"

    def settings(self) -> dict[str, Any]:
        cfg = asdict(self.config) | {"path": str(self.path)}
        mtime = (self.path / "config.json").stat().st_mtime  # a replaced model folder invalidates the cache
        return {"backend": "local", **cfg, "config_mtime": mtime}

    def chat(self, messages: list[dict]) -> str:
        model, processor = self._load()
        images = [c["image"] for m in messages if isinstance(m["content"], list)
                  for c in m["content"] if c["type"] == "image"]
        chat = [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]}
                if isinstance(m["content"], str)
                else {"role": m["role"], "content": [{"type": c["type"]} if c["type"] == "image" else c
                                                     for c in m["content"]]} for m in messages]
        try:
            text = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
            inputs = processor(text=[text], images=images, return_tensors="pt").to(model.device)
            return self._generate(model, processor, inputs)
        except torch.cuda.OutOfMemoryError as err:
            raise RephraseError(f"{self.label}: out of GPU memory while generating ({err})") from err

    def _generate(self, model, processor, inputs) -> str:
        cfg = self.config
        sample = cfg.temperature > 0
        kwargs = {"do_sample": sample, "max_new_tokens": cfg.max_new_tokens}
        kwargs |= {"temperature": cfg.temperature} if sample else {"temperature": None, "top_p": None, "top_k": None}
        devices = [model.device] if model.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.inference_mode():  # leave the caller's RNG alone
            torch.manual_seed(cfg.seed)
            out = model.generate(**inputs, **kwargs)  # (1, L_in + L_new) token ids
        new_tokens = out[:, inputs["input_ids"].shape[1]:]
        logger.info("rephraser: %s generated %d tokens", self.label, new_tokens.shape[1])
        return processor.batch_decode(new_tokens, skip_special_tokens=True)[0]

    def _load(self) -> tuple[Any, Any]:
        device = self.config.device if self.config.device != "auto" else ("cuda" if torch.cuda.is_available()
                                                                         else "cpu")
        key = (str(self.path), device, self.config.dtype)
        if key not in _LOADED:
            unload_local_models()  # keep at most one rephraser model resident
            _LOADED[key] = self._load_uncached(device)
        return _LOADED[key]

    def _load_uncached(self, device: str) -> tuple[Any, Any]:
        from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

        dtype = _DTYPES.get(self.config.dtype)
        if dtype is None:
            dtype = torch.bfloat16 if device.startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32
        logger.info("rephraser: loading %s from %s on %s (%s)", self.label, self.path, device, dtype)
        try:
            kind = AutoConfig.from_pretrained(self.path).model_type
        except (OSError, ValueError) as err:
            raise RephraseError(f"{self.label}: cannot read {self.path}/config.json ({err})") from err
        try:
            model = AutoModelForImageTextToText.from_pretrained(self.path, dtype=dtype)
        except ValueError as err:
            raise RephraseError(f"{self.label}: {self.path} holds a {kind!r} model, which is not a vision-language "
                                "(image-text-to-text) model; use e.g. Qwen2.5-VL-3B-Instruct") from err
        except OSError as err:
            raise RephraseError(f"{self.label}: cannot load the weights in {self.path} ({err})") from err
        try:
            processor = AutoProcessor.from_pretrained(self.path)
        except (OSError, ValueError, TypeError) as err:
            raise RephraseError(f"{self.label}: cannot load the processor in {self.path} ({err})") from err
        if getattr(processor, "image_processor", None) is None or not getattr(processor, "chat_template", None):
            raise RephraseError(f"{self.label}: the processor in {self.path} has no image processor or no chat "
                                "template; an instruct vision-language checkpoint is needed")
        return model.to(device).eval(), processor


# ---------------------------------------------------------------------------------------------- factory
def make_backend(backend: str, *, endpoint_url: str = "", endpoint_model: str = "", api_key_env: str = "",
                 timeout_s: float = 120.0, max_retries: int = 2, local_path: str = "", max_new_tokens: int = 512,
                 temperature: float = 0.0, seed: int = 0) -> EndpointBackend | LocalVLMBackend:
    """Build the back-end named `backend` ("openai-compatible" | "local") from flat settings.

    Raises ValueError naming the missing or invalid setting (no endpoint URL, no model folder, ...).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend is {backend!r}; valid: {', '.join(BACKENDS)}")
    if max_new_tokens < 16 or temperature < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens}, temperature={temperature}; need >= 16 and >= 0")
    if backend == "local":
        if not local_path.strip():
            raise ValueError("no rephraser back-end configured: backend is 'local' but no model folder is given "
                             "(put a vision-language model folder under models/LLM)")
        return LocalVLMBackend(LocalConfig(local_path, max_new_tokens, temperature, seed))
    if not endpoint_url.strip():
        raise ValueError("no rephraser back-end configured: backend is 'openai-compatible' but endpoint_url is "
                         "empty (e.g. http://127.0.0.1:11434/v1 for Ollama)")
    return EndpointBackend(EndpointConfig(endpoint_url.strip(), endpoint_model.strip(), api_key_env.strip(),
                                          timeout_s, max_retries, max_tokens=max_new_tokens,
                                          temperature=temperature, seed=seed))
