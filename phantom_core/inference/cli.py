"""The ``generate`` and ``inspect`` subcommands of ``python -m phantom_core``.

    python -m phantom_core generate --dit DIT --vae VAE --text-encoder T5 --ref a.png --ref b.png \\
        --prompt "..." --out video.mp4 [--preset official|paper] [--steps 50 ...]
    python -m phantom_core generate --ref a.png --prompt "a cat moves left on a blue background" --out v.mp4
                                                     # no model files: the trained default (--model default)
    python -m phantom_core generate --model default-mmdit --ref a.png --prompt "..." --out v.mp4
                                                     # the paper's MMDiT default (inference/cli_models.py)
    python -m phantom_core generate ... --rephrase --rephrase-endpoint http://127.0.0.1:11434/v1 \\
        --rephrase-model qwen2.5vl:7b [--rephrase-hint TEXT ...]
    python -m phantom_core generate ... --lora style.safetensors:0.8 --lora lightx2v.safetensors
    python -m phantom_core generate --from-sidecar video.json --out again.mp4
    torchrun --nproc-per-node 3 -m phantom_core generate ... [--parallel guidance|sequence|guidance,sequence]
                                                     # many GPUs: see inference/parallel.py; rank 0 writes
    python -m phantom_core inspect FILE [FILE ...] [--json]

Value precedence for ``generate``: an option given on the command line > ``--preset`` > the sidecar of
``--from-sidecar`` > the official defaults of ``GenerationSettings``. The CLI draws a plain-text progress bar on
stderr; the library itself only logs.

Precision and placement: ``--dtype auto`` (default) keeps each DiT / text-encoder file's stored weight dtype (a bf16
umT5 stays bf16, an fp8 file stays fp8) and computes in bf16 on CUDA, fp32 on the CPU (``--compute-dtype``);
``--text-encoder-device cpu`` keeps umT5 on the CPU while the DiT holds the GPU. The sidecar records the choices
(and what they resolved to), so ``--from-sidecar`` decides the same way.

Speed: ``--attention auto|sdpa|flash|sage|math`` picks the DiT's attention kernel (``phantom_core.wan.attention``;
not given: ``$PHANTOM_ATTENTION``, else auto), ``--compile`` compiles each DiT block with ``torch.compile``
(``phantom_core.wan.block_compile``; ``--no-compile`` overrides a sidecar's). Both are recorded in the sidecar's
``runtime`` (with the back-end auto resolved to).

``--lora FILE[:STRENGTH]`` (repeatable, strength 1.0 by default) applies LoRAs to the DiT after loading, in any
layout ``phantom_core.lora.keys`` reads; the sidecar records each file (path, sha256) and strength, and
``--from-sidecar`` applies them again (``--lora`` given on the command line replaces the recorded list).

``--rephrase`` rewrites the prompt with the rephraser (``phantom_core.rephrase.rephraser``; back-end options of
``cli_rephrase`` under the ``--rephrase-`` prefix) before it is encoded. The sidecar's ``settings.prompt`` is the
rewritten prompt (what the video was made from); its ``"rephrase"`` entry records the original prompt, the
rewritten one, the descriptions and the rephraser's settings (the API key variable's name, never the key).
``--from-sidecar`` therefore regenerates from the recorded rewritten prompt without asking the model again (the
entry is carried over to the new sidecar); ``--from-sidecar --rephrase`` asks again, starting from the recorded
original prompt (or ``--prompt``).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import torch

from phantom_core.inference.cli_models import MODEL_FLAGS, add_model_arguments, resolve_model_files
from phantom_core.inference.parallel import add_parallel_argument, join_ranks
from phantom_core.inference.pipeline import generate_to_file
from phantom_core.inference.rephrasing import REPHRASE_PREFIX, SIDECAR_REPHRASE_KEY, add_to_sidecar, rephrase_settings
from phantom_core.inference.settings import GenerationSettings, resolve_seed
from phantom_core.inference.sidecar import changed_files, default_sidecar_path, dtype_name, read_sidecar
from phantom_core.inference.threads import cpu_threads_checked
from phantom_core.loading.fp8 import COMPUTE_DTYPES, WEIGHT_DTYPES
from phantom_core.references import MAX_REFERENCES, REFERENCE_MODES
from phantom_core.rephrase.cli import add_rephrase_backend_arguments
from phantom_core.sampling.loop import BATCH_PASSES, SAMPLER_PRESETS, SOLVERS
from phantom_core.wan.attention import ATTENTION_CHOICES, check_attention, selected_attention
from phantom_core.wan.inspect import format_report, inspect_checkpoint

# --dtype: weight dtype of the DiT and the text encoder (None: each file's stored dtype); --compute-dtype: activations
DTYPES: dict[str, torch.dtype | None] = {"auto": None, **WEIGHT_DTYPES}
CLI_COMPUTE_DTYPES: dict[str, torch.dtype | None] = {"auto": None, **COMPUTE_DTYPES}
# torch's names (as the sidecar records them) -> ours
DTYPE_ALIASES = {str(dt).removeprefix("torch."): name for name, dt in WEIGHT_DTYPES.items()}

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
    "ref_mode": ("--ref-mode", str, f"how references fit the frame: {' | '.join(REFERENCE_MODES)} (default letterbox)"),
    "image_guidance_start": ("--image-guidance-start", float, "fraction of the steps where the image-guidance "
                                                              "(v_neg) pass starts (default 0)"),
    "image_guidance_end": ("--image-guidance-end", float, "fraction of the steps where it ends; w_img = 1 outside "
                                                          "(default 1: every step, as official)"),
    "cache_threshold": ("--cache-threshold", float, "reuse each guidance pass across steps while its predicted "
                                                    "change stays under this (EasyCache rule; default 0 = off, "
                                                    "0.1 with --model default-mmdit)"),
}


class TextProgressBar:
    """``callback(step, total, x0)`` drawing ``sampling [#####-----] 3/6 1.20 s/step`` on a text stream.

    The rate is measured between step callbacks (model loading and encoding before the first step do not count);
    a count that starts again (a step not after the last one, or another total: the next phase of a training stage)
    restarts the measure, so each phase shows its own rate. ``label`` and ``unit`` name what is counted
    (``evaluate`` draws ``cases [###---] 3/300 2.10 s/case``); ``note`` (e.g. training's ``loss 0.1234``) is
    appended to the line.
    """

    def __init__(self, stream: TextIO | None = None, width: int = 30, label: str = "sampling",
                 unit: str = "step") -> None:
        self.stream, self.width, self.label, self.unit = stream or sys.stderr, width, label, unit
        self.first: float | None = None  # time of the first callback (of this count)
        self.first_done = 0
        self.last: tuple[int, int] | None = None  # (done, total) of the last callback

    def __call__(self, step: int, total: int, x0_pred: Any = None, note: str = "") -> None:
        now, done = time.perf_counter(), step + 1
        if self.last is None or done <= self.last[0] or total != self.last[1]:
            self.first, self.first_done = now, done
        self.last = (done, total)
        filled = round(self.width * done / total)
        rate = f" {(now - self.first) / (done - self.first_done):.2f} s/{self.unit}" if done > self.first_done else ""
        note = f" {note}" if note else ""
        self.stream.write(f"\r{self.label} [{'#' * filled}{'-' * (self.width - filled)}] {done}/{total}{rate}{note}"
                          + ("\n" if done == total else ""))
        self.stream.flush()


# ---------------------------------------------------------------------------------------------- parsers


def add_generate_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``generate`` (``func=run_generate``) on ``subparsers``; returns the sub-parser."""
    p = subparsers.add_parser(
        "generate", help="generate a video of reference subjects (Phantom-Wan), write MP4 + JSON sidecar",
        description="Generate a subject-consistent video from 1 to 4 reference images and a prompt. Writes the "
                    "MP4 and, next to it, a JSON sidecar recording every setting, the seed and file hashes.")
    add_model_arguments(p)
    p.add_argument("--ref", action="append", metavar="IMAGE", help=f"reference image, in order (1 to {MAX_REFERENCES})")
    p.add_argument("--lora", action="append", type=lora_choice, metavar="FILE[:STRENGTH]",
                   help="apply a LoRA to the DiT (repeatable; strength default 1.0, negative inverts): ComfyUI, "
                        "kohya / musubi, diffusion-pipe, ai-toolkit or diffusers files for Wan2.1 T2V")
    p.add_argument("--out", required=True, metavar="MP4", help="output video (.mp4), written atomically; an existing "
                                                               "file is refused unless --overwrite")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out MP4 and its sidecar")
    p.add_argument("--sidecar", metavar="JSON", help="where to write the sidecar (default: the MP4's name, .json)")
    p.add_argument("--preset", choices=list(SAMPLER_PRESETS), help="sampler preset: official (UniPC, w_img 5) or "
                                                                   "paper (Euler, w_img 3)")
    settings = p.add_argument_group("generation settings (default: the official Phantom-Wan values; with an "
                                    "embedded default, its own format, guidance and step cache)")
    for field, (flag, kind, text) in SETTING_OPTIONS.items():
        choices = {"solver": SOLVERS, "ref_mode": REFERENCE_MODES}.get(field)
        settings.add_argument(flag, dest=field, type=kind, default=None, choices=choices, help=text)
    run = p.add_argument_group("runtime")
    run.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    run.add_argument("--text-encoder-device", default=None, metavar="DEVICE",
                     help="where the umT5 text encoder runs (default: --device); cpu keeps its 5.7 B parameters off "
                          "the GPU (its output is moved to the DiT's device)")
    run.add_argument("--dtype", default=None, type=dtype_choice, choices=list(DTYPES),
                     help="DiT and text encoder weight dtype. auto (default): each file's stored dtype, never upcast "
                          "wholesale (a bf16 umT5 stays bf16, an fp8 file stays fp8); fp32/fp16/bf16: cast every "
                          "weight; fp8_e4m3fn/fp8_e5m2: store the Linear weights in 8 bits. The VAE always runs "
                          "in fp32")
    run.add_argument("--compute-dtype", default=None, type=dtype_choice, choices=list(CLI_COMPUTE_DTYPES),
                     help="activation dtype of the DiT and text encoder. auto (default): the --dtype when it is "
                          "fp32/fp16/bf16, else bf16 on CUDA and fp32 on the CPU (weights upcast layer by layer)")
    run.add_argument("--attention", default=None, choices=ATTENTION_CHOICES,
                     help="attention kernel of the DiT. auto: FlashAttention, else SageAttention, when installed and "
                          "the device and dtype fit (CUDA, fp16/bf16), else PyTorch SDPA; sdpa: PyTorch's "
                          "scaled_dot_product_attention; flash / sage: refused when not installed; math: the slow "
                          "float32 reference. Default: $PHANTOM_ATTENTION, else auto")
    run.add_argument("--compile", dest="compiled", default=None, action=argparse.BooleanOptionalAction,
                     help="torch.compile each DiT block (regional compilation, inductor): the first steps compile, "
                          "the rest run faster; needs Triton on CUDA, a C++ compiler on the CPU (default: off)")
    run.add_argument("--batch-passes", default="auto", choices=BATCH_PASSES,
                     help="the guidance passes of a step as one batched forward: auto (default: batched unless the "
                          "batch would not fit the free GPU memory, then one at a time), on, off (a third of the "
                          "activation memory, slower); the video is the same to within float rounding")
    run.add_argument("--threads", type=int, default=None, metavar="N",
                     help="torch's CPU thread count (default: the one recorded in the --from-sidecar sidecar, else "
                          "torch's own); a video made on the CPU regenerates bit for bit only with the same count")
    run.add_argument("--block-swap", type=int, default=0, metavar="N",
                     help="keep the last N DiT blocks on the CPU and stream each to the GPU just before it runs "
                          "(less GPU memory, slower steps; 0 = off; at most the block count: 30 for 1.3B, 40 for 14B)")
    run.add_argument("--from-sidecar", metavar="JSON", help="regenerate from a sidecar: its files and settings "
                                                            "(options given here override it)")
    run.add_argument("--ignore-changed-files", action="store_true",
                     help="with --from-sidecar: go on although a model or reference file's hash has changed")
    run.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    add_parallel_argument(run)
    p.add_argument("--rephrase", action="store_true",
                   help="rewrite --prompt with a vision-language model before encoding, so that every reference "
                        "subject is named with its appearance (Phantom paper, arXiv 2502.11079); configure it with the "
                        f"--{REPHRASE_PREFIX}* options below")
    add_rephrase_backend_arguments(p, prefix=REPHRASE_PREFIX)
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


def dtype_choice(text: str) -> str:
    """A ``--dtype`` / ``--compute-dtype`` value normalised: torch's names (``bfloat16``) become ours (``bf16``)."""
    text = str(text).strip().lower()
    return DTYPE_ALIASES.get(text, text)


def lora_choice(text: str) -> tuple[str, float]:
    """A ``--lora`` value: ``FILE`` or ``FILE:STRENGTH`` -> ``(FILE, strength)`` (strength 1.0 when absent; a tail
    after the last ``:`` that is not a number belongs to the path, e.g. ``C:\\loras\\x.safetensors``)."""
    path, sep, tail = str(text).rpartition(":")
    if sep and path:
        try:
            return path, float(tail)
        except ValueError:
            pass
    return str(text), 1.0


def _check_device(flag: str, value: str) -> str:
    try:
        torch.device(value)
    except (RuntimeError, ValueError) as err:
        raise ValueError(f"{flag}: got {value!r}; expected cpu, cuda, cuda:1, mps, ... ({err})") from None
    return value


def _runtime_args(args: argparse.Namespace, recorded: dict[str, Any]) -> dict[str, Any]:
    """``dtype`` / ``compute_dtype`` / ``device`` / ``text_encoder_device`` / ``attention`` / ``compiled`` /
    ``threads`` of ``generate_to_file``: an option given > the sidecar's ``runtime`` (``recorded``) > the defaults
    (auto; cuda when available; attention None, i.e. ``$PHANTOM_ATTENTION`` or auto; not compiled; torch's threads).
    Raises ``ValueError`` naming ``--threads`` for a count below 1."""
    device = _check_device("--device", args.device or recorded.get("device") or _default_device())
    te_device = args.text_encoder_device or recorded.get("text_encoder_device")
    out: dict[str, Any] = {"device": device,
                           "text_encoder_device": te_device and _check_device("--text-encoder-device", te_device)}
    for key, flag, valid in (("dtype", "--dtype", DTYPES), ("compute_dtype", "--compute-dtype", CLI_COMPUTE_DTYPES)):
        name = dtype_choice(getattr(args, key) or recorded.get(key) or "auto")
        if name not in valid:
            raise ValueError(f"{flag}: got {name!r}; valid: {', '.join(valid)}")
        out[key] = valid[name]
    attention = args.attention or recorded.get("attention")
    out["attention"] = None if attention is None else check_attention(attention, "--attention")
    out["compiled"] = bool(recorded.get("compiled", False) if args.compiled is None else args.compiled)
    out["threads"] = cpu_threads_checked(args.threads if args.threads is not None else recorded.get("threads"),
                                         "--threads")
    return out


def resolve_generate_args(args: argparse.Namespace) -> dict[str, Any]:
    """Merge defaults < sidecar < preset < explicit options into the arguments of ``generate_to_file``.

    Plus ``"rephrased"``: the ``--from-sidecar`` sidecar's ``"rephrase"`` entry or None (not an argument of
    ``generate_to_file``; ``run_generate`` takes it out). Raises ``ValueError`` naming a missing option, a bad
    value or (unless ``--ignore-changed-files``) a file that changed since the sidecar was written.
    """
    if not args.rephrase and (args.rephrase_endpoint or args.rephrase_local):
        raise ValueError(f"--{REPHRASE_PREFIX}endpoint / --{REPHRASE_PREFIX}local given without --rephrase; add "
                         "--rephrase to rewrite the prompt before encoding")
    values: dict[str, Any] = {}
    files: dict[str, Any] = {"dit": None, "vae": None, "text_encoder": None, "tokenizer": None, "clip_vision": None,
                             "ref": None, "lora": None}
    recorded, rephrased, clip_output = {}, None, None
    if args.from_sidecar:
        record = read_sidecar(args.from_sidecar)
        rephrased = record.get(SIDECAR_REPHRASE_KEY)
        values.update(record["settings"].to_json())
        files.update({role: entry["path"] for role, entry in record["models"].items() if role in files})
        files["ref"] = [r["path"] for r in record["references"]]
        files["lora"] = [(entry["path"], entry["strength"]) for entry in record.get("loras", [])]
        recorded = record.get("runtime") or {}
        clip_output = record["models"].get("clip_vision", {}).get("clip_output")  # sidecars before the MMDiT: none
        problems = [] if args.ignore_changed_files else changed_files(record)
        if problems:
            raise ValueError(f"--from-sidecar {args.from_sidecar}: the video would not be the same: "
                             + "; ".join(problems) + " (pass --ignore-changed-files to regenerate anyway)")
    if args.preset:
        values.update(SAMPLER_PRESETS[args.preset])
    values.update({f: getattr(args, f) for f in SETTING_OPTIONS if getattr(args, f) is not None})
    files.update({k: getattr(args, k) for k in ("tokenizer", "ref", "lora") if getattr(args, k)})
    values, clip_output = resolve_model_files(args, files, values, clip_output)
    for role, flag in (*MODEL_FLAGS, ("ref", "--ref")):
        if not files[role]:
            raise ValueError(f"{flag} is required (or --from-sidecar FILE)")
    if "prompt" not in values:
        raise ValueError("--prompt is required (or --from-sidecar FILE)")
    return {"dit_path": files["dit"], "vae_path": files["vae"], "text_encoder_path": files["text_encoder"],
            "ref_paths": list(files["ref"]), "settings": GenerationSettings.from_json(values),
            "out_path": args.out, **_runtime_args(args, recorded),
            "sidecar_path": args.sidecar or default_sidecar_path(args.out), "tokenizer_path": files["tokenizer"],
            "loras": list(files["lora"] or []), "rephrased": rephrased, "block_swap": args.block_swap,
            "batch_passes": args.batch_passes, "clip_vision_path": files["clip_vision"], "clip_output": clip_output}


def check_outputs(out: str | Path, sidecar: str | Path, overwrite: bool) -> None:
    """Refuse outputs that cannot or must not be written, before any model is loaded.

    Raises ValueError naming ``--out`` / ``--sidecar`` for a directory, a path under a file, or an existing file
    (unless ``overwrite``).
    """
    for flag, path in (("--out", Path(out)), ("--sidecar", Path(sidecar))):
        if path.is_dir():
            raise ValueError(f"{flag}: {path} is a directory; give a file name in it, e.g. {path / 'video.mp4'}"
                             if flag == "--out" else f"{flag}: {path} is a directory; give the JSON file's name")
        parent = next((p for p in path.parents if p.exists()), None)
        if parent is not None and not parent.is_dir():
            raise ValueError(f"{flag}: {path} cannot be created: {parent} is a file, not a folder")
        if path.exists() and not overwrite:
            raise ValueError(f"{flag}: {path} already exists; pass --overwrite to replace it, or choose another name")


def run_generate(args: argparse.Namespace, stream: TextIO | None = None) -> int:
    """``generate``: load, sample, write MP4 + sidecar. Returns 0; raises ``ValueError`` for bad input."""
    stream, ranks = stream or sys.stderr, None
    try:
        kwargs = resolve_generate_args(args)
        check_outputs(kwargs["out_path"], kwargs["sidecar_path"], args.overwrite)  # before any model loads
        ranks = join_ranks(args.parallel, kwargs)  # torchrun: every rank runs this; rank 0 asks, reports, writes
        if ranks is not None:
            kwargs["parallel"], stream = ranks, (stream if ranks.is_main else io.StringIO())
        previous = kwargs.pop("rephrased")
        settings, rephrased = resolve_seed(kwargs["settings"]), None  # under torchrun, rank 0's seed and prompt win
        if ranks is None or ranks.is_main:
            settings, rephrased = rephrase_settings(args, settings, kwargs["ref_paths"], previous, stream)
        kwargs["settings"] = settings
        te_device = kwargs["text_encoder_device"] or kwargs["device"]
        stream.write(f"generating {settings.frames} frames {settings.width}x{settings.height}, {settings.solver} "
                     f"{settings.steps} steps, seed {settings.seed}, on {kwargs['device']} (text encoder on "
                     f"{te_device}; weights {dtype_name(kwargs['dtype'])}, compute "
                     f"{dtype_name(kwargs['compute_dtype'])}; attention {kwargs['attention'] or selected_attention()}"
                     f"{', compiled blocks' if kwargs['compiled'] else ''}"
                     + (f"; {kwargs['block_swap']} DiT blocks swapped" if kwargs["block_swap"] else "") + ")"
                     + "".join(f"\n  LoRA {path} x {strength:g}" for path, strength in kwargs["loras"]) + "\n")
        bar = None if args.no_progress else TextProgressBar(stream)
        mp4, side = generate_to_file(**kwargs, progress=False, callback=bar)
        if rephrased is not None:
            add_to_sidecar(side, SIDECAR_REPHRASE_KEY, rephrased)
    except OSError as err:  # a missing or unreadable file: report it like any other bad input
        raise ValueError(str(err)) from err
    finally:
        if ranks is not None:
            ranks.close()
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
