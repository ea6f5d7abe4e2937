"""Which model files ``generate`` runs: an embedded default (``--model``) or the files given, plus the CLIP vision
tower of an MMDiT with a CLIP branch (``--clip-vision``, ``--clip-output``).

    --model default        the trained Phantom-Wan default (phantom_core/tiny/trained/, MODEL_CARD.md); also what
                           runs when no model file is given (and no --from-sidecar)
    --model default-mmdit  the paper's MMDiT trained in the same world (``make train-default-mmdit``): its DiT,
                           world CLIP tower and VAE (``TRAINED_MMDIT_FILES``), the Phantom-Wan default's umT5, the
                           CLIP tokens it was trained on (``TRAINED_MMDIT_CLIP_OUTPUT``)

Both run at their world's format (``TRAINED_FORMAT``) with the default's guidance (``TRAINED_SAMPLING``), and the
MMDiT default with its step cache (``TRAINED_MMDIT_SPEED``), unless an option (or ``--from-sidecar``'s settings) says
otherwise.
"""

from __future__ import annotations

import argparse
from typing import Any

from phantom_core.mmdit.clip import CLIP_OUTPUTS
from phantom_core.tiny.default import (
    TRAINED_FILES,
    TRAINED_FORMAT,
    TRAINED_MMDIT_CLIP_OUTPUT,
    TRAINED_MMDIT_FILES,
    TRAINED_MMDIT_SPEED,
    TRAINED_SAMPLING,
    trained_file,
)

EMBEDDED_MODELS = ("default", "default-mmdit")
MODEL_FLAGS = (("dit", "--dit"), ("vae", "--vae"), ("text_encoder", "--text-encoder"))
FILE_FLAGS = (*MODEL_FLAGS, ("clip_vision", "--clip-vision"))


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``model files`` option group of ``generate``."""
    files = parser.add_argument_group("model files (none given: the trained embedded default, as --model default)")
    files.add_argument("--model", choices=EMBEDDED_MODELS,
                       help="an embedded default (phantom_core/tiny/trained/, MODEL_CARD.md): default (Phantom-Wan) "
                            "or default-mmdit (the paper's MMDiT, once `make train-default-mmdit` has made it); "
                            "128x128, 17 frames unless --width/--height/--frames say otherwise; prompts in the "
                            "world's grammar")
    files.add_argument("--dit", metavar="PATH", help="Phantom-Wan DiT or MMDiT: .safetensors, .pth, sharded index or "
                                                     "its folder")
    files.add_argument("--vae", metavar="PATH", help="Wan2.1 VAE (.pth or .safetensors)")
    files.add_argument("--text-encoder", metavar="PATH", help="umT5-xxl encoder (.safetensors with tokenizer, or .pth)")
    files.add_argument("--tokenizer", metavar="PATH", help="umT5 spiece.model (or its folder) when the text encoder "
                                                          "file has none embedded (e.g. Wan's .pth)")
    files.add_argument("--clip-vision", metavar="PATH", help="the CLIP vision tower an MMDiT with a CLIP branch was "
                                                            "trained with (open_clip or ComfyUI layout)")
    files.add_argument("--clip-output", choices=CLIP_OUTPUTS, default=None,
                       help="the CLIP features that MMDiT reads: tokens (default) or pooled")


def embedded_files(model: str) -> dict[str, str]:
    """Role -> shipped file of the embedded default ``model`` (``default``: dit, vae, text_encoder; ``default-mmdit``:
    those and clip_vision). Raises ``ValueError`` naming the missing files when ``default-mmdit`` is not shipped."""
    roles = dict(TRAINED_FILES) if model == "default" else {**TRAINED_FILES, **TRAINED_MMDIT_FILES}
    paths = {role: trained_file(relative) for role, relative in roles.items()}
    missing = [str(path) for path in paths.values() if not path.is_file()]
    if missing:
        make = "make train-default-mmdit" if model == "default-mmdit" else "make train-default"
        raise ValueError(f"--model {model}: the trained files are not shipped ({', '.join(missing)} missing); "
                         f"`{make}` trains and exports them")
    return {role: str(path) for role, path in paths.items()}


def resolve_model_files(args: argparse.Namespace, files: dict[str, Any], values: dict[str, Any],
                        recorded_clip_output: str | None = None) -> tuple[dict[str, Any], str]:
    """Fill ``files`` (role -> path, in place; a ``--from-sidecar`` sidecar's already there) from ``--model`` or the
    file options given. Returns ``(values, clip_output)``: the settings with an embedded default's format,
    guidance (and the MMDiT default's step cache) under those given, and the CLIP features to use (an option > the
    embedded default's > the sidecar's ``recorded_clip_output`` > tokens). Raises ``ValueError`` for ``--model``
    with file options, or an embedded default that is not shipped."""
    given = [flag for role, flag in FILE_FLAGS if getattr(args, role)]
    if args.model and given:
        raise ValueError(f"--model {args.model} names the embedded default's files; drop {', '.join(given)} "
                         "(or --model)")
    files.update({role: getattr(args, role) for role, _ in FILE_FLAGS if getattr(args, role)})
    model = args.model or (None if args.from_sidecar or given else "default")
    if model is not None:
        files.update({"clip_vision": None, **embedded_files(model)})  # no CLIP tower a sidecar named
        mmdit = model == "default-mmdit"
        values = {**TRAINED_FORMAT, **TRAINED_SAMPLING, **(TRAINED_MMDIT_SPEED if mmdit else {}), **values}
        recorded_clip_output = TRAINED_MMDIT_CLIP_OUTPUT if mmdit else None
    return values, args.clip_output or recorded_clip_output or CLIP_OUTPUTS[0]
