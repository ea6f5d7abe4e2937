"""Saved evaluation outputs: score a model's videos again without making them again.

``evaluate --save-outputs`` keeps every case's output video (and the VAE ceiling's reconstruction, when there is
one) in ``<out>/outputs/case_<index>.npz``; ``evaluate --rescore DIR`` scores those files again with the metrics of
the code that runs it, on the same cases (rebuilt from ``DIR/metrics.json``: world, case set, pool), and writes a
new ``metrics.json`` and contact sheet. A change to the metrics then costs seconds per case set instead of the
minutes (or hours) that sampling took.

``--save-outputs --resume`` continues an interrupted run in the same ``--out``: ``outputs/run.json`` records what
makes a case's video (``run_identity``: the model options, sampling, world, prompt form, device and the sha256 of
every model file), and a resumed run reuses the saved cases only when that record is the same; the case counts are
not part of it, so a run of the first 48 cases can also be extended to more.

File format: ``numpy.savez_compressed`` with ``output`` (uint8 [T, H, W, 3], the model's video as ``evaluate``
scored it) and optionally ``ceiling`` (the same shape); each file is written atomically as its case finishes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from phantom_core.inference.sidecar import file_sha256
from phantom_core.loading.disk import atomic_write
from phantom_core.log import logger
from phantom_core.world.render import VideoFormat
from phantom_core.world.sample import WorldConfig, WorldSample

OUTPUTS_FOLDER = "outputs"
RUN_FILE = "run.json"
NOT_IDENTITY = frozenset({"out", "no_progress", "sheet_cases", "save_outputs", "resume", "quick", "cases_single",
                          "cases_multi", "rescore", "device", "verbose", "func",
                          "command"})  # options that leave a case's video as it is
MODEL_FILE_OPTIONS = ("dit", "vae", "text_encoder", "tokenizer", "clip_vision")
Producer = Callable[[WorldSample], np.ndarray]  # a sample -> its uint8 [T, H, W, 3] video (baselines.VideoProducer)


def case_file(folder: str | Path, index: int) -> Path:
    """``<folder>/outputs/case_<index, at least 5 digits>.npz``: where ``save_case`` writes that sample index."""
    return Path(folder) / OUTPUTS_FOLDER / f"case_{index:05d}.npz"


def save_case(folder: str | Path, sample: WorldSample, output: np.ndarray, ceiling: np.ndarray | None) -> Path:
    """Write one case's output (and ceiling video, or None) to ``case_file(folder, sample.index)`` atomically.
    Both are uint8 [T, H, W, 3]; raises ``ValueError`` for another dtype or rank."""
    arrays = {"output": output} if ceiling is None else {"output": output, "ceiling": ceiling}
    for key, video in arrays.items():
        if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3:
            raise ValueError(f"save_case: {key} must be uint8 [T, H, W, 3]; got {video.dtype} {tuple(video.shape)}")
    path = case_file(folder, sample.index)
    with atomic_write(path, suffix=".npz") as tmp, open(tmp, "wb") as handle:
        np.savez_compressed(handle, **arrays)
    return path


def case_saver(folder: str | Path) -> Callable[..., Path | None]:
    """``evaluate``'s ``on_case`` hook for ``--save-outputs``: ``save_case`` for a case not saved yet; a case
    already in ``folder`` (reused by ``--resume``) is left as it is (returns None)."""
    def save(sample: WorldSample, output: np.ndarray, ceiling: np.ndarray | None = None) -> Path | None:
        return None if case_file(folder, sample.index).is_file() else save_case(folder, sample, output, ceiling)

    return save


def load_case(folder: str | Path, sample: WorldSample, key: str = "output") -> np.ndarray:
    """The saved ``key`` video (``output`` or ``ceiling``) of ``sample``'s case, uint8 [T, H, W, 3]. Raises
    ``ValueError`` naming the file when it is missing or lacks ``key``, or when its shape is not the case's."""
    path = case_file(folder, sample.index)
    if not path.is_file():
        raise ValueError(f"evaluate --rescore: {path} is missing; only an evaluation run with --save-outputs can be "
                         "scored again, on the cases it ran")
    video, keys = _read_saved(path, key)
    if video is None:
        raise ValueError(f"evaluate --rescore: {path} holds {keys}, no {key!r}")
    expected = tuple(sample.video.shape)
    if video.shape != expected:
        raise ValueError(f"evaluate --rescore: {path}: {key} is {tuple(video.shape)}; the case is {expected}")
    return video


def _read_saved(path: Path, key: str) -> tuple[np.ndarray | None, list[str]]:
    """``(video or None, the keys the file holds)``: ``key``'s array of an existing case file (None when absent)."""
    with np.load(path) as data:
        return (data[key] if key in data.files else None), sorted(data.files)


def read_report(folder: str | Path) -> dict[str, Any]:
    """``<folder>/metrics.json`` of a saved evaluation. Raises ``ValueError`` when it is missing, is not an
    evaluation report, or the run kept no outputs (no ``--save-outputs``)."""
    path = Path(folder) / "metrics.json"
    if not path.is_file():
        raise ValueError(f"evaluate --rescore: no {path}; give the --out folder of an evaluation run with "
                         "--save-outputs")
    report = json.loads(path.read_text(encoding="utf-8"))
    if not {"world", "case_set", "pool"} <= report.keys():
        raise ValueError(f"evaluate --rescore: {path} is not an evaluate report (no world / case_set / pool)")
    if not (Path(folder) / OUTPUTS_FOLDER).is_dir():
        raise ValueError(f"evaluate --rescore: {folder} has no {OUTPUTS_FOLDER}/ folder; that run did not use "
                         "--save-outputs, so its videos must be made again")
    return report


def report_world(report: dict[str, Any]) -> WorldConfig:
    """The ``WorldConfig`` of a report's ``world`` entry (size, frames, fps, travel)."""
    world = report["world"]
    video = VideoFormat(width=world["width"], height=world["height"], frames=world["frames"], fps=world["fps"])
    return WorldConfig(video=video, travel=world["travel"])


def run_identity(options: dict[str, Any], device: str) -> dict[str, Any]:
    """What decides a case's output video: ``options`` (``evaluate``'s, by name) except ``NOT_IDENTITY``, the
    resolved ``device``, and ``files``: the sha256 of each model file option given (of every shipped trained file
    for ``--model``). JSON-ready."""
    identity: dict[str, Any] = {k: options[k] for k in sorted(options) if k not in NOT_IDENTITY}
    identity["device"] = device
    files = {flag: file_sha256(options[flag]) for flag in MODEL_FILE_OPTIONS if options.get(flag)}
    if options.get("model"):
        from phantom_core.tiny.default import TRAINED_DIR

        files.update({path.name: file_sha256(path) for path in sorted(TRAINED_DIR.glob("*.safetensors"))})
    identity["files"] = files
    return json.loads(json.dumps(identity))


def open_outputs(folder: str | Path, identity: dict[str, Any], resume: bool) -> int:
    """Make ``<folder>/outputs`` ready for ``save_case``; returns how many cases are saved there already.

    A new folder gets ``run.json`` (``identity``). An existing one is continued only with ``resume`` and the same
    identity. Raises ``ValueError`` for saved outputs without ``resume`` (they are never overwritten silently), of
    a run whose identity differs (naming the options that differ), or without a ``run.json`` to compare.
    """
    run_file = Path(folder) / OUTPUTS_FOLDER / RUN_FILE
    if not run_file.is_file() and any(run_file.parent.glob("case_*.npz")):
        raise ValueError(f"evaluate --save-outputs: {run_file.parent} holds saved cases but no {RUN_FILE}, so "
                         "nothing says which run made them: give another --out")
    if run_file.is_file():
        if not resume:
            raise ValueError(f"evaluate --save-outputs: {run_file.parent} holds the videos of an earlier run; add "
                             "--resume to continue it (its saved cases are reused), or give another --out")
        saved = json.loads(run_file.read_text(encoding="utf-8"))
        differ = sorted(k for k in saved.keys() | identity.keys() if saved.get(k) != identity.get(k))
        if differ:
            raise ValueError(f"evaluate --resume: {run_file.parent} was made with other {', '.join(differ)} (see "
                             f"{run_file}); its videos cannot be mixed with this run's: give another --out")
        done = len(list(run_file.parent.glob("case_*.npz")))
        logger.info("evaluate --resume: %d cases saved in %s are reused", done, run_file.parent)
        return done
    with atomic_write(run_file) as tmp:
        tmp.write_text(json.dumps(identity, indent=1) + "\n", encoding="utf-8")
    return 0


def resumed_producer(folder: str | Path, producer: Producer | None, key: str = "output") -> Producer | None:
    """A producer that returns ``sample``'s saved ``key`` video when its case file holds one, else calls
    ``producer(sample)`` (``None`` stays ``None``: no ceiling)."""
    if producer is None:
        return None

    def produce(sample: WorldSample) -> np.ndarray:
        path = case_file(folder, sample.index)
        video = _read_saved(path, key)[0] if path.is_file() else None
        return producer(sample) if video is None else video

    return produce
