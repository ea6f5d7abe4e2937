"""`make demo`: a Phantom subject-to-video run through a real, headless ComfyUI, end to end.

1. Lays out a ComfyUI base directory in `.demo/` (git-ignored): this extension linked into `custom_nodes/`, the
   embedded defaults in `models/` (the trained world defaults of `phantom_core/tiny/trained/`, see their model
   cards, and the random tiny test checkpoints); the job's photos are two of the shipped example photos
   (example_inputs/: an astronaut and a cat, from scikit-image's public-domain / CC0 data).
2. Starts ComfyUI 0.3.75 (`.comfyui/`) headless on the CPU with that base directory.
3. Queues a shipped API workflow over ComfyUI's HTTP API with the batch client (tools/phantom_batch.py): the photos
   are uploaded with /upload/image, the job is queued with /prompt, followed through /history, and the MP4 is
   downloaded with /view. ``--model`` picks the embedded default and so the workflow (``MODELS``): ``default-mmdit``
   (the default: the paper's MMDiT, which scores better in the world, README "What the demo shows") runs
   example_workflows/api/phantom_mmdit_2ref_api.json, ``default`` (the Phantom-Wan form) runs
   example_workflows/api/phantom_4ref_api.json with its unused reference inputs removed.
4. Prints the path of the MP4 (in `output/`) and of a frame strip PNG (the references as the model sees them,
   then frames of the video), and stops the server.

The prompt is in the world's grammar, which the default was trained on: the astronaut (first reference) moves
right and the cat (second) moves up, on a blue background, 128x128 px, 17 frames, 50 UniPC steps (the official
recipe). Both photos are outside the default's training data (every photo subject is held out).

    .venv/bin/python -m tools.demo [--model default-mmdit|default] [--width 128 --height 128 --frames 17
        --steps 50 --seed 42] [--strip output/demo_frames.png]

The README's frame strips are this tool's: ``--model default --strip docs/demo_frames.png`` and ``--model
default-mmdit --strip docs/demo_frames_mmdit.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from PIL import Image

from tools.comfy_launcher import ComfyServer
from tools.make_workflows import INPUTS_DIR, PROMPTS, api_path
from tools.phantom_batch import DEFAULT_WORKFLOW, Client, run_batch, write_manifest

ROOT = Path(__file__).resolve().parents[1]

DEMO_DIR = ROOT / ".demo"
OUT_DIR = ROOT / "output"
PHOTOS = [INPUTS_DIR / "phantom_astronaut.jpg", INPUTS_DIR / "phantom_cat.jpg"]
PROMPT = PROMPTS[2]  # the world grammar (docs/WORLD.md): the astronaut moves right and the cat up, on blue
MODELS = {"default-mmdit": api_path("phantom_mmdit_2ref"), "default": DEFAULT_WORKFLOW}  # --model -> workflow

log = logging.getLogger("phantom.demo")


def build_parser() -> argparse.ArgumentParser:
    """The command line (``python -m tools.demo --help``)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=list(MODELS), default="default-mmdit",
                        help="the embedded default that makes the video (default: %(default)s, the better one)")
    parser.add_argument("--width", type=int, default=128, help="video width in px (multiple of 16)")
    parser.add_argument("--height", type=int, default=128, help="video height in px (multiple of 16)")
    parser.add_argument("--frames", type=int, default=17, help="frames, 4k+1")
    parser.add_argument("--steps", type=int, default=50, help="sampling steps (official: 50)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait for the job")
    parser.add_argument("--strip", default=str(OUT_DIR / "demo_frames.png"),
                        help="where the frame strip PNG goes (references, then frames of the video)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from phantom_core.tiny.default import trained_mmdit_shipped

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.model == "default-mmdit" and not trained_mmdit_shipped():
        parser.error("--model default-mmdit: the MMDiT default is not in phantom_core/tiny/trained/ (make "
                     "train-default-mmdit exports it); give --model default")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    job = {"id": "demo", "refs": [str(p) for p in PHOTOS], "prompt": PROMPT, "seed": args.seed,
           "width": args.width, "height": args.height, "frames": args.frames, "steps": args.steps}
    server = ComfyServer(base=DEMO_DIR / "comfyui", cleanup=False)
    log.info("starting ComfyUI headless (log: %s)", server.log_path)
    server.start()
    try:
        template = json.loads(MODELS[args.model].read_text(encoding="utf-8"))
        records = run_batch([job], [Client(server.url)], template, OUT_DIR, args.timeout, 1.0)
        write_manifest(OUT_DIR / "demo_manifest.json", [server.url], records)
    finally:
        server.stop()
    record = records[0]
    if record["status"] != "ok":
        log.error("the demo job failed: %s\n(server log: %s)", record.get("error"), server.log_path)
        return 1
    for path in record["outputs"]:
        print(Path(path).resolve())
    strip = frame_strip(PHOTOS, Path(record["outputs"][0]), args.width, args.height)
    strip.save(args.strip)
    print(Path(args.strip).resolve())
    return 0


def frame_strip(photos: list[Path], video: Path, width: int, height: int, shown: int = 6) -> Image.Image:
    """One row for a person to look at: the reference photos letterboxed on white as the model sees them, a gap,
    then ``shown`` evenly spaced frames of the video, each at the video's size."""
    from phantom_core.references import prepare_reference
    from phantom_core.video_io import read_mp4_frames, to_uint8_frames

    frames = read_mp4_frames(video)  # (T, H, W, 3) uint8
    picks = sorted({round(i * (len(frames) - 1) / (shown - 1)) for i in range(shown)})
    refs = [Image.fromarray(to_uint8_frames(prepare_reference(Image.open(p), width, height, "letterbox")[:, None])[0])
            for p in photos]  # (3, 1, H, W) in [-1, 1] -> (H, W, 3) uint8
    tiles = refs + [None] + [Image.fromarray(frames[i]) for i in picks]
    gap = 4
    strip = Image.new("RGB", (sum(width + gap for _ in tiles) + gap, height + 2 * gap), (96, 96, 96))
    x = gap
    for tile in tiles:
        if tile is not None:
            strip.paste(tile, (x, gap))
        x += width + gap
    return strip


if __name__ == "__main__":
    sys.exit(main())
