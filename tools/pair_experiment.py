"""Phantom-Data's finding in miniature (Table 2): the same DiT trained on in-pair and on cross-pair triplets.

    python -m tools.pair_experiment [--from build/default] [--work build/pairs] [--samples 600] [--steps 1200]
        [--quick 8] [--w-img 3] [--w-text 3] [--out docs/pair_experiment.md]

In-pair: the reference is a crop of the target video's first frame, background included; cross-pair: the
reference shows the subject in another context (letterboxed on white, another scale, pose, lighting), the recipe's
data. Both runs use the trained default's VAE and umT5 (``--from``, after ``make train-default``), the same number
of triplets drawn from the same seeds (so the same subjects, prompts and videos: only the references differ), the
same DiT recipe (``DIT_TRAIN`` with ``--steps``) and seed; then the same held-out cases (always cross-pair
references: what users give) are scored by ``world.evaluate``. The table reports prompt following (background,
motion) and the copy-paste rate for each. Each stage resumes; ``--work`` keeps the caches and runs.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

MODES = ("in", "cross")


def train_mode(source: Path, work: Path, mode: str, samples: int, steps: int) -> Path:
    """Encode ``samples`` triplets of ``mode`` with ``source``'s VAE and umT5 and train a DiT on them; resumable."""
    from phantom_core.inference.settings import WAN_NEGATIVE_PROMPT
    from phantom_core.training.config import load_config
    from phantom_core.training.loop import train
    from phantom_core.world import default_model as recipe

    folder = work / mode
    folder.mkdir(parents=True, exist_ok=True)
    for name in (recipe.VAE_STAGE_FILE, recipe.TEXT_STAGE_FILE):
        if not (folder / name).is_file():
            shutil.copyfile(source / name, folder / name)
    recipe.stage_latents(folder, samples=samples, pair_mode=mode)
    out = folder / recipe.DIT_STAGE_FILE
    if not out.is_file():
        config = load_config(None, **{**recipe.DIT_TRAIN, "steps": steps}, out=str(out),
                             run_dir=str(folder / recipe.DIT_RUN), resume=True, dropped_prompt=WAN_NEGATIVE_PROMPT)
        train(config, dataset=recipe.cached_latents(folder))
    return out


def main(argv: list[str] | None = None) -> int:
    from phantom_core.inference.pipeline import load_models
    from phantom_core.world.baselines import model_producer
    from phantom_core.world.cases import CaseSet
    from phantom_core.world.evaluate import COMPARISON_COLUMNS, comparison_markdown, evaluate, write_comparison

    p = argparse.ArgumentParser(prog="python -m tools.pair_experiment", description=__doc__.split("\n")[0])
    p.add_argument("--from", dest="source", default="build/default", help="the default's work folder")
    p.add_argument("--work", default="build/pairs")
    p.add_argument("--samples", type=int, default=600), p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--quick", type=int, default=8), p.add_argument("--sampling-steps", type=int, default=20)
    p.add_argument("--w-img", type=float, default=3.0), p.add_argument("--w-text", type=float, default=3.0)
    p.add_argument("--out", default="docs/pair_experiment.md")
    args = p.parse_args(argv)
    source = Path(args.source)
    missing = [n for n in ("vae.safetensors", "umt5.safetensors") if not (source / n).is_file()]
    if missing:
        p.error(f"--from {source}: {', '.join(missing)} missing; run `make train-default` first (or name its --work)")
    if args.samples < 8 or args.steps < 1:
        p.error(f"--samples must be >= 8 and --steps >= 1; got {args.samples} and {args.steps}")
    rows = []
    for mode in MODES:
        dit_path = train_mode(source, Path(args.work), mode, args.samples, args.steps)
        dit, vae, text_encoder = load_models(dit_path, source / "vae.safetensors", source / "umt5.safetensors",
                                             device="cpu")
        producer = model_producer(dit, vae, text_encoder, steps=args.sampling_steps, w_img=args.w_img,
                                  w_text=args.w_text)
        result = evaluate(producer, CaseSet().quick(args.quick), name=f"{mode}-pair", keep=0)
        rows.append({"mode": mode, **result.summary()})
        summary = rows[-1]["all"]
        print(f"{mode}-pair: " + ", ".join(f"{label} {summary[k]}" for k, label, _ in COMPARISON_COLUMNS), flush=True)
    command = "python -m tools.pair_experiment " + " ".join(argv if argv is not None else sys.argv[1:])
    table = comparison_markdown(["training pairs"], [([f"{r['mode']}-pair"], r["all"]) for r in rows],
                                command.strip())
    out = write_comparison(args.out, table, {"command": command.strip(), "rows": rows})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
