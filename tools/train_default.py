"""`make train-default`: train the embedded default in the miniature world, from scratch, resumably.

    python -m tools.train_default [--work build/default] [--stages text,vae,latents,dit,export] [--threads 2]

Each stage leaves its files in ``--work`` and is skipped when they are complete, and the VAE and DiT stages
resume from their latest checkpoint, so an interrupted run continues where it stopped. The VAE and DiT stages draw
a progress bar with the loss on stderr and leave ``loss.png`` (and ``log.jsonl``) in their run folders. ``export``
copies the finished files into ``phantom_core/tiny/trained/`` (atomically). The recipe is
``phantom_core.world.default_model``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import torch

STAGES = ("text", "vae", "latents", "dit", "export")


def main(argv: list[str] | None = None) -> int:
    from phantom_core.inference.cli import TextProgressBar
    from phantom_core.world import default_model as recipe

    parser = argparse.ArgumentParser(prog="python -m tools.train_default", description=__doc__.split("\n")[0])
    parser.add_argument("--work", default="build/default", help="folder of the runs and intermediate files")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, of {', '.join(STAGES)}")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (the figures are for 2)")
    args = parser.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    bad = [s for s in stages if s not in STAGES]
    if bad:
        parser.error(f"--stages: unknown {bad}; valid stages are {', '.join(STAGES)}")
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
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


if __name__ == "__main__":
    sys.exit(main())
