"""One table from several ``evaluate`` reports: the models side by side on the same held-out cases.

    python -m tools.compare_evals LABEL=DIR_OR_METRICS_JSON [LABEL=...] [--group all|single|multi]
        [--out docs/ablation_mmdit.md] [--title "..."]

Each argument names a column and an ``evaluate --out`` folder (or its ``metrics.json``). The reports must score the
same cases the same way: equal ``world`` (size, frames, fps, travel), ``case_set`` (counts, seed), held-out
``pool`` signature and prompt form; otherwise ``ValueError`` names the field and both reports, since a table over
different cases compares nothing. The sampler settings (steps, shift, solver, w_img, w_text) may differ and are
shown per model above the table. The VAE's own reconstruction (each report's ``ceiling``) is a column of its own,
once per distinct ceiling (one per VAE). ``--out`` writes the markdown and the per-model records as JSON beside it
(``.json``), atomically; without it the table is printed. Rows: ``world.evaluate.SUMMARY_ROWS`` (the ``evaluate``
table's metrics), of ``--group``.

Below it, the fidelity differences paired case by case against the first column (``paired_differences``): with
72 cases a 0.3 dB gap between two columns may be the cases' spread, not the models'; the paired table says which
gaps are larger than their 95% interval.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

GROUPS = ("all", "single", "multi")
MATCHED = ("world", "case_set", "pool")  # report fields that must be equal across the compared reports
PAIRED = (("psnr", "subject PSNR (dB)", "{:+.2f} ± {:.2f}"), ("ssim", "subject SSIM", "{:+.3f} ± {:.3f}"))
Z95 = 1.96  # two-sided 95% normal quantile


def load_report(path: str | Path) -> dict[str, Any]:
    """The ``evaluate`` report at ``path`` (a folder with ``metrics.json``, or the file). Raises
    ``FileNotFoundError`` naming the path when there is none, ``ValueError`` when it lacks a summary."""
    path = Path(path)
    file = path / "metrics.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no evaluate report at {path} (an `evaluate --out` folder or its metrics.json)")
    report = json.loads(file.read_text(encoding="utf-8"))
    if not isinstance(report.get("summary"), dict):
        raise ValueError(f"{file} is not an evaluate report (no 'summary')")
    return report


def _prompt_form(report: dict[str, Any]) -> str:
    return (report.get("options") or {}).get("prompt_form") or "named"


def check_comparable(reports: dict[str, dict[str, Any]]) -> None:
    """Raise ``ValueError`` naming the field and the two labels where two reports did not score the same cases
    (``MATCHED`` fields, the prompt form)."""
    (first, ref), *rest = reports.items()
    for label, report in rest:
        for key in MATCHED:
            if report.get(key) != ref.get(key):
                raise ValueError(f"{label!r} and {first!r} were scored on different cases: {key} "
                                 f"{report.get(key)} against {ref.get(key)}; evaluate both with the same options")
        if _prompt_form(report) != _prompt_form(ref):
            raise ValueError(f"{label!r} and {first!r} used different prompt forms: {_prompt_form(report)!r} "
                             f"against {_prompt_form(ref)!r}")


def _sampling(report: dict[str, Any]) -> str:
    s = report.get("sampling") or {}
    parts = [f"{k} {s[k]:g}" if isinstance(s.get(k), (int, float)) else f"{k} {s[k]}"
             for k in ("steps", "w_img", "w_text", "shift", "solver") if s.get(k) is not None]
    return ", ".join(parts) or "model defaults"


def comparison(reports: dict[str, dict[str, Any]], group: str = "all") -> tuple[str, list[dict[str, Any]]]:
    """``(markdown table, rows)``: one column per model and per distinct VAE ceiling, one line per metric of
    ``SUMMARY_ROWS`` in ``group`` (``all``, ``single``, ``multi``). Raises ``ValueError`` for an unknown group or
    reports that are not comparable (``check_comparable``)."""
    from phantom_core.world.evaluate import SUMMARY_ROWS

    if group not in GROUPS:
        raise ValueError(f"group is {group!r}; valid: {', '.join(GROUPS)}")
    check_comparable(reports)
    columns: list[tuple[str, dict[str, Any]]] = [(label, r["summary"].get(group) or {}) for label, r in reports.items()]
    ceilings: list[dict[str, Any]] = []
    for report in reports.values():
        ceiling = (report.get("ceiling") or {}).get(group)
        if ceiling and ceiling not in ceilings:
            ceilings.append(ceiling)
    for i, ceiling in enumerate(ceilings):
        columns.append(("VAE ceiling" if len(ceilings) == 1 else f"VAE ceiling {i + 1}", ceiling))
    lines = ["| metric | " + " | ".join(label for label, _ in columns) + " |", "|" + "---|" * (len(columns) + 1)]
    for key, label, fmt in SUMMARY_ROWS:
        cells = [fmt.format(s[key]) if s.get(key) is not None else "-" for _, s in columns]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    rows = [{"label": label, "sampling": _sampling(r), "seconds": r.get("seconds"),
             "dit": (r.get("options") or {}).get("dit"), group: r["summary"].get(group)}
            for label, r in reports.items()]
    return "\n".join(lines) + "\n", rows


def case_values(report: dict[str, Any], key: str, group: str = "all") -> dict[int, float]:
    """``{case index: mean of its subjects' key}`` over ``report["cases"]`` of ``group`` (``single``: one subject,
    ``multi``: two or more); subjects without a value (``None``: no subject region) are left out, and a case
    with none at all is absent."""
    values: dict[int, float] = {}
    for case in report.get("cases") or []:
        count = len(case["subjects"])
        if (group == "single" and count != 1) or (group == "multi" and count < 2):
            continue
        finite = [s[key] for s in case["subjects"] if s.get(key) is not None]
        if finite:
            values[case["index"]] = float(np.mean(finite))
    return values


def paired_differences(reports: dict[str, dict[str, Any]], group: str = "all") -> tuple[str, list[dict[str, Any]]]:
    """``(markdown, rows)``: for each report after the first and each metric of ``PAIRED``, the mean over the
    cases both scored of (its case value - the first report's), ``case_values``, with the half-width of a 95%
    interval (``Z95`` standard errors of the mean, sample standard deviation; below two cases "nan" in the table and
    None in the rows, which go to JSON). A gap whose interval excludes 0 is marked ``*``. The mean of case means
    weighs a two-subject case once, as the summary's mean over subjects does not, so the difference may differ a
    little from the summaries' difference."""
    (base_label, base), *rest = reports.items()
    header = "| paired against " + base_label + " | " + " | ".join(label for _, label, _ in PAIRED) + " | cases |"
    lines = [header, "|" + "---|" * (len(PAIRED) + 2)]
    rows = []
    base_values = {key: case_values(base, key, group) for key, _, _ in PAIRED}
    for label, report in rest:
        row: dict[str, Any] = {"label": label, "against": base_label}
        cells, count = [], 0
        for key, _, fmt in PAIRED:
            mine, theirs = case_values(report, key, group), base_values[key]
            common = sorted(mine.keys() & theirs.keys())
            diff = np.array([mine[i] - theirs[i] for i in common])
            mean = float(diff.mean()) if len(diff) else math.nan
            half = Z95 * float(diff.std(ddof=1)) / math.sqrt(len(diff)) if len(diff) > 1 else math.nan
            row[key] = {"mean": _or_none(mean), "half_width_95": _or_none(half), "cases": len(common)}
            count = max(count, len(common))
            cells.append(fmt.format(mean, half) + (" *" if abs(mean) > half else ""))
        rows.append(row)
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {count} |")
    return "\n".join(lines) + "\n", rows


def _or_none(value: float) -> float | None:
    return None if math.isnan(value) else value


def _parse_pair(text: str) -> tuple[str, str]:
    label, sep, path = text.partition("=")
    if not sep or not label or not path:
        raise argparse.ArgumentTypeError(f"{text!r}: give LABEL=PATH (an evaluate --out folder or its metrics.json)")
    return label, path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.compare_evals", description=__doc__.split("\n\n")[0])
    p.add_argument("reports", nargs="+", type=_parse_pair, metavar="LABEL=PATH")
    p.add_argument("--group", choices=GROUPS, default="all", help="cases to summarise (default %(default)s)")
    p.add_argument("--title", default="", help="a heading above the table")
    p.add_argument("--out", default=None, help="markdown file to write (JSON beside it); default: print")
    args = p.parse_args(argv)
    labels = [label for label, _ in args.reports]
    if len(set(labels)) != len(labels):
        p.error(f"labels must differ: {labels}")
    try:
        reports = {label: load_report(path) for label, path in args.reports}
        table, rows = comparison(reports, args.group)
        paired, paired_rows = paired_differences(reports, args.group) if len(reports) > 1 else ("", [])
    except (OSError, ValueError) as exc:
        print(f"compare_evals: {exc}", file=sys.stderr)
        return 2
    first = next(iter(reports.values()))
    cases = first["case_set"]
    head = (f"{cases['single']} one-subject and {cases['multi']} two-subject held-out cases (seed {cases['seed']}), "
            f"travel {first['world'].get('travel')}, group '{args.group}'. Sampling per model: "
            + "; ".join(f"{r['label']}: {r['sampling']}" for r in rows) + ".")
    markdown = (f"## {args.title}\n\n" if args.title else "") + head + "\n\n" + table
    if paired:
        markdown += ("\nPer-case differences against the first column, mean ± the half-width of its 95% interval "
                     "(* where the interval excludes 0):\n\n" + paired)
    if args.out is None:
        print(markdown)
        return 0
    from phantom_core.world.evaluate import write_comparison

    command = "python -m tools.compare_evals " + " ".join(f"{label}={path}" for label, path in args.reports)
    out = write_comparison(args.out, markdown, {"command": command, "group": args.group, "rows": rows,
                                                       "paired": paired_rows})
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
