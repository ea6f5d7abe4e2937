"""Command line: `python -m phantom_core <command> ...`.

    python -m phantom_core generate --dit DIT --vae VAE --text-encoder T5 --ref a.png --prompt "..." --out v.mp4
    python -m phantom_core generate ... --rephrase --rephrase-endpoint http://127.0.0.1:11434/v1 \\
        --rephrase-model qwen2.5vl:7b          # rewrite the prompt with a vision-language model first
    python -m phantom_core generate --from-sidecar v.json --out again.mp4   # reuses the recorded rewritten prompt
    python -m phantom_core inspect FILE [FILE ...] [--json]
    python -m phantom_core rephrase --ref a.png --prompt "..." --endpoint URL --model NAME [--json]

Commands are registered in `COMMANDS` (name -> "module:function" adding its sub-parser). Each sub-parser sets
`func(args) -> int` (the exit code): `generate` and `inspect` (inference/cli.py), `rephrase` (rephrase/cli.py),
`evaluate` (world/cli.py: the miniature world's metrics).
The rephraser's back-end options are the same for `rephrase` and `generate --rephrase`, spelled without a prefix
for `rephrase` (`--endpoint`, `--model`, `--seed`, `--timeout`, ...) and with `--rephrase-` for `generate`
(`--rephrase-endpoint`, `--rephrase-model`, `--rephrase-seed`, ...), whose own `--seed` is the noise seed.
With `generate --rephrase` the sidecar records the original prompt, the rewritten prompt (the one encoded), the
descriptions and the rephraser's settings (the API key variable's name, never the key).

Exit codes: 0 success, 1 the rephraser's back-end failed or answered unusably, 2 invalid input, 130 interrupted
(Ctrl-C: one line on stderr, no traceback; an MP4 being written is not left half-written).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from phantom_core.rephrase.types import RephraseError

EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a Ctrl-C'd program

# command -> "module:function" adding its sub-parser; imported inside `main`, so that a Ctrl-C while torch is
# still importing is reported like any other interrupt
COMMANDS: dict[str, str] = {
    "generate": "phantom_core.inference.cli:add_generate_parser",
    "inspect": "phantom_core.inference.cli:add_inspect_parser",
    "rephrase": "phantom_core.rephrase.cli:add_rephrase_parser",
    "evaluate": "phantom_core.world.cli:add_evaluate_parser",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m phantom_core", description="Phantom subject-to-video tools")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for target in COMMANDS.values():
        module, function = target.split(":")
        getattr(importlib.import_module(module), function)(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns 0 on success, 1 when the rephraser's back-end fails, 2 for invalid input, 130 when
    interrupted (Ctrl-C, SIGINT: one line on stderr, no traceback)."""
    try:
        args = build_parser().parse_args(argv)
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
        return args.func(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RephraseError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted (Ctrl-C)", file=sys.stderr)  # the newline ends a progress bar line
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
