"""The standalone pipeline, its CLI (`generate`, `inspect`), the JSON sidecar and bit-for-bit regeneration."""

from __future__ import annotations

import hashlib
import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import phantom_core.inference.pipeline as pipeline
import phantom_core.inference.sidecar as sidecar
from phantom_core.__main__ import build_parser, main
from phantom_core.inference.cli import resolve_generate_args
from phantom_core.inference.pipeline import generate, load_models
from phantom_core.inference.settings import WAN_NEGATIVE_PROMPT, GenerationSettings, settings_from_preset
from phantom_core.inference.sidecar import read_sidecar
from phantom_core.loading.files import read_state_dict
from phantom_core.video_io import read_mp4_frames
from phantom_core.wan.dit import DIT_PRESETS
from phantom_core.wan.inspect import inspect_checkpoint
from phantom_core.wan.load import expected_shapes
from tests.support.files import make_tiny_files, model_args

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--width", "32", "--height", "32", "--frames", "5", "--steps", "3"]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    return make_tiny_files(tmp_path_factory.mktemp("pipeline"), seed=0, sizes=[(40, 56), (64, 30)])


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cli_command() -> list[str]:
    """The one CLI, as users run it."""
    return [sys.executable, "-m", "phantom_core"]


# ---------------------------------------------------------------------------------------------- settings


def test_settings_presets_and_validation():
    paper = settings_from_preset("paper", prompt="p", steps=4)
    assert (paper.solver, paper.w_img, paper.w_text, paper.steps) == ("euler", 3.0, 7.5, 4)
    assert settings_from_preset("official", prompt="p").solver == "unipc"
    assert GenerationSettings("p", width=64, height=32, frames=9).latent_shape == (1, 16, 3, 4, 8)
    assert GenerationSettings.from_json(paper.to_json()) == paper
    for bad, word in [(dict(width=30), "width"), (dict(frames=6), "frames"), (dict(solver="ddim"), "solver"),
                      (dict(seed=-2), "seed"), (dict(shift=0.0), "shift"), (dict(ref_mode="fit"), "ref_mode"),
                      (dict(quality=11), "quality"), (dict(w_img=float("nan")), "w_img")]:
        with pytest.raises(ValueError, match=word):
            GenerationSettings("p", **bad)
    with pytest.raises(ValueError, match="preset"):
        settings_from_preset("fast", prompt="p")
    with pytest.raises(ValueError, match="unknown fields"):
        GenerationSettings.from_json({"prompt": "p", "cfg": 3})


# ---------------------------------------------------------------------------------------------- Python API


def test_generate_python_api_is_seeded(files):
    dit, vae, te = load_models(files["dit"], files["vae"], files["text_encoder"])
    settings = GenerationSettings("a red ball", width=32, height=32, frames=1, steps=2, solver="euler", seed=7)
    refs = [files["ref0"], Image.open(files["ref1"]).convert("RGB")]
    steps_seen = []
    a = generate(dit, vae, te, refs, settings, callback=lambda i, n, x0: steps_seen.append((i, n)))
    b = generate(dit, vae, te, refs, settings)
    c = generate(dit, vae, te, refs, GenerationSettings(**{**settings.to_json(), "seed": 8}))
    assert a.shape == (1, 3, 1, 32, 32) and a.dtype == torch.float32
    assert -1 <= a.min() and a.max() <= 1
    assert steps_seen == [(0, 2), (1, 2)]
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-2  # another seed, another video


# ---------------------------------------------------------------------------------------------- generate CLI


def test_cli_sidecar_and_bit_exact_regeneration(files, capsys, single_thread):
    # one thread here, torch's default (the machine's cores) in the fresh process below unless the sidecar's
    # recorded count is applied: on the CPU the float reductions, hence the video's bits, depend on it
    out = files["root"] / "run1" / "video.mp4"
    argv = ["generate", *model_args(files), "--prompt", "two things", "--preset", "paper", *SMALL,
            "--seed", "-1", "--out", str(out)]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "sampling [" in err and "3/3" in err  # the progress bar
    sidecar = out.with_suffix(".json")
    record = json.loads(sidecar.read_text())
    # every setting, the drawn seed, the hashes
    assert record["seed"] == record["settings"]["seed"] and 0 <= record["seed"] < 2**53
    s = record["settings"]
    assert (s["solver"], s["w_img"], s["steps"], s["width"], s["frames"]) == ("euler", 3.0, 3, 32, 5)
    assert s["negative_prompt"] == WAN_NEGATIVE_PROMPT
    for role in ("dit", "vae", "text_encoder"):
        (entry,) = record["models"][role]["files"]
        assert entry["sha256"] == sha256(files[role]) and entry["bytes"] == files[role].stat().st_size
    assert [r["sha256"] for r in record["references"]] == [sha256(files["ref0"]), sha256(files["ref1"])]
    assert record["output"]["sha256"] == sha256(out)
    runtime = record["runtime"]  # the choices (defaults: auto) and what they resolved to
    assert {k: runtime[k] for k in ("dtype", "compute_dtype", "device", "text_encoder_device")} == {
        "dtype": "auto", "compute_dtype": "auto", "device": "cpu", "text_encoder_device": None}
    assert runtime["resolved"]["dit"] == {"weights": "float32", "compute": "float32", "device": "cpu"}
    assert runtime["threads"] == torch.get_num_threads() == 1
    assert record["versions"]["torch"] == torch.__version__
    assert read_sidecar(sidecar)["settings"].seed == record["seed"]
    # regenerate in a fresh process from the sidecar alone
    again = files["root"] / "run2" / "again.mp4"
    proc = subprocess.run([*cli_command(), "generate", "--from-sidecar", str(sidecar), "--out", str(again),
                           "--no-progress"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    first, second = read_mp4_frames(out), read_mp4_frames(again)
    assert first.shape == (5, 32, 32, 3)
    assert first.std() > 5  # a real, non-constant video
    assert np.array_equal(first, second)
    regenerated = json.loads(again.with_suffix(".json").read_text())
    assert regenerated["seed"] == record["seed"] and regenerated["runtime"]["threads"] == 1


def test_from_sidecar_precedence_and_changed_files(files, tmp_path):
    record = {
        "format": "phantom-generation", "format_version": 1, "seed": 5,
        "settings": GenerationSettings("from sidecar", width=32, height=32, frames=5, steps=9, seed=5).to_json(),
        "runtime": {"dtype": "float32", "device": "cpu", "threads": 3},
        "models": {r: {"path": str(files[r]), "files": [{"path": str(files[r]), "bytes": files[r].stat().st_size,
                                                         "sha256": sha256(files[r])}]}
                   for r in ("dit", "vae", "text_encoder")},
        "references": [{"path": str(files["ref0"]), "bytes": files["ref0"].stat().st_size,
                        "sha256": sha256(files["ref0"])}],
    }
    side = tmp_path / "s.json"
    side.write_text(json.dumps(record))
    parse = build_parser().parse_args
    kw = resolve_generate_args(parse(["generate", "--from-sidecar", str(side), "--out", "x.mp4", "--steps", "4",
                                      "--preset", "paper"]))
    st = kw["settings"]
    # explicit option > preset > sidecar
    assert (st.steps, st.solver, st.w_img, st.prompt, st.seed) == (4, "euler", 3.0, "from sidecar", 5)
    assert kw["ref_paths"] == [str(files["ref0"])] and kw["dit_path"] == str(files["dit"])
    assert kw["threads"] == 3  # the recorded CPU thread count, unless --threads is given
    assert resolve_generate_args(parse(["generate", "--from-sidecar", str(side), "--out", "x.mp4",
                                        "--threads", "2"]))["threads"] == 2
    with pytest.raises(ValueError, match="--threads: got 0"):
        resolve_generate_args(parse(["generate", "--from-sidecar", str(side), "--out", "x.mp4", "--threads", "0"]))
    record["references"][0]["sha256"] = "0" * 64
    side.write_text(json.dumps(record))
    with pytest.raises(ValueError, match="ref0.png has changed"):
        resolve_generate_args(parse(["generate", "--from-sidecar", str(side), "--out", "x.mp4"]))
    ok = resolve_generate_args(parse(["generate", "--from-sidecar", str(side), "--out", "x.mp4",
                                      "--ignore-changed-files"]))
    assert ok["settings"].steps == 9


def _bad_dit_files(files: dict[str, Path], root: Path) -> dict[str, tuple[Path, str]]:
    """name -> (path, words the error must contain)."""
    root.mkdir(exist_ok=True)
    data = files["dit"].read_bytes()
    (root / "empty_dir").mkdir(exist_ok=True)
    sharded = root / "sharded"
    sharded.mkdir(exist_ok=True)
    (sharded / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"patch_embedding.weight": "model-00001-of-00002.safetensors"}}))
    (root / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (root / "notes.safetensors").write_text("these are not weights\n" * 10)
    (root / "access_denied.pth").write_text("<!DOCTYPE html><html><body>Access denied</body></html>\n")
    (root / "m.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 1}}))
    sd = dict(read_state_dict(files["dit"]))
    torch.save(sd, root / "dit.pth")
    (root / "truncated.pth").write_bytes((root / "dit.pth").read_bytes()[:5000])
    torch.save({"weights": sd, "step": slice(1)}, root / "full.pth")
    sd["img_emb.proj.0.weight"] = torch.zeros(4, 4)  # what makes a Wan DiT an image-to-video one
    save_file(sd, root / "i2v.safetensors")
    return {
        "missing": (root / "nope.safetensors", "does not exist"),
        "no index": (root / "empty_dir", "index"),
        "missing shard": (sharded, "model-00001-of-00002.safetensors"),
        "truncated": (root / "truncated.safetensors", "is truncated"),
        "not a checkpoint": (root / "notes.safetensors", "is not a safetensors file: it is a text file"),
        "web page as .pth": (root / "access_denied.pth", "is not a PyTorch checkpoint: it is an HTML"),
        "truncated .pth": (root / "truncated.pth", "is truncated"),
        "index without weight_map": (root / "m.safetensors.index.json", 'has no "weight_map"'),
        "full pickle": (root / "full.pth", "holds more than tensors"),
        "other architecture": (root / "i2v.safetensors", "image-to-video"),
        "text encoder as DiT": (files["text_encoder"], "text encoder"),
    }


def test_bad_model_files_fail_before_sampling(files, capsys, monkeypatch):
    def no_sampling(*args, **kwargs):
        raise AssertionError("sampling started although a model file is bad")

    monkeypatch.setattr(pipeline, "sample_from_seed", no_sampling)
    bad = _bad_dit_files(files, files["root"] / "bad")
    out = files["root"] / "bad_out" / "v.mp4"
    for name, (path, words) in bad.items():
        args = model_args(files)
        args[1] = str(path)  # --dit
        assert main(["generate", *args, "--prompt", "x", *SMALL, "--out", str(out)]) == 2, name
        err = capsys.readouterr().err
        assert "error: DiT file" in err and str(path) in err and words in err, (name, err)
        assert "weights_only=False" not in err and "Traceback" not in err, (name, err)
    # a DiT where the VAE belongs, a VAE where the text encoder belongs, and bad files in those roles
    cut_vae, cut_te = files["root"] / "bad" / "cut_vae.safetensors", files["root"] / "bad" / "cut_umt5.safetensors"
    cut_vae.write_bytes(files["vae"].read_bytes()[:3000])
    cut_te.write_bytes(files["text_encoder"].read_bytes()[:-10])
    for flag, role, wrong, words in (
            ("--vae", "VAE", files["dit"], "encoder.conv1.weight"),
            ("--text-encoder", "text encoder", files["vae"], "shared.weight"),
            ("--vae", "VAE", cut_vae, "is truncated"),
            ("--text-encoder", "text encoder", cut_te, "is truncated"),
            ("--text-encoder", "text encoder", files["root"] / "bad" / "access_denied.pth", "HTML page")):
        args = model_args(files)
        args[args.index(flag) + 1] = str(wrong)
        assert main(["generate", *args, "--prompt", "x", *SMALL, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"error: {role} file {wrong}" in err and words in err, err
    assert not out.exists()


def test_separate_tokenizer_file(files, tmp_path, capsys):
    sd = dict(read_state_dict(files["text_encoder"]))
    (tmp_path / "spiece.model").write_bytes(sd.pop("spiece_model").numpy().tobytes())
    save_file(sd, tmp_path / "umt5_no_tokenizer.safetensors")
    args = model_args(files)
    args[args.index("--text-encoder") + 1] = str(tmp_path / "umt5_no_tokenizer.safetensors")
    assert main(["generate", *args, "--prompt", "x", *SMALL, "--out", str(tmp_path / "v.mp4")]) == 2
    err = capsys.readouterr().err
    assert "umt5_no_tokenizer.safetensors" in err and "tokenizer" in err
    _, _, te = load_models(files["dit"], files["vae"], tmp_path / "umt5_no_tokenizer.safetensors",
                           tokenizer_path=tmp_path)
    assert te.tokenize(["a red ball"])[0][-1] == 1  # </s>


def test_bad_options_are_named(files, capsys):
    cases = [(["--width", "30"], "width"), (["--frames", "6"], "frames"),
             (["--ref", str(files["root"] / "none.png")], "none.png")]
    for extra, word in cases:
        args = ["generate", *model_args(files), "--prompt", "x", *SMALL, *extra, "--out", "v.mp4"]
        assert main(args) == 2
        assert word in capsys.readouterr().err
    # no model file at all is the trained default; a partial set names what is missing
    assert main(["generate", "--prompt", "x", "--out", "v.mp4"]) == 2
    assert "--ref is required" in capsys.readouterr().err
    assert main(["generate", "--dit", str(files["dit"]), "--prompt", "x", "--out", "v.mp4"]) == 2
    assert "--vae is required" in capsys.readouterr().err
    assert main(["generate", "--model", "default", "--dit", str(files["dit"]), "--prompt", "x", "--out", "v.mp4"]) == 2
    err = capsys.readouterr().err
    assert "--model default" in err and "drop --dit" in err, err


def test_generate_without_model_files_runs_the_trained_default(tmp_path, capsys):
    """The trained default at its world format (128x128, 17 frames), here with 4 steps; the sidecar names its files."""
    from phantom_core.tiny.default import TRAINED_DIR

    ref = tmp_path / "ref.png"
    Image.fromarray(np.full((40, 30, 3), (200, 30, 30), dtype=np.uint8)).save(ref)
    out = tmp_path / "v.mp4"
    assert main(["generate", "--ref", str(ref), "--prompt", "a red square moves left on a blue background",
                 "--steps", "4", "--out", str(out), "--no-progress", "--device", "cpu"]) == 0, capsys.readouterr().err
    record = read_sidecar(tmp_path / "v.json")
    assert (record["settings"].width, record["settings"].height, record["settings"].frames) == (128, 128, 17)
    assert Path(record["models"]["dit"]["path"]).resolve() == (TRAINED_DIR / "phantom_world_dit.safetensors").resolve()


# ---------------------------------------------------------------------------------------------- inspect


def test_inspect_tiny_files(files, tmp_path):
    dit = inspect_checkpoint(files["dit"])
    assert (dit["kind"], dit["preset"], dit["key_count"], dit["dtypes"]) == ("dit", "tiny", 69, {"float32": 69})
    shapes = expected_shapes(DIT_PRESETS["tiny"])
    assert dit["parameter_count"] == sum(int(np.prod(s)) for s in shapes.values())
    assert dit["file_size"] == files["dit"].stat().st_size and dit["problems"] == []
    vae = inspect_checkpoint(files["vae"])
    assert (vae["kind"], vae["preset"], vae["key_count"]) == ("vae", "tiny", 194)
    te = inspect_checkpoint(files["text_encoder"])
    assert (te["kind"], te["preset"]) == ("umt5", "tiny") and "tokenizer embedded" in te["architecture"]
    # a .pth copy and a two-shard index of the DiT
    sd = read_state_dict(files["vae"])
    torch.save(dict(sd), tmp_path / "vae.pth")
    assert inspect_checkpoint(tmp_path / "vae.pth")["kind"] == "vae"
    dsd = dict(read_state_dict(files["dit"]))
    keys = sorted(dsd)
    weight_map = {}
    for i, part in enumerate((keys[:30], keys[30:])):
        name = f"dit-0000{i + 1}-of-00002.safetensors"
        save_file({k: dsd[k] for k in part}, tmp_path / name)
        weight_map |= {k: name for k in part}
    (tmp_path / "dit.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    sharded = inspect_checkpoint(tmp_path)
    assert (sharded["kind"], sharded["preset"], sharded["key_count"], len(sharded["files"])) == ("dit", "tiny", 69, 3)
    # the sidecar hashes an index and each of its shards
    files_of = sidecar.checkpoint_files(tmp_path)
    assert [f.name for f in files_of] == ["dit.safetensors.index.json", "dit-00001-of-00002.safetensors",
                                          "dit-00002-of-00002.safetensors"]
    assert [d["sha256"] for d in sidecar.describe_files(files_of)] == [sha256(f) for f in files_of]
    save_file({"weight": torch.zeros(3, 3)}, tmp_path / "other.safetensors")
    assert inspect_checkpoint(tmp_path / "other.safetensors")["kind"] == "unknown"


def test_inspect_reads_only_the_header(tmp_path, capsys):
    # a 1.3B-shaped bf16 DiT whose 2.8 GB of data are a sparse hole: only the header is ever read
    shapes = expected_shapes(DIT_PRESETS["phantom-wan-1.3b"])
    header, offset = {}, 0
    for key in sorted(shapes):
        size = int(np.prod(shapes[key])) * 2
        header[key] = {"dtype": "BF16", "shape": list(shapes[key]), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    path = tmp_path / "phantom_1.3b.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    report = inspect_checkpoint(path)
    assert (report["kind"], report["preset"], report["key_count"]) == ("dit", "phantom-wan-1.3b", 825)
    assert report["parameter_count"] == 1_418_996_800 and report["dtypes"] == {"bfloat16": 825}
    assert main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    assert "phantom-wan-1.3b" in text and "1,418,996,800" in text
    with open(path, "r+b") as f:  # cut the file: the header now points past its end
        f.truncate(offset // 2)
    assert main(["inspect", str(path), "--json"]) == 2
    err = capsys.readouterr().err
    assert "truncated" in err and str(path) in err
