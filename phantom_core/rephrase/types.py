"""What the rephraser, its back-ends and its cache share: the two errors, the result and the back-end interface.

- `RephraseError`: a back-end failed (transport, time limit, loading) or answered unusably twice.
- `UnusableAnswer`: one answer that cannot be used; `Rephraser` retries once with a corrective turn.
- `RephraseResult`: the rewritten prompt with one appearance description per reference.
- `ChatBackend`: the protocol `Rephraser` asks (implementations: `rephrase_endpoint.EndpointBackend`,
  `rephrase_local.LocalVLMBackend`, built by `rephrase_backends.make_backend`).

This module imports nothing heavy (no torch, no requests), so every rephraser module can depend on it without
import cycles.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


class RephraseError(RuntimeError):
    """A back-end failed or answered unusably; the message names the back-end and what happened."""


class UnusableAnswer(ValueError):
    """An answer that cannot be used (`reason` says why); `Rephraser` retries once, then raises RephraseError."""

    def __init__(self, reason: str, raw: str = ""):
        super().__init__(reason)
        self.reason, self.raw = reason, raw


class ChatBackend(Protocol):
    """What `Rephraser` needs from a back-end (implementations: `rephrase_endpoint`, `rephrase_local`)."""

    label: str
    """Human-readable name for errors and logs, e.g. "local model 'Qwen2.5-VL-3B'"; never holds a secret."""

    def settings(self) -> dict[str, Any]:
        """Everything that changes the answer (model, decoding settings); part of the cache key; no secrets."""
        ...

    def chat(self, messages: list[dict], deadline: float | None = None) -> str:
        """Answer a chat (`rephraser.build_messages` format) before `deadline` (a `time.monotonic()` value;
        None = no overall limit). Raises RephraseError (transport, time limit) or UnusableAnswer (refusal)."""
        ...

    def release(self) -> None:
        """Called once after every `Rephraser.rephrase` that used the back-end (e.g. move a model off the GPU)."""
        ...


@dataclass(frozen=True)
class RephraseResult:
    """A rewritten prompt with one appearance description per reference (in reference order)."""

    prompt: str
    descriptions: tuple[str, ...]
    language: str  # "en" | "zh"
    raw: str  # the model's last raw answer
    validated: bool  # False only for a lenient (strict=False) result that failed `check_answer`
    cached: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "descriptions": list(self.descriptions), "language": self.language,
                "raw": self.raw, "validated": self.validated}
