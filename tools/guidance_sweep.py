"""Sweep Phantom's two guidance scales (paper Eq. 5: ``w_img``, ``w_text``) on a world model, same cases each time.

    python -m tools.guidance_sweep [--model default|default-mmdit | --dit D --vae V --text-encoder T [--clip-vision C]]
        [--w-img 1,3,5,7.5] [--w-text 1,3,5,7.5] [--quick 8 | --cases-single 24 --cases-multi 12] [--travel 0.5]
        [--steps 20] [--out docs/guidance_sweep.md]

Each (w_img, w_text) pair samples the same held-out world cases (``world.cases``, cross-pair references) from the
same seeds and is scored by ``world.evaluate``; the table (markdown) and the raw summaries (JSON beside it) say
how subject fidelity and prompt following move with each scale. Every other sampling setting is the official
recipe's (UniPC, shift 5) unless given. ``--travel`` runs the cases of a world whose subjects travel that fraction of
the frame (``evaluate --travel``; the shipped MMDiT default trained last at 0.5); an MMDiT with a CLIP branch reads its
references' CLIP features (``default-mmdit``: the shipped tower and ``TRAINED_MMDIT_CLIP_OUTPUT``; a ``--dit``:
``--clip-vision`` and ``--clip-output``).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace


def scales(text: str, name: str) -> list[float]:
    """``"1,3,5"`` -> ``[1.0, 3.0, 5.0]``; ``ValueError`` naming ``name`` for anything but positive numbers."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(v <= 0 for v in values):
        raise ValueError(f"{name}: got {text!r}; expected comma-separated positive numbers, e.g. 1,3,5,7.5")
    return values


def load(args: argparse.Namespace):
    """(DiT, VAE, text encoder, CLIP tower or None, CLIP output) of ``args``' model: an embedded default's shipped
    files (``cli_models.embedded_files``), or the files given. Raises ``ValueError`` naming what is missing."""
    from phantom_core.inference.cli_models import embedded_files
    from phantom_core.inference.pipeline import check_clip_vision, load_clip_tower, load_models
    from phantom_core.tiny.default import TRAINED_MMDIT_CLIP_OUTPUT

    if args.model:
        files, clip_output = embedded_files(args.model), TRAINED_MMDIT_CLIP_OUTPUT
    else:
        files = {"dit": args.dit, "vae": args.vae, "text_encoder": args.text_encoder, "clip_vision": args.clip_vision}
        clip_output = args.clip_output
    dit, vae, text_encoder = load_models(files["dit"], files["vae"], files["text_encoder"], device="cpu")
    clip = load_clip_tower(files["clip_vision"]) if files.get("clip_vision") else None
    check_clip_vision(dit, clip, clip_output)
    return dit, vae, text_encoder, clip, clip_output


def main(argv: list[str] | None = None) -> int:
    from phantom_core.mmdit.clip import CLIP_OUTPUTS
    from phantom_core.world.baselines import model_producer
    from phantom_core.world.cases import CaseSet
    from phantom_core.world.evaluate import COMPARISON_COLUMNS, comparison_markdown, evaluate, write_comparison
    from phantom_core.world.render import MAX_TRAVEL, TRAVEL_FRACTION, check_travel
    from phantom_core.world.sample import WorldConfig

    p = argparse.ArgumentParser(prog="python -m tools.guidance_sweep", description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=["default", "default-mmdit"],
                   help="a trained embedded default (phantom_core/tiny/trained): Phantom-Wan or the paper's MMDiT")
    p.add_argument("--dit"), p.add_argument("--vae"), p.add_argument("--text-encoder")
    p.add_argument("--clip-vision", help="the CLIP tower of an MMDiT --dit with a CLIP branch")
    p.add_argument("--clip-output", choices=CLIP_OUTPUTS, default=CLIP_OUTPUTS[0])
    p.add_argument("--w-img", default="1,3,5,7.5"), p.add_argument("--w-text", default="1,3,5,7.5")
    p.add_argument("--quick", type=int, default=None,
                   help="N single- and N/2 two-subject cases (default 8 unless --cases-single / --cases-multi)")
    p.add_argument("--cases-single", type=int, default=None, metavar="N")
    p.add_argument("--cases-multi", type=int, default=None, metavar="N")
    p.add_argument("--travel", type=float, default=TRAVEL_FRACTION,
                   help=f"the world's travel, in (0, {MAX_TRAVEL}] (default %(default)s)")
    p.add_argument("--steps", type=int, default=20), p.add_argument("--shift", type=float, default=5.0)
    p.add_argument("--out", default="docs/guidance_sweep.md", help="markdown table; JSON beside it")
    args = p.parse_args(argv)
    if bool(args.model) == bool(args.dit and args.vae and args.text_encoder):
        p.error("give --model default|default-mmdit, or all of --dit, --vae and --text-encoder")
    if args.model and args.clip_vision:
        p.error("--clip-vision goes with --dit; --model default-mmdit brings its own tower")
    explicit = args.cases_single is not None or args.cases_multi is not None
    if explicit and args.quick is not None:
        p.error("give --quick or --cases-single / --cases-multi, not both")
    try:
        grid = [(wi, wt) for wi in scales(args.w_img, "--w-img") for wt in scales(args.w_text, "--w-text")]
        check_travel(args.travel)
        cases = CaseSet(config=WorldConfig(travel=args.travel))  # CaseSet checks the counts
        cases = (replace(cases, single=args.cases_single or 0, multi=args.cases_multi or 0) if explicit
                 else cases.quick(8 if args.quick is None else args.quick))
        dit, vae, text_encoder, clip, clip_output = load(args)
    except ValueError as err:
        p.error(str(err))
    rows = []
    for w_img, w_text in grid:
        t0 = time.perf_counter()
        producer = model_producer(dit, vae, text_encoder, clip_vision=clip, clip_output=clip_output,
                                  steps=args.steps, shift=args.shift, w_img=w_img, w_text=w_text)
        result = evaluate(producer, cases, name=f"w_img {w_img:g} w_text {w_text:g}", keep=0)
        rows.append({"w_img": w_img, "w_text": w_text, **result.summary()})
        print(f"w_img {w_img:g} w_text {w_text:g}: " + ", ".join(
            f"{label} {fmt.format(rows[-1]['all'][key]) if rows[-1]['all'][key] is not None else '-'}"
            for key, label, fmt in COMPARISON_COLUMNS) + f" ({time.perf_counter() - t0:.0f} s)", flush=True)
    command = "python -m tools.guidance_sweep " + " ".join(argv if argv is not None else sys.argv[1:])
    table = comparison_markdown(["w_img", "w_text"], [([f"{r['w_img']:g}", f"{r['w_text']:g}"], r["all"])
                                                      for r in rows], command.strip())
    out = write_comparison(args.out, table, {"command": command.strip(), "cases": len(cases), "travel": args.travel,
                                             "rows": rows})
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
