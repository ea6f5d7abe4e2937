"""tools/phantom_batch.py against the real headless ComfyUI server: good jobs give MP4s, a bad one is reported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from phantom_core.video_io import probe_mp4
from tools import phantom_batch
from tools.comfy_launcher import ComfyServer
from tools.make_workflows import api_path

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "phantom_batch.py"


def load_tool():
    return phantom_batch


def test_fill_workflow_keeps_only_the_used_references() -> None:
    tool = load_tool()
    template = json.loads(api_path("phantom_4ref").read_text(encoding="utf-8"))
    job = {"id": "a", "refs": ["x", "y"], "prompt": "a cat", "negative_prompt": "blur", "frames": 9, "width": 48,
           "height": 32, "fps": 8, "seed": 7}
    prompt = tool.fill_workflow(template, job, ["phantom_batch/x.jpg", "phantom_batch/y.jpg"])
    loads = {k: v["inputs"]["image"] for k, v in prompt.items() if v["class_type"] == "LoadImage"}
    assert sorted(loads.values()) == ["phantom_batch/x.jpg", "phantom_batch/y.jpg"]
    refs = next(v for v in prompt.values() if v["class_type"] == "PhantomReferences")["inputs"]
    assert [k for k in refs if k.startswith("image_")] == ["image_1", "image_2"]
    assert [k for k in refs if k.startswith("mask_")] == ["mask_1", "mask_2"]  # each with its Load Image's MASK
    assert all(src in prompt for src, _ in (refs["image_1"], refs["image_2"], refs["mask_1"], refs["mask_2"]))
    assert refs["mask_1"] == [refs["image_1"][0], 1]
    sampler = next(v for v in prompt.values() if v["class_type"] == "PhantomSampler")["inputs"]
    assert (sampler["frames"], sampler["width"], sampler["height"], sampler["seed"]) == (9, 48, 32, 7)
    assert prompt[sampler["positive"][0]]["inputs"]["text"] == "a cat"
    assert prompt[sampler["negative"][0]]["inputs"]["text"] == "blur"
    assert template["13"]["class_type"] == "LoadImage"  # the template itself is untouched


def test_batch_two_good_jobs_and_three_bad(comfy_server: ComfyServer, examples_dir: Path, tmp_path: Path) -> None:
    jobs = [
        {"id": "one_ref", "refs": [str(examples_dir / "ref1.jpg")], "prompt": "a girl in a garden", "seed": 1,
         "width": 64, "height": 64, "frames": 5, "steps": 2, "fps": 16},
        {"id": "bad_frames", "refs": [str(examples_dir / "ref2.jpg")], "prompt": "a dog", "frames": 6,
         "width": 64, "height": 64, "steps": 2},
        {"id": "two_refs", "refs": [str(examples_dir / "ref3.jpg"), "ref4.jpg"], "prompt": "a woman on a beach",
         "negative_prompt": "blurry", "width": 64, "height": 48, "frames": 1, "steps": 2, "fps": 8,
         "solver": "euler"},
    ]
    jobs_file = tmp_path / "jobs.jsonl"
    (tmp_path / "ref4.jpg").write_bytes((examples_dir / "ref4.jpg").read_bytes())  # relative to the JSONL
    jobs.append({"id": "bad_model", "refs": [str(examples_dir / "ref2.jpg")], "prompt": "a dog",
                 "dit_name": "missing_dit.safetensors", "width": 64, "height": 64, "steps": 2, "frames": 1})
    lines = [json.dumps(j) for j in jobs] + ['{"id": "broken", "refs": ["ref1.jpg"], "prompt": ']
    jobs_file.write_text("# two good jobs, three bad\n" + "\n".join(lines) + "\n")
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, str(TOOL), str(jobs_file), "--server", comfy_server.url, "--out", str(out),
                          "--timeout", "300", "--poll", "0.5", "--dit", "phantom_tiny_dit.safetensors"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 1, run.stderr  # some jobs failed
    manifest = json.loads((out / "manifest.json").read_text())
    by_id = {r["id"]: r for r in manifest["jobs"]}
    assert (manifest["ok"], manifest["failed"]) == (2, 3)
    assert by_id["bad_frames"]["status"] == "failed" and "frames" in by_id["bad_frames"]["error"]
    assert by_id["bad_frames"]["outputs"] == []
    assert by_id["bad_model"]["status"] == "failed" and "missing_dit.safetensors" in by_id["bad_model"]["error"]
    assert by_id["line6"]["status"] == "failed" and "jobs.jsonl:6: not valid JSON" in by_id["line6"]["error"]
    expected = {"one_ref": (5, 64, 64, 16.0), "two_refs": (1, 64, 48, 8.0)}
    for job_id, (frames, width, height, fps) in expected.items():
        record = by_id[job_id]
        assert record["status"] == "ok", record
        [video] = map(Path, record["outputs"])
        assert video.parent == out and video.name == f"{job_id}.mp4"
        meta = probe_mp4(video)
        assert (meta["frames"], meta["width"], meta["height"]) == (frames, width, height)
        assert abs(meta["fps"] - fps) < 1e-3
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "one_ref.mp4", "two_refs.mp4"]
