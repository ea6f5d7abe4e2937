"""Training the paper's MMDiT with the general trainer: scratch presets and checkpoints detected by their keys, the
references' CLIP features cached and fed, dropout of both encodings, and the final file loading with load_mmdit."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from phantom_core.mmdit.clip import build_vision_tower, encode_clip_references, load_clip_vision
from phantom_core.mmdit.clip_keys import CLIP_VISION_PRESETS
from phantom_core.mmdit.config import MMDIT_PRESETS, MMDiTConfig
from phantom_core.mmdit.load import load_mmdit
from phantom_core.mmdit.model import PhantomMMDiT
from phantom_core.training.cache import InMemoryLatents, RawSample, build_cache, module_fingerprint
from phantom_core.training.checkpoint import WEIGHTS_FILE
from phantom_core.training.clip_features import ClipFeatures, file_clip_features, has_clip_features
from phantom_core.training.config import load_config
from phantom_core.training.loop import train
from phantom_core.training.model import build_model, check_preset
from phantom_core.training.objective import drop_conditions, flow_matching_loss, reference_inputs
from phantom_core.wan.umt5 import load_text_encoder
from phantom_core.wan.vae import load_vae
from tests.support.files import make_tiny_files
from tests.support.training import micro_dit, random_latents, write_dataset

pytestmark = pytest.mark.usefixtures("single_thread")
MICRO = MMDiTConfig(dim=64, num_heads=2, num_layers=2, ffn_dim=128, text_dim=32, text_len=16, clip_dim=24,
                    window=(2, 2, 2), freq_dim=32)
CLIP_TOKENS = 3


def micro_mmdit(seed: int = 0, config: MMDiTConfig = MICRO) -> PhantomMMDiT:
    model = PhantomMMDiT(config, device="meta").to_empty(device="cpu")
    gen = torch.Generator().manual_seed(seed)
    model.init_weights(gen)
    nn.init.normal_(model.final_layer.linear.weight, std=0.02, generator=gen)  # gradients reach every block
    return model


def with_clip(data: InMemoryLatents, seed: int = 0, width: int = 24, offset: float = 0.0) -> InMemoryLatents:
    """``data`` with random CLIP features; ``offset`` shifts the latents (a mean to learn: a loss that falls fast)."""
    gen = torch.Generator().manual_seed(seed)
    samples = [replace(s, latents=s.latents * 0.2 + offset,
                       ref_clip=torch.randn(s.ref_latents.shape[1], CLIP_TOKENS, width, generator=gen))
               if offset else replace(s, ref_clip=torch.randn(s.ref_latents.shape[1], CLIP_TOKENS, width,
                                                               generator=gen)) for s in data.samples]
    return InMemoryLatents(samples, data.dropped_context)


def settings(tmp_path, **kw):
    return load_config(None, **{"mode": "full", "steps": 4, "learning_rate": 1e-3, "batch_size": 2,
                                "gradient_checkpointing": False, "out": str(tmp_path / "mmdit.safetensors"),
                                "checkpoint_every": 100, "device": "cpu", **kw})


class Spy(nn.Module):
    """Records the reference inputs each forward gets."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.config, self.seen = model, model.config, []

    def forward(self, x, t, context, ref_latents=None, ref_clip=None):
        self.seen.append((None if ref_latents is None else ref_latents.detach().clone(),
                          None if ref_clip is None else ref_clip.detach().clone()))
        return self.model(x, t, context, ref_latents, ref_clip=ref_clip)


def fixed_loss(model, data) -> float:
    """The loss of the first 4 samples at fixed sigmas and noise (no dropout)."""
    gen = torch.Generator().manual_seed(7)
    batch = [data[i] for i in range(4)]
    x0 = torch.stack([s.latents for s in batch])
    refs, clip = torch.stack([s.ref_latents for s in batch]), torch.stack([s.ref_clip for s in batch])
    context = torch.stack([s.context[:3] for s in batch])
    with torch.no_grad():
        return float(flow_matching_loss(model, x0, refs, context, torch.tensor([0.2, 0.4, 0.6, 0.8]),
                                        torch.randn(x0.shape, generator=gen), clip))


def test_a_few_mmdit_steps_with_clip_features_lower_the_loss(tmp_path):
    data = with_clip(random_latents(8, seed=1), offset=1.5)
    model = micro_mmdit(1)
    before = fixed_loss(model, data)
    train(settings(tmp_path, steps=30, text_dropout=0.2, reference_dropout=0.1, vae_reference_dropout=0.7),
          dataset=data, model=model)
    after = fixed_loss(model, data)
    assert after < 0.9 * before, (before, after)  # tolerance: at least 10% lower after 30 steps


def test_reference_dropout_zeroes_both_encodings_and_vae_dropout_only_the_latents():
    gen = torch.Generator().manual_seed(0)
    refs, clip = torch.randn(4, 16, 2, 4, 4, generator=gen), torch.randn(4, 2, 3, 8, generator=gen)
    context, dropped = torch.randn(4, 5, 8, generator=gen), torch.randn(2, 8, generator=gen)
    drop_u, vae_u = torch.tensor([0.05, 0.5, 0.5, 0.95], dtype=torch.float64), torch.tensor([0.9, 0.1, 0.9, 0.9])
    _, dropped_refs = drop_conditions(context, refs, dropped, drop_u, 0.2, 0.1)
    lat, feats = reference_inputs(dropped_refs, clip, drop_u, vae_u, 0.1, 0.7)
    assert lat[0].abs().max() == 0 and feats[0].abs().max() == 0  # v_neg: both zero
    assert lat[1].abs().max() == 0 and torch.equal(feats[1], clip[1])  # VAE alone dropped, CLIP kept
    assert torch.equal(lat[2:], refs[2:]) and torch.equal(feats[2:], clip[2:])
    none, feats = reference_inputs(dropped_refs, clip, drop_u, vae_u, 0.1, 0.0, vae_references=False)
    assert none is None and feats[0].abs().max() == 0
    with pytest.raises(ValueError, match="no CLIP features"):
        reference_inputs(dropped_refs, None, drop_u, vae_u, 0.1, 0.7)


def test_clip_dropout_zeroes_the_clip_features_alone_at_the_other_end_of_the_vae_draw():
    gen = torch.Generator().manual_seed(1)
    refs, clip = torch.randn(4, 16, 2, 4, 4, generator=gen), torch.randn(4, 2, 3, 8, generator=gen)
    drop_u = torch.tensor([0.5, 0.5, 0.5, 0.05], dtype=torch.float64)  # the last: v_neg (reference_dropout 0.1)
    vae_u = torch.tensor([0.1, 0.5, 0.9, 0.5])
    refs_in = refs.clone()
    refs_in[3] = 0  # as drop_conditions leaves the v_neg sample
    lat, feats = reference_inputs(refs_in, clip, drop_u, vae_u, 0.1, 0.3, clip_reference_dropout=0.4)
    assert lat[0].abs().max() == 0 and torch.equal(feats[0], clip[0])  # u 0.1 < 0.3: the VAE latents alone
    assert torch.equal(lat[1], refs[1]) and torch.equal(feats[1], clip[1])  # 0.3 <= u < 0.6: both kept
    assert torch.equal(lat[2], refs[2]) and feats[2].abs().max() == 0  # u 0.9 >= 1 - 0.4: the CLIP features alone
    assert lat[3].abs().max() == 0 and feats[3].abs().max() == 0  # v_neg: both, whatever the draw
    for u in torch.linspace(0, 0.999, 50):  # never both to the two encoding dropouts, even at a sum of 1
        lat, feats = reference_inputs(refs, clip, drop_u[:1], u[None], 0.1, 0.6, clip_reference_dropout=0.4)
        assert lat.abs().max() > 0 or feats.abs().max() > 0
    for kwargs, detail in ((dict(ref_clip=None, vae_reference_dropout=0.0), "CLIP features missing"),
                           (dict(vae_references=False), "vae_references is False"),
                           (dict(vae_reference_dropout=0.7), "vae_reference_dropout (0.7) + clip_reference_dropout")):
        args = dict(ref_latents=refs, ref_clip=clip, drop_u=drop_u, vae_drop_u=vae_u, reference_dropout=0.1,
                    vae_reference_dropout=0.3, clip_reference_dropout=0.4) | kwargs
        with pytest.raises(ValueError, match="clip_reference_dropout is 0.4: it needs CLIP features") as err:
            reference_inputs(**args)
        assert detail in str(err.value)
    for overrides, message in ((dict(vae_reference_dropout=0.7, clip_reference_dropout=0.4),
                                "clip_reference_dropout is 0.4; valid: at most 1 - vae_reference_dropout"),
                               (dict(vae_references=False, clip_reference_dropout=0.4),
                                "valid: 0 without VAE references")):
        with pytest.raises(ValueError, match=re.escape(message)):
            load_config(None, **overrides)


def test_the_loop_feeds_zeroed_features_and_no_vae_latents_to_the_clip_only_variant(tmp_path):
    data = with_clip(random_latents(4, seed=2))
    spy = Spy(micro_mmdit(2))
    train(settings(tmp_path / "a", steps=2, reference_dropout=1.0, text_dropout=1.0), dataset=data, model=spy)
    assert spy.seen and all(r.abs().max() == 0 and c.abs().max() == 0 for r, c in spy.seen)
    spy.seen.clear()
    train(settings(tmp_path / "b", steps=2, reference_dropout=0.0, vae_references=False), dataset=data, model=spy)
    assert all(r is None and c is not None and c.abs().max() > 0 for r, c in spy.seen)


def test_a_clip_branch_model_without_features_is_refused(tmp_path):
    with pytest.raises(ValueError, match="give clip_vision"):
        train(settings(tmp_path, steps=1), dataset=random_latents(4), model=micro_mmdit())


def test_the_saved_mmdit_loads_with_load_mmdit_and_gives_the_same_output(tmp_path):
    data = with_clip(random_latents(4, seed=3))
    model = micro_mmdit(3)
    result = train(settings(tmp_path, steps=2), dataset=data, model=model)
    loaded = load_mmdit(result.out)
    assert loaded.config == MICRO
    gen = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 16, 2, 4, 4, generator=gen), torch.randn(1, 5, 32, generator=gen)
    refs, clip = torch.randn(1, 16, 1, 4, 4, generator=gen), torch.randn(1, 1, CLIP_TOKENS, 24, generator=gen)
    with torch.no_grad():
        want = model.eval()(x, torch.tensor([500.0]), ctx, refs, ref_clip=clip)
        got = loaded(x, torch.tensor([500.0]), ctx, refs, ref_clip=clip)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)  # same float32 weights, same code path


def test_scratch_mmdit_presets_and_checkpoints_are_built_by_name_and_keys(tmp_path):
    check_preset("mmdit-tiny")
    with pytest.raises(ValueError, match="mmdit-world"):
        check_preset("mmdit-nope")
    model = build_model(settings(tmp_path, dit="scratch:mmdit-tiny"), torch.device("cpu"))
    assert isinstance(model, PhantomMMDiT) and model.config == MMDIT_PRESETS["tiny"] and model.training
    path = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    again = build_model(settings(tmp_path, dit=str(path)), torch.device("cpu"))
    assert isinstance(again, PhantomMMDiT) and all(p.requires_grad for p in again.parameters())


def test_the_cache_holds_ref_clip_added_once_from_the_tower(tmp_path):
    files = make_tiny_files(tmp_path / "models", 0, [])
    vae, te = load_vae(files["vae"]), load_text_encoder(files["text_encoder"])
    tower_path = tmp_path / "clip.safetensors"
    torch.manual_seed(0)
    tower = build_vision_tower(CLIP_VISION_PRESETS["tiny"])
    save_file({f"visual.{k}": v.contiguous() for k, v in tower.state_dict().items()}, str(tower_path))
    gen = torch.Generator().manual_seed(0)
    from PIL import Image

    images = [Image.fromarray((torch.rand(24, 20 + 4 * k, 3, generator=gen) * 255).byte().numpy()) for k in range(2)]
    raw = [RawSample(f"s{k}", torch.rand(3, 5, 32, 32, generator=gen) * 2 - 1, tuple(images[: k + 1]), "a cat")
           for k in range(2)]
    kw = dict(encoders=lambda: (vae, te), fingerprints={"vae": module_fingerprint(vae),
                                                        "text_encoder": module_fingerprint(te)},
              frames=5, width=32, height=32)
    plain, _ = build_cache(raw, tmp_path / "cache", **kw)
    assert plain[0].ref_clip is None  # no tower: the Phantom-Wan cache as before
    features = file_clip_features(str(tower_path), "tokens", torch.device("cpu"))
    loads = []
    counted = ClipFeatures(lambda: loads.append(1) or features.load(), features.fingerprint)
    data, bad = build_cache(raw, tmp_path / "cache", clip=counted, **kw)
    assert not bad and data.files == plain.files and loads == [1]
    want = encode_clip_references(load_clip_vision(tower_path), list(raw[1].references))[0]
    assert data[1].ref_clip.shape == (2, 17, 128)
    torch.testing.assert_close(data[1].ref_clip, want, rtol=0, atol=0)  # float32 stored exactly
    torch.testing.assert_close(data[1].latents, plain[1].latents, rtol=0, atol=0)
    build_cache(raw, tmp_path / "cache", clip=counted, **kw)
    assert loads == [1]  # cached: the tower is not loaded again


def test_a_checkpoint_written_before_the_mmdit_fields_still_resumes(tmp_path):
    data = random_latents(4, seed=4, text_dim=32)
    train(settings(tmp_path, steps=2, checkpoint_every=1), dataset=data, model=micro_dit(4))
    for path in (tmp_path / "mmdit.run" / "checkpoints").glob("step_*/config.json"):
        old = {k: v for k, v in json.loads(path.read_text()).items()
               if k not in ("clip_vision", "clip_output", "vae_reference_dropout", "vae_references")}
        path.write_text(json.dumps(old))
    result = train(settings(tmp_path, steps=3, checkpoint_every=1, resume=True), dataset=data, model=micro_dit(4))
    assert result.steps == 3 and len(result.losses) == 3


def test_a_dataset_folder_trains_a_scratch_mmdit_with_cached_clip_features_and_validates(tmp_path):
    files = make_tiny_files(tmp_path / "models", 0, [(40, 32)])
    torch.manual_seed(0)
    tower = build_vision_tower(CLIP_VISION_PRESETS["tiny"])  # tokens 128 wide: MMDIT_PRESETS["tiny"].clip_dim
    clip_path = tmp_path / "clip.safetensors"
    save_file({f"visual.{k}": v.contiguous() for k, v in tower.state_dict().items()}, str(clip_path))
    root = write_dataset(tmp_path / "data", samples=2, frames=5, size=(32, 32))
    config = settings(tmp_path, dataset=str(root), dit="scratch:mmdit-tiny", vae=str(files["vae"]),
                      text_encoder=str(files["text_encoder"]), clip_vision=str(clip_path), frames=5,
                      width=32, height=32, batch_size=1, steps=2, vae_reference_dropout=0.7, validate_every=2,
                      validation_prompt="a cat", validation_references=(str(files["ref0"]),), validation_steps=2)
    result = train(config)
    assert load_mmdit(result.out).config == MMDIT_PRESETS["tiny"]
    cached = sorted(config.cache_path.glob("clip_*.safetensors"))
    assert len(cached) == 2 and all(has_clip_features(p, file_clip_features(config.clip_vision, "tokens",
                                                                           torch.device("cpu")).fingerprint)
                                    for p in cached)
    assert (result.run_dir / "validation" / "step_000002.mp4").is_file()


class Stop(Exception):
    """Raised by the step callback: the run is interrupted."""


def test_an_interrupted_mmdit_run_resumes_with_its_buffers(tmp_path):
    """An MMDiT checkpoint holds the model's persistent buffers (window_size, text_len, the pos_embed table) beside
    its trainable parameters; resuming accepts and loads them, and the resumed run ends where the whole run does
    (same code path and thread count: equal within 1e-6)."""
    config = replace(MICRO, pos_embed_max=4)
    data = with_clip(random_latents(6, seed=2))

    def run(name, callback=None, **kw):
        return train(settings(tmp_path, steps=4, checkpoint_every=2, out=str(tmp_path / f"{name}.safetensors"), **kw),
                     dataset=data, model=micro_mmdit(3, config), callback=callback)

    whole = run("whole")

    def interrupt(step, total, loss):
        if step == 3:
            raise Stop
    with pytest.raises(Stop):
        run("cut", interrupt)
    stored = load_file(str(next((tmp_path / "cut.run" / "checkpoints").glob("step_*")) / WEIGHTS_FILE))
    assert {"pos_embed", "window_size", "text_len"} <= set(stored)
    resumed = run("cut", resume=True)
    assert resumed.steps == 4
    assert all(abs(a - b) < 1e-6 for a, b in zip(resumed.losses[-1:], whole.losses[-1:]))
    a, b = load_mmdit(whole.out), load_mmdit(resumed.out)
    assert a.config.pos_embed_max == 4
    assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
