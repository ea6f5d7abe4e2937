"""`make demo`: a Phantom subject-to-video run through a real, headless ComfyUI, end to end.

1. Lays out a ComfyUI base directory in `.demo/` (git-ignored): this extension linked into `custom_nodes/`, the
   embedded default checkpoints in `models/` (tiny random-weight DiT, VAE and umT5 in the official key layouts:
   `phantom_core.tiny.default`); the job's photos are two of the shipped example photos (example_inputs/: an
   astronaut and a cat, from scikit-image's public-domain / CC0 data).
2. Starts ComfyUI 0.3.75 (`.comfyui/`) headless on the CPU with that base directory.
3. Queues the shipped API workflow (example_workflows/api/phantom_4ref_api.json, unused reference inputs
   removed) over ComfyUI's HTTP API with the batch client (tools/phantom_batch.py): the photos are uploaded with
   /upload/image, the job is queued with /prompt, followed through /history, and the MP4 is downloaded with /view.
4. Prints the path of the MP4 (in `output/`) and stops the server.

Until a trained default exists, the weights are random, so the MP4 is coloured noise: the demo proves the whole
path (nodes, HTTP API, sampling, decoding, MP4 export), not image quality. With real Phantom-Wan weights (see
the README) the same workflow makes real videos.

    .venv/bin/python -m tools.demo [--width 320 --height 192 --frames 33 --steps 50 --seed 42]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from tools.comfy_launcher import ComfyServer
from tools.make_workflows import INPUTS_DIR
from tools.phantom_batch import DEFAULT_WORKFLOW, Client, run_batch, write_manifest

ROOT = Path(__file__).resolve().parents[1]

DEMO_DIR = ROOT / ".demo"
OUT_DIR = ROOT / "output"
PHOTOS = [INPUTS_DIR / "phantom_astronaut.jpg", INPUTS_DIR / "phantom_cat.jpg"]
PROMPT = "an astronaut moves right and a cat moves up on a blue background"  # the world grammar (docs/WORLD.md)

log = logging.getLogger("phantom.demo")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=128, help="video width in px (multiple of 16)")
    parser.add_argument("--height", type=int, default=128, help="video height in px (multiple of 16)")
    parser.add_argument("--frames", type=int, default=17, help="frames, 4k+1")
    parser.add_argument("--steps", type=int, default=50, help="sampling steps (official: 50)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait for the job")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    job = {"id": "demo", "refs": [str(p) for p in PHOTOS], "prompt": PROMPT, "seed": args.seed,
           "width": args.width, "height": args.height, "frames": args.frames, "steps": args.steps}
    server = ComfyServer(base=DEMO_DIR / "comfyui", cleanup=False)
    log.info("starting ComfyUI headless (log: %s)", server.log_path)
    server.start()
    try:
        template = json.loads(DEFAULT_WORKFLOW.read_text(encoding="utf-8"))
        records = run_batch([job], Client(server.url), template, OUT_DIR, args.timeout, 1.0)
        write_manifest(OUT_DIR / "demo_manifest.json", server.url, records)
    finally:
        server.stop()
    record = records[0]
    if record["status"] != "ok":
        log.error("the demo job failed: %s\n(server log: %s)", record.get("error"), server.log_path)
        return 1
    for path in record["outputs"]:
        print(Path(path).resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
