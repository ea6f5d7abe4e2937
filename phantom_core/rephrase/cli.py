"""The rephraser on the command line: the ``rephrase`` subcommand and the back-end options it shares with
``generate --rephrase``.

    python -m phantom_core rephrase --ref a.png --ref b.png --prompt "..." --endpoint URL --model NAME [--json]
    python -m phantom_core generate ... --rephrase --rephrase-endpoint URL --rephrase-model NAME

``add_rephrase_backend_arguments(parser, prefix)`` registers the options under a flag prefix: ``rephrase`` uses
none (``--endpoint``, ``--model``, ``--seed``, ...); ``generate`` uses ``"rephrase-"`` (``--rephrase-endpoint``,
``--rephrase-model``, ``--rephrase-seed``, ...) because its own ``--seed`` and friends mean something else. The
argparse destinations follow the flags (``endpoint`` / ``rephrase_endpoint``); ``rephraser_from_args`` and
``rephrase_from_args`` read them back with the same prefix. The API key is only ever named (``--api-key-env``).

``--timeout S`` bounds the whole rephrase on an endpoint (every request, retry and wait: at most S seconds).
A local model is unloaded after the rephrase, so that ``generate`` has the GPU to itself next. Reference files
are read like ``generate`` reads them (``references.open_reference``: EXIF orientation applied, transparency
over white).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from phantom_core.references import MAX_REFERENCES, open_reference
from phantom_core.rephrase.backends import make_backend
from phantom_core.rephrase.cache import RephraseCache
from phantom_core.rephrase.rephraser import Rephraser
from phantom_core.rephrase.types import RephraseResult

# option name (flag without "--" and prefix) -> add_argument keywords; the order is the --help order
BACKEND_OPTIONS: dict[str, dict[str, Any]] = {
    "endpoint": dict(default="", metavar="URL",
                     help="OpenAI-compatible base URL, e.g. http://127.0.0.1:11434/v1 (Ollama)"),
    "model": dict(default="", metavar="NAME", help="model name served by the endpoint"),
    "api-key-env": dict(default="", metavar="VAR",
                        help="NAME of the environment variable holding the endpoint's API key (the key is never "
                             "taken on the command line)"),
    "timeout": dict(type=float, default=120.0, metavar="S",
                    help="endpoint: the most seconds the whole rephrase may take, all requests and retries included"),
    "retries": dict(type=int, default=2, metavar="N", help="endpoint retries for transient faults"),
    "local": dict(default="", metavar="PATH", help="local vision-language model folder"),
    "max-new-tokens": dict(type=int, default=512, metavar="N", help="upper bound on the answer's length, tokens"),
    "temperature": dict(type=float, default=0.0, metavar="T", help="0 = greedy decoding"),
    "seed": dict(type=int, default=0, metavar="N",
                 help="sampling seed of the rephraser (used when its temperature > 0)"),
    "language": dict(default="auto", metavar="LANG",
                     help="auto | en | zh (auto: Chinese if the prompt is mostly Chinese, else English)"),
    "hint": dict(action="append", default=[], metavar="TEXT",
                 help="subject hint for the reference of the same position (repeatable; '' to skip one)"),
    "lenient": dict(action="store_true", help="use an answer that fails validation instead of an error"),
    "cache-dir": dict(default=None, metavar="DIR",
                      help="keep results as JSON files here, so identical calls do not ask the model again"),
}


def option_dest(prefix: str, name: str) -> str:
    """argparse destination of ``--{prefix}{name}``: ("rephrase-", "api-key-env") -> "rephrase_api_key_env"."""
    return f"{prefix}{name}".replace("-", "_")


def add_rephrase_backend_arguments(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    """Register the rephraser's back-end, language and cache options as ``--{prefix}{name}`` (see module doc)."""
    flag = f"--{prefix}"
    group = parser.add_argument_group(f"rephraser back-end (give {flag}endpoint/{flag}model or {flag}local)")
    for name, kwargs in BACKEND_OPTIONS.items():
        group.add_argument(f"{flag}{name}", dest=option_dest(prefix, name), **kwargs)


def _get(args: argparse.Namespace, prefix: str, name: str) -> Any:
    return getattr(args, option_dest(prefix, name))


def rephraser_from_args(args: argparse.Namespace, prefix: str = "") -> Rephraser:
    """The ``Rephraser`` configured by ``add_rephrase_backend_arguments(parser, prefix)`` options.

    A local model is unloaded after each rephrase (the caller, e.g. ``generate``, needs the GPU next); an
    endpoint rephrase is capped at ``--timeout`` seconds in total. Raises ValueError naming the flags when
    neither or both back-ends are given, or a setting is invalid.
    """
    flag = f"--{prefix}"
    endpoint, local = _get(args, prefix, "endpoint"), _get(args, prefix, "local")
    if bool(endpoint) == bool(local):
        raise ValueError(f"give either {flag}endpoint URL {flag}model NAME (chat-completions back-end) or "
                         f"{flag}local PATH (local vision-language model folder)")
    backend = make_backend("local" if local else "openai-compatible", endpoint_url=endpoint,
                           endpoint_model=_get(args, prefix, "model"), api_key_env=_get(args, prefix, "api-key-env"),
                           timeout_s=_get(args, prefix, "timeout"), max_retries=_get(args, prefix, "retries"),
                           local_path=local, max_new_tokens=_get(args, prefix, "max-new-tokens"),
                           temperature=_get(args, prefix, "temperature"), seed=_get(args, prefix, "seed"),
                           after_use="unload")
    cache_dir = _get(args, prefix, "cache-dir")
    cache = RephraseCache(directory=cache_dir) if cache_dir else None
    time_limit = None if local else _get(args, prefix, "timeout")
    return Rephraser(backend, cache=cache, strict=not _get(args, prefix, "lenient"), time_limit_s=time_limit)


def rephrase_from_args(args: argparse.Namespace, prompt: str, images: Sequence[Image.Image],
                       prefix: str = "") -> RephraseResult:
    """Rewrite ``prompt`` for ``images`` with the rephraser of the ``prefix`` options (hints, language included).

    Raises ValueError (bad options or inputs) or RephraseError (the back-end failed or answered unusably).
    """
    return rephraser_from_args(args, prefix).rephrase(prompt, images, hints=_get(args, prefix, "hint"),
                                                      language=_get(args, prefix, "language"))


def load_images(paths: Sequence[str]) -> list[Image.Image]:
    """Open reference image files as ``generate`` does (``open_reference``: RGB, EXIF orientation applied,
    transparency over white). Raises ValueError naming the file that cannot be read."""
    images = []
    for k, path in enumerate(paths, start=1):
        try:
            images.append(open_reference(Path(path)))
        except (OSError, ValueError) as err:
            raise ValueError(f"--ref {k} ({path}) cannot be read as an image: {err}") from err
    return images


def add_rephrase_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``rephrase`` (``func=run_rephrase``) on ``subparsers``; returns the sub-parser."""
    p = subparsers.add_parser("rephrase", help="rewrite a prompt so each reference subject is described",
                              description="Rewrite a prompt for Phantom with a vision-language model; prints the "
                                          "rewritten prompt (or, with --json, the descriptions too).")
    p.add_argument("--ref", action="append", required=True, metavar="IMAGE",
                   help=f"reference image, in order (1 to {MAX_REFERENCES})")
    p.add_argument("--prompt", required=True, help="the prompt to rewrite")
    p.add_argument("--json", action="store_true", help="print prompt, descriptions and language as JSON")
    add_rephrase_backend_arguments(p)
    p.set_defaults(func=run_rephrase)
    return p


def run_rephrase(args: argparse.Namespace) -> int:
    """``rephrase``: print the rewritten prompt (or JSON). Raises ValueError / RephraseError."""
    result = rephrase_from_args(args, args.prompt, load_images(args.ref))
    if args.json:
        data = result.to_json() | {"cached": result.cached}
        print(json.dumps(data, ensure_ascii=False, indent=2))
    else:
        print(result.prompt)
    return 0
