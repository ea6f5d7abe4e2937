"""The ``evaluate`` subcommand: the world's metrics for a model or a baseline, on the held-out case set.

    python -m phantom_core evaluate --baseline paste            # "paste the reference, static, in the centre"
    python -m phantom_core evaluate --baseline untrained        # the random-weight tiny default
    python -m phantom_core evaluate --model default             # the trained embedded default (MODEL_CARD.md)
    python -m phantom_core evaluate --model default-mmdit       # the MMDiT default (make train-default-mmdit)
    python -m phantom_core evaluate --dit D --vae V --text-encoder T [--steps 50 --w-img 5 --w-text 7.5 ...]
    python -m phantom_core evaluate --dit MMDIT --vae V --text-encoder T --clip-vision C [--clip-output tokens]
    python -m phantom_core evaluate --baseline truth --quick 4  # sanity: the ground truth scores perfectly
    python -m phantom_core evaluate --baseline empty            # the prompted background alone, no subject
    python -m phantom_core evaluate ... --save-outputs --out D  # keep every output video (world/saved.py)
    python -m phantom_core evaluate --rescore D                 # score D's saved videos again (current metrics)

Prints the table, writes ``<out>/metrics.json`` and ``<out>/contact_sheet.png`` (default ``output/evaluate/<name>``).
``--baseline truth`` and ``noise`` check the metrics themselves (perfect and bad scores); ``empty`` (the
background alone) is the floor a model's subject fidelity must clear to show it draws subjects at all. The VAE
ceiling column is the model's VAE (or ``--vae`` with a baseline) reconstructing the ground truth.

``--dit`` takes a Phantom-Wan DiT or the paper's MMDiT (told apart by its keys). An MMDiT with a CLIP branch needs
``--clip-vision``, the CLIP vision file it was trained with, and ``--clip-output`` when it was trained on the pooled
embedding; the "VAE only" MMDiT (no CLIP branch, ``MMDIT_PRESETS["world-vae"]``) and the Phantom-Wan DiT need none
(and ignore one, with a warning). The "CLIP only" MMDiT (trained without VAE reference tokens; its keys are those of
``both``) needs ``--clip-only`` too: it then gets the references' CLIP features and no VAE latents.

``--rescore D`` makes no video: it rebuilds the cases of ``D/metrics.json`` (world, case set; the subject pool must
be the same) and scores the videos that run saved (``--save-outputs``), and the ceiling's if it saved one, with the
metrics as they are now; ``--quick N`` scores a subset; the report goes to ``D`` unless ``--out`` says otherwise and
keeps the original run's options, sampling and device, with ``rescored`` added.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from phantom_core.mmdit.clip import CLIP_OUTPUTS
from phantom_core.world.baselines import (
    VideoProducer,
    empty_video,
    model_producer,
    noise_video,
    paste_video,
    truth_video,
    vae_reconstruction,
)
from phantom_core.world.cases import CASES_MULTI, CASES_SINGLE, EVAL_SEED, CaseSet
from phantom_core.world.evaluate import evaluate, format_confusion, format_table, report_dict
from phantom_core.world.grammar import PROMPT_FORMS
from phantom_core.world.render import MAX_TRAVEL, TRAVEL_FRACTION, VideoFormat
from phantom_core.world.sample import WorldConfig
from phantom_core.world.saved import (
    case_saver,
    load_case,
    open_outputs,
    read_report,
    report_world,
    resumed_producer,
    run_identity,
)
from phantom_core.world.sheet import contact_sheet, save_png
from phantom_core.world.subjects import available_sources, pool_signature, split_subjects

FILE_FREE_BASELINES: dict[str, VideoProducer] = {"paste": paste_video, "empty": empty_video, "truth": truth_video,
                                                  "noise": noise_video}  # baselines that need no model file
BASELINES = ("paste", "empty", "untrained", "truth", "noise")
SAMPLING_OPTIONS = (("steps", "--steps", int), ("shift", "--shift", float), ("solver", "--solver", str),
                    ("w_img", "--w-img", float), ("w_text", "--w-text", float),
                    ("negative_prompt", "--negative-prompt", str))


def add_evaluate_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``evaluate`` (``func=run_evaluate``) on ``subparsers``; returns the sub-parser."""
    p = subparsers.add_parser("evaluate", help="measure a model or a baseline in the miniature world",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_argument_group("what to evaluate (one of)")
    what.add_argument("--baseline", choices=BASELINES, help="paste | empty (the background alone: the floor of subject "
                      "fidelity) | untrained | truth | noise")
    what.add_argument("--model", choices=["default", "default-mmdit"],
                      help="a trained embedded default (phantom_core/tiny/trained): Phantom-Wan or the paper's MMDiT")
    what.add_argument("--dit", metavar="PATH", help="Phantom-Wan DiT or MMDiT file (with --vae and --text-encoder)")
    what.add_argument("--vae", metavar="PATH", help="Wan2.1 VAE file (with a baseline: only the ceiling)")
    what.add_argument("--text-encoder", metavar="PATH", help="umT5 text encoder file")
    what.add_argument("--tokenizer", metavar="PATH", help="spiece.model when the text encoder has none embedded")
    what.add_argument("--clip-vision", metavar="PATH", help="CLIP vision file of an MMDiT with a CLIP branch (--dit)")
    what.add_argument("--clip-output", choices=CLIP_OUTPUTS, default=CLIP_OUTPUTS[0],
                      help="the CLIP features the MMDiT reads: tokens (default; --model default-mmdit's) or pooled")
    what.add_argument("--clip-only", action="store_true",
                      help="the paper's CLIP-only ablation MMDiT (--dit): the references reach it through CLIP alone, "
                           "no VAE reference latents, as it was trained (python -m tools.train_default --model mmdit "
                           "--variant clip)")
    what.add_argument("--rescore", metavar="DIR", help="no model: score the videos saved in DIR by a run with "
                      "--save-outputs again, with the current metrics, on its cases")
    cases = p.add_argument_group("cases")
    cases.add_argument("--quick", type=int, metavar="N", help="only the first N single- and N/2 two-subject cases")
    cases.add_argument("--cases-single", type=int, default=CASES_SINGLE, metavar="N", help="default %(default)s")
    cases.add_argument("--cases-multi", type=int, default=CASES_MULTI, metavar="N", help="default %(default)s")
    cases.add_argument("--case-seed", type=int, default=EVAL_SEED, metavar="SEED", help="default %(default)s")
    cases.add_argument("--size", type=int, default=128, metavar="PX", help="frame width = height (default 128)")
    cases.add_argument("--frames", type=int, default=17, help="frames, 4k+1 (default 17)")
    cases.add_argument("--travel", type=float, default=TRAVEL_FRACTION, metavar="F",
                       help=f"a moving subject's path, a fraction of the frame in (0, {MAX_TRAVEL}] (default "
                            "%(default)s: the world the defaults were trained in)")
    sampling = p.add_argument_group("sampling (a model; default: the official Phantom-Wan values; "
                                    "--model default / default-mmdit: its own guidance, TRAINED_SAMPLING)")
    for _, flag, kind in SAMPLING_OPTIONS:
        sampling.add_argument(flag, type=kind, default=None)
    p.add_argument("--prompt-form", choices=PROMPT_FORMS, default="named",
                   help="named (default): each clause names and describes its subject; generic: every subject is "
                        "'thing' (the un-rephrased prompt of Phantom's rephraser comparison; binding by order only)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--out", metavar="DIR", help="where metrics.json and contact_sheet.png go "
                                               "(default output/evaluate/<name>)")
    p.add_argument("--sheet-cases", type=int, default=6, metavar="N", help="cases on the contact sheet (default 6)")
    p.add_argument("--save-outputs", action="store_true", help="keep every case's output video (and the ceiling's) "
                   "in <out>/outputs/, compressed (about 0.5 MB a case at 128 px, ceiling included), for --rescore")
    p.add_argument("--resume", action="store_true", help="with --save-outputs: continue the run saved in --out, "
                   "reusing its saved cases (only when the model files, sampling and world are the same)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=run_evaluate)
    return p


def _load(args: argparse.Namespace, device: str, folder: str) -> tuple[Any, Any, Any, str | None, str]:
    """(DiT, VAE, text encoder, CLIP vision file or None, CLIP output): the files given, or an embedded default's
    installed in ``folder``. Raises ``ValueError`` naming the files of a default that is not shipped."""
    from phantom_core.inference.pipeline import load_models
    from phantom_core.tiny.default import (
        TRAINED_MMDIT_CLIP_OUTPUT,
        install_trained_default,
        install_trained_mmdit_default,
        write_tiny_default,
    )

    installers = {"default": install_trained_default, "default-mmdit": install_trained_mmdit_default}
    if args.model or args.baseline == "untrained":
        try:
            files = installers[args.model](folder) if args.model else write_tiny_default(folder)
        except FileNotFoundError as err:
            raise ValueError(f"evaluate --model {args.model}: {err}") from err
        clip = files.get("clip_vision"), TRAINED_MMDIT_CLIP_OUTPUT if "clip_vision" in files else args.clip_output
        return (*load_models(files["dit"], files["vae"], files["text_encoder"], device=device), *clip)
    models = load_models(args.dit, args.vae, args.text_encoder, tokenizer_path=args.tokenizer, device=device)
    return (*models, args.clip_vision, args.clip_output)


def _producer(args: argparse.Namespace, device: str, folder: str) -> tuple[str, VideoProducer, Any]:
    """(report name, producer, VAE for the ceiling or None) for the options given."""
    chosen = [bool(args.baseline), bool(args.model), bool(args.dit or args.text_encoder)]
    if sum(chosen) != 1:
        raise ValueError("evaluate: give exactly one of --baseline, --model default|default-mmdit, "
                         "--dit/--vae/--text-encoder, or --rescore DIR")
    if (args.clip_vision or args.clip_only) and not args.dit:
        raise ValueError("evaluate: --clip-vision and --clip-only go with --dit (an MMDiT with a CLIP branch)")
    if args.baseline in FILE_FREE_BASELINES:
        vae = None
        if args.vae:
            from phantom_core.wan.vae import load_vae
            vae = load_vae(args.vae, dtype=torch.float32, device=device)
        return args.baseline, FILE_FREE_BASELINES[args.baseline], vae
    if args.dit and not (args.vae and args.text_encoder):
        raise ValueError("evaluate: --dit needs --vae and --text-encoder")
    dit, vae, text_encoder, clip_path, clip_output = _load(args, device, folder)
    settings = {key: getattr(args, key) for key, _, _ in SAMPLING_OPTIONS if getattr(args, key) is not None}
    if args.model:
        from phantom_core.tiny.default import TRAINED_SAMPLING

        settings = {**TRAINED_SAMPLING, **settings}  # the default's guidance unless given
    name = args.baseline or (args.model if args.model else Path(args.dit).stem)
    clip = _clip_tower(args, clip_path, dit, device)
    if args.clip_only:
        from phantom_core.mmdit.inputs import clip_references_only

        try:
            clip_references_only(dit)
        except ValueError as err:
            raise ValueError(f"evaluate --clip-only: --dit {args.dit}: {err}") from err
    producer = model_producer(dit, vae, text_encoder, clip_vision=clip, clip_output=clip_output,
                              prompt_form=args.prompt_form, **settings)
    return name, producer, vae


def _clip_tower(args: argparse.Namespace, clip_path: str | None, dit: Any, device: str) -> Any:
    """The CLIP vision tower of ``clip_path``, or None without it. Raises ``ValueError`` when ``dit`` reads CLIP
    features (an MMDiT with a CLIP branch: ``config.clip_dim > 0``) and none was given."""
    from phantom_core.inference.pipeline import load_clip_tower

    clip_dim = getattr(dit.config, "clip_dim", 0)
    if clip_dim and not clip_path:
        raise ValueError(f"evaluate: --dit {args.dit} is an MMDiT that reads {clip_dim}-wide CLIP features of the "
                         "references; give --clip-vision PATH, the CLIP vision file it was trained with (and "
                         "--clip-output pooled if it was trained on the pooled embedding)")
    return load_clip_tower(clip_path, device=device) if clip_path else None


def _rescore_cases(args: argparse.Namespace) -> tuple[CaseSet, dict[str, Any], VideoProducer, VideoProducer | None]:
    """(cases, original report, saved-output producer, saved-ceiling producer or None) of ``--rescore DIR``.
    Raises ``ValueError`` when a model or baseline option is given too, or the subject pool is not the report's."""
    given = [flag for flag, value in (("--baseline", args.baseline), ("--model", args.model), ("--dit", args.dit),
                                      ("--vae", args.vae), ("--text-encoder", args.text_encoder),
                                      ("--clip-vision", args.clip_vision), ("--clip-only", args.clip_only),
                                      ("--save-outputs", args.save_outputs), ("--resume", args.resume)) if value]
    if given:
        raise ValueError(f"evaluate --rescore: makes no video, so it takes no {', '.join(given)}")
    folder = args.rescore
    report = read_report(folder)
    config = report_world(report)
    held_out = split_subjects("test", config.sources)
    if pool_signature(held_out) != report["pool"]["signature"]:
        raise ValueError(f"evaluate --rescore: {folder} was evaluated on another held-out subject pool (signature "
                         f"{report['pool']['signature']}, now {pool_signature(held_out)}): its cases cannot be rebuilt")
    counts = report["case_set"]
    cases = CaseSet(single=counts["single"], multi=counts["multi"], seed=counts["seed"], config=config)
    ceiling = (lambda sample: load_case(folder, sample, "ceiling")) if report.get("ceiling") else None
    return cases, report, (lambda sample: load_case(folder, sample)), ceiling


def run_evaluate(args: argparse.Namespace) -> int:
    """Run the evaluation (or ``--rescore``); print the table and the paths written. Returns 0."""
    # imported here: they load the pipeline and ffmpeg, needed only when the command runs
    from phantom_core.inference.cli import TextProgressBar
    from phantom_core.inference.sidecar import write_sidecar

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.resume and not (args.save_outputs or args.rescore):
        raise ValueError("evaluate --resume continues a run with --save-outputs; add --save-outputs")
    options = {k: v for k, v in vars(args).items() if k not in ("func", "command")}
    if args.rescore:
        cases, report, producer, ceiling = _rescore_cases(args)
        name, config = report["name"], cases.config
    else:
        config = WorldConfig(video=VideoFormat(width=args.size, height=args.size, frames=args.frames),
                             travel=args.travel)
        cases = CaseSet(single=args.cases_single, multi=args.cases_multi, seed=args.case_seed, config=config)
        with tempfile.TemporaryDirectory(prefix="phantom-evaluate-") as folder:
            name, producer, vae = _producer(args, device, folder)
        ceiling = vae_reconstruction(vae) if vae is not None else None
    cases = cases.quick(args.quick) if args.quick is not None else cases
    out = Path(args.out or args.rescore or Path("output") / "evaluate" / name)
    if args.save_outputs:
        open_outputs(out, run_identity(options, device), args.resume)
        producer, ceiling = resumed_producer(out, producer), resumed_producer(out, ceiling, "ceiling")
    bar = None if args.no_progress else TextProgressBar(sys.stderr, label="cases", unit="case")
    result = evaluate(producer, cases, name=name, ceiling=ceiling, keep=args.sheet_cases,
                      progress=(lambda done, total: bar(done - 1, total)) if bar else None,
                      on_case=case_saver(out) if args.save_outputs else None)
    if args.rescore:
        info = {key: report[key] for key in ("options", "device", "world", "pool", "sampling") if key in report}
        sampled = (report.get("rescored") or {}).get("sampling_seconds", report.get("seconds"))  # rescored again
        info["rescored"] = {"from": str(args.rescore), "sampling_seconds": sampled}
    else:
        held_out = split_subjects("test", config.sources)
        info = {"options": options, "device": device,
                "world": {"width": config.video.width, "height": config.video.height, "frames": config.video.frames,
                          "fps": config.video.fps, "travel": config.travel},
                "pool": {"sources": list(available_sources()), "held_out_subjects": len(held_out),
                         "signature": pool_signature(held_out)},
                "sampling": {key: getattr(args, key) for key, _, _ in SAMPLING_OPTIONS}}
    info["case_set"] = {"single": cases.single, "multi": cases.multi, "seed": cases.seed}
    json_path = write_sidecar(report_dict(result, info), out / "metrics.json")
    sheet_path = save_png(contact_sheet(result.kept), out / "contact_sheet.png") if result.kept else None
    print(format_table(result))
    if confusion := format_confusion(result):
        print(confusion)
    print(f"wrote {json_path}" + (f" and {sheet_path}" if sheet_path else ""))
    return 0
