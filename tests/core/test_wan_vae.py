"""Wan2.1 VAE: parity with ComfyUI's `comfy.ldm.wan.vae.WanVAE`, key layout, causality, validation, loading."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import save_file

from phantom_core.wan.latents import (
    WAN21_LATENT_MEAN,
    WAN21_LATENT_STD,
    denormalize_latents,
    normalize_latents,
)
from phantom_core.wan.vae import VAE_PRESETS, WanVAE, WanVAEConfig, infer_vae_config, load_vae
from tests.support.weights import random_vae_state_dict

TINY = VAE_PRESETS["tiny"]
H, W = 32, 48  # encoded video, pixels (latents 4 x 6)
LH, LW = 2, 3  # decoded latents (video 16 x 24 px): decoding runs at full resolution, keep it cheap on the CPU
REL_TOL = 1e-4


def comfy_kwargs(cfg: WanVAEConfig) -> dict:
    """ComfyUI WanVAE constructor arguments for our config (as comfy/sd.py builds the Wan 2.1 VAE)."""
    return {"dim": cfg.dim, "z_dim": cfg.z_dim, "dim_mult": list(cfg.dim_mult), "num_res_blocks": cfg.num_res_blocks,
            "attn_scales": [], "temperal_downsample": list(cfg.temporal_downsample), "dropout": 0.0}  # fmt: skip


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return ((ours - ref).abs().max() / ref.abs().max()).item()


@pytest.fixture(scope="module")
def vae_mod(comfy_import):
    return comfy_import("comfy.ldm.wan.vae")


@pytest.fixture(scope="module")
def pair(vae_mod):
    """(ours, ComfyUI's) tiny VAE holding the same random weights."""
    sd = random_vae_state_dict(TINY)
    theirs = vae_mod.WanVAE(**comfy_kwargs(TINY))
    theirs.load_state_dict(sd, strict=True)
    return load_vae(sd), theirs.eval().requires_grad_(False)


def video(frames: int, seed: int = 1, batch: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, frames, H, W, generator=gen) * 2 - 1


def latents(n: int, seed: int = 2, batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, 16, n, LH, LW, generator=torch.Generator().manual_seed(seed))


# --- key layout ---------------------------------------------------------------------------------------------


def test_real_preset_has_comfy_key_set_and_shapes(vae_mod):
    ours = WanVAE(VAE_PRESETS["wan2.1"], device="meta").state_dict()
    with torch.device("meta"):
        theirs = vae_mod.WanVAE(**comfy_kwargs(VAE_PRESETS["wan2.1"])).state_dict()
    assert len(ours) == 194
    assert set(ours) == set(theirs)
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    assert all(v.is_meta for v in ours.values())
    assert ours["encoder.conv1.weight"].shape == (96, 3, 3, 3, 3)


def test_tiny_preset_has_same_keys_as_real():
    real = WanVAE(VAE_PRESETS["wan2.1"], device="meta").state_dict()
    tiny = WanVAE(TINY, device="meta").state_dict()
    assert list(tiny) == list(real)
    assert tiny["encoder.conv1.weight"].shape[0] == TINY.dim < 96


@pytest.mark.parametrize("name", ["wan2.1", "tiny"])
def test_infer_config_from_shapes(name):
    sd = WanVAE(VAE_PRESETS[name], device="meta").state_dict()
    assert infer_vae_config(sd) == VAE_PRESETS[name]
    other = dataclasses.replace(TINY, dim=4, dim_mult=(1, 2, 3), num_res_blocks=1, temporal_downsample=(True, False))
    assert infer_vae_config(WanVAE(other, device="meta").state_dict()) == other


# --- numerical parity with ComfyUI ---------------------------------------------------------------------------


@pytest.mark.parametrize("frames", [1, 5, 9])
def test_encode_matches_comfy(pair, frames):
    ours, theirs = pair
    x = video(frames)
    with torch.no_grad():
        ref = theirs.encode(x)  # raw posterior mean
        raw = ours.encode_raw(x)
        normalized = ours.encode(x)
    assert raw.shape == (1, 16, 1 + (frames - 1) // 4, H // 8, W // 8)
    assert ref.abs().max() > 0.1  # activations did not vanish
    assert relative_error(raw, ref) <= REL_TOL
    assert relative_error(denormalize_latents(normalized), ref) <= REL_TOL


@pytest.mark.parametrize("n_latent", [1, 2, 3])
def test_decode_matches_comfy(pair, n_latent):
    ours, theirs = pair
    z = latents(n_latent)
    with torch.no_grad():
        ref = theirs.decode(z)
        raw = ours.decode_raw(z)
        clamped = ours.decode(normalize_latents(z))
    assert raw.shape == (1, 3, 1 + 4 * (n_latent - 1), 8 * LH, 8 * LW)
    assert ref.abs().max() > 0.1
    assert relative_error(raw, ref) <= REL_TOL
    assert relative_error(clamped, ref.clamp(-1, 1)) <= REL_TOL
    assert clamped.min() >= -1 and clamped.max() <= 1


def test_parity_other_config_and_batch(vae_mod):
    cfg = dataclasses.replace(TINY, dim=12, num_res_blocks=1)  # another width, one block per stage, 2 videos
    sd = random_vae_state_dict(cfg, seed=3)
    theirs = vae_mod.WanVAE(**comfy_kwargs(cfg))
    theirs.load_state_dict(sd, strict=True)
    ours = WanVAE(cfg)
    ours.load_state_dict(sd, strict=True)
    x, z = video(5, batch=2)[..., :16, :24], latents(2, batch=2)
    with torch.no_grad():
        assert relative_error(ours.encode_raw(x), theirs.encode(x)) <= REL_TOL
        assert relative_error(ours.decode_raw(z), theirs.decode(z)) <= REL_TOL


# --- causality and per-call state ----------------------------------------------------------------------------


def test_repeated_calls_do_not_leak_cache(pair):
    ours, _ = pair
    x1, x9, z1, z3 = video(1), video(9, seed=5), latents(1), latents(3, seed=6)
    first_enc, first_dec = ours.encode(x1), ours.decode(z1)
    ours.encode(x9), ours.decode(z3)  # longer calls in between must leave nothing behind
    assert torch.equal(ours.encode(x1), first_enc)
    assert torch.equal(ours.decode(z1), first_dec)
    assert not any(isinstance(v, torch.Tensor) for m in ours.modules() for v in vars(m).values())


def test_encode_and_decode_are_causal(pair):
    ours, _ = pair
    x = video(9)
    assert torch.allclose(ours.encode(x[:, :, :5]), ours.encode(x)[:, :, :2], atol=1e-6)
    z = latents(3)
    assert torch.allclose(ours.decode(z[:, :, :2]), ours.decode(z)[:, :, :5], atol=1e-6)
    # and the future does matter: changing frame 8 changes latent frame 2
    x2 = x.clone()
    x2[:, :, 8] = 0
    assert not torch.allclose(ours.encode(x2)[:, :, 2], ours.encode(x)[:, :, 2])


# --- input validation ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "needle"),
    [((1, 3, 6, 32, 48), "T=6"), ((1, 3, 5, 30, 48), "height H=30"), ((1, 3, 5, 32, 44), "width W=44"),
     ((1, 4, 5, 32, 48), "video has shape"), ((3, 5, 32, 48), "video has shape")],
)  # fmt: skip
def test_bad_video_shape_is_named(pair, shape, needle):
    with pytest.raises(ValueError, match=needle):
        pair[0].encode(torch.zeros(shape))


def test_bad_latent_shape_is_named(pair):
    with pytest.raises(ValueError, match="latents has shape"):
        pair[0].decode(torch.zeros(1, 8, 2, 4, 6))


# --- loading -------------------------------------------------------------------------------------------------


def test_load_vae_rejects_missing_extra_and_misshaped_keys():
    sd = random_vae_state_dict(TINY)
    missing = {k: v for k, v in sd.items() if k != "decoder.head.2.bias"}
    with pytest.raises(ValueError, match=r"1 missing keys: decoder.head.2.bias$"):
        load_vae(missing)
    with pytest.raises(ValueError, match=r"1 unexpected keys: decoder.extra.weight$"):
        load_vae({**sd, "decoder.extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"1 wrong shapes: decoder.middle.0.residual.0.gamma \(32, 1, 1\) \(expected \(32, 1, 1, 1\)\)"):
        load_vae({**sd, "decoder.middle.0.residual.0.gamma": torch.ones(32, 1, 1)})
    with pytest.raises(ValueError, match="encoder.conv1.weight"):
        load_vae({k: v for k, v in sd.items() if k != "encoder.conv1.weight"})


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_load_vae_from_file(tmp_path, suffix):
    sd = random_vae_state_dict(TINY, seed=7)
    path = tmp_path / f"vae{suffix}"
    prefixed = {f"first_stage_model.{k}": v for k, v in sd.items()} | {"model.diffusion_model.x": torch.ones(2)}
    save_file(prefixed, str(path)) if suffix == ".safetensors" else torch.save(prefixed, path)
    vae = load_vae(path, dtype=torch.bfloat16)
    assert vae.config == TINY and not vae.training
    loaded = vae.state_dict()
    assert all(t.dtype == torch.bfloat16 and not t.requires_grad for t in loaded.values())
    assert all(torch.equal(loaded[k], v.to(torch.bfloat16)) for k, v in sd.items())
    out = vae.encode(video(1))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_vae(tmp_path / "nope.pth")


def test_load_vae_with_comfy_ops_layers(comfy_import, pair):
    ops = comfy_import("comfy.ops").disable_weight_init  # the host's layer classes, passed through `ops`
    sd = random_vae_state_dict(TINY)
    vae = load_vae(sd, ops=ops)
    assert isinstance(vae.encoder.conv1, ops.Conv3d) and isinstance(vae.encoder.middle[1].to_qkv, ops.Conv2d)
    x = video(5)
    # same maths, other memory layout: CPU kernels promise no bitwise equality there
    torch.testing.assert_close(vae.encode(x), pair[0].encode(x), rtol=1e-5, atol=1e-6)


# --- latent normalisation ------------------------------------------------------------------------------------


def test_latent_stats_match_comfy_wan21(comfy_import):
    fmt = comfy_import("comfy.latent_formats").Wan21()
    assert torch.equal(torch.tensor(WAN21_LATENT_MEAN), fmt.latents_mean.flatten())
    assert torch.equal(torch.tensor(WAN21_LATENT_STD), fmt.latents_std.flatten())
    raw = torch.randn(2, 16, 3, 4, 5)
    assert torch.allclose(normalize_latents(raw), fmt.process_in(raw), atol=1e-6)
    assert torch.allclose(denormalize_latents(raw), fmt.process_out(raw), atol=1e-6)


def test_normalize_denormalize_are_inverse():
    raw = torch.randn(2, 16, 3, 4, 5, dtype=torch.float64) * 3
    assert torch.allclose(denormalize_latents(normalize_latents(raw)), raw, atol=1e-12)
    assert torch.allclose(normalize_latents(denormalize_latents(raw)), raw, atol=1e-12)
    assert normalize_latents(raw).dtype == torch.float64
    assert not torch.allclose(normalize_latents(raw), raw)
    with pytest.raises(ValueError, match=r"raw latents has shape \(2, 8, 3, 4, 5\)"):
        normalize_latents(torch.zeros(2, 8, 3, 4, 5))
