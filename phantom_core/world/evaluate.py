"""Run the metrics over a case set: score every case, summarise, print a table, write JSON.

``evaluate(producer, cases, ceiling=None)`` calls ``producer(sample) -> uint8 [T, H, W, 3]`` for each case (a model
through ``baselines.model_producer``, or a baseline) and scores it (``metrics.score_video``); ``ceiling`` (usually
``baselines.vae_reconstruction(vae)``) is scored on the same cases: the same numbers for the VAE's reconstruction of
the ground truth, the best a latent model with this VAE can reach. Summaries (``summarize``), over all cases and
over the single- and two-subject cases apart:

    psnr, ssim          mean subject fidelity over subjects (dB; SSIM in [-1, 1])
    motion_accuracy     % of subjects whose measured motion is the prompted one
    trajectory_error    mean trajectory error over subjects, % of the frame
    background_accuracy % of cases whose border colour is the prompted background
    swap_rate           % of cases of several subjects with a swap (two-subject cases)
    placement_accuracy  % of cases of several subjects with every subject where its own path is (``metrics``)
    copy_paste_rate     % of cases that copy their references' context (a subject's, or the white surround as the
                        background: ``metrics``)
    surround_rate       % of cases whose background is the references' white surround against the prompt (a part of
                        copy-paste)
    static_rate         % of subjects prompted to move that stay still
    stability           mean appearance stability over subjects (SSIM of consecutive frames)
    presence_start/end  mean subject presence over cases in the first / last frames, % of the truth's (100: as much
                        subject as the truth; a subject that fades falls from start to end; ``metrics``)

``motion_confusion`` counts subjects by prompted and measured motion (which words a model misreads, and as what);
``format_confusion`` prints it after the table and the JSON report keeps it.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from phantom_core.log import logger
from phantom_core.world.baselines import VideoProducer
from phantom_core.world.grammar import MOTIONS
from phantom_core.world.metrics import ABSENT, CaseScore, score_video, subject_templates
from phantom_core.world.sample import WorldSample

SUMMARY_ROWS: tuple[tuple[str, str, str], ...] = (  # key, label, format
    ("psnr", "subject PSNR (dB)", "{:.2f}"),
    ("ssim", "subject SSIM", "{:.3f}"),
    ("motion_accuracy", "motion direction accuracy (%)", "{:.1f}"),
    ("trajectory_error", "trajectory error (% of frame)", "{:.2f}"),
    ("background_accuracy", "background accuracy (%)", "{:.1f}"),
    ("swap_rate", "two-subject swap rate (%)", "{:.1f}"),
    ("placement_accuracy", "two-subject placement (%)", "{:.1f}"),
    ("copy_paste_rate", "copy-paste rate (%)", "{:.1f}"),
    ("surround_rate", "  of it, white surround (%)", "{:.1f}"),
    ("static_rate", "static rate (%)", "{:.1f}"),
    ("stability", "appearance stability (SSIM)", "{:.3f}"),
    ("presence_start", "presence, first frames (%)", "{:.1f}"),
    ("presence_end", "presence, last frames (%)", "{:.1f}"),
)


@dataclass
class Evaluation:
    """Scores of every case (and of the ceiling), the first few outputs kept for the contact sheet."""

    name: str
    scores: list[CaseScore] = field(default_factory=list)
    ceiling: list[CaseScore] | None = None
    kept: list[tuple[WorldSample, np.ndarray, CaseScore]] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict[str, dict[str, float | None]]:
        return summarize(self.scores)

    def ceiling_summary(self) -> dict[str, dict[str, float | None]] | None:
        return summarize(self.ceiling) if self.ceiling is not None else None


def evaluate(producer: VideoProducer, cases: Iterable[WorldSample], *, name: str = "model",
             ceiling: VideoProducer | None = None, keep: int = 6,
             progress: Callable[[int, int], None] | None = None,
             on_case: Callable[[WorldSample, np.ndarray, np.ndarray | None], None] | None = None) -> Evaluation:
    """Score ``producer`` on every case (module docstring); keep the first ``keep`` outputs (half of them from
    two-subject cases when there are any). ``progress(done, total)`` after each case; ``on_case(sample, output,
    ceiling video or None)`` too (``saved.save_case`` keeps them); ``cases`` may be a ``CaseSet`` (made one at a
    time) or any iterable of samples."""
    cases = cases if hasattr(cases, "__len__") else list(cases)
    total = len(cases)  # type: ignore[arg-type]
    result = Evaluation(name, ceiling=[] if ceiling is not None else None)
    started = time.perf_counter()
    kept_single = kept_multi = 0
    for done, sample in enumerate(cases, start=1):
        templates = subject_templates(sample)
        output = producer(sample)
        result.scores.append(score_video(output, sample, templates))
        result.records.append(_case_record(sample, result.scores[-1]))
        reconstruction = ceiling(sample) if ceiling is not None else None
        if reconstruction is not None:
            result.ceiling.append(score_video(reconstruction, sample, templates))
        if on_case is not None:
            on_case(sample, output, reconstruction)
        multi = len(sample.subjects) > 1
        if (multi and kept_multi < keep // 2) or (not multi and kept_single < keep - keep // 2):
            result.kept.append((sample, output, result.scores[-1]))
            kept_multi, kept_single = kept_multi + multi, kept_single + (not multi)
        if progress is not None:
            progress(done, total)
    result.seconds = time.perf_counter() - started
    logger.info("evaluated %s on %d cases in %.1f s", name, total, result.seconds)
    return result


def _mean(values: list[float]) -> float | None:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else None


def _percent(flags: list[bool]) -> float | None:
    return 100.0 * float(np.mean(flags)) if flags else None


def _group(scores: list[CaseScore]) -> dict[str, float | None]:
    subjects = [s for c in scores for s in c.subjects]
    moving = [s for s in subjects if s.prompted != "still"]
    return {
        "cases": float(len(scores)),
        "psnr": _mean([s.psnr for s in subjects]),
        "ssim": _mean([s.ssim for s in subjects]),
        "motion_accuracy": _percent([s.measured == s.prompted for s in subjects]),
        "trajectory_error": _mean([s.trajectory_error for s in subjects]),
        "background_accuracy": _percent([c.background_correct for c in scores]),
        "swap_rate": _percent([c.swapped for c in scores if len(c.subjects) > 1]),
        "placement_accuracy": _percent([bool(c.placed) for c in scores if len(c.subjects) > 1]),
        "copy_paste_rate": _percent([c.copy_paste for c in scores]),
        "surround_rate": _percent([c.surround_copied for c in scores]),
        "static_rate": _percent([s.static for s in moving]),
        "stability": _mean([s.stability for s in subjects]),
        "presence_start": _mean([c.presence_start for c in scores]),
        "presence_end": _mean([c.presence_end for c in scores]),
    }


def summarize(scores: list[CaseScore]) -> dict[str, dict[str, float | None]]:
    """``{"all" | "single" | "multi": {metric: value or None when there is nothing to measure}}``."""
    return {"all": _group(scores), "single": _group([c for c in scores if len(c.subjects) == 1]),
            "multi": _group([c for c in scores if len(c.subjects) > 1])}


def format_table(result: Evaluation) -> str:
    """A plain-text table: one row per metric; columns all cases, single, two-subject, VAE ceiling (all cases)."""
    summary, ceiling = result.summary(), result.ceiling_summary()
    head = (f"{result.name}: {int(summary['all']['cases'])} cases "
            f"({int(summary['single']['cases'])} single-subject, {int(summary['multi']['cases'])} two-subject), "
            f"{result.seconds:.0f} s")
    columns = ["all", "1 subject", "2 subjects", "VAE ceiling"]
    lines = [head, f"{'metric':32s}" + "".join(f"{c:>13s}" for c in columns)]
    for key, label, fmt in SUMMARY_ROWS:
        values = [summary["all"][key], summary["single"][key], summary["multi"][key],
                  ceiling["all"][key] if ceiling else None]
        lines.append(f"{label:32s}" + "".join(f"{(fmt.format(v) if v is not None else '-'):>13s}" for v in values))
    return "\n".join(lines)


def motion_confusion(scores: list[CaseScore]) -> dict[str, dict[str, dict[str, int]]]:
    """``{"single" | "multi": {prompted motion: {measured motion: subjects}}}`` over the one- and several-subject
    cases apart; prompted motions are ``grammar.MOTIONS``, measured ones those plus ``metrics.ABSENT``; zero counts
    are left out (a group with no cases is ``{}``)."""
    groups: dict[str, dict[str, dict[str, int]]] = {"single": {}, "multi": {}}
    for case in scores:
        table = groups["multi" if len(case.subjects) > 1 else "single"]
        for subject in case.subjects:
            row = table.setdefault(subject.prompted, {})
            row[subject.measured] = row.get(subject.measured, 0) + 1
    return groups


def format_confusion(result: Evaluation) -> str:
    """Plain-text motion confusion tables (``motion_confusion``): a row per prompted motion, a column per measured
    one, then the row's subjects and ``match``, the % measured as prompted. Empty when there are no cases."""
    columns, confusion = [*MOTIONS, ABSENT], motion_confusion(result.scores)
    lines = []
    for group, title in (("single", "1 subject"), ("multi", "2+ subjects")):
        table = confusion[group]
        if not table:
            continue
        lines += [f"motion, {title}: prompted (rows) x measured (columns)",
                  f"{'':8s}" + "".join(f"{c:>8s}" for c in columns) + f"{'total':>8s}{'match':>8s}"]
        for prompted in (m for m in MOTIONS if m in table):  # a prompt's motion is one of MOTIONS (grammar)
            row, total = table[prompted], sum(table[prompted].values())
            cells = "".join(f"{row.get(c, 0):>8d}" for c in columns)
            lines.append(f"{prompted:8s}{cells}{total:>8d}{100.0 * row.get(prompted, 0) / total:>7.0f}%")
    return "\n".join(lines)


def _case_record(sample: WorldSample, score: CaseScore) -> dict[str, Any]:
    return {"index": sample.index, "prompt": sample.prompt, "background": score.background,
            "measured_background": score.measured_background, "swapped": score.swapped, "placed": score.placed,
            "copy_paste": score.copy_paste, "surround_copied": score.surround_copied,
            "presence": [_finite(score.presence_start), _finite(score.presence_end)],
            "subjects": [
                {"name": name, "prompted": s.prompted, "measured": s.measured, "psnr": _finite(s.psnr),
                 "ssim": _finite(s.ssim), "trajectory_error": _finite(s.trajectory_error),
                 "stability": _finite(s.stability), "copy_paste": s.copy_paste, "swapped": s.swapped}
                for name, s in zip(sample.truth.names, score.subjects)]}


def _finite(value: float) -> float | None:
    return None if value is None or math.isnan(value) else round(float(value), 4)


def report_dict(result: Evaluation, info: dict[str, Any]) -> dict[str, Any]:
    """The JSON report: ``info`` (settings, pool, command), summaries, ceiling, ``motion_confusion`` and per-case
    records."""
    return {**info, "name": result.name, "seconds": round(result.seconds, 2), "summary": result.summary(),
            "ceiling": result.ceiling_summary(), "motion_confusion": motion_confusion(result.scores),
            "cases": result.records}


COMPARISON_COLUMNS = (("psnr", "subject PSNR (dB)", "{:.2f}"), ("motion_accuracy", "motion (%)", "{:.1f}"),
                      ("trajectory_error", "trajectory err (%)", "{:.1f}"),
                      ("background_accuracy", "background (%)", "{:.1f}"), ("swap_rate", "swaps (%)", "{:.1f}"),
                      ("copy_paste_rate", "copy-paste (%)", "{:.1f}"), ("stability", "stability", "{:.3f}"),
                      ("presence_end", "presence, last frames (%)", "{:.1f}"))


def comparison_markdown(keys: list[str], rows: list[tuple[list[str], dict[str, float | None]]], command: str) -> str:
    """A markdown table comparing runs: leading columns ``keys`` (e.g. ``w_img``, ``w_text``), then the ``all``
    summary's ``COMPARISON_COLUMNS``; each row is ``(key cells, summary["all"])``; ``command`` is printed above."""
    head = "| " + " | ".join([*keys, *(label for _, label, _ in COMPARISON_COLUMNS)]) + " |"
    lines = [f"`{command}`", "", head, "|" + "---|" * (len(keys) + len(COMPARISON_COLUMNS))]
    for cells, summary in rows:
        values = [fmt.format(summary[k]) if summary[k] is not None else "-" for k, _, fmt in COMPARISON_COLUMNS]
        lines.append("| " + " | ".join([*cells, *values]) + " |")
    return "\n".join(lines) + "\n"


def write_comparison(out: str | Path, markdown: str, payload: dict[str, Any]) -> Path:
    """Write ``markdown`` to ``out`` and ``payload`` as JSON beside it (``.json``), each atomically."""
    from phantom_core.loading.disk import atomic_write

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out) as tmp:
        tmp.write_text(markdown, encoding="utf-8")
    with atomic_write(out.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(payload, indent=1), encoding="utf-8")
    return out
