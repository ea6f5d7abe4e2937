"""The rephraser's HTTP back-end: any OpenAI-compatible `/chat/completions` server (Ollama, vLLM, llama.cpp,
hosted).

`EndpointBackend` implements `rephrase_types.ChatBackend`. Images go as base64 PNG data URLs
(`image_data_url`). Every request has a total deadline (`EndpointConfig.timeout_s`, connect to last byte),
enforced even against a server that trickles its reply: the request runs in a daemon thread that the caller
stops waiting for at the deadline, and that thread stops reading once past it (`_request`). The `Rephraser`'s
overall deadline caps the retries; connection errors, timeouts, 408, 429 and 5xx are retried at most
`max_retries` times with exponential backoff, other statuses fail at once.

The API key is read from the environment variable *named* by `api_key_env` at call time: it is never stored on
the object, logged, hashed or put in an error message (`check_key_variable_name` refuses a value that looks
like a key rather than a name, without echoing it), and labels show the URL without user:password or query
string (`safe_url`).
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import requests
from PIL import Image

from phantom_core.log import logger
from phantom_core.rephrase.types import RephraseError, UnusableAnswer

MAX_REPLY_BYTES = 16 * 2**20  # a chat answer is a few kB; a larger reply is not a chat-completions reply
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")


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
    """`ChatBackend` over an OpenAI-compatible chat-completions endpoint (see the module doc).

    Raises ValueError at construction naming the bad setting (URL scheme, empty model, timeout / retries,
    a key given where its variable name belongs).
    """

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


def image_data_url(image: Image.Image) -> str:
    """PIL image -> "data:image/png;base64,..." (lossless, deterministic)."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _redact(text: str, key: str) -> str:
    return text.replace(key, "***") if key else text
