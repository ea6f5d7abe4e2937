"""Write the example training dataset the "Phantom train LoRA" workflow names: `example_inputs/phantom_world_lora/`.

    python -m tools.make_example_dataset            # (re)write example_inputs/phantom_world_lora/ (a few seconds)
    python -m tools.make_example_dataset --out DIR  # the same samples somewhere else

Six samples of the miniature world (phantom_core.world, docs/WORLD.md) written by `write_world_dataset`: split
`train`, seed SEED, 128x128, 17 frames at 16 fps (the embedded default's format), one subject per clip (the
workflow samples with one reference), cross-pair references. Sources `photo` and `shape`: the pool that needs no
emoji font, so the files are the same on every machine; every photo is held out (phantom_core.world.subjects), so
the train split draws procedural shapes only. The folder holds `manifest.jsonl` (what the trainer reads:
phantom_core.training.dataset.read_dataset), `clips/*.mp4` (lossless H.264), `refs/*.png` and `truth/*.npz` (the
world's ground truth: masks and boxes), about 70 KB in all. tools/comfy_launcher.py copies it into ComfyUI's
`input/` folder, where Phantom Train LoRA's `dataset` input finds it by name.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from phantom_core.world.dataset import write_world_dataset
from phantom_core.world.render import VideoFormat
from phantom_core.world.sample import WorldConfig
from tools.make_workflows import INPUTS_DIR, TRAIN_DATASET

DATASET_DIR = INPUTS_DIR / TRAIN_DATASET  # the folder name is the dataset name the workflow gives
SPLIT, SEED, COUNT = "train", 7, 6
CONFIG = WorldConfig(video=VideoFormat(width=128, height=128, frames=17, fps=16.0), pair_mode="cross",
                     subject_weights=(1.0, 0.0, 0.0), sources=("photo", "shape"))


def write_example_dataset(folder: str | Path = DATASET_DIR) -> Path:
    """Write the example dataset to `folder`, replacing what is there (built beside it, then moved into place)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{folder.name}.", dir=folder.parent) as scratch:
        fresh = write_world_dataset(Path(scratch) / folder.name, SPLIT, SEED, COUNT, CONFIG)
        if folder.exists():
            shutil.rmtree(folder)
        fresh.rename(folder)
    return folder


def size_bytes(folder: Path) -> int:
    """The total size of the files under `folder`."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DATASET_DIR, help=f"output folder (default: {DATASET_DIR})")
    args = parser.parse_args(argv)
    folder = write_example_dataset(args.out)
    print(f"wrote {COUNT} samples to {folder} ({size_bytes(folder) / 1000:.0f} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
