"""Write the Templates browser's thumbnail of every shipped workflow: `example_workflows/<title>.jpg`.

    python -m tools.make_thumbnails                      # (make thumbnails) about a minute on 2 CPU cores
    python -m tools.make_thumbnails phantom_train_lora   # only these workflows (stems of WORKFLOWS)

Each thumbnail is the middle frame of that workflow's own output, generated through a headless ComfyUI (the
embedded default checkpoints, the shipped photos of example_inputs/) at 320x192, 9 frames, 20 UniPC steps,
cut to a square (the browser's cards are square), with the workflow's reference photos in a strip along its
bottom so the templates can be told apart. The rephrase workflow runs with its typed prompt in place of the
rewritten one (no vision-language model here). The training workflow trains only TRAIN_STEPS steps (into a LoRA
file of its own name, so the thumbnail costs seconds, not the shipped run's minutes) and its thumbnail is the
frame sampled with that LoRA. The embedded default's weights are random, so today the frame
is coloured noise; once the trained default exists, rerunning this puts a real frame there.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
from pathlib import Path

from PIL import Image, ImageOps

from phantom_core.loading.disk import atomic_write
from phantom_core.video_io import read_mp4_frames
from tools.comfy_launcher import ComfyServer
from tools.make_workflows import INPUTS_DIR, WORKFLOWS, api_path, thumbnail_path, workflow_weights_shipped

SIDE = 384  # px, square
INSET = 88  # px, each reference photo in the strip
BORDER = 3  # px of white around each inset
SETTINGS = {"width": 320, "height": 192, "frames": 9, "steps": 20}
TRAIN_STEPS = 10  # Phantom Train LoRA's steps for a thumbnail (the training size is the example dataset's)

log = logging.getLogger("phantom.thumbnails")


def without_rephraser(prompt: dict) -> dict:
    """The API workflow with PhantomRephrase and its previews removed and the typed prompt encoded directly."""
    prompt = copy.deepcopy(prompt)
    rephrase = [k for k, v in prompt.items() if v["class_type"] == "PhantomRephrase"]
    if not rephrase:
        return prompt
    (node_id,) = rephrase
    typed = prompt[node_id]["inputs"]["prompt"]
    for k, v in list(prompt.items()):
        inputs = v["inputs"]
        if v["class_type"] == "PreviewAny" and inputs["source"][0] == node_id:
            del prompt[k]
        elif inputs.get("text") == [node_id, 0]:
            inputs["text"] = typed
    del prompt[node_id]
    return prompt


def tiny_run(prompt: dict, prefix: str) -> dict:
    """`prompt` at SETTINGS' size, length and steps (TRAIN_STEPS of training), saving under `prefix`."""
    prompt = copy.deepcopy(prompt)
    for node in prompt.values():
        if node["class_type"] in ("PhantomEncodeReferences", "PhantomSampler"):
            node["inputs"] |= {k: SETTINGS[k] for k in ("width", "height")}
        if node["class_type"] == "PhantomSampler":
            node["inputs"] |= {k: SETTINGS[k] for k in ("frames", "steps")}
        elif node["class_type"] == "PhantomSaveVideo":
            node["inputs"]["filename_prefix"] = prefix
        elif node["class_type"] == "PhantomTrainLoRA":
            node["inputs"] |= {"steps": TRAIN_STEPS, "lora_name": prefix}
        elif node["class_type"] == "LossGraphNode":
            node["inputs"]["filename_prefix"] = f"{prefix}_loss"
    return prompt


def compose(frame: Image.Image, photos: list[Path]) -> Image.Image:
    """A SIDE x SIDE thumbnail: `frame` cut to a square, the reference photos as insets along the bottom."""
    thumb = ImageOps.fit(frame.convert("RGB"), (SIDE, SIDE), Image.Resampling.LANCZOS)
    x = 10
    for path in photos:
        with Image.open(path) as photo:
            inset = ImageOps.fit(photo.convert("RGB"), (INSET, INSET), Image.Resampling.LANCZOS)
        framed = ImageOps.expand(inset, border=BORDER, fill="white")
        thumb.paste(framed, (x, SIDE - framed.height - 10))
        x += framed.width + 8
    return thumb


def save_jpeg(image: Image.Image, path: Path) -> None:
    """Write `image` as a JPEG through a temporary file and a rename (`atomic_write`: never half-written, the
    permissions a plain file write gives)."""
    with atomic_write(path) as tmp:
        image.save(tmp, "JPEG", quality=85, optimize=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stems", nargs="*", metavar="stem",
                        help=f"workflows to draw (default: all of {', '.join(WORKFLOWS)})")
    stems = parser.parse_args(argv).stems or list(WORKFLOWS)
    if unknown := [s for s in stems if s not in WORKFLOWS]:
        parser.error(f"unknown workflow {', '.join(unknown)}; valid: {', '.join(WORKFLOWS)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for stem in [s for s in stems if not workflow_weights_shipped(s)]:  # the MMDiT's, until it is trained
        log.warning("%s: its embedded default is not shipped yet (make train-default-mmdit): no thumbnail", stem)
    stems = [s for s in stems if workflow_weights_shipped(s)]
    server = ComfyServer().start()
    try:
        for stem in stems:
            api = json.loads(api_path(stem).read_text(encoding="utf-8"))
            entry = server.run(tiny_run(without_rephraser(api), f"thumb_{stem}"), timeout_s=900.0)
            if entry["status"]["status_str"] != "success":
                log.error("%s failed:\n%s", stem, server.log())
                return 1
            save = next(k for k, v in api.items() if v["class_type"] == "PhantomSaveVideo")  # Plot Loss Graph too
            (result,) = entry["outputs"][save]["images"]  # shows "images" (its PNG)
            frames = read_mp4_frames(server.output_dir / result["subfolder"] / result["filename"])
            photos = [INPUTS_DIR / v["inputs"]["image"] for v in api.values() if v["class_type"] == "LoadImage"]
            save_jpeg(compose(Image.fromarray(frames[len(frames) // 2]), photos), thumbnail_path(stem))
            log.info("wrote %s", thumbnail_path(stem))
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
