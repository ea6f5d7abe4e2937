"""Spatially tiled VAE decode: tile layout and blend weights, exactness on a pointwise decoder, PSNR against the
untiled decode of the tiny random-weight Wan VAE, largest activation, validation."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from einops import repeat

from phantom_core.wan.latents import normalize_latents
from phantom_core.wan.vae import VAE_PRESETS, load_vae
from phantom_core.wan.vae_tiling import MIN_TILE_LATENT, axis_weights, check_tiling, decode_tiled, tile_starts
from tests.support.weights import random_vae_state_dict

TINY = VAE_PRESETS["tiny"]
LAYOUTS = [(24, 16, 8), (32, 16, 8), (13, 5, 2), (9, 4, 3), (40, 32, 8), (7, 6, 0), (17, 8, 0), (10, 4, 1)]


@pytest.fixture(scope="module")
def vae():
    """The tiny Wan VAE with the random weights test_wan_vae uses (parity with ComfyUI is checked there)."""
    return load_vae(random_vae_state_dict(TINY))


def raw_latents(n: int, h: int, w: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, 16, n, h, w, generator=torch.Generator().manual_seed(seed))


def psnr(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """PSNR in dB of pixels clamped to [-1, 1] (what users see); the peak-to-peak range is 2."""
    mse = (ours.clamp(-1, 1) - ref.clamp(-1, 1)).pow(2).mean().item()
    return 10 * math.log10(4.0 / mse)


class PointwiseDecoder:
    """A stand-in VAE whose every output pixel depends on one latent cell only (a 16 -> 3 channel mix, nearest
    x8 upsampling, 1 + 4(F-1) frames with a per-sub-frame gain). Tiling must then reproduce it exactly; it also
    records the latent shape of every `decode_raw` call."""

    config = SimpleNamespace(spatial_stride=8, temporal_stride=4)

    def __init__(self) -> None:
        self.mix = torch.randn(3, 16, generator=torch.Generator().manual_seed(9))
        self.calls: list[tuple[int, ...]] = []

    def decode_raw(self, latents: torch.Tensor, progress=None) -> torch.Tensor:
        self.calls.append(tuple(latents.shape))
        for k in range(latents.shape[2]):  # the decode_raw contract: one report per latent frame
            if progress is not None:
                progress(k + 1, latents.shape[2])
        pix = torch.einsum("dc,bcfhw->bdfhw", self.mix, latents)  # (B, 3, F, h, w)
        gains = torch.tensor([1.0, 2.0, 3.0, 4.0]).repeat(pix.shape[2] - 1).view(1, 1, -1, 1, 1)  # 4 frames differ
        later = repeat(pix[:, :, 1:], "b d f h w -> b d (f k) h w", k=4) * gains  # (B, 3, 4(F-1), h, w)
        video = torch.cat([pix[:, :, :1], later], 2)  # (B, 3, 1 + 4(F-1), h, w)
        return repeat(video, "b d t h w -> b d t (h i) (w j)", i=8, j=8)  # (B, 3, T, 8h, 8w)


# --- layout and weights --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "tile", "overlap"), LAYOUTS)
def test_tile_starts_cover_with_requested_overlap(size, tile, overlap):
    starts = tile_starts(size, tile, overlap)
    assert starts[0] == 0 and starts[-1] + tile == size  # first at 0, last flush with the end
    overlaps = [a + tile - b for a, b in zip(starts, starts[1:])]
    assert all(o >= overlap for o in overlaps), overlaps  # never less overlap than asked, no gaps
    assert max(overlaps) - min(overlaps) <= 1  # spread evenly
    fewer = len(starts) - 1  # and the fewest tiles: one fewer could not reach the end with that overlap
    assert fewer * tile - (fewer - 1) * overlap < size
    assert tile_starts(size, size, overlap) == [0] and tile_starts(size, size + 5, overlap) == [0]


@pytest.mark.parametrize("blend", ["linear", "cosine"])
@pytest.mark.parametrize(("size", "tile", "overlap"), LAYOUTS)
def test_axis_weights_sum_to_one_and_ramp_to_edges(size, tile, overlap, blend):
    starts = tile_starts(size, tile, overlap)
    weights = axis_weights(starts, tile, size, 8, blend)
    total = torch.zeros(size * 8, dtype=torch.float64)
    for start, w in zip(starts, weights):
        assert w.shape == (tile * 8,) and (w > 0).all() and (w <= 1 + 1e-12).all()
        total[start * 8 : (start + tile) * 8] += w
    assert torch.allclose(total, torch.ones_like(total), atol=1e-12)
    for i, w in enumerate(weights):  # weight ~0 at an edge shared with a neighbour, 1 at an outer border
        assert (w[0] < 0.1) if i > 0 else (w[0] == 1)
        assert (w[-1] < 0.1) if i < len(weights) - 1 else (w[-1] == 1)


# --- exactness where tiling cannot change anything ----------------------------------------------------------------


@pytest.mark.parametrize("blend", ["linear", "cosine"])
@pytest.mark.parametrize(("h", "w", "tile", "overlap"), [(9, 13, 5, 2), (12, 20, (6, 8), 3), (7, 30, 4, 0)])
def test_tiling_is_exact_for_a_pointwise_decoder(h, w, tile, overlap, blend):
    dec = PointwiseDecoder()
    z = raw_latents(3, h, w, batch=2)
    ref = dec.decode_raw(z)
    dec.calls.clear()
    out = decode_tiled(dec, z, tile, overlap, blend)
    assert out.shape == ref.shape == (2, 3, 9, 8 * h, 8 * w)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5), (out - ref).abs().max()
    th, tw = check_tiling(tile, overlap)
    n_tiles = len(tile_starts(h, th, overlap)) * len(tile_starts(w, tw, overlap))
    assert len(dec.calls) == n_tiles > 1
    assert all(c == (2, 16, 3, th, tw) for c in dec.calls)  # every tile: all frames, one full temporal pass


def test_one_tile_covering_everything_is_exactly_untiled(vae):
    z = raw_latents(1, 4, 6)
    ref = vae.decode_raw(z)
    # the same maths on a sliced tensor (another memory layout): equal to fp32 rounding, not bitwise
    torch.testing.assert_close(vae.decode_raw(z, tile_latent=(4, 6), overlap_latent=3), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(decode_tiled(vae, z, (16, 9), 3), ref, rtol=1e-5, atol=1e-6)
    clamped = vae.decode(normalize_latents(z), tile_latent=8, overlap_latent=2)  # the normalized-latent entry
    assert torch.allclose(clamped, ref.clamp(-1, 1), atol=1e-5)


# --- the real decoder ---------------------------------------------------------------------------------------------


def largest_activation(vae, run) -> tuple[torch.Tensor, int]:
    """Run ``run()`` while recording the largest output (elements) of any decoder module; (result, that size)."""
    sizes = [0]

    def hook(_module, _inputs, output):
        if isinstance(output, torch.Tensor):
            sizes[0] = max(sizes[0], output.numel())

    handles = [m.register_forward_hook(hook) for m in vae.decoder.modules()]
    try:
        return run(), sizes[0]
    finally:
        for handle in handles:
            handle.remove()


def test_tiled_decode_matches_untiled_closely(vae):
    """24 x 24 latent cells (192 x 192 px), 2 latent frames, 16-cell tiles with 8 cells of overlap: 2 x 2 tiles.

    Threshold 27.5 dB: a random-weight decoder is a worst case for tiling. Perturbing one latent cell of this VAE
    changes its output by O(1) up to ~8 cells away (its 20-odd 3x3 convs and the frame-wide middle attention all
    mix at full strength, where trained decoders are much more local), so even the middle of an 8-cell overlap
    (4 cells from a tile edge) carries edge error. Measured over the clip: 29.5 dB (28.6 dB with latent seed 1),
    so the threshold sits ~1 dB below the worst seen; first frame ~35 dB, later frames lower because the causal
    time convs carry edge error forward. Abutting 8-cell tiles (no overlap; frame 0 only to keep the test cheap,
    the decoder being causal) give ~21 dB there, so a broken blend or placement cannot pass.
    """
    z = raw_latents(2, 24, 24, seed=4)
    ref, act_full = largest_activation(vae, lambda: vae.decode_raw(z))
    out, act_tile = largest_activation(vae, lambda: vae.decode_raw(z, tile_latent=16, overlap_latent=8))
    abutting = vae.decode_raw(z[:, :, :1], tile_latent=8, overlap_latent=0)  # 3 x 3 tiles, hard seams, frame 0
    assert out.shape == ref.shape == (1, 3, 5, 192, 192) and out.dtype == torch.float32
    assert ref.std() > 0.2 and (ref.abs() < 1).float().mean() > 0.9  # a busy picture, mostly unclamped
    db = psnr(out, ref)
    per_frame = [round(psnr(out[:, :, t], ref[:, :, t]), 1) for t in range(ref.shape[2])]
    db_abutting = psnr(abutting, ref[:, :, :1])
    report = f"tiled vs untiled PSNR {db:.2f} dB, per frame {per_frame}; abutting tiles frame 0 {db_abutting:.2f} dB"
    assert db >= 27.5, report
    assert per_frame[0] >= db_abutting + 10.0, report  # overlap and blending are what make it close
    ratio = act_tile / act_full  # the largest activation scales with the tile area, not the frame
    assert ratio <= (16 * 16) / (24 * 24) + 1e-9, f"largest decoder activation tiled/untiled = {ratio:.3f}"
    print(f"\n{report}; largest decoder activation tiled/untiled {ratio:.3f}")


def test_tiled_shapes_for_non_divisible_sizes_and_batch(vae):
    z = normalize_latents(raw_latents(2, 6, 9, seed=5, batch=2))  # 6 x 9 cells, (4, 5)-cell tiles: 2 x 2 tiles
    out = vae.decode(z, tile_latent=(4, 5), overlap_latent=1, blend="cosine")
    assert out.shape == (2, 3, 5, 48, 72) and torch.isfinite(out).all()
    assert out.min() >= -1 and out.max() <= 1
    single = vae.decode(z[1:], tile_latent=(4, 5), overlap_latent=1, blend="cosine")
    assert torch.allclose(out[1:], single, atol=1e-5)  # batch items stay independent
    assert not torch.allclose(out[0], out[1], atol=0.1)


# --- validation ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tile", "overlap", "blend", "needle"),
    [(MIN_TILE_LATENT - 1, 0, "linear", r"tile_latent=3; each side must be at least 4"),
     ((8, 2), 1, "linear", r"tile_latent=\(8, 2\)"), ((8,), 1, "linear", r"tile_latent=\(8,\)"),
     (8.0, 1, "linear", "tile_latent=8.0"), (8, 8, "linear", r"overlap_latent=8; it must be an int in \[0, 7\]"),
     ((16, 6), 6, "linear", r"\[0, 5\]"), (8, -1, "linear", "overlap_latent=-1"),
     (8, 2, "gauss", "blend='gauss'")],
)  # fmt: skip
def test_bad_tiling_is_named(vae, tile, overlap, blend, needle):
    z = raw_latents(1, 4, 4)
    with pytest.raises(ValueError, match=needle):
        vae.decode_raw(z, tile_latent=tile, overlap_latent=overlap, blend=blend)
    with pytest.raises(ValueError, match=needle):  # checked before anything is decoded, even if one tile fits
        decode_tiled(PointwiseDecoder(), z, tile, overlap, blend)


def test_bad_latents_are_named_when_tiled(vae):
    with pytest.raises(ValueError, match="latents has shape"):
        vae.decode_raw(torch.zeros(1, 8, 2, 4, 6), tile_latent=4, overlap_latent=1)
    with pytest.raises(ValueError, match="latents has shape"):
        decode_tiled(vae, torch.zeros(16, 2, 4, 6), 4, 1)


# --- progress -----------------------------------------------------------------------------------------------------


def test_progress_is_reported_per_latent_frame_and_tile(vae):
    """decode_raw reports (done, total) after each latent frame; tiled, after each frame of each tile, counting
    on across tiles up to tiles x F; an exception raised by the callback stops the decode (an interrupt)."""
    z = raw_latents(3, 6, 9, seed=6)  # 3 latent frames
    seen: list[tuple[int, int]] = []
    vae.decode_raw(z, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(1, 3), (2, 3), (3, 3)]
    seen.clear()
    vae.decode(normalize_latents(z), tile_latent=(4, 5), overlap_latent=1, progress=lambda *a: seen.append(a))
    assert seen == [(k, 12) for k in range(1, 13)]  # 2 x 2 tiles x 3 frames
    seen.clear()
    decode_tiled(PointwiseDecoder(), z, (4, 5), 1, progress=lambda *a: seen.append(a))
    assert seen == [(k, 12) for k in range(1, 13)]

    def stop(done: int, total: int) -> None:
        if done == 2:
            raise InterruptedError("stop")

    with pytest.raises(InterruptedError):
        vae.decode_raw(z, progress=stop)
