"""The second embedded default, the paper's MMDiT trained in the miniature world (``default-mmdit``): its export
(``world.mmdit_default.stage_mmdit_export``, refused unless the work folder's umT5, and its VAE while the MMDiT
default has none of its own, are the shipped Phantom-Wan default's), its installation, ``generate --model
default-mmdit`` / ``--clip-vision`` and the sidecar that records the CLIP tower, and ``evaluate --model
default-mmdit``.

The trained files need not exist: ``TRAINED_DIR`` is pointed at a temporary folder holding tiny random stand-ins
(``MMDIT_PRESETS["tiny"]``, ``CLIP_VISION_PRESETS["tiny"]``, the tiny default's VAE and umT5) under the shipped
names, or nothing.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import phantom_core.inference.cli_models as cli_models
import phantom_core.tiny.default as embedded
from phantom_core.__main__ import build_parser, main
from phantom_core.inference.cli import resolve_generate_args
from phantom_core.inference.sidecar import read_sidecar
from phantom_core.mmdit.clip_keys import CLIP_VISION_PRESETS
from phantom_core.mmdit.config import MMDIT_PRESETS
from phantom_core.mmdit.model import PhantomMMDiT
from phantom_core.world.mmdit_default import stage_mmdit_export
from tests.support.networks import random_clip_state_dict, save_safetensors
from tests.support.weights import random_state_dict
from tools import train_default

pytestmark = pytest.mark.usefixtures("single_thread")
SMALL = ["--width", "32", "--height", "32", "--frames", "5", "--steps", "2", "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory) -> dict[str, Path]:
    """Tiny random files, by role: dit (an MMDiT with a CLIP branch), clip_vision, vae, text_encoder."""
    root = tmp_path_factory.mktemp("stand_ins")
    paths = {k: v for k, v in embedded.write_tiny_default(root / "models").items() if k != "dit"}
    paths["dit"] = save_safetensors(random_state_dict(PhantomMMDiT(MMDIT_PRESETS["tiny"], device="meta"), seed=41),
                                    root / "mmdit.safetensors")
    paths["clip_vision"] = save_safetensors(random_clip_state_dict(CLIP_VISION_PRESETS["tiny"], seed=42),
                                            root / "clip_vision.safetensors")
    return paths


def shipped_name(role: str) -> str:
    return Path({**embedded.TRAINED_FILES, **embedded.TRAINED_MMDIT_FILES}[role]).name


@pytest.fixture
def trained_dir(tmp_path, monkeypatch) -> Path:
    """An empty ``TRAINED_DIR`` (every reader finds the shipped files through ``trained_file``, which reads it)."""
    folder = tmp_path / "trained"
    folder.mkdir()
    monkeypatch.setattr(embedded, "TRAINED_DIR", folder)
    return folder


def ship(folder: Path, stand_ins: dict[str, Path], roles=("dit", "clip_vision", "vae", "text_encoder")) -> None:
    for role in roles:
        shutil.copyfile(stand_ins[role], folder / shipped_name(role))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ref") / "ref.png"
    Image.fromarray(np.full((40, 30, 3), (200, 30, 30), dtype=np.uint8)).save(path)
    return path


# ---------------------------------------------------------------------------------------------- export


def work_folder(tmp_path: Path, stand_ins: dict[str, Path]) -> Path:
    """A work folder after the MMDiT stages: mmdit_both, clip_vision, and the VAE / umT5 it was trained on."""
    work = tmp_path / "work"
    work.mkdir()
    for role, name in (("dit", "mmdit_both.safetensors"), ("clip_vision", "clip_vision.safetensors"),
                       ("vae", "vae.safetensors"), ("text_encoder", "umt5.safetensors")):
        shutil.copyfile(stand_ins[role], work / name)
    return work


@pytest.fixture
def shared_vae(monkeypatch) -> None:
    """The MMDiT default sharing the Phantom-Wan default's VAE file (as it did until 2026-12-07)."""
    monkeypatch.setitem(embedded.TRAINED_MMDIT_FILES, "vae", embedded.TRAINED_FILES["vae"])


@pytest.mark.usefixtures("shared_vae")
def test_export_refuses_a_vae_or_umt5_other_than_the_shipped_ones(tmp_path, stand_ins, trained_dir):
    work = work_folder(tmp_path, stand_ins)
    with pytest.raises(ValueError, match=r"vae.safetensors.*not byte-identical.*phantom_world_vae.*--stages export"):
        stage_mmdit_export(work)  # nothing shipped at all
    ship(trained_dir, stand_ins, ("vae", "text_encoder"))
    (work / "umt5.safetensors").write_bytes((work / "umt5.safetensors").read_bytes() + b" ")
    with pytest.raises(ValueError, match=r"umt5.safetensors.*phantom_world_umt5.safetensors"):
        stage_mmdit_export(work)
    assert not embedded.trained_mmdit_shipped()  # nothing copied


@pytest.mark.usefixtures("shared_vae")
def test_export_copies_the_mmdit_and_its_clip_tower_when_they_match(tmp_path, stand_ins, trained_dir):
    work = work_folder(tmp_path, stand_ins)
    ship(trained_dir, stand_ins, ("vae", "text_encoder"))
    out = stage_mmdit_export(work)
    assert set(out) == {"dit", "clip_vision"} and embedded.trained_mmdit_shipped()
    assert out["dit"].read_bytes() == (work / "mmdit_both.safetensors").read_bytes()
    assert out["clip_vision"] == trained_dir / "phantom_world_clip.safetensors"
    assert sorted(p.name for p in trained_dir.iterdir()) == sorted(map(shipped_name, stand_ins))  # no temp files
    (work / "mmdit_both.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="mmdit_both.safetensors is missing.*--model mmdit"):
        stage_mmdit_export(work)


def test_a_vae_of_the_mmdits_own_is_exported_installed_and_run(tmp_path, stand_ins, trained_dir):
    own = Path(embedded.TRAINED_NEXT_VAE).name
    assert embedded.TRAINED_MMDIT_FILES["vae"] == embedded.TRAINED_NEXT_VAE != embedded.TRAINED_FILES["vae"]
    work = work_folder(tmp_path, stand_ins)
    with pytest.raises(ValueError, match=r"umt5.safetensors.*phantom_world_umt5"):
        stage_mmdit_export(work)  # the umT5 stays the Phantom-Wan default's
    assert not (trained_dir / own).exists()
    ship(trained_dir, stand_ins, ("text_encoder",))  # no Phantom-Wan VAE shipped: the MMDiT's own is what counts
    out = stage_mmdit_export(work)
    assert set(out) == {"dit", "clip_vision", "vae"} and out["vae"] == trained_dir / own
    assert out["vae"].read_bytes() == (work / "vae.safetensors").read_bytes() and embedded.trained_mmdit_shipped()
    files = embedded.install_trained_mmdit_default(tmp_path / "models")
    assert files["vae"] == tmp_path / "models" / "vae" / own
    assert files["text_encoder"].name == "phantom_world_umt5.safetensors"
    assert cli_models.embedded_files("default-mmdit")["vae"] == str(trained_dir / own)
    other = tmp_path / "next_vae.safetensors"  # vae=: the VAE of the caches the last run learned on
    other.write_bytes(b"another VAE")
    assert stage_mmdit_export(work, vae=other)["vae"].read_bytes() == b"another VAE"
    with pytest.raises(FileNotFoundError, match="missing.safetensors is missing"):
        stage_mmdit_export(work, vae=tmp_path / "missing.safetensors")
    assert (trained_dir / own).read_bytes() == b"another VAE"  # the failed export left the file as it was


def test_train_default_runs_the_export_stage_for_the_variant_both_only(monkeypatch):
    calls = []
    monkeypatch.setattr("phantom_core.world.mmdit_default.stage_mmdit_export",
                        lambda w, v, dit=None, vae=None: calls.append((w, v, dit, vae)))
    assert train_default.main(["--work", "w", "--model", "mmdit", "--stages", "export", "--threads", "1"]) == 0
    # the cool-down on the next VAE's latents, with that VAE
    assert calls == [("w", "both", Path("w") / "next" / "motion" / "g.safetensors", Path("w") / "next" / "vae.safetensors")]
    with pytest.raises(SystemExit):
        train_default.main(["--model", "mmdit", "--variant", "vae", "--stages", "export"])
    assert "export" in train_default.MMDIT_STAGES


# ---------------------------------------------------------------------------------------------- install


def test_install_names_the_missing_files_and_the_make_target(tmp_path, stand_ins, trained_dir):
    ship(trained_dir, stand_ins, ("vae", "text_encoder"))
    with pytest.raises(FileNotFoundError, match=r"phantom_world_mmdit.*phantom_world_clip.*make train-default-mmdit"):
        embedded.install_trained_mmdit_default(tmp_path / "models")
    ship(trained_dir, stand_ins)
    files = embedded.install_trained_mmdit_default(tmp_path / "models")
    assert files["dit"] == tmp_path / "models" / "diffusion_models" / "phantom_world_mmdit.safetensors"
    assert files["clip_vision"] == tmp_path / "models" / "clip_vision" / "phantom_world_clip.safetensors"
    assert all(files[r].read_bytes() == stand_ins[r].read_bytes() for r in stand_ins)


# ---------------------------------------------------------------------------------------------- generate


def resolve(argv: list[str]) -> dict:
    return resolve_generate_args(build_parser().parse_args(["generate", *argv]))


def test_default_mmdit_names_its_files_or_says_how_to_make_them(stand_ins, trained_dir, reference):
    argv = ["--model", "default-mmdit", "--ref", str(reference), "--prompt", "x", "--out", "v.mp4"]
    with pytest.raises(ValueError, match=r"--model default-mmdit.*phantom_world_mmdit.*make train-default-mmdit"):
        resolve(argv)
    ship(trained_dir, stand_ins)
    kw = resolve(argv)
    assert (kw["dit_path"], kw["clip_vision_path"], kw["clip_output"]) == (
        str(trained_dir / "phantom_world_mmdit.safetensors"), str(trained_dir / "phantom_world_clip.safetensors"),
        "tokens")
    assert kw["vae_path"] == str(trained_dir / shipped_name("vae"))  # the MMDiT default's own VAE
    s = kw["settings"]  # the default's format and guidance unless given
    assert (s.width, s.height, s.frames, s.w_img, s.w_text) == (128, 128, 17, *embedded.TRAINED_SAMPLING.values())
    assert s.cache_threshold == embedded.TRAINED_MMDIT_SPEED["cache_threshold"] == 0.1  # its measured step cache
    assert resolve([*argv, "--cache-threshold", "0"])["settings"].cache_threshold == 0.0  # an option still wins
    with pytest.raises(ValueError, match="--model default-mmdit names the embedded default's files; drop --clip-vision"):
        resolve([*argv, "--clip-vision", "c.safetensors"])


def test_explicit_clip_vision_and_output(reference):
    plain = resolve(["--ref", str(reference), "--prompt", "x", "--out", "v.mp4"])  # no file: the Phantom-Wan default
    assert plain["clip_vision_path"] is None and plain["dit_path"].endswith("phantom_world_dit.safetensors")
    assert plain["settings"].cache_threshold == 0.0  # the Phantom-Wan default runs uncached
    kw = resolve(["--dit", "m.safetensors", "--vae", "v.safetensors", "--text-encoder", "t.safetensors",
                  "--clip-vision", "c.safetensors", "--clip-output", "pooled", "--ref", str(reference), "--prompt",
                  "x", "--out", "v.mp4"])
    assert (kw["clip_vision_path"], kw["clip_output"]) == ("c.safetensors", "pooled")


def test_generate_default_mmdit_records_the_clip_tower_and_regenerates_from_the_sidecar(
        tmp_path, stand_ins, trained_dir, reference, capsys):
    ship(trained_dir, stand_ins)
    out = tmp_path / "v.mp4"
    assert main(["generate", "--model", "default-mmdit", "--ref", str(reference), "--prompt", "a red square moves "
                 "left", *SMALL, "--seed", "3", "--out", str(out)]) == 0, capsys.readouterr().err
    record = read_sidecar(tmp_path / "v.json")
    clip = record["models"]["clip_vision"]
    assert Path(clip["path"]) == trained_dir / "phantom_world_clip.safetensors" and clip["clip_output"] == "tokens"
    assert Path(record["models"]["dit"]["path"]) == trained_dir / "phantom_world_mmdit.safetensors"
    again = resolve(["--from-sidecar", str(tmp_path / "v.json"), "--out", str(tmp_path / "w.mp4")])
    assert (again["clip_vision_path"], again["clip_output"]) == (clip["path"], "tokens")
    assert again["settings"] == record["settings"]
    assert main(["generate", "--from-sidecar", str(tmp_path / "v.json"), "--out", str(tmp_path / "w.mp4"),
                 "--no-progress"]) == 0
    assert (tmp_path / "w.mp4").read_bytes() == out.read_bytes()  # the same tower and features: the same video


def test_an_mmdit_without_its_tower_is_refused_and_old_sidecars_still_read(tmp_path, stand_ins, reference, capsys):
    out = tmp_path / "v.mp4"
    files = ["--dit", str(stand_ins["dit"]), "--vae", str(stand_ins["vae"]), "--text-encoder",
             str(stand_ins["text_encoder"])]
    assert main(["generate", *files, "--ref", str(reference), "--prompt", "x", *SMALL, "--out", str(out)]) == 2
    assert "reads 128-wide CLIP features" in capsys.readouterr().err and not out.exists()
    wan = embedded.write_tiny_default(tmp_path / "models")
    assert main(["generate", "--dit", str(wan["dit"]), "--vae", str(wan["vae"]), "--text-encoder",
                 str(wan["text_encoder"]), "--ref", str(reference), "--prompt", "x", *SMALL, "--out", str(out)]) == 0
    record = read_sidecar(tmp_path / "v.json")
    assert "clip_vision" not in record["models"]  # only an MMDiT's run records one
    again = resolve(["--from-sidecar", str(tmp_path / "v.json"), "--out", str(tmp_path / "w.mp4")])
    assert (again["clip_vision_path"], again["clip_output"]) == (None, "tokens")


# ---------------------------------------------------------------------------------------------- evaluate


def test_evaluate_default_mmdit(tmp_path, stand_ins, trained_dir, capsys):
    small = ["--quick", "1", "--steps", "2", "--device", "cpu", "--size", "64", "--frames", "5", "--no-progress"]
    assert main(["evaluate", "--model", "default-mmdit", *small]) == 2
    err = capsys.readouterr().err
    assert "evaluate --model default-mmdit" in err and "make train-default-mmdit" in err, err
    ship(trained_dir, stand_ins)
    assert main(["evaluate", "--model", "default-mmdit", *small, "--out", str(tmp_path / "e")]) == 0
    assert (tmp_path / "e" / "metrics.json").is_file()
