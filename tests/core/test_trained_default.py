"""The trained embedded default (phantom_core/tiny/trained/): complete, loadable in the official layouts, and
better than the untrained model on held-out world cases (a check that fails if the weights stop being trained)."""

from __future__ import annotations

import torch

from phantom_core.tiny.default import TRAINED_DIR, TRAINED_FILES, install_trained_default
from phantom_core.wan.dit import DIT_PRESETS
from phantom_core.wan.load import load_dit
from phantom_core.wan.umt5 import load_text_encoder
from phantom_core.wan.vae import VAE_PRESETS, load_vae


def test_install_copies_every_file_once(tmp_path) -> None:
    first = install_trained_default(tmp_path)
    assert set(first) == set(TRAINED_FILES)
    for name, path in first.items():
        assert path.read_bytes() == (TRAINED_DIR / path.name).read_bytes(), name
    stamp = {name: path.stat().st_mtime_ns for name, path in first.items()}
    second = install_trained_default(tmp_path)  # byte-identical files are kept, not rewritten
    assert {name: path.stat().st_mtime_ns for name, path in second.items()} == stamp
    assert sum((TRAINED_DIR / p.name).stat().st_size for p in first.values()) < 64 * 2**20  # the repository's budget


def test_files_load_as_the_presets_the_model_card_names(tmp_path) -> None:
    files = install_trained_default(tmp_path)
    dit = load_dit(files["dit"])
    assert dit.config == DIT_PRESETS["world"]
    vae = load_vae(files["vae"])
    assert vae.config == VAE_PRESETS["tiny"]
    encoder = load_text_encoder(files["text_encoder"])
    assert encoder.spec.d_model == dit.config.text_dim
    # the world tokenizer covers the grammar with real pieces (no byte fallback, no <unk>)
    pieces = encoder.tokenizer.encode("a small cat moves left and a large red striped star stays still on a blue "
                                      "background", out_type=str)
    assert not any(p.startswith("<0x") or p == "<unk>" for p in pieces), pieces
    assert all(torch.isfinite(p).all() for p in dit.parameters())


def _x0_error_ratio(dit, vae, text_encoder, sample, sigma: float = 0.6) -> float:
    """MSE of the DiT's one-step clean-latent estimate ``x_t - sigma v`` against the clean latents, relative to
    the MSE of ``x_t`` itself (1: no better than the noisy input; 0: perfect)."""
    from phantom_core.references import encode_references
    from phantom_core.world.dataset import sample_tensors

    item = sample_tensors(sample)
    with torch.no_grad():
        x0 = vae.encode(item.video[None])  # (1, 16, 5, 16, 16) normalized
        refs = encode_references(vae, list(sample.references), 128, 128, "letterbox")  # (1, 16, N, 16, 16)
        context = text_encoder.encode([sample.prompt])[0][None]  # (1, L, 64)
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(sample.index))
        x_t = (1 - sigma) * x0 + sigma * noise
        v = dit(x_t, torch.tensor([1000.0 * sigma]), context, refs)
    return float(((x_t - sigma * v - x0) ** 2).mean() / ((x_t - x0) ** 2).mean())


def test_the_trained_dit_denoises_held_out_cases_and_the_untrained_one_does_not(tmp_path) -> None:
    """The trained DiT's one-step estimate of the clean latents of held-out world cases is far closer than the noisy
    input (a check that fails if the committed weights stop being trained); the same network at its init is not."""
    from phantom_core.inference.pipeline import load_models
    from phantom_core.training.model import scratch_model
    from phantom_core.world.cases import CaseSet

    files = install_trained_default(tmp_path)
    dit, vae, text_encoder = load_models(files["dit"], files["vae"], files["text_encoder"], device="cpu")
    untrained = scratch_model("world", 0, torch.device("cpu")).eval()
    cases = list(CaseSet(single=2, multi=1))
    trained = [_x0_error_ratio(dit, vae, text_encoder, s) for s in cases]
    baseline = [_x0_error_ratio(untrained, vae, text_encoder, s) for s in cases]
    assert max(trained) < TRAINED_RATIO, trained
    assert min(baseline) > UNTRAINED_RATIO, baseline


TRAINED_RATIO, UNTRAINED_RATIO = 0.5, 0.8
