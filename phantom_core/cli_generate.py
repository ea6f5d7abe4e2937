"""The ``generate`` and ``inspect`` subcommands of ``python -m phantom_core``.

    python -m phantom_core generate --dit DIT --vae VAE --text-encoder T5 --ref a.png --ref b.png \\
        --prompt "..." --out video.mp4 [--preset official|paper] [--steps 50 ...]
    python -m phantom_core generate --from-sidecar video.json --out again.mp4
    python -m phantom_core inspect FILE [FILE ...] [--json]

Value precedence for ``generate``: an option given on the command line > ``--preset`` > the sidecar of
``--from-sidecar`` > the official defaults of ``GenerationSettings``. The CLI draws a plain-text progress bar on
stderr; the library itself only logs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

import torch

from phantom_core.inspect_checkpoint import format_report, inspect_checkpoint
from phantom_core.pipeline import (
    REF_MODES,
    GenerationSettings,
    changed_files,
    default_sidecar_path,
    generate_to_file,
    read_sidecar,
    resolve_seed,
)
from phantom_core.references import MAX_REFERENCES
from phantom_core.sampler import SAMPLER_PRESETS, SOLVERS

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# command-line option -> GenerationSettings field, for the sampler / video options (all default to None so that
# "not given" can be told apart from a value, see the precedence in the module docstring)
SETTING_OPTIONS: dict[str, tuple[str, type, str]] = {
    "prompt": ("--prompt", str, "what the video shows (the reference subjects doing something)"),
    "negative_prompt": ("--negative-prompt", str, "negative prompt (default: Wan2.1's standard one)"),
    "width": ("--width", int, "video width in px, multiple of 16 (default 832)"),
    "height": ("--height", int, "video height in px, multiple of 16 (default 480)"),
    "frames": ("--frames", int, "frames, 4k+1 (default 81 = 5 s at 16 fps)"),
    "steps": ("--steps", int, "sampling steps (official 50)"),
    "shift": ("--shift", float, "flow time shift (official 5.0)"),
    "solver": ("--solver", str, f"sampler: {' | '.join(SOLVERS)} (official unipc, paper euler)"),
    "w_img": ("--w-img", float, "reference-image guidance (official 5.0, paper 3.0)"),
    "w_text": ("--w-text", float, "text guidance (official 7.5)"),
    "seed": ("--seed", int, "noise seed; -1 (default) draws one, recorded in the sidecar"),
    "fps": ("--fps", float, "frames per second of the MP4 (default 16)"),
    "quality": ("--quality", int, "MP4 quality 0..10, 10 best (default 8)"),
    "ref_mode": ("--ref-mode", str, f"how references fit the frame: {' | '.join(REF_MODES)} (default letterbox)"),
}


class TextProgressBar:
    """``callback(step, total, x0)`` drawing ``sampling [#####-----] 3/6 1.20 s/step`` on a text stream.

    The rate is measured between step callbacks (model loading and encoding before the first step do not count).
    """

    def __init__(self, stream: TextIO | None = None, width: int = 30) -> None:
        self.stream, self.width = stream or sys.stderr, width
        self.first: float | None = None  # time of the first callback
        self.first_done = 0

    def __call__(self, step: int, total: int, x0_pred: Any = None) -> None:
        now, done = time.perf_counter(), step + 1
        if self.first is None:
            self.first, self.first_done = now, done
        filled = round(self.width * done / total)
        rate = f" {(now - self.first) / (done - self.first_done):.2f} s/step" if done > self.first_done else ""
        self.stream.write(f"\rsampling [{'#' * filled}{'-' * (self.width - filled)}] {done}/{total}{rate}"
                          + ("\n" if done == total else ""))
        self.stream.flush()


# ---------------------------------------------------------------------------------------------- parsers


def add_generate_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``generate`` (``func=run_generate``) on ``subparsers``; returns the sub-parser."""
    p = subparsers.add_parser(
        "generate", help="generate a video of reference subjects (Phantom-Wan), write MP4 + JSON sidecar",
        description="Generate a subject-consistent video from 1 to 4 reference images and a prompt. Writes the "
                    "MP4 and, next to it, a JSON sidecar recording every setting, the seed and file hashes.")
    files = p.add_argument_group("model files (not needed with --from-sidecar)")
    files.add_argument("--dit", metavar="PATH", help="Phantom-Wan DiT: .safetensors, .pth, sharded index or its folder")
    files.add_argument("--vae", metavar="PATH", help="Wan2.1 VAE (.pth or .safetensors)")
    files.add_argument("--text-encoder", metavar="PATH", help="umT5-xxl encoder (.safetensors with tokenizer, or .pth)")
    files.add_argument("--tokenizer", metavar="PATH", help="umT5 spiece.model (or its folder) when the text encoder "
                                                          "file has none embedded (e.g. Wan's .pth)")
    p.add_argument("--ref", action="append", metavar="IMAGE", help=f"reference image, in order (1 to {MAX_REFERENCES})")
    p.add_argument("--out", required=True, metavar="MP4", help="output video (.mp4); written atomically")
    p.add_argument("--sidecar", metavar="JSON", help="where to write the sidecar (default: the MP4's name, .json)")
    p.add_argument("--preset", choices=list(SAMPLER_PRESETS), help="sampler preset: official (UniPC, w_img 5) or "
                                                                   "paper (Euler, w_img 3)")
    settings = p.add_argument_group("generation settings (default: the official Phantom-Wan values)")
    for field, (flag, kind, text) in SETTING_OPTIONS.items():
        choices = {"solver": SOLVERS, "ref_mode": REF_MODES}.get(field)
        settings.add_argument(flag, dest=field, type=kind, default=None, choices=choices, help=text)
    run = p.add_argument_group("runtime")
    run.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    run.add_argument("--dtype", default=None, choices=list(DTYPES),
                     help="DiT / text encoder dtype (default: bfloat16 on CUDA, float32 on the CPU)")
    run.add_argument("--from-sidecar", metavar="JSON", help="regenerate from a sidecar: its files and settings "
                                                            "(options given here override it)")
    run.add_argument("--ignore-changed-files", action="store_true",
                     help="with --from-sidecar: go on although a model or reference file's hash has changed")
    run.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=run_generate)
    return p


def add_inspect_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``inspect`` (``func=run_inspect``) on ``subparsers``; returns the sub-parser."""
    p = subparsers.add_parser(
        "inspect", help="say what a checkpoint is (architecture, preset, dtype, size, keys) without loading it",
        description="Reads only the checkpoint's header (safetensors) or a memory map (.pth): no weights are "
                    "loaded. Recognises Phantom-Wan / Wan2.1 T2V DiTs (and their preset), Wan I2V DiTs, the Wan "
                    "VAE and umT5 text encoders.")
    p.add_argument("files", nargs="+", metavar="FILE", help="checkpoint file, sharded index or its folder")
    p.add_argument("--json", action="store_true", help="print the reports as a JSON list")
    p.set_defaults(func=run_inspect)
    return p


# ---------------------------------------------------------------------------------------------- commands


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_generate_args(args: argparse.Namespace) -> dict[str, Any]:
    """Merge defaults < sidecar < preset < explicit options into the arguments of ``generate_to_file``.

    Raises ``ValueError`` naming a missing option, a bad value or (unless ``--ignore-changed-files``) a file
    that changed since the sidecar was written.
    """
    values: dict[str, Any] = {}
    files: dict[str, Any] = {"dit": None, "vae": None, "text_encoder": None, "tokenizer": None, "ref": None}
    device, dtype = None, None
    if args.from_sidecar:
        record = read_sidecar(args.from_sidecar)
        values.update(record["settings"].to_json())
        files.update({role: entry["path"] for role, entry in record["models"].items() if role in files})
        files["ref"] = [r["path"] for r in record["references"]]
        device, dtype = record["runtime"]["device"], record["runtime"]["dtype"]
        problems = [] if args.ignore_changed_files else changed_files(record)
        if problems:
            raise ValueError(f"--from-sidecar {args.from_sidecar}: the video would not be the same: "
                             + "; ".join(problems) + " (pass --ignore-changed-files to regenerate anyway)")
    if args.preset:
        values.update(SAMPLER_PRESETS[args.preset])
    values.update({f: getattr(args, f) for f in SETTING_OPTIONS if getattr(args, f) is not None})
    files.update({k: getattr(args, k) for k in files if getattr(args, k)})
    for role, flag in (("dit", "--dit"), ("vae", "--vae"), ("text_encoder", "--text-encoder"), ("ref", "--ref")):
        if not files[role]:
            raise ValueError(f"{flag} is required (or --from-sidecar FILE)")
    if "prompt" not in values:
        raise ValueError("--prompt is required (or --from-sidecar FILE)")
    device = args.device or device or _default_device()
    dtype = args.dtype or dtype or ("bfloat16" if str(device).startswith("cuda") else "float32")
    if dtype not in DTYPES:
        raise ValueError(f"dtype: got {dtype!r}; valid dtypes are {', '.join(DTYPES)}")
    return {"dit_path": files["dit"], "vae_path": files["vae"], "text_encoder_path": files["text_encoder"],
            "ref_paths": list(files["ref"]), "settings": GenerationSettings.from_json(values),
            "out_path": args.out, "dtype": DTYPES[dtype], "device": device,
            "sidecar_path": args.sidecar or default_sidecar_path(args.out), "tokenizer_path": files["tokenizer"]}


def run_generate(args: argparse.Namespace, stream: TextIO | None = None) -> int:
    """``generate``: load, sample, write MP4 + sidecar. Returns 0; raises ``ValueError`` for bad input."""
    stream = stream or sys.stderr
    try:
        kwargs = resolve_generate_args(args)
        kwargs["settings"] = settings = resolve_seed(kwargs["settings"])
        dtype = str(kwargs["dtype"]).removeprefix("torch.")
        stream.write(f"generating {settings.frames} frames {settings.width}x{settings.height}, {settings.solver} "
                     f"{settings.steps} steps, seed {settings.seed}, on {kwargs['device']} ({dtype})\n")
        bar = None if args.no_progress else TextProgressBar(stream)
        mp4, side = generate_to_file(**kwargs, progress=False, callback=bar)
    except OSError as err:  # a missing or unreadable file: report it like any other bad input
        raise ValueError(str(err)) from err
    stream.write(f"wrote {mp4} and {side} (seed {settings.seed})\n")
    return 0


def run_inspect(args: argparse.Namespace, stream: TextIO | None = None) -> int:
    """``inspect``: print one report per file (text or ``--json``). Raises ``ValueError`` for a bad file."""
    stream = stream or sys.stdout
    try:
        reports = [inspect_checkpoint(f) for f in args.files]
    except OSError as err:
        raise ValueError(str(err)) from err
    if args.json:
        stream.write(json.dumps(reports, indent=2) + "\n")
    else:
        stream.write("\n".join(format_report(r) for r in reports) + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """A top-level parser with just ``generate`` and ``inspect`` (tests, and ``main`` below)."""
    parser = argparse.ArgumentParser(prog="python -m phantom_core", description="Phantom subject-to-video tools")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_generate_parser(subparsers)
    add_inspect_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``generate`` / ``inspect`` from ``argv``; 0 on success, 2 for bad input (message on stderr)."""
    import logging

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        return args.func(args)
    except ValueError as err:
        sys.stderr.write(f"error: {err}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
