"""tools.motion_run: a world cache of a chosen travel, then a training run probed as it learns, stopped on time, and
resumed from its last probe; a cool-down run that writes the weights' EMA; several caches mixed into one training
set."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from phantom_core.mmdit.clip import encode_clip_references, load_clip_vision
from phantom_core.mmdit.config import MMDIT_PRESETS
from phantom_core.mmdit.load import load_any_dit
from phantom_core.mmdit.model import PhantomMMDiT
from phantom_core.tiny.default import TRAINED_DIR
from phantom_core.training.checkpoint import CONFIG_FILE, STATE_FILE, WEIGHTS_FILE, list_checkpoints
from phantom_core.world.default_model import WORLD, _raw_samples
from phantom_core.world.mmdit_default import CLIP_OUTPUT, FEATURES_DIR, clip_feature_table, stage_clip_features
from phantom_core.world.subjects import available_sources
from tools.motion_cache import vae_error
from tools.motion_run import CLIP_FILE, main, training_latents

pytestmark = pytest.mark.skipif("emoji" not in available_sources(),
                                reason="the recipe's subjects include emoji: `make emoji-font`")


@pytest.mark.slow  # ~50 s on two CPU cores: 10 triplets of 17 frames at 128 px go through the world VAE
def test_cache_train_probe_stop_on_time_and_resume(tmp_path):
    work, run = tmp_path / "w", tmp_path / "run"
    vae = TRAINED_DIR / "phantom_world_vae.safetensors"  # --vae: the latents' VAE is copied into the work folder
    assert main(["cache", "--work", str(work), "--travel", "0.5", "--samples", "6", "--subjects", "1",
                 "--held-out", "4", "--workers", "1", "--vae", str(vae)]) == 0
    assert (work / "vae.safetensors").read_bytes() == vae.read_bytes()
    index = json.loads((work / "latents" / "index.json").read_text())
    assert len(index["files"]) == 6 and index["world"] == {"travel": 0.5, "subjects": 1}
    assert all(f.get_slice("ref_latents").get_shape()[1] == 1 for f in
               (safe_open(str(work / "latents" / name), framework="pt") for name in index["files"]))
    held = json.loads((work / "held_out" / "latents" / "index.json").read_text())
    assert len(held["files"]) == 4 and held["world"] == {"travel": 0.5, "subjects": 1}
    # --seconds 0: the run stops after its first step, probed there, and still writes its files (float32 weights
    # under --precision bf16's autocast)
    assert main(["train", "--work", str(work), "--network", "mmdit-pooled", "--batch", "1", "--steps", "5",
                 "--every", "1", "--probe", "2", "--seconds", "0", "--threads", "2", "--dropout", "0", "0",
                 "--precision", "bf16", "--out", str(run)]) == 0
    curve = json.loads((tmp_path / "run_curve.json").read_text())
    assert [row["step"] for row in curve] == [1]
    for tag in ("train", "held"):
        at = curve[0][tag]["0.95"]
        assert at["truth"] > 1.5  # half the frame's side over the clip: ~3 latent px of the centroid (0.3: ~1.9)
        assert abs(at["effect"]) < at["truth"] and 0.0 <= at["share"] <= 100.0
    with safe_open(str(run.with_suffix(".safetensors")), framework="pt") as f:
        assert f.metadata()["steps"] == "1"
        floats = {f.get_slice(k).get_dtype() for k in f.keys()} - {"I64"}  # integer buffers aside
        assert floats == {"F32"}, floats
    full, half = load_any_dit(run.with_suffix(".safetensors")), load_any_dit(f"{run}_fp16.safetensors")
    for (name, a), b in zip(full.state_dict().items(), half.state_dict().values()):
        torch.testing.assert_close(b.float(), a.float(), rtol=1e-3, atol=1e-4, msg=name)
    # a run of 4 steps, then --resume to 6, against 6 steps in one go: the same weights and the same probe rows
    common = ["train", "--work", str(work), "--network", "mmdit-pooled", "--batch", "2", "--every", "2", "--probe",
              "2", "--threads", "2"]
    split, whole = tmp_path / "split", tmp_path / "whole"
    assert main([*common, "--steps", "4", "--out", str(split)]) == 0
    # resumed and stopped on time: it went on from step 4 (a fresh start would stop at step 1)
    assert main([*common, "--steps", "6", "--resume", "--seconds", "0", "--out", str(split)]) == 0
    assert [row["step"] for row in json.loads((tmp_path / "split_curve.json").read_text())] == [2, 4, 5]
    with safe_open(str(split.with_suffix(".safetensors")), framework="pt") as f:
        assert f.metadata()["steps"] == "5"
    assert main([*common, "--steps", "6", "--resume", "--out", str(split)]) == 0  # from step 4's checkpoint again
    assert main([*common, "--steps", "6", "--out", str(whole)]) == 0
    rows = {name: json.loads((tmp_path / f"{name}_curve.json").read_text()) for name in ("split", "whole")}
    assert [row["step"] for row in rows["split"]] == [row["step"] for row in rows["whole"]] == [2, 4, 6]
    for a, b in zip(rows["split"], rows["whole"]):
        for tag in ("train", "held"):
            assert a[tag]["0.95"]["effect"] == pytest.approx(b[tag]["0.95"]["effect"], abs=2e-3)
    resumed, straight = load_any_dit(split.with_suffix(".safetensors")), load_any_dit(whole.with_suffix(".safetensors"))
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    # a cool-down run: cosine to 0 and the weights' EMA as the final file (and its half-size copy)
    cool = tmp_path / "cool"
    assert main([*common, "--steps", "4", "--schedule", "cosine", "--ema", "0.5", "--out", str(cool)]) == 0
    (step, ckpt), = list_checkpoints(f"{cool}_run/checkpoints")
    state = torch.load(ckpt / STATE_FILE, weights_only=False)
    saved = json.loads((ckpt / CONFIG_FILE).read_text())
    assert step == 4 and saved["lr_schedule"] == "cosine" and saved["ema_decay"] == 0.5
    final, last = load_file(str(cool.with_suffix(".safetensors"))), load_file(str(ckpt / WEIGHTS_FILE))
    assert set(state["ema"]) <= set(final)
    for name, average in state["ema"].items():
        torch.testing.assert_close(final[name], average, rtol=1e-6, atol=1e-7, msg=name)
    assert max(float((final[n] - last[n]).abs().max()) for n in state["ema"]) > 1e-6  # not the last iterate
    half = load_file(f"{cool}_fp16.safetensors")
    for name, value in final.items():
        torch.testing.assert_close(half[name].float(), value.float(), rtol=1e-3, atol=1e-4, msg=name)
    # --clip: the paper's both network (a CLIP branch), its references' CLIP features rendered again from each
    # cache's index (the held-out cache from its own split and seed), in training and in the probe
    both = tmp_path / "both.safetensors"
    model = PhantomMMDiT(MMDIT_PRESETS["world"], device="meta").to_empty(device="cpu")
    model.init_weights(torch.Generator().manual_seed(0))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(both))
    clipped, tower_file = tmp_path / "clipped", tmp_path / "own_clip.safetensors"
    shutil.copyfile(TRAINED_DIR / CLIP_FILE, tower_file)  # --clip-vision: a tower of its own (train_default's)
    assert main(["train", "--work", str(work), "--init", str(both), "--clip", "--clip-vision", str(tower_file),
                 "--encoding-dropout", "0.3", "0.5", "--batch", "2", "--steps", "2", "--every", "2", "--probe", "2",
                 "--threads", "2", "--out", str(clipped)]) == 0
    assert [row["step"] for row in json.loads((tmp_path / "clipped_curve.json").read_text())] == [2]
    (_, ckpt), = list_checkpoints(f"{clipped}_run/checkpoints")
    saved = json.loads((ckpt / CONFIG_FILE).read_text())
    assert saved["clip_vision"] == str(tower_file)
    assert (saved["vae_reference_dropout"], saved["clip_reference_dropout"]) == (0.3, 0.5)
    # from scratch: the both network with the key mask, the reference index and text positions from step one
    scratch = tmp_path / "scratch"
    assert main(["train", "--work", str(work), "--network", "mmdit-clip-pooled", "--clip", "--text-positions",
                 "--reference-index", "--key-mask", "0.25", "--batch", "2", "--steps", "2", "--every", "2", "--probe",
                 "2", "--threads", "2", "--out", str(scratch)]) == 0
    cfg = load_any_dit(scratch.with_suffix(".safetensors")).config
    assert cfg.clip_dim > 0 and cfg.pooled_reference and cfg.text_positions and cfg.reference_index
    assert cfg.reference_key_mask == pytest.approx(0.25)
    data = training_latents([work], clip=True)
    held = clip_feature_table(work / "held_out")
    assert len(held) == 4 and all(name.startswith("world_test_") for name in held)
    first = data[0]
    regenerated = next(_raw_samples([int(first.name.split("_")[-1])], replace(WORLD, travel=0.5), count=1))
    assert regenerated.name == first.name
    tower = load_clip_vision(TRAINED_DIR / CLIP_FILE)
    want = encode_clip_references(tower, list(regenerated.references), CLIP_OUTPUT)[0]
    torch.testing.assert_close(first.ref_clip, want, rtol=1e-5, atol=1e-6)
    # the held-out cache is not the training draw: rendering it with the training seed is refused, not mislabelled
    shutil.rmtree(work / "held_out" / FEATURES_DIR)
    with pytest.raises(ValueError, match="regenerates as .* rebuild the latent cache, or give its split and seed"):
        stage_clip_features(work / "held_out", TRAINED_DIR / CLIP_FILE, split="test")


def test_a_cache_holds_one_vaes_latents(tmp_path, capsys):
    work, ours, other = tmp_path / "w", tmp_path / "ours.safetensors", tmp_path / "other.safetensors"
    with pytest.raises(SystemExit):
        main(["cache", "--work", str(work), "--vae", str(ours)])
    assert f"--vae: {ours} is not a file" in capsys.readouterr().err
    work.mkdir()
    ours.write_bytes(b"ours")
    other.write_bytes(b"other")
    assert vae_error(ours, work) is None and vae_error(None, work) is None  # an empty folder takes any VAE
    shutil.copyfile(ours, work / "vae.safetensors")
    assert vae_error(ours, work) is None  # the same VAE: the cache goes on
    with pytest.raises(SystemExit):
        main(["cache", "--work", str(work), "--vae", str(other)])
    assert f"{work / 'vae.safetensors'} holds another VAE" in capsys.readouterr().err
    assert (work / "vae.safetensors").read_bytes() == b"ours"  # nothing replaced


def test_bad_options_are_refused(capsys):
    with pytest.raises(SystemExit):
        main(["cache", "--work", "w", "--travel", "0.8"])
    assert "--travel: travel: got 0.8" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--work", "w", "--out", "r", "--batch", "0"])
    assert "--batch is 0; it must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--work", "w", "--out", "r", "--dropout", "0.2", "1.0"])
    assert "--dropout is [0.2, 1.0]; each must be >= 0 and < 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--work", "w", "--out", "r", "--ema", "1.5"])
    assert "--ema: got 1.5; expected a number from 0.0 to 0.99999 (EMA decay" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--work", "w", "--out", "r", "--ema", "0.99", "--seconds", "60"])
    assert "--ema with --seconds: a run stopped on time has no final average" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--work", "w", "--out", "r", "--temporal-weight", "-1"])
    assert "--temporal-weight: got -1.0; expected a number from 0.0 to 1000.0" in capsys.readouterr().err
    for flag, value, low in (("--first", "-1", 0), ("--samples", "0", 1), ("--held-out", "-2", 0)):
        with pytest.raises(SystemExit):
            main(["cache", "--work", "w", flag, value])
        assert f"{flag} is {value}; it must be >= {low}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--work", "w", "--out", "r", "--precision", "fp16"])
    assert "--precision: invalid choice: 'fp16'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["cache", "--work", "w", "--subjects", "4"])
    assert "--subjects: invalid choice: 4" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--work", "w", "--out", "r", "--pooled"])
    assert "--pooled adds the pooled vectors to an --init MMDiT; from scratch, give --network" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--work", "w", "--out", "r", "--network", "phantom-wan", "--text-positions", "--key-mask", "0.2"])
    assert "--text-positions, --key-mask: MMDiT fields; the phantom-wan network has none" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--work", "w", "--out", "r", "--network", "mmdit-pooled", "--clip"])
    assert "--clip from scratch needs a CLIP branch: --network mmdit-clip-pooled, not mmdit-pooled" in \
        capsys.readouterr().err
    for extra, flag in ((["--clip-vision", "t.safetensors"], "--clip-vision"),
                        (["--encoding-dropout", "0.3", "0.5"], "--encoding-dropout")):
        with pytest.raises(SystemExit):
            main(["train", "--work", "w", "--out", "r", *extra])
        assert f"{flag} is for the CLIP features of --clip; give --clip too" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--work", "w", "--out", "r", "--clip", "--encoding-dropout", "0.7", "0.4"])
    assert "--encoding-dropout is [0.7, 0.4]; two probabilities >= 0 whose sum is at most 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--work", "w", "--out", "r", "--clip", "--clip-vision", "missing.safetensors"])
    assert "--clip-vision: missing.safetensors is not a file" in capsys.readouterr().err


def test_from_scratch_the_mmdit_fields_are_in_the_config_from_the_first_step():
    import argparse

    from tools.motion_run import start_model

    args = argparse.Namespace(init="", network="mmdit-clip-pooled", seed=3, pooled=False, text_positions=True,
                              reference_index=True, key_mask=0.25)
    model = start_model(args)
    cfg = model.config
    assert cfg.clip_dim == MMDIT_PRESETS["world"].clip_dim > 0 and cfg.pooled_text and cfg.pooled_reference
    assert cfg.text_positions and cfg.reference_index and cfg.reference_key_mask == 0.25
    assert float(model.reference_key_mask) == 0.25 and model.training
    assert float(model.ref_index_embed.detach().abs().max()) > 0  # init_weights' sin-cos start, not zeros
    again = start_model(args)  # the seed decides the weights
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)
    plain = start_model(argparse.Namespace(**{**vars(args), "text_positions": False, "reference_index": False,
                                              "key_mask": 0.0}))
    assert not (plain.config.text_positions or plain.config.reference_index or plain.config.reference_key_mask)


def fake_cache(work, refs: int, count: int, dropped: torch.Tensor, stem: str = "") -> None:
    """``count`` cache files with ``refs`` reference latents each (named ``<stem>_<i>``, by default ``s<refs>_<i>``),
    and the index ``motion_run cache`` writes."""
    folder = work / "latents"
    folder.mkdir(parents=True)
    save_file({"context": dropped}, str(folder / "dropped-x.safetensors"))
    names = [f"{stem or f's{refs}'}_{i}.safetensors" for i in range(count)]
    for i, name in enumerate(names):
        save_file({"latents": torch.full((4, 2, 4, 4), float(i)), "ref_latents": torch.zeros(4, refs, 4, 4),
                   "context": torch.zeros(3, 8)}, str(folder / name), metadata={"name": name})
    (folder / "index.json").write_text(json.dumps({"files": names, "dropped": "dropped-x.safetensors",
                                                   "world": {"travel": 0.5, "subjects": refs}}))


def test_mixed_caches_train_as_one_set_and_a_foreign_cache_is_refused(tmp_path, capsys):
    dropped = torch.randn(5, 8)
    fake_cache(tmp_path / "one", 1, 3, dropped)
    fake_cache(tmp_path / "two", 2, 2, dropped + 1e-7)  # the same umT5, written again
    data = training_latents([tmp_path / "one", tmp_path / "two"])
    assert len(data) == 5 and [data[i].ref_latents.shape[1] for i in range(5)] == [1, 1, 1, 2, 2]
    assert data.bucket(0) == data.bucket(2) != data.bucket(3)  # one- and two-reference samples batch apart
    torch.testing.assert_close(data[4].latents, torch.ones(4, 2, 4, 4), rtol=0, atol=0)
    fake_cache(tmp_path / "other", 2, 1, dropped + 0.1)  # another text encoder
    with pytest.raises(ValueError, match="--mix .*other: its dropped-prompt context differs"):
        training_latents([tmp_path / "one", tmp_path / "other"])
    with pytest.raises(SystemExit):
        main(["train", "--work", str(tmp_path / "one"), "--mix", str(tmp_path / "none"), "--out", "r"])
    assert "none: no latents/index.json; run `motion_run cache --work" in capsys.readouterr().err


def test_mixed_caches_with_the_same_sample_names_keep_their_own_clip_features(tmp_path):
    """motion_run's caches draw the same indices from the same seed, so their sample names repeat: each sample must
    get the CLIP features of its own cache's references (one table for all gave a two-subject sample's features,
    2 references, to a one-subject sample: the MMDiT refused the batch)."""
    from phantom_core.world.mmdit_default import FEATURES_DIR

    dropped = torch.randn(5, 8)
    for refs, count in ((1, 3), (2, 2)):
        work = tmp_path / f"refs{refs}"
        fake_cache(work, refs, count, dropped, stem="sample")  # sample_0, sample_1, ... in both caches
        (work / FEATURES_DIR).mkdir()
        save_file({f"sample_{i}.safetensors": torch.full((refs, 3, 4), 10.0 * refs + i) for i in range(count)},
                  str(work / FEATURES_DIR / "part_0000.safetensors"))
    data = training_latents([tmp_path / "refs1", tmp_path / "refs2"], clip=True)
    assert len(data) == 5
    for i, (refs, index) in enumerate([(1, 0), (1, 1), (1, 2), (2, 0), (2, 1)]):
        assert data[i].ref_latents.shape[1] == data[i].ref_clip.shape[0] == refs
        torch.testing.assert_close(data[i].ref_clip, torch.full((refs, 3, 4), 10.0 * refs + index), rtol=0, atol=0)
