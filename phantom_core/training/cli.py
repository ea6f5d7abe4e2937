"""The ``train`` subcommand of ``python -m phantom_core``.

    python -m phantom_core train --config run.toml                      # every setting from the file
    python -m phantom_core train --config run.toml --steps 200 --learning-rate 5e-5   # flags override it
    python -m phantom_core train --dataset data/dog --dit Phantom-Wan-1.3B.pth --vae Wan2.1_VAE.pth \\
        --text-encoder umt5_xxl_fp16.safetensors --out loras/dog.safetensors --mode lora --steps 1000
    torchrun --nproc-per-node 8 -m phantom_core train --config run.toml --fsdp   # many GPUs

Every ``TrainConfig`` field is a flag (``learning_rate`` -> ``--learning-rate``; booleans ``--resume`` /
``--no-resume``; lists take several values). Precedence: a flag > the TOML file > the field's default. Rank 0
draws a progress bar with the loss on stderr and writes ``out``, ``<run_dir>/log.jsonl``, ``loss.png``,
``checkpoints/`` and ``validation/``.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TextIO

from phantom_core.inference.cli import TextProgressBar
from phantom_core.training.config import FIELDS, load_config
from phantom_core.training.loop import train


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_train_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``train`` (``func=run_train``) on ``subparsers``; returns the sub-parser."""
    p = subparsers.add_parser(
        "train", help="train Phantom (LoRA or full fine-tune) on a dataset of clips, references and captions",
        description="Rectified-flow training with Phantom's reference conditioning (paper Sec. 3.3): caches the "
                    "latents and text contexts once, trains, checkpoints, resumes, validates, and writes --out.")
    p.add_argument("--config", metavar="TOML", help="a flat TOML file of TrainConfig fields")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    group = p.add_argument_group("settings (TrainConfig fields; they override --config)")
    for name, f in FIELDS.items():
        kind, text = type(f.default), f.metadata["help"]
        if kind is bool:
            group.add_argument(_flag(name), dest=name, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif kind is tuple:
            group.add_argument(_flag(name), dest=name, nargs="+", default=None, metavar="VALUE", help=text)
        else:
            group.add_argument(_flag(name), dest=name, type=kind, default=None, help=f"{text} (default {f.default!r})")
    p.set_defaults(func=run_train)
    return p


def run_train(args: argparse.Namespace, stream: TextIO | None = None) -> int:
    """``train``: build the config (``--config`` + flags), train, report the result. Raises ``ValueError`` for
    bad settings or data (the CLI's exit code 2)."""
    stream = stream or sys.stderr
    overrides = {name: getattr(args, name) for name in FIELDS if getattr(args, name) is not None}
    config = load_config(args.config, **overrides)
    main_rank = int(os.environ.get("RANK", "0")) == 0
    bar = TextProgressBar(stream, label="training") if main_rank and not args.no_progress else None

    def on_step(step: int, total: int, loss: float) -> None:
        if bar is not None:
            bar(step - 1, total, note=f"loss {loss:.4f}")

    try:
        result = train(config, callback=on_step)
    except OSError as err:  # a missing or unreadable file: reported like any other bad input
        raise ValueError(str(err)) from err
    if main_rank:
        for b in result.bad_samples:
            stream.write(f"skipped sample {b.name}: {b.reason}\n")
        last = f", last loss {result.losses[-1]:.4f}" if result.losses else ""
        stream.write(f"wrote {result.out} after {result.steps} steps{last}; run folder {result.run_dir}\n")
    return 0
