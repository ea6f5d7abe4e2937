"""`make train-default`: train the embedded default in the miniature world, from scratch, resumably.

    python -m tools.train_default [--work build/default] [--stages text,vae,latents,dit,export] [--threads 2]
    python -m tools.train_default --model mmdit [--variant both|vae|clip] [--stages clip,clip_features,mmdit,export]

``--model mmdit`` trains the paper's MMDiT in a work folder that already holds the Phantom-Wan recipe's text, vae and
latents stages: the world CLIP, the references' CLIP features, then the MMDiT variant (``--variant``: VAE and CLIP
references, VAE only, CLIP only; ``phantom_core.world.mmdit_default``). Its ``export`` (variant ``both`` only, the
default's) copies the MMDiT and the world CLIP tower into ``phantom_core/tiny/trained/`` as the second embedded
default (``generate --model default-mmdit``), and refuses unless the folder's VAE and umT5 are the shipped
Phantom-Wan default's own (``make train-default-mmdit`` runs ``make train-default`` first, so they are).

Each stage leaves its files in ``--work`` and is skipped when they are complete, and the VAE and DiT stages
resume from their latest checkpoint, so an interrupted run continues where it stopped. The VAE and DiT stages draw
a progress bar with the loss on stderr and leave ``loss.png`` (and ``log.jsonl``) in their run folders. ``export``
copies the finished files into ``phantom_core/tiny/trained/`` (atomically). The recipe is
``phantom_core.world.default_model``.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import time

import torch

STAGES = ("text", "vae", "latents", "dit", "export")
MMDIT_STAGES = ("clip", "clip_features", "mmdit", "export")


def main(argv: list[str] | None = None) -> int:
    from phantom_core.inference.cli import TextProgressBar
    from phantom_core.world import default_model as recipe

    parser = argparse.ArgumentParser(prog="python -m tools.train_default", description=__doc__.split("\n")[0])
    parser.add_argument("--work", default="build/default", help="folder of the runs and intermediate files")
    parser.add_argument("--stages", default=None, help=f"comma-separated, of {', '.join(STAGES)} (--model wan, "
                        f"the default: all) or {', '.join(MMDIT_STAGES)} (--model mmdit: all; export only for "
                        "--variant both)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (the figures are for 2)")
    parser.add_argument("--model", choices=("wan", "mmdit"), default="wan",
                        help="wan: the Phantom-Wan default; mmdit: the paper's MMDiT on the wan recipe's latents")
    parser.add_argument("--variant", choices=("both", "vae", "clip"), default="both",
                        help="--model mmdit: VAE and CLIP references, VAE only, or CLIP only")
    args = parser.parse_args(argv)
    valid = STAGES if args.model == "wan" else MMDIT_STAGES
    everything = [s for s in valid if args.model == "wan" or args.variant == "both" or s != "export"]
    stages = [s.strip() for s in (args.stages or ",".join(everything)).split(",") if s.strip()]
    bad = [s for s in stages if s not in valid]
    if bad:
        parser.error(f"--stages: unknown {bad} for --model {args.model}; valid stages are {', '.join(valid)}")
    if args.model == "mmdit" and "export" in stages and args.variant != "both":
        parser.error(f"--stages export: the MMDiT default is the variant both; --variant is {args.variant}")
    if len(stages) > 1:
        return run_apart(args, [s for s in valid if s in stages])
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    if args.model == "mmdit":
        return run_mmdit(args.work, stages, args.variant)
    for stage in STAGES:
        if stage in stages:
            t0 = time.perf_counter()
            print(f"== stage {stage}", flush=True)  # a command-line tool: its report goes to stdout
            run = getattr(recipe, f"stage_{stage}")
            if stage in ("vae", "dit"):
                bar = TextProgressBar(sys.stderr, label=stage, unit="step")
                run(args.work, progress=lambda step, total, note, bar=bar: bar(step - 1, total, note=note))
            else:
                run(args.work)
            print(f"== stage {stage} done in {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


def run_apart(args: argparse.Namespace, stages: list[str]) -> int:
    """Each stage in a fresh process of this tool, in order; stops at the first that fails (its exit status).

    Measured 2026-12-03 on the 2-core Xeon: the DiT stage's step took 2.9-3.0 s in the process that had just run the
    latents stage (5.7 GB resident) and 1.23 s in a fresh one, same settings."""
    for stage in stages:
        command = [sys.executable, "-m", "tools.train_default", "--work", args.work, "--stages", stage,
                   "--threads", str(args.threads), "--model", args.model, "--variant", args.variant]
        status = subprocess.run(command, check=False).returncode
        if status != 0:
            print(f"== stage {stage} failed (exit status {status}); rerun the same command to resume", flush=True)
            return status
    return 0


def run_mmdit(work: str, stages: list[str], variant: str) -> int:
    """The MMDiT stages in order (``clip`` and ``clip_features`` are skipped for the VAE-only variant; ``export``
    ships the variant as the MMDiT default)."""
    from phantom_core.inference.cli import TextProgressBar
    from phantom_core.world import clip_model, mmdit_default

    for stage in MMDIT_STAGES:
        if stage not in stages or (variant == "vae" and stage in ("clip", "clip_features")):
            continue
        t0 = time.perf_counter()
        print(f"== stage {stage}", flush=True)
        bar = TextProgressBar(sys.stderr, label=stage, unit="step")
        progress = lambda step, total, note, bar=bar: bar(step - 1, total, note=note)  # noqa: E731
        if stage == "clip":
            clip_model.stage_clip(work, progress=progress)
        elif stage == "clip_features":
            mmdit_default.stage_clip_features(work)
        elif stage == "export":
            mmdit_default.stage_mmdit_export(work, variant)
        else:
            counts = mmdit_default.parameter_counts()
            print(f"parameters: {', '.join(f'{k} {v:,}' for k, v in counts.items())}", flush=True)
            mmdit_default.stage_mmdit(work, variant, progress=progress)
        print(f"== stage {stage} done in {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
