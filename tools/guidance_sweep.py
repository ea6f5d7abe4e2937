"""Sweep Phantom's two guidance scales (paper Eq. 5: ``w_img``, ``w_text``) on a world model, same cases each time.

    python -m tools.guidance_sweep [--model default | --dit D --vae V --text-encoder T]
        [--w-img 1,3,5,7.5] [--w-text 1,3,5,7.5] [--quick 8] [--steps 20] [--out docs/guidance_sweep.md]

Each (w_img, w_text) pair samples the same held-out world cases (``world.cases``, cross-pair references) from the
same seeds and is scored by ``world.evaluate``; the table (markdown) and the raw summaries (JSON beside it) say
how subject fidelity and prompt following move with each scale. Every other sampling setting is the official
recipe's (UniPC, shift 5) unless given.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time


def scales(text: str, name: str) -> list[float]:
    """``"1,3,5"`` -> ``[1.0, 3.0, 5.0]``; ``ValueError`` naming ``name`` for anything but positive numbers."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(v <= 0 for v in values):
        raise ValueError(f"{name}: got {text!r}; expected comma-separated positive numbers, e.g. 1,3,5,7.5")
    return values


def main(argv: list[str] | None = None) -> int:
    from phantom_core.inference.pipeline import load_models
    from phantom_core.tiny.default import install_trained_default
    from phantom_core.world.baselines import model_producer
    from phantom_core.world.cases import CaseSet
    from phantom_core.world.evaluate import COMPARISON_COLUMNS, comparison_markdown, evaluate, write_comparison

    p = argparse.ArgumentParser(prog="python -m tools.guidance_sweep", description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=["default"], help="the trained embedded default (phantom_core/tiny/trained)")
    p.add_argument("--dit"), p.add_argument("--vae"), p.add_argument("--text-encoder")
    p.add_argument("--w-img", default="1,3,5,7.5"), p.add_argument("--w-text", default="1,3,5,7.5")
    p.add_argument("--quick", type=int, default=8, help="N single- and N/2 two-subject cases (default 8)")
    p.add_argument("--steps", type=int, default=20), p.add_argument("--shift", type=float, default=5.0)
    p.add_argument("--out", default="docs/guidance_sweep.md", help="markdown table; JSON beside it")
    args = p.parse_args(argv)
    try:
        grid = [(wi, wt) for wi in scales(args.w_img, "--w-img") for wt in scales(args.w_text, "--w-text")]
    except ValueError as err:
        p.error(str(err))
    if bool(args.model) == bool(args.dit and args.vae and args.text_encoder):
        p.error("give --model default, or all of --dit, --vae and --text-encoder")
    with tempfile.TemporaryDirectory(prefix="phantom-sweep-") as folder:
        files = install_trained_default(folder) if args.model else {
            "dit": args.dit, "vae": args.vae, "text_encoder": args.text_encoder}
        dit, vae, text_encoder = load_models(files["dit"], files["vae"], files["text_encoder"], device="cpu")
    cases = CaseSet().quick(args.quick)
    rows = []
    for w_img, w_text in grid:
        t0 = time.perf_counter()
        producer = model_producer(dit, vae, text_encoder, steps=args.steps, shift=args.shift, w_img=w_img,
                                  w_text=w_text)
        result = evaluate(producer, cases, name=f"w_img {w_img:g} w_text {w_text:g}", keep=0)
        rows.append({"w_img": w_img, "w_text": w_text, **result.summary()})
        print(f"w_img {w_img:g} w_text {w_text:g}: " + ", ".join(
            f"{label} {fmt.format(rows[-1]['all'][key]) if rows[-1]['all'][key] is not None else '-'}"
            for key, label, fmt in COMPARISON_COLUMNS) + f" ({time.perf_counter() - t0:.0f} s)", flush=True)
    command = "python -m tools.guidance_sweep " + " ".join(argv if argv is not None else sys.argv[1:])
    table = comparison_markdown(["w_img", "w_text"], [([f"{r['w_img']:g}", f"{r['w_text']:g}"], r["all"])
                                                      for r in rows], command.strip())
    out = write_comparison(args.out, table, {"command": command.strip(), "cases": len(cases), "rows": rows})
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
