"""Command line: `python -m phantom_core <command> ...`.

Commands are registered in `COMMANDS` (name -> function adding its sub-parser). Each sub-parser sets
`func(args) -> int` (the exit code): `generate` and `inspect` (cli_generate.py), `rephrase` (below).

Not wired yet: `generate --rephrase` (the rephraser's `--seed/--model/--timeout` clash with generate's options;
they need a `--rephrase-` prefix there).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from PIL import Image

from .cli_generate import add_generate_parser, add_inspect_parser
from .rephrase_backends import make_backend
from .rephraser import MAX_REFERENCES, RephraseCache, Rephraser, RephraseError, RephraseResult


def add_rephrase_backend_arguments(parser: argparse.ArgumentParser) -> None:
    """The rephraser's back-end, language and cache options (shared by `rephrase` and a future `generate`)."""
    g = parser.add_argument_group("rephraser back-end (give --endpoint/--model or --local)")
    g.add_argument("--endpoint", default="", metavar="URL",
                   help="OpenAI-compatible base URL, e.g. http://127.0.0.1:11434/v1 (Ollama)")
    g.add_argument("--model", default="", help="model name served by --endpoint")
    g.add_argument("--api-key-env", default="", metavar="VAR",
                   help="NAME of the environment variable holding the endpoint's API key (the key is never "
                        "taken on the command line)")
    g.add_argument("--timeout", type=float, default=120.0, help="endpoint timeout per request, seconds")
    g.add_argument("--retries", type=int, default=2, help="endpoint retries for transient faults")
    g.add_argument("--local", default="", metavar="PATH", help="local vision-language model folder")
    g.add_argument("--max-new-tokens", type=int, default=512)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy decoding")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (used when --temperature > 0)")
    g.add_argument("--language", default="auto", help="auto | en | zh (auto: the prompt's language)")
    g.add_argument("--hint", action="append", default=[], metavar="TEXT",
                   help="subject hint for the reference of the same position (repeatable; '' to skip one)")
    g.add_argument("--lenient", action="store_true",
                   help="return an answer that fails validation instead of an error")
    g.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="keep results as JSON files here, so identical calls do not ask the model again")


def rephrase_from_args(args: argparse.Namespace, prompt: str, images: Sequence[Image.Image]) -> RephraseResult:
    """Run the rephraser configured by `add_rephrase_backend_arguments` options. Raises ValueError/RephraseError."""
    if bool(args.endpoint) == bool(args.local):
        raise ValueError("give either --endpoint URL --model NAME (chat-completions back-end) or --local PATH "
                         "(local vision-language model folder)")
    backend = make_backend("local" if args.local else "openai-compatible", endpoint_url=args.endpoint,
                           endpoint_model=args.model, api_key_env=args.api_key_env, timeout_s=args.timeout,
                           max_retries=args.retries, local_path=args.local, max_new_tokens=args.max_new_tokens,
                           temperature=args.temperature, seed=args.seed)
    cache = RephraseCache(directory=args.cache_dir) if args.cache_dir else None
    rephraser = Rephraser(backend, cache=cache, strict=not args.lenient)
    return rephraser.rephrase(prompt, images, hints=args.hint, language=args.language)


def load_images(paths: Sequence[str]) -> list[Image.Image]:
    """Open reference image files (RGB). Raises ValueError naming the file that cannot be read."""
    images = []
    for k, path in enumerate(paths, start=1):
        try:
            with Image.open(Path(path)) as img:
                images.append(img.convert("RGB"))
        except OSError as err:
            raise ValueError(f"--ref {k} ({path}) cannot be read as an image: {err}") from err
    return images


def add_rephrase_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("rephrase", help="rewrite a prompt so each reference subject is described",
                              description="Rewrite a prompt for Phantom with a vision-language model; prints the "
                                          "rewritten prompt (or, with --json, the descriptions too).")
    p.add_argument("--ref", action="append", required=True, metavar="IMAGE",
                   help=f"reference image, in order (1 to {MAX_REFERENCES})")
    p.add_argument("--prompt", required=True, help="the prompt to rewrite")
    p.add_argument("--json", action="store_true", help="print prompt, descriptions and language as JSON")
    add_rephrase_backend_arguments(p)
    p.set_defaults(func=run_rephrase)


def run_rephrase(args: argparse.Namespace) -> int:
    result = rephrase_from_args(args, args.prompt, load_images(args.ref))
    if args.json:
        data = result.to_json() | {"cached": result.cached}
        print(json.dumps(data, ensure_ascii=False, indent=2))
    else:
        print(result.prompt)
    return 0


COMMANDS: dict[str, Callable[[argparse._SubParsersAction], None]] = {
    "generate": add_generate_parser,
    "inspect": add_inspect_parser,
    "rephrase": add_rephrase_parser,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m phantom_core", description="Phantom subject-to-video tools")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS.values():
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns 0 on success, 1 when the back-end fails, 2 for invalid input."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        return args.func(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RephraseError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
