"""Training data: the dataset folder and JSONL layouts, clips cut and resized, bad samples skipped by name, and
the latent / context cache (computed once, read back unchanged, re-encoded only what changed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from phantom_core.references import encode_references, open_reference
from phantom_core.training.cache import RawSample, build_cache, file_fingerprint, module_fingerprint
from phantom_core.training.dataset import load_clip, read_dataset
from phantom_core.wan.umt5 import load_text_encoder
from phantom_core.wan.vae import load_vae
from tests.support.files import make_tiny_files
from tests.support.training import write_clip, write_dataset, write_manifest, write_reference

pytestmark = pytest.mark.usefixtures("single_thread")
SIZE = dict(frames=5, width=32, height=32)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    files = make_tiny_files(tmp_path_factory.mktemp("models"), 0, [])
    return {"vae": load_vae(files["vae"]), "text_encoder": load_text_encoder(files["text_encoder"]),
            "root": files["root"]}


def encoders_of(models: dict, calls: list | None = None):
    def load():
        if calls is not None:
            calls.append(1)
        return models["vae"], models["text_encoder"]
    return load


def fingerprints_of(models: dict) -> dict:
    return {"vae": module_fingerprint(models["vae"]), "text_encoder": module_fingerprint(models["text_encoder"])}


def test_folder_layout_lists_samples_and_reports_the_unusable_ones_by_name(tmp_path):
    root = write_dataset(tmp_path / "data", samples=2, frames=5)
    (root / "no_caption").mkdir()
    write_clip(root / "no_caption" / "video.mp4", 5, (32, 32), seed=9)
    write_reference(root / "no_caption" / "ref_1.png", (32, 32), seed=9)
    (root / "no_refs").mkdir()
    write_clip(root / "no_refs" / "video.mp4", 5, (32, 32), seed=9)
    (root / "no_refs" / "caption.txt").write_text("a cat")
    (root / "five_refs").mkdir()
    (root / "five_refs" / "caption.txt").write_text("a cat")
    (root / "five_refs" / "frames").mkdir()
    for k in range(5):
        write_reference(root / "five_refs" / f"ref_{k}.png", (32, 32), seed=k)
    specs, bad = read_dataset(root)
    assert [s.name for s in specs] == ["clip_00", "clip_01"]
    assert specs[1].references == (root / "clip_01" / "ref_1.png", root / "clip_01" / "ref_2.png")
    assert specs[0].caption == "a subject number 0 moves left"
    reasons = {b.name: b.reason for b in bad}
    assert reasons.keys() == {"no_caption", "no_refs", "five_refs"}
    assert "caption.txt" in reasons["no_caption"]
    assert "0 references" in reasons["no_refs"] and "5 references" in reasons["five_refs"]


def test_jsonl_manifest_paths_relative_to_it_and_its_bad_lines(tmp_path):
    write_clip(tmp_path / "clips" / "a.mp4", 5, (32, 32), seed=1)
    write_reference(tmp_path / "r1.png", (32, 32), seed=1)
    manifest = write_manifest(tmp_path / "train.jsonl", [
        {"video": "clips/a.mp4", "references": ["r1.png"], "caption": "a dog"},
        {"name": "a", "video": "clips/a.mp4", "references": "r1.png", "caption": "a dog again"},
        {"name": "gone", "video": "clips/a.mp4", "references": ["missing.png"], "caption": "x"},
        {"name": "outside", "video": "../elsewhere.mp4", "references": ["r1.png"], "caption": "x"},
    ])
    with manifest.open("a") as f:
        f.write("{not json\n")
    specs, bad = read_dataset(manifest, contained=True)
    assert [(s.name, s.video) for s in specs] == [("a", tmp_path / "clips" / "a.mp4")]
    reasons = {b.name: b.reason for b in bad}
    assert "same name" in reasons["a"] and "missing.png does not exist" in reasons["gone"]
    assert "outside the dataset folder" in reasons["outside"] and "line 5" in reasons
    with pytest.raises(ValueError, match="expected a folder of samples or a .jsonl manifest"):
        read_dataset(tmp_path / "nothing.txt")


def test_clips_give_their_first_4k_plus_1_frames_scaled_to_cover_and_centre_cropped(tmp_path):
    frames = np.zeros((7, 20, 40, 3), dtype=np.uint8)
    for t in range(7):
        frames[t, :, :, 0] = 30 * t  # the red level counts the frames
    frames[:, :, :10] = 255  # a white band at the left, cut off by the centre crop to a square
    folder = tmp_path / "frames"
    folder.mkdir()
    for t in range(7):
        Image.fromarray(frames[t]).save(folder / f"{t:04d}.png")
    clip = load_clip(folder, 5, 16, 16)
    assert clip.shape == (3, 5, 16, 16) and clip.dtype == torch.float32
    red = (clip[0, :, 8, 8] + 1) * 127.5
    torch.testing.assert_close(red, torch.tensor([0.0, 30, 60, 90, 120]), atol=1.0, rtol=0)  # frames 0..4
    assert float(clip[1].max()) < -0.9  # no white from the cropped band (green is 0 elsewhere)
    with pytest.raises(ValueError, match="the clip has 7 frames; training needs 9"):
        load_clip(folder, 9, 16, 16)
    mp4 = write_clip(tmp_path / "c.mp4", 6, (40, 24), seed=3)
    assert load_clip(mp4, 5, 32, 16).shape == (3, 5, 16, 32)


def test_bad_samples_are_skipped_with_their_names_and_reasons(tmp_path, models):
    root = write_dataset(tmp_path / "data", samples=2, frames=5)
    (tmp_path / "data" / "clip_00" / "video.mp4").write_bytes(b"not a video at all")
    short = write_dataset(tmp_path / "short", samples=1, frames=3)
    (short / "clip_00").rename(root / "short_clip")
    (root / "clip_01" / "ref_2.png").write_bytes(b"\x89PNG broken")
    good = write_dataset(tmp_path / "good", samples=3, frames=5)
    (good / "clip_02").rename(root / "fine")
    specs, bad = read_dataset(root)
    data, bad = build_cache(specs, tmp_path / "cache", encoders=encoders_of(models),
                            fingerprints=fingerprints_of(models), bad=bad, **SIZE)
    assert len(data) == 1 and data[0].name == "fine"
    reasons = {b.name: b.reason for b in bad}
    assert set(reasons) == {"clip_00", "clip_01", "short_clip"}
    assert "cannot be read" in reasons["clip_00"] and "video.mp4" in reasons["clip_00"]
    assert "ref_2.png cannot be read as an image" in reasons["clip_01"]
    assert "the clip has 3 frames; training needs 5" in reasons["short_clip"]
    with pytest.raises(ValueError, match="no usable training sample"):
        build_cache(specs[:2], tmp_path / "cache", encoders=encoders_of(models), fingerprints=fingerprints_of(models),
                    **SIZE)


def test_cache_round_trip_equals_direct_encoding_and_is_computed_once(tmp_path, models):
    root = write_dataset(tmp_path / "data", samples=3, frames=5)
    specs, _ = read_dataset(root)
    calls: list = []
    data, bad = build_cache(specs, tmp_path / "cache", encoders=encoders_of(models, calls),
                            fingerprints=fingerprints_of(models), dropped_prompt="", **SIZE)
    assert not bad and len(data) == 3 and calls == [1]
    vae, te = models["vae"], models["text_encoder"]
    with torch.no_grad():
        for spec, sample in zip(specs, (data[i] for i in range(3))):
            latents = vae.encode(load_clip(spec.video, 5, 32, 32)[None])[0]
            refs = encode_references(vae, [open_reference(p) for p in spec.references], 32, 32)[0]
            context = te.encode([spec.caption])[0]
            # safetensors stores float32 exactly: the cached tensors are the computed ones
            for got, want in ((sample.latents, latents), (sample.ref_latents, refs), (sample.context, context)):
                torch.testing.assert_close(got, want, rtol=0, atol=0)
        torch.testing.assert_close(data.dropped_context, te.encode([""])[0], rtol=0, atol=0)
    assert data.bucket(0) == (2, 4, 4, 1) and data.bucket(1) == (2, 4, 4, 2)

    again, _ = build_cache(specs, tmp_path / "cache", encoders=encoders_of(models, calls),
                           fingerprints=fingerprints_of(models), **SIZE)
    assert calls == [1] and again.files == data.files  # nothing re-encoded, models never loaded
    read_only, _ = build_cache(specs, tmp_path / "cache", encoders=None, fingerprints=None, in_memory=True, **SIZE)
    torch.testing.assert_close(read_only[2].latents, data[2].latents, rtol=0, atol=0)

    (root / "clip_01" / "caption.txt").write_text("a different caption, a longer one")
    changed, _ = build_cache(read_dataset(root)[0], tmp_path / "cache", encoders=encoders_of(models, calls),
                             fingerprints=fingerprints_of(models), **SIZE)
    assert calls == [1, 1] and changed.files[0] == data.files[0] and changed.files[1] != data.files[1]
    with pytest.raises(ValueError, match="give the VAE and the text encoder"):
        build_cache(specs, tmp_path / "cache", encoders=None, fingerprints=None, **{**SIZE, "width": 48})


def test_a_generator_can_feed_raw_samples(tmp_path, models):
    gen = torch.Generator().manual_seed(0)
    video = torch.rand(3, 5, 32, 32, generator=gen) * 2 - 1
    refs = (Image.fromarray(np.full((40, 30, 3), 200, np.uint8)),)
    raw = [RawSample("g0", video, refs, "a red square moves up"),
           RawSample("wrong_size", video[:, :, :16], refs, "x")]
    data, bad = build_cache(raw, tmp_path / "cache", encoders=encoders_of(models), fingerprints=fingerprints_of(models),
                            **SIZE)
    assert [data[i].name for i in range(len(data))] == ["g0"] and [b.name for b in bad] == ["wrong_size"]
    assert data[0].latents.shape == (16, 2, 4, 4)


def test_fingerprints_change_with_the_weights_and_the_file(tmp_path, models):
    vae = models["vae"]
    before, kept = module_fingerprint(vae), vae.encoder.conv1.weight.detach().clone()
    with torch.no_grad():
        vae.encoder.conv1.weight.view(-1)[0] += 1.0
    try:
        assert module_fingerprint(vae) != before
    finally:
        with torch.no_grad():
            vae.encoder.conv1.weight.copy_(kept)
    assert module_fingerprint(vae) == before
    path = Path(models["root"]) / "copy.bin"
    path.write_bytes(b"abc")
    first = file_fingerprint(path)
    path.write_bytes(b"abcd")
    assert file_fingerprint(path) != first


def test_the_miniature_worlds_dataset_is_read_and_cached_as_it_is_written(tmp_path, models):
    """phantom_core.world writes its triplets in this trainer's manifest format: they are read with no bad sample
    and cached (clips cut to 5 frames, scaled to 32x32)."""
    from phantom_core.world.dataset import write_world_dataset

    root = write_world_dataset(tmp_path / "world", "train", seed=0, count=2)
    specs, bad = read_dataset(root, contained=True)
    assert len(specs) == 2 and not bad and all(1 <= len(s.references) <= 3 and s.caption for s in specs)
    data, bad = build_cache(specs, tmp_path / "cache", encoders=encoders_of(models),
                            fingerprints=fingerprints_of(models), **SIZE)
    assert len(data) == 2 and not bad and data[0].latents.shape == (16, 2, 4, 4)
