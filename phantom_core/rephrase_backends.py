"""The rephraser's two back-ends behind `rephraser.ChatBackend`: a local transformers VLM, an HTTP endpoint.

- `LocalVLMBackend`: a vision-language instruct checkpoint in a folder (e.g. Qwen2.5-VL-3B-Instruct under
  ComfyUI's `models/LLM`), loaded once through `AutoModelForImageTextToText` / `AutoProcessor` and cached;
  on the GPU when there is one; greedy decoding unless `temperature > 0` (then sampling seeded by `seed`).
  After each rephrase (`release`) the model is moved to the CPU (`after_use="offload"`, the default), dropped
  (`"unload"`) or left on the GPU (`"keep"`); the host may pass `free_memory` / `after_offload` callbacks so
  that its own memory manager makes room before the model goes to the GPU and reclaims it afterwards.
- `EndpointBackend`: any OpenAI-compatible `/chat/completions` server (Ollama, vLLM, llama.cpp, hosted);
  images go as base64 PNG data URLs; every request has a total deadline (`timeout_s`, connect to last byte,
  enforced even against a server that trickles its reply), and the `Rephraser`'s overall deadline caps the
  retries; connection errors, timeouts, 408, 429 and 5xx are retried a bounded number of times. The API key is
  read from the environment variable *named* by `api_key_env` at call time: it is never stored on the object,
  logged, hashed or put in an error message, and labels show the URL without user:password or query string.

`make_backend` builds either from flat settings (what the ComfyUI node and the CLI have).
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import requests
import torch

from .log import logger
from .rephraser import RephraseError, UnusableAnswer

BACKENDS = ("openai-compatible", "local")
AFTER_USE = ("offload", "unload", "keep")
MAX_REPLY_BYTES = 16 * 2**20  # a chat answer is a few kB; a larger reply is not a chat-completions reply
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")


# ------------------------------------------------------------------------------------------- endpoint
@dataclass(frozen=True)
class EndpointConfig:
    """An OpenAI-compatible chat-completions endpoint. `base_url` e.g. "http://127.0.0.1:11434/v1"."""

    base_url: str
    model: str
    api_key_env: str = ""  # NAME of the environment variable holding the key; "" = send no key
    timeout_s: float = 120.0  # total per request (connect, send, wait, read the whole reply), seconds
    max_retries: int = 2  # extra attempts after the first, for transient faults only
    retry_backoff_s: float = 1.0  # wait before retry k is backoff * 2**(k-1)
    max_tokens: int = 512
    temperature: float = 0.0
    seed: int = 0


def safe_url(url: str) -> str:
    """`url` without user:password, query string and fragment (for labels, logs and errors)."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


def check_key_variable_name(name: str) -> None:
    """Raise ValueError (without echoing `name`) unless it reads as an environment variable NAME.

    Valid: letters, digits and "_", not starting with a digit, at most 128 characters, and not key-like
    (20+ characters mixing lower case and 4+ digits, as API keys do; e.g. OPENAI_API_KEY is fine).
    """
    key_like = len(name) >= 20 and sum(c.isdigit() for c in name) >= 4 and any(c.islower() for c in name)
    if name and (not _ENV_NAME.fullmatch(name) or key_like):
        raise ValueError("api_key_env must be the NAME of an environment variable holding the key (letters, "
                         "digits and _, e.g. OPENAI_API_KEY), not the key itself; the value given looks like a key "
                         "and is not shown. Put the key in an environment variable and give its name.")


class EndpointBackend:
    def __init__(self, config: EndpointConfig):
        if not config.base_url.startswith(("http://", "https://")):
            raise ValueError(f"endpoint_url is {safe_url(config.base_url)!r}; it must be an http:// or https:// "
                             "URL such as http://127.0.0.1:11434/v1")
        if not config.model.strip():
            raise ValueError("endpoint model is empty; give the model name the server serves (e.g. qwen2.5vl:7b)")
        if config.timeout_s <= 0 or config.max_retries < 0:
            raise ValueError(f"endpoint timeout_s={config.timeout_s} / max_retries={config.max_retries}; "
                             "timeout must be > 0 and retries >= 0")
        check_key_variable_name(config.api_key_env.strip())
        self.config = config
        parts = urlsplit(config.base_url)
        path = parts.path.rstrip("/")
        path = path if path.endswith("/chat/completions") else path + "/chat/completions"
        self.url = urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))  # what is requested
        self.label = f"OpenAI-compatible endpoint {safe_url(self.url)} (model {config.model!r})"

    def settings(self) -> dict[str, Any]:
        cfg = asdict(self.config)
        for k in ("api_key_env", "timeout_s", "max_retries", "retry_backoff_s"):  # do not change the answer
            cfg.pop(k)
        return {"backend": "openai-compatible", "url": self.url, **cfg}

    def chat(self, messages: list[dict], deadline: float | None = None) -> str:
        body = {"model": self.config.model, "messages": [_openai_message(m) for m in messages],
                "max_tokens": self.config.max_tokens, "temperature": self.config.temperature,
                "seed": self.config.seed, "stream": False}
        key = self._api_key()
        headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
        data = self._post(body, headers, key, deadline)
        return self._answer_text(data, key)

    def release(self) -> None:
        """Nothing to release: each request has its own connection."""

    def _api_key(self) -> str:
        name = self.config.api_key_env.strip()
        if not name:
            return ""
        key = os.environ.get(name, "")
        if not key:
            raise RephraseError(f"{self.label}: environment variable {name} (api_key_env) is not set or empty")
        return key

    def _post(self, body: dict, headers: dict[str, str], key: str, deadline: float | None) -> dict:
        """POST with retries; each request ends by `timeout_s`, and no request or wait goes past `deadline`."""
        cfg, attempts, reason = self.config, self.config.max_retries + 1, ""
        for attempt in range(1, attempts + 1):
            wait = cfg.retry_backoff_s * 2 ** (attempt - 2) if attempt > 1 else 0.0
            stop = time.monotonic() + wait + cfg.timeout_s
            capped = deadline is not None and deadline <= stop
            if capped and deadline - time.monotonic() - wait <= 0.05:
                raise RephraseError(f"{self.label}: the overall time limit ran out after {attempt - 1} of "
                                    f"{attempts} attempts ({reason or 'no request could start'})")
            time.sleep(wait)
            try:
                status, text = self._request(body, headers, min(stop, deadline) if capped else stop)
            except requests.Timeout:
                if capped:
                    raise RephraseError(f"{self.label}: the overall time limit ran out while waiting for the reply "
                                        f"(attempt {attempt} of {attempts})") from None
                reason = f"timed out after {cfg.timeout_s:g} s"
            except requests.ConnectionError as err:
                reason = f"cannot connect ({type(err).__name__}; is the server running at {safe_url(self.url)}?)"
            else:
                if 200 <= status < 300:
                    try:
                        return json.loads(text)
                    except ValueError:
                        raise RephraseError(f"{self.label}: the reply is not JSON: "
                                            f"{_redact(text[:300], key)!r}") from None
                reason = f"HTTP {status}: {_redact(text[:300], key)!r}"
                if status not in (408, 429) and status < 500:
                    raise RephraseError(f"{self.label}: {reason}")
            logger.warning("rephraser: %s: %s (attempt %d of %d)", self.label, reason, attempt, attempts)
        raise RephraseError(f"{self.label}: {reason} (gave up after {attempts} attempts)")

    def _request(self, body: dict, headers: dict[str, str], stop: float) -> tuple[int, str]:
        """One POST that returns (status, body text) by `stop` (monotonic) or raises requests.Timeout.

        requests' own timeout bounds each socket read, not the request, so a server trickling bytes would beat
        it: the request runs in a daemon thread that the caller waits for until `stop` and then abandons. The
        thread ends by itself soon after: it reads whatever has arrived (`read1`) and stops once past `stop`,
        and no single socket read may wait longer than the time the request had.
        """
        box: dict[str, Any] = {}
        done = threading.Event()

        def work() -> None:
            try:
                box["result"] = self._request_blocking(body, headers, stop)
            except BaseException as err:  # handed to the waiting caller
                box["error"] = err
            finally:
                done.set()

        threading.Thread(target=work, name="phantom-rephrase-request", daemon=True).start()
        if not done.wait(max(0.0, stop - time.monotonic())):
            raise requests.Timeout(f"no complete reply by the deadline ({self.config.timeout_s:g} s)")
        if "error" in box:
            raise box["error"]
        return box["result"]

    def _request_blocking(self, body: dict, headers: dict[str, str], stop: float) -> tuple[int, str]:
        remaining = max(0.01, stop - time.monotonic())
        response = requests.post(self.url, json=body, headers=headers, stream=True,
                                 timeout=(min(remaining, 10.0), remaining))
        raw = response.raw
        read = getattr(raw, "read1", None) or raw.read  # read1 (urllib3 >= 2.3): what has arrived, >= 1 byte
        with response:
            chunks, size = [], 0
            while chunk := read(65536, decode_content=True):
                size += len(chunk)
                if time.monotonic() > stop:
                    raise requests.Timeout("the reply did not finish by the deadline")
                if size > MAX_REPLY_BYTES:
                    raise RephraseError(f"{self.label}: the reply is larger than {MAX_REPLY_BYTES >> 20} MiB")
                chunks.append(chunk)
        return response.status_code, b"".join(chunks).decode("utf-8", errors="replace")

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
    after_use: str = "offload"  # after each rephrase: "offload" to the CPU | "unload" | "keep" on the device


@dataclass
class _Resident:
    """A cached model: `placed` is True while it sits on its target device (False: offloaded to the CPU)."""

    model: Any
    processor: Any
    placed: bool = False


_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_LOADED: dict[tuple[str, str, str], _Resident] = {}
ACTIVATION_MARGIN = 1.25  # bytes asked of the host to free = weights * margin + 512 MiB (activations, KV cache)


def unload_local_models() -> None:
    """Drop the cached local model(s) (they are reloaded on the next use)."""
    _LOADED.clear()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class LocalVLMBackend:
    """`free_memory(bytes_needed, device)`: called before the model is put on its device (host memory manager);
    `after_offload()`: called after it left the device (default: `torch.cuda.empty_cache()` on a GPU)."""

    def __init__(self, config: LocalConfig, *, free_memory: Callable[[int, str], None] | None = None,
                 after_offload: Callable[[], None] | None = None):
        path = Path(config.path).expanduser()
        if not (path / "config.json").is_file():
            raise ValueError(f"local model folder {str(path)!r} has no config.json; give a transformers "
                             "vision-language model folder (e.g. Qwen2.5-VL-3B-Instruct)")
        if config.dtype not in ("auto", *_DTYPES):
            raise ValueError(f"local dtype is {config.dtype!r}; valid: auto, {', '.join(_DTYPES)}")
        if config.after_use not in AFTER_USE:
            raise ValueError(f"local after_use is {config.after_use!r}; valid: {', '.join(AFTER_USE)}")
        self.config, self.path = config, path.resolve()
        self.free_memory, self.after_offload = free_memory, after_offload
        self.label = f"local model {path.name!r}"
        self.device = config.device if config.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")

    def settings(self) -> dict[str, Any]:
        cfg = asdict(self.config) | {"path": str(self.path)}
        cfg.pop("after_use")  # where the model waits between calls does not change the answer
        mtime = (self.path / "config.json").stat().st_mtime  # a replaced model folder invalidates the cache
        return {"backend": "local", **cfg, "config_mtime": mtime}

    def chat(self, messages: list[dict], deadline: float | None = None) -> str:
        model, processor = self._load()
        images = [c["image"] for m in messages if isinstance(m["content"], list)
                  for c in m["content"] if c["type"] == "image"]
        chat = [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]}
                if isinstance(m["content"], str)
                else {"role": m["role"], "content": [{"type": c["type"]} if c["type"] == "image" else c
                                                     for c in m["content"]]} for m in messages]
        stage = "applying the chat template"
        try:
            text = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
            stage = "preparing the inputs with the processor"
            inputs = processor(text=[text], images=images, return_tensors="pt").to(model.device)
            stage = "generating"
            return self._generate(model, processor, inputs, deadline)
        except (RephraseError, UnusableAnswer):
            raise
        except torch.cuda.OutOfMemoryError as err:
            raise RephraseError(f"{self.label}: out of GPU memory while {stage} ({err})") from err
        except Exception as err:  # noqa: BLE001 (any library failure becomes an error naming the back-end)
            raise RephraseError(f"{self.label}: failed while {stage}: {type(err).__name__}: {err}") from err

    def release(self) -> None:
        """After a rephrase: offload the model to the CPU, unload it, or keep it (`LocalConfig.after_use`)."""
        resident = _LOADED.get(self._key())
        if resident is None or self.config.after_use == "keep":
            return
        if self.config.after_use == "unload":
            _LOADED.pop(self._key())
            logger.info("rephraser: unloaded %s", self.label)
        elif resident.placed:
            if self.device != "cpu":
                resident.model.to("cpu")
                logger.info("rephraser: moved %s to the CPU (after_use=offload)", self.label)
            resident.placed = False
        else:
            return
        if self.after_offload is not None:
            self.after_offload()
        elif torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _generate(self, model, processor, inputs, deadline: float | None) -> str:
        cfg = self.config
        sample = cfg.temperature > 0
        kwargs = {"do_sample": sample, "max_new_tokens": cfg.max_new_tokens}
        kwargs |= {"temperature": cfg.temperature} if sample else {"temperature": None, "top_p": None, "top_k": None}
        if deadline is not None:  # generation stops there; a cut answer is then reported as unusable
            kwargs["max_time"] = deadline - time.monotonic()
            if kwargs["max_time"] <= 0:
                raise RephraseError(f"{self.label}: the overall time limit ran out before generating")
        devices = [model.device] if model.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.inference_mode():  # leave the caller's RNG alone
            torch.manual_seed(cfg.seed)
            out = model.generate(**inputs, **kwargs)  # (1, L_in + L_new) token ids
        new_tokens = out[:, inputs["input_ids"].shape[1]:]
        logger.info("rephraser: %s generated %d tokens", self.label, new_tokens.shape[1])
        return processor.batch_decode(new_tokens, skip_special_tokens=True)[0]

    def _key(self) -> tuple[str, str, str]:
        return str(self.path), self.device, self.config.dtype

    def _load(self) -> tuple[Any, Any]:
        key = self._key()
        if key not in _LOADED:
            unload_local_models()  # keep at most one rephraser model resident
            _LOADED[key] = _Resident(*self._load_uncached())
        resident = _LOADED[key]
        if not resident.placed:
            self._place(resident.model)
            resident.placed = True
        return resident.model, resident.processor

    def _place(self, model) -> None:
        """Move `model` (on the CPU) to `self.device`, asking the host to make room first."""
        weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
        if self.free_memory is not None:
            self.free_memory(int(weights * ACTIVATION_MARGIN) + (512 << 20), self.device)
        try:
            model.to(self.device)
        except (torch.cuda.OutOfMemoryError, RuntimeError) as err:
            unload_local_models()  # drop it (with whatever part reached the GPU) rather than keep half of it there
            raise RephraseError(f"{self.label}: cannot move the model ({weights / 2**30:.2f} GiB) to {self.device}: "
                                f"{type(err).__name__}: {err}; free GPU memory or use a smaller model") from err

    def _load_uncached(self) -> tuple[Any, Any]:
        """(model on the CPU in eval mode, processor). Raises RephraseError naming the back-end and the fault."""
        from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

        dtype = _DTYPES.get(self.config.dtype)
        if dtype is None:
            cuda = self.device.startswith("cuda")
            dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
        logger.info("rephraser: loading %s from %s for %s (%s)", self.label, self.path, self.device, dtype)
        try:
            kind = AutoConfig.from_pretrained(self.path).model_type
        except (OSError, ValueError) as err:
            raise RephraseError(f"{self.label}: cannot read {self.path}/config.json ({err})") from err
        try:
            model = AutoModelForImageTextToText.from_pretrained(self.path, dtype=dtype)
        except ValueError as err:
            raise RephraseError(f"{self.label}: {self.path} holds a {kind!r} model, which is not a vision-language "
                                "(image-text-to-text) model; use e.g. Qwen2.5-VL-3B-Instruct") from err
        except Exception as err:  # noqa: BLE001 (missing / corrupt weights, missing packages, ...)
            raise RephraseError(f"{self.label}: cannot load the weights in {self.path} "
                                f"({type(err).__name__}: {err})") from err
        try:
            processor = AutoProcessor.from_pretrained(self.path)
        except Exception as err:  # noqa: BLE001
            raise RephraseError(f"{self.label}: cannot load the processor in {self.path} "
                                f"({type(err).__name__}: {err})") from err
        if getattr(processor, "image_processor", None) is None or not getattr(processor, "chat_template", None):
            raise RephraseError(f"{self.label}: the processor in {self.path} has no image processor or no chat "
                                "template; an instruct vision-language checkpoint is needed")
        return model.eval(), processor


# ---------------------------------------------------------------------------------------------- factory
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
    if max_new_tokens < 16 or temperature < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens}, temperature={temperature}; need >= 16 and >= 0")
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
