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
import json
import sys
import tempfile
import time
from pathlib import Path

COLUMNS = (("psnr", "subject PSNR (dB)", "{:.2f}"), ("motion_accuracy", "motion (%)", "{:.1f}"),
           ("trajectory_error", "trajectory err (%)", "{:.1f}"), ("background_accuracy", "background (%)", "{:.1f}"),
           ("swap_rate", "swaps (%)", "{:.1f}"), ("copy_paste_rate", "copy-paste (%)", "{:.1f}"),
           ("stability", "stability", "{:.3f}"))


def scales(text: str, name: str) -> list[float]:
    """``"1,3,5"`` -> ``[1.0, 3.0, 5.0]``; ``ValueError`` naming ``name`` for anything but positive numbers."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(v <= 0 for v in values):
        raise ValueError(f"{name}: got {text!r}; expected comma-separated positive numbers, e.g. 1,3,5,7.5")
    return values


def markdown(rows: list[dict], command: str) -> str:
    """The sweep as a markdown table (one row per scale pair, ``all`` cases) with the command that made it."""
    head = "| w_img | w_text | " + " | ".join(label for _, label, _ in COLUMNS) + " |"
    lines = [f"`{command}`", "", head, "|" + "---|" * (len(COLUMNS) + 2)]
    for row in rows:
        cells = [fmt.format(row["all"][key]) if row["all"][key] is not None else "-" for key, _, fmt in COLUMNS]
        lines.append(f"| {row['w_img']:g} | {row['w_text']:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from phantom_core.inference.pipeline import load_models
    from phantom_core.loading.disk import atomic_write
    from phantom_core.tiny.default import install_trained_default
    from phantom_core.world.baselines import model_producer
    from phantom_core.world.cases import CaseSet
    from phantom_core.world.evaluate import evaluate

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
            for key, label, fmt in COLUMNS) + f" ({time.perf_counter() - t0:.0f} s)", flush=True)
    command = "python -m tools.guidance_sweep " + " ".join(argv if argv is not None else sys.argv[1:])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out) as tmp:
        tmp.write_text(markdown(rows, command.strip()), encoding="utf-8")
    with atomic_write(out.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps({"command": command.strip(), "cases": len(cases), "rows": rows}, indent=1),
                       encoding="utf-8")
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
