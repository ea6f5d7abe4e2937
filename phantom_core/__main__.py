"""Command line: `python -m phantom_core <command> ...`.

    python -m phantom_core generate --dit DIT --vae VAE --text-encoder T5 --ref a.png --prompt "..." --out v.mp4
    python -m phantom_core generate ... --rephrase --rephrase-endpoint http://127.0.0.1:11434/v1 \\
        --rephrase-model qwen2.5vl:7b          # rewrite the prompt with a vision-language model first
    python -m phantom_core generate --from-sidecar v.json --out again.mp4   # reuses the recorded rewritten prompt
    python -m phantom_core inspect FILE [FILE ...] [--json]
    python -m phantom_core rephrase --ref a.png --prompt "..." --endpoint URL --model NAME [--json]
    python -m phantom_core evaluate --baseline paste | --model default | --dit D --vae V --text-encoder T [--quick N]

Commands are registered in `COMMANDS` (name -> function adding its sub-parser). Each sub-parser sets
`func(args) -> int` (the exit code): `generate` and `inspect` (cli.py), `rephrase` (rephrase/cli.py), `evaluate`
(world/cli.py: the miniature world's metrics).
The rephraser's back-end options are the same for `rephrase` and `generate --rephrase`, spelled without a prefix
for `rephrase` (`--endpoint`, `--model`, `--seed`, `--timeout`, ...) and with `--rephrase-` for `generate`
(`--rephrase-endpoint`, `--rephrase-model`, `--rephrase-seed`, ...), whose own `--seed` is the noise seed.
With `generate --rephrase` the sidecar records the original prompt, the rewritten prompt (the one encoded), the
descriptions and the rephraser's settings (the API key variable's name, never the key).

Exit codes: 0 success, 1 the rephraser's back-end failed or answered unusably, 2 invalid input.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from phantom_core.inference.cli import add_generate_parser, add_inspect_parser
from phantom_core.rephrase.cli import (
    add_rephrase_parser,
)
from phantom_core.rephrase.types import RephraseError
from phantom_core.world.cli import add_evaluate_parser

COMMANDS: dict[str, Callable[[argparse._SubParsersAction], object]] = {
    "generate": add_generate_parser,
    "inspect": add_inspect_parser,
    "rephrase": add_rephrase_parser,
    "evaluate": add_evaluate_parser,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m phantom_core", description="Phantom subject-to-video tools")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS.values():
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns 0 on success, 1 when the rephraser's back-end fails, 2 for invalid input."""
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
