"""``generate --rephrase``: the prompt rewritten by the rephraser before it is encoded, and the sidecar's
``"rephrase"`` entry recording it (the precedence rules are in ``inference/cli.py``'s docstring)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit, urlunsplit

from phantom_core.inference.settings import GenerationSettings
from phantom_core.inference.sidecar import write_sidecar
from phantom_core.references import open_reference
from phantom_core.rephrase.cli import rephraser_from_args
from phantom_core.rephrase.rephraser import Rephraser
from phantom_core.rephrase.types import RephraseResult

REPHRASE_PREFIX = "rephrase-"  # generate's rephraser flags: --rephrase-endpoint, --rephrase-seed, ...
SIDECAR_REPHRASE_KEY = "rephrase"  # the sidecar entry written by --rephrase


def rephrase_settings(args: argparse.Namespace, settings: GenerationSettings, ref_paths: Sequence[str],
                      previous: dict[str, Any] | None, stream: TextIO) -> tuple[GenerationSettings, dict | None]:
    """Apply ``--rephrase``: settings with the rewritten prompt, and the sidecar's ``"rephrase"`` entry.

    ``previous``: the entry of the ``--from-sidecar`` sidecar (or None). Without ``--rephrase`` it is kept when
    the prompt is still its rewritten prompt (no model call), dropped otherwise. With ``--rephrase`` the prompt
    to rewrite is ``--prompt``, else the original prompt of ``previous`` when the prompt is its rewrite, else the
    prompt in effect. Raises ValueError (options, unreadable reference) or RephraseError (the back-end failed).
    """
    if not args.rephrase:
        keep = previous is not None and previous.get("prompt") == settings.prompt
        return settings, ({**previous, "reused_from": str(Path(args.from_sidecar).resolve())} if keep else None)
    original = settings.prompt
    if args.prompt is None and previous is not None and previous.get("prompt") == settings.prompt:
        original = previous["original_prompt"]
    rephraser = rephraser_from_args(args, REPHRASE_PREFIX)  # bad options fail before the images are read
    images = []
    for k, path in enumerate(ref_paths, start=1):
        try:
            images.append(open_reference(path))
        except (OSError, ValueError) as err:
            raise ValueError(f"--ref {k} ({path}) cannot be read as an image: {err}") from err
    result = rephraser.rephrase(original, images, hints=args.rephrase_hint, language=args.rephrase_language)
    stream.write(f"rephrased prompt{' (cached)' if result.cached else ''}: {result.prompt}\n")
    return dataclasses.replace(settings, prompt=result.prompt), rephrase_record(args, original, result, rephraser)


def rephrase_record(args: argparse.Namespace, original: str, result: RephraseResult,
                    rephraser: Rephraser) -> dict[str, Any]:
    """The sidecar's ``"rephrase"`` entry (JSON-ready): prompts, descriptions, raw answer and settings.

    Never holds a secret: the API key's variable is recorded by name, and an endpoint URL loses any user:password
    part and query string.
    """
    backend = dict(rephraser.backend.settings())
    if "url" in backend:
        parts = urlsplit(backend["url"])
        backend["url"] = urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))
    return {
        "original_prompt": original, "prompt": result.prompt, "descriptions": list(result.descriptions),
        "language": result.language, "validated": result.validated, "raw_answer": result.raw,
        "settings": {"backend": backend, "api_key_env": args.rephrase_api_key_env if args.rephrase_endpoint else "",
                     "hints": list(args.rephrase_hint), "language": args.rephrase_language,
                     "strict": rephraser.strict},
    }


def add_to_sidecar(path: str | Path, key: str, entry: dict[str, Any]) -> None:
    """Add ``entry`` under ``key`` to the sidecar JSON at ``path`` (rewritten atomically)."""
    record = json.loads(Path(path).read_text(encoding="utf-8"))
    record[key] = entry
    write_sidecar(record, path)
