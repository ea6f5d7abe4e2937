"""`make train-default`: train the embedded default in the miniature world, from scratch, resumably.

    python -m tools.train_default [--work build/default] [--stages text,vae,latents,dit,export] [--threads 2]
        [--pairs cross|in]
    python -m tools.train_default --model mmdit [--variant both|vae|clip]
        [--stages clip,clip_features,mmdit,motion_cache,motion,cooldown,pairs_cache,pairs,pairs_cooldown,
                  next_vae,next_cache,next_pairs_cache,next,next_cooldown,export]

``--model mmdit`` trains the paper's MMDiT in a work folder that already holds the Phantom-Wan recipe's text, vae and
latents stages: the world CLIP, the references' CLIP features, then the MMDiT variant (``--variant``: VAE and CLIP
references, VAE only, CLIP only; ``phantom_core.world.mmdit_default``). The default (variant ``both`` only) then has
its motion stages, with ``tools.motion_run`` in ``<work>/motion`` (docs/WORLD.md, MODEL_CARD_MMDIT.md steps 4-5):
``motion_cache`` renders and encodes 600 one-subject scenes whose subjects travel 0.5 of the frame (and 48 held-out
ones for the probe) with the folder's own VAE and umT5, ``motion`` gives the MMDiT its pooled text and reference
vectors and trains it on them (``MOTION_TRAIN``: constant learning rate, CLIP features from the folder's CLIP,
probing the motion word every 250 steps), ``cooldown`` goes on at a falling learning rate and keeps the EMA of the
weights (``COOLDOWN``); ``pairs_cache`` renders 450 two-subject scenes in ``<work>/motion_pairs``, and ``pairs`` and
``pairs_cooldown`` do the same two runs again on both caches mixed (``PAIRS_TRAIN``, then ``COOLDOWN``), so that two
subjects each keep a motion of their own (``MOTION_RUNS`` chains the runs). Then the MMDiT moves to a VAE of its own:
``next_vae`` trains the ``subjects`` VAE recipe in ``<work>/next`` (``world.vae_recipe``; sharper subjects), the
``next_cache`` / ``next_pairs_cache`` stages encode 600 one-subject and 240 two-subject scenes with it in
``<work>/next``, and ``next`` / ``next_cooldown`` fine-tune the two-subject stage's file on them (``NEXT_TRAIN``,
``NEXT_COOLDOWN``). Its ``export`` (variant ``both`` only) copies the last run's MMDiT, the world CLIP tower and the
next VAE into ``phantom_core/tiny/trained/`` as the second embedded default (``generate --model default-mmdit``),
and refuses unless the folder's umT5 is the shipped Phantom-Wan default's own (``make train-default-mmdit`` runs
``make train-default`` first, so it is).

``--pairs in`` makes the latents stage encode in-pair triplets (each reference a crop of a frame of its video,
background included) instead of the recipe's cross-pair ones, for Phantom-Data's comparison (docs/WORLD.md); a
folder's cache keeps the mode it was built with (another is refused).

Each stage leaves its files in ``--work`` and is skipped when they are complete, and the VAE and DiT stages
resume from their latest checkpoint, so an interrupted run continues where it stopped. The VAE and DiT stages draw
a progress bar with the loss on stderr and leave ``loss.png`` (and ``log.jsonl``) in their run folders. ``export``
copies the finished files into ``phantom_core/tiny/trained/`` (atomically). The recipe is
``phantom_core.world.default_model``.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import torch

STAGES = ("text", "vae", "latents", "dit", "export")
NEXT_STAGES = ("next_vae", "next_cache", "next_pairs_cache", "next", "next_cooldown")
MOTION_STAGES = ("motion_cache", "motion", "cooldown", "pairs_cache", "pairs", "pairs_cooldown", *NEXT_STAGES)
MMDIT_STAGES = ("clip", "clip_features", "mmdit", *MOTION_STAGES, "export")
DEFAULT_ONLY = (*MOTION_STAGES, "export")  # the MMDiT default's stages (--variant both)
MOTION_DIR = "motion"  # <work>/motion: the motion stages' one-subject cache and their runs (tools.motion_run)
PAIRS_DIR = "motion_pairs"  # <work>/motion_pairs: the two-subject cache that joins the one-subject one
NEXT_DIR = "next"  # <work>/next: the MMDiT default's own VAE (recipe NEXT_VAE_RECIPE) and its caches and runs
NEXT_VAE_RECIPE = "subjects"  # world.vae_recipe: the MMDiT default's VAE (TRAINED_MMDIT_FILES["vae"])
MOTION_CACHE = ["--travel", "0.5", "--samples", "600", "--subjects", "1", "--held-out", "48"]
PAIRS_CACHE = ["--travel", "0.5", "--samples", "450", "--subjects", "2", "--held-out", "8"]
NEXT_PAIRS_CACHE = ["--travel", "0.5", "--samples", "240", "--subjects", "2", "--held-out", "8"]
# cache stage -> (its folder in <work>, its settings, the folder of the VAE it encodes with: <work> or <work>/next)
CACHES = {"motion_cache": (MOTION_DIR, MOTION_CACHE, "."), "pairs_cache": (PAIRS_DIR, PAIRS_CACHE, "."),
          "next_cache": (f"{NEXT_DIR}/{MOTION_DIR}", MOTION_CACHE, NEXT_DIR),
          "next_pairs_cache": (f"{NEXT_DIR}/{PAIRS_DIR}", NEXT_PAIRS_CACHE, NEXT_DIR)}
MOTION_TRAIN = ["--pooled", "--every", "250", "--probe", "16", "--seed", "5", "--steps", "5000"]
PAIRS_TRAIN = ["--every", "250", "--probe", "16", "--seed", "7", "--steps", "6000"]
COOLDOWN = ["--every", "400", "--probe", "16", "--seed", "6", "--lr", "2e-4", "--schedule", "cosine",
            "--ema", "0.998", "--steps", "800"]
# the fine-tune on the next VAE's latents (2026-12-07): the shipped run stopped at its 3,600 s budget on the 2-core
# AMD EPYC, at step 3,844 (the constant learning rate makes that the same run as --steps 3844)
NEXT_TRAIN = ["--every", "1000", "--probe", "16", "--seed", "31", "--steps", "3844"]
NEXT_COOLDOWN = ["--every", "400", "--probe", "16", "--seed", "32", "--lr", "2e-4", "--schedule", "cosine",
                 "--ema", "0.998", "--steps", "600"]
# training stage -> (its run: the file <name>.safetensors in its one-subject cache's folder, the stage it starts
# from (None: the MMDiT stage's mmdit_both.safetensors), its settings, its one-subject cache stage, the two-subject
# cache stage mixed in or None)
MOTION_RUNS = {"motion": ("b", None, MOTION_TRAIN, "motion_cache", None),
               "cooldown": ("c", "motion", COOLDOWN, "motion_cache", None),
               "pairs": ("d", "cooldown", PAIRS_TRAIN, "motion_cache", "pairs_cache"),
               "pairs_cooldown": ("e", "pairs", COOLDOWN, "motion_cache", "pairs_cache"),
               "next": ("f", "pairs_cooldown", NEXT_TRAIN, "next_cache", "next_pairs_cache"),
               "next_cooldown": ("g", "next", NEXT_COOLDOWN, "next_cache", "next_pairs_cache")}
SHIPPED_RUN = "next_cooldown"  # the training stage whose file export ships, with the VAE of its caches


def main(argv: list[str] | None = None) -> int:
    from phantom_core.inference.cli import TextProgressBar
    from phantom_core.world import default_model as recipe
    from phantom_core.world.pairs import PAIR_MODES

    parser = argparse.ArgumentParser(prog="python -m tools.train_default", description=__doc__.split("\n")[0])
    parser.add_argument("--work", default="build/default", help="folder of the runs and intermediate files")
    parser.add_argument("--stages", default=None, help=f"comma-separated, of {', '.join(STAGES)} (--model wan, "
                        f"the default: all) or {', '.join(MMDIT_STAGES)} (--model mmdit: all; "
                        f"{', '.join(DEFAULT_ONLY)} only for --variant both)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (the figures are for 2)")
    parser.add_argument("--model", choices=("wan", "mmdit"), default="wan",
                        help="wan: the Phantom-Wan default; mmdit: the paper's MMDiT on the wan recipe's latents")
    parser.add_argument("--variant", choices=("both", "vae", "clip"), default="both",
                        help="--model mmdit: VAE and CLIP references, VAE only, or CLIP only")
    parser.add_argument("--pairs", choices=PAIR_MODES, default="cross",
                        help="the latents stage's references: cross-pair (the recipe's) or in-pair, a crop of the "
                             "video (Phantom-Data's comparison, docs/WORLD.md); a folder keeps one mode")
    args = parser.parse_args(argv)
    valid = STAGES if args.model == "wan" else MMDIT_STAGES
    everything = [s for s in valid if args.model == "wan" or args.variant == "both" or s not in DEFAULT_ONLY]
    stages = [s.strip() for s in (args.stages or ",".join(everything)).split(",") if s.strip()]
    bad = [s for s in stages if s not in valid]
    if bad:
        parser.error(f"--stages: unknown {bad} for --model {args.model}; valid stages are {', '.join(valid)}")
    if args.model == "mmdit" and args.variant != "both" and (mine := [s for s in stages if s in DEFAULT_ONLY]):
        parser.error(f"--stages {','.join(mine)}: the MMDiT default's stages, for the variant both; --variant is "
                     f"{args.variant}")
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
            try:
                if stage == "latents":
                    run(args.work, pair_mode=args.pairs)
                elif stage in ("vae", "dit"):
                    bar = TextProgressBar(sys.stderr, label=stage, unit="step")
                    run(args.work, progress=lambda step, total, note, bar=bar: bar(step - 1, total, note=note))
                else:
                    run(args.work)
            except ValueError as err:  # a work folder that holds another world's files: nothing was changed
                print(f"train_default: stage {stage}: {err}", file=sys.stderr, flush=True)
                return 2
            print(f"== stage {stage} done in {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


def run_apart(args: argparse.Namespace, stages: list[str]) -> int:
    """Each stage in a fresh process of this tool, in order; stops at the first that fails (its exit status).

    Measured 2026-12-03 on the 2-core Xeon: the DiT stage's step took 2.9-3.0 s in the process that had just run the
    latents stage (5.7 GB resident) and 1.23 s in a fresh one, same settings."""
    for stage in stages:
        command = [sys.executable, "-m", "tools.train_default", "--work", args.work, "--stages", stage,
                   "--threads", str(args.threads), "--model", args.model, "--variant", args.variant,
                   "--pairs", args.pairs]
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
            mmdit_default.stage_mmdit_export(work, variant, dit=motion_output(Path(work), SHIPPED_RUN),
                                             vae=cache_vae(Path(work), MOTION_RUNS[SHIPPED_RUN][3]))
        elif stage == "next_vae":
            from phantom_core.world.default_model import stage_vae

            stage_vae(Path(work) / NEXT_DIR, progress, recipe=NEXT_VAE_RECIPE)
        elif stage in MOTION_STAGES:
            status = run_motion(Path(work), stage)
            if status:
                return status
        else:
            counts = mmdit_default.parameter_counts()
            print(f"parameters: {', '.join(f'{k} {v:,}' for k, v in counts.items())}", flush=True)
            mmdit_default.stage_mmdit(work, variant, progress=progress)
        print(f"== stage {stage} done in {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


def motion_output(work: Path, stage: str) -> Path:
    """The file the training run of ``stage`` (a key of ``MOTION_RUNS``) leaves when it is done: in the folder of
    its one-subject cache."""
    run, _, _, cache, _ = MOTION_RUNS[stage]
    return work / CACHES[cache][0] / f"{run}.safetensors"


def cache_vae(work: Path, cache: str) -> Path:
    """The VAE file the cache stage ``cache`` (a key of ``CACHES``) encodes with: ``work``'s or ``work/NEXT_DIR``'s."""
    from phantom_core.world.default_model import VAE_STAGE_FILE

    return work / CACHES[cache][2] / VAE_STAGE_FILE


def run_motion(work: Path, stage: str) -> int:
    """One motion stage (``MOTION_STAGES`` but ``next_vae``) through ``tools.motion_run`` (its exit status): a cache
    stage renders and encodes ``CACHES[stage]`` in its folder of ``work`` with the folder's umT5 and its VAE (``work``'s
    own, or ``work/NEXT_DIR``'s for the ``next`` caches), a training stage runs ``MOTION_RUNS[stage]`` in its
    one-subject cache's folder with ``work``'s CLIP tower. A stage whose output is complete is
    skipped, and a training stage resumes from its latest checkpoint.

    Raises ``FileNotFoundError`` naming the earlier stage's missing file."""
    from phantom_core.loading.disk import atomic_write
    from phantom_core.world.clip_model import CLIP_STAGE_FILE
    from phantom_core.world.default_model import TEXT_STAGE_FILE
    from tools import motion_run

    def require(*paths: Path) -> None:
        for path in paths:
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing: run the stages before {stage} first (python -m "
                                        f"tools.train_default --work {work} --model mmdit)")

    if stage in CACHES:
        folder, settings, _ = CACHES[stage]
        encoders = [cache_vae(work, stage), work / TEXT_STAGE_FILE]
        require(*encoders)
        cache = work / folder
        if (cache / "cache_done.json").is_file():
            return 0
        cache.mkdir(parents=True, exist_ok=True)
        for source in encoders:  # the cache encodes with the folder's VAE and umT5, not the shipped ones
            (cache / source.name).write_bytes(source.read_bytes())
        status = motion_run.main(["cache", "--work", str(cache), *settings])
        if status == 0:  # only a finished cache is marked done
            with atomic_write(cache / "cache_done.json") as tmp:
                tmp.write_text(json.dumps({"motion_run cache": settings}), encoding="utf-8")
        return status
    run, start, settings, single, mixed = MOTION_RUNS[stage]
    motion = work / CACHES[single][0]
    init = motion_output(work, start) if start else work / "mmdit_both.safetensors"
    caches = [motion] + ([work / CACHES[mixed][0]] if mixed else [])
    require(*(c / "cache_done.json" for c in caches), init, work / CLIP_STAGE_FILE)
    if motion_output(work, stage).is_file():
        return 0
    clip = ["--clip", "--clip-vision", str(work / CLIP_STAGE_FILE)]
    mix = ["--mix", str(caches[1])] if mixed else []
    return motion_run.main(["train", "--work", str(motion), *mix, "--init", str(init), *clip, *settings, "--resume",
                            "--out", str(motion / run)])


if __name__ == "__main__":
    sys.exit(main())
