"""Fewer DiT evaluations at measured quality: the step cache and the image-guidance window on the trained default.

For each held-out world case (``world.cases``, cross-pair references) the trained embedded default samples the
video once uncached (50 UniPC steps, shift 5, the default's own guidance TRAINED_SAMPLING, 3 passes a step) and once
per setting; each setting is scored against that uncached video (PSNR over the whole clip, dB; SSIM per frame) and
with the world's metrics (motion accuracy, background accuracy, subject PSNR against the ground truth) and the share
of subject tracks whose measured motion differs from the uncached video's (``changed_percent``). DiT pass
evaluations are counted exactly (the cache's counters; the window's passes per step), so the speed-up is
``uncached evaluations / evaluations`` whatever else the machine is doing (the default's guidance, w_img = w_text = 3,
needs two passes a step, not three: ``sampling.guidance.guidance_weights``). Everything is measured side by side in one run.

    .venv/bin/python -m benchmarks.bench_cache_quality [--model default|default-mmdit] [--travel 0.5] [--quick 6]
        [--out docs/speed_quality.png]

``--model default-mmdit`` measures the paper's MMDiT default instead (its references' CLIP features from the shipped
world CLIP, ``TRAINED_MMDIT_CLIP_OUTPUT``); ``--travel`` runs the cases of a world whose subjects travel that
fraction of the frame (the MMDiT default trained last at 0.5).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from phantom_core.inference.cli_models import embedded_files
from phantom_core.inference.pipeline import load_clip_tower, load_models
from phantom_core.inference.settings import WAN_NEGATIVE_PROMPT
from phantom_core.mmdit.clip import encode_clip_references
from phantom_core.references import encode_references
from phantom_core.sampling.cache import StepCache
from phantom_core.sampling.guidance import guidance_weights
from phantom_core.sampling.loop import sample_from_seed
from phantom_core.tiny.default import TRAINED_MMDIT_CLIP_OUTPUT, TRAINED_SAMPLING
from phantom_core.video_io import to_uint8_frames
from phantom_core.wan.latents import latent_shape
from phantom_core.world.cases import CaseSet
from phantom_core.world.evaluate import evaluate
from phantom_core.world.metrics import CaseScore
from phantom_core.world.render import MAX_TRAVEL, TRAVEL_FRACTION, VideoFormat, check_travel
from phantom_core.world.sample import WorldConfig

OFFICIAL = dict(steps=50, shift=5.0, solver="unipc", **TRAINED_SAMPLING)  # the default's own guidance
SETTINGS: dict[str, dict] = {  # name -> (cache threshold, image-guidance window)
    "uncached": {"cache": 0.0, "window": (0.0, 1.0)},
    "cache 0.05": {"cache": 0.05, "window": (0.0, 1.0)},
    "cache 0.1": {"cache": 0.1, "window": (0.0, 1.0)},
    "cache 0.2": {"cache": 0.2, "window": (0.0, 1.0)},
    "cache 0.3": {"cache": 0.3, "window": (0.0, 1.0)},
    "window 0-0.5": {"cache": 0.0, "window": (0.0, 0.5)},
    "window 0-0.5 + cache 0.1": {"cache": 0.1, "window": (0.0, 0.5)},
    "window 0-0.5 + cache 0.2": {"cache": 0.2, "window": (0.0, 0.5)},
}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 100.0 if mse == 0 else 10 * math.log10(255.0**2 / mse)


def window_passes(steps: int, window: tuple[float, float], w_img: float, w_text: float) -> int:
    """DiT pass evaluations of an uncached run: the passes Eq. 5 needs at each step (``guidance_weights``; with
    ``w_img == w_text`` the ``img`` pass drops out), ``w_img = 1`` outside the image-guidance window."""
    return sum(len(guidance_weights(w_img if window[0] <= i / steps < window[1] else 1.0, w_text))
               for i in range(steps))


def run(cases: CaseSet, device: str, model: str = "default") -> dict[str, dict]:
    """Every setting of ``SETTINGS`` on every case, for the embedded default ``model`` (``default`` or
    ``default-mmdit``); returns the table's rows by setting name."""
    files = embedded_files(model)  # the shipped files; ValueError naming any that are missing
    dit, vae, text_encoder = load_models(files["dit"], files["vae"], files["text_encoder"], device=device)
    clip_vision = load_clip_tower(files["clip_vision"], device=device) if "clip_vision" in files else None
    samples = list(cases)
    fmt = samples[0].config.video
    videos: dict[str, list[np.ndarray]] = {name: [] for name in SETTINGS}
    evals: dict[str, int] = {name: 0 for name in SETTINGS}
    seconds: dict[str, float] = {name: 0.0 for name in SETTINGS}
    for k, sample in enumerate(samples):
        with torch.no_grad():
            context, context_neg = text_encoder.encode([sample.prompt, WAN_NEGATIVE_PROMPT])
            refs = encode_references(vae, list(sample.references), fmt.width, fmt.height, "letterbox").to(device)
            ref_clip = None if clip_vision is None else encode_clip_references(
                clip_vision, list(sample.references), TRAINED_MMDIT_CLIP_OUTPUT).to(device)  # (1, N, T, C)
            for name, s in SETTINGS.items():
                cache = StepCache(s["cache"]) if s["cache"] > 0 else None
                started = time.perf_counter()
                latents = sample_from_seed(dit, sample.index, latent_shape(fmt.frames, fmt.height, fmt.width), refs,
                                           context[None].to(device), context_neg[None].to(device), **OFFICIAL,
                                           image_guidance_window=s["window"], cache=cache,
                                           model_dtype=dit.compute_dtype, ref_clip=ref_clip)
                seconds[name] += time.perf_counter() - started
                evals[name] += cache.computed if cache is not None else window_passes(50, s["window"], OFFICIAL["w_img"], OFFICIAL["w_text"])
                videos[name].append(to_uint8_frames(vae.decode(latents)))
        print(f"case {k + 1}/{len(samples)} done", flush=True)
    out, tracks = {}, {}
    for name in SETTINGS:  # "uncached" first: the other settings' tracks are compared with its
        by_index = {s.index: v for s, v in zip(samples, videos[name])}
        result = evaluate(lambda sample, table=by_index: table[sample.index], samples, name=name, keep=0)
        summary = result.summary()["all"]
        tracks[name] = measured_motions(result.scores)
        out[name] = {"evaluations_per_video": evals[name] / len(samples),
                     "speedup": evals["uncached"] / evals[name],
                     "seconds_per_video": seconds[name] / len(samples),
                     "psnr_vs_uncached": float(np.mean([psnr(v, u) for v, u in zip(videos[name],
                                                                                    videos["uncached"])])),
                     "motion_accuracy": summary["motion_accuracy"],
                     "motion_changed": changed_percent(tracks[name], tracks["uncached"]),
                     "background_accuracy": summary["background_accuracy"], "subject_psnr": summary["psnr"]}
    return out


def measured_motions(scores: list[CaseScore]) -> list[str]:
    """The motion measured for every subject track (``SubjectScore.measured``), cases in order."""
    return [subject.measured for case in scores for subject in case.subjects]


def changed_percent(tracks: list[str], reference: list[str]) -> float:
    """% of subject tracks whose measured motion differs from ``reference``'s (the uncached videos'): what a setting
    changes in the motion metric, whichever way, unlike the accuracy's net difference. Raises ``ValueError`` when the
    two lists differ in length (not the same cases)."""
    if len(tracks) != len(reference) or not tracks:
        raise ValueError(f"tracks: {len(tracks)} against {len(reference)} of the uncached videos; expected the same "
                         "cases, at least one")
    return 100.0 * sum(a != b for a, b in zip(tracks, reference)) / len(tracks)


def plot(rows: dict[str, dict], path: Path) -> None:
    """PSNR against the uncached video (y) over the speed-up in DiT evaluations (x), one labelled dot per setting."""
    w, h, m = 720, 420, 60
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    finite = [r for r in rows.values() if r["psnr_vs_uncached"] < 100]
    y_lo = min([r["psnr_vs_uncached"] for r in finite] + [25.0]) - 2
    y_hi = max([r["psnr_vs_uncached"] for r in finite] + [35.0]) + 2
    x_hi = max(r["speedup"] for r in rows.values()) + 0.5

    def at(x: float, y: float) -> tuple[float, float]:
        return m + (x - 1) / (x_hi - 1) * (w - 2 * m), h - m - (min(y, y_hi) - y_lo) / (y_hi - y_lo) * (h - 2 * m)

    d.line([at(1, y_lo), at(x_hi, y_lo)], fill="black")
    d.line([at(1, y_lo), at(1, y_hi)], fill="black")
    d.line([at(1, 30), at(x_hi, 30)], fill=(200, 0, 0))
    d.text((at(x_hi, 30)[0] - 90, at(x_hi, 30)[1] - 14), "target 30 dB", fill=(200, 0, 0))
    d.line([at(2.5, y_lo), at(2.5, y_hi)], fill=(200, 0, 0))
    d.text(at(2.5, y_hi), " target 2.5x", fill=(200, 0, 0))
    for name, r in rows.items():
        x, y = at(r["speedup"], r["psnr_vs_uncached"])
        d.ellipse([x - 4, y - 4, x + 4, y + 4], fill=(30, 80, 200))
        d.text((x + 6, y - 6), name, fill="black")
    d.text((w // 2 - 120, h - m + 20), "speed-up in DiT evaluations (x)", fill="black")
    d.text((8, m - 30), "PSNR vs uncached (dB), trained world default", fill="black")
    for v in range(int(y_lo) + 1, int(y_hi) + 1, 5):
        d.text((m - 30, at(1, v)[1] - 6), f"{v}", fill="black")
    for v in range(1, int(x_hi) + 1):
        d.text((at(v, y_lo)[0] - 4, h - m + 4), f"{v}", fill="black")
    img.save(path)


COLUMNS = (("evaluations_per_video", "DiT evaluations / video", "{:.1f}"), ("speedup", "speed-up", "{:.2f}x"),
           ("psnr_vs_uncached", "PSNR vs uncached (dB)", "{:.1f}"), ("motion_accuracy", "motion %", "{:.1f}"),
           ("motion_changed", "tracks changed %", "{:.1f}"),
           ("background_accuracy", "background %", "{:.1f}"), ("subject_psnr", "subject PSNR (dB)", "{:.2f}"),
           ("seconds_per_video", "s / video (CPU)", "{:.2f}"))


def markdown(rows: dict[str, dict], cases: int, command: str) -> str:
    """The speed / quality table as Markdown, with the command that produced it."""
    head = "| setting | " + " | ".join(title for _, title, _ in COLUMNS) + " |"
    uncached = rows["uncached"]["evaluations_per_video"]
    lines = [f"Produced by `{command}` ({cases} held-out world cases, 50 UniPC steps, shift 5, the trained "
             f"default's own guidance; {uncached:.0f} DiT pass evaluations per uncached video: with w_img = w_text "
             "Eq. 5 needs two passes a step).", "", head, "|" + " --- |" * (len(COLUMNS) + 1)]
    for name, r in rows.items():
        cells = ("100 (itself)" if key == "psnr_vs_uncached" and r[key] >= 100 else fmt.format(r[key])
                 for key, _, fmt in COLUMNS)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=("default", "default-mmdit"), default="default",
                        help="the embedded default to measure (default: %(default)s, the Phantom-Wan one)")
    parser.add_argument("--travel", type=float, default=TRAVEL_FRACTION,
                        help=f"the world's travel, in (0, {MAX_TRAVEL}] (default %(default)s)")
    parser.add_argument("--quick", type=int, default=6, help="N single- and N/2 two-subject held-out cases")
    parser.add_argument("--out", type=Path, default=Path("output/bench_cache_quality.png"))
    parser.add_argument("--json", type=Path, default=Path("output/bench_cache_quality.json"))
    parser.add_argument("--md", type=Path, help="also write the table as Markdown (docs/speed_quality.md)")
    args = parser.parse_args()
    try:
        check_travel(args.travel)
    except ValueError as err:
        parser.error(f"--travel: {err}")
    torch.manual_seed(0)
    config = WorldConfig(video=VideoFormat(), travel=args.travel)
    cases = list(CaseSet(config=config).quick(args.quick))
    rows = run(cases, "cpu", args.model)
    print(f"{'setting':28s} {'evals':>6s} {'speed-up':>8s} {'PSNR vs uncached':>16s} {'motion %':>8s} "
          f"{'changed %':>9s} {'background %':>12s} {'subject PSNR':>12s} {'s/video':>8s}")
    for name, r in rows.items():
        print(f"{name:28s} {r['evaluations_per_video']:6.1f} {r['speedup']:8.2f} {r['psnr_vs_uncached']:16.2f} "
              f"{r['motion_accuracy']:8.1f} {r['motion_changed']:9.1f} {r['background_accuracy']:12.1f} "
              f"{r['subject_psnr']:12.2f} {r['seconds_per_video']:8.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot(rows, args.out)
    args.json.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    print(f"wrote {args.out} and {args.json}")
    if args.md is not None:
        command = (f"python -m benchmarks.bench_cache_quality --model {args.model} --travel {args.travel} --quick "
                   f"{args.quick} --out {args.out} --json {args.json}")
        args.md.write_text(markdown(rows, len(cases), command + f" --md {args.md}"), encoding="utf-8")
        print(f"wrote {args.md}")


if __name__ == "__main__":
    main()
