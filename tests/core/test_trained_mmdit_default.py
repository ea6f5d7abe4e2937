"""The shipped MMDiT default (phantom_core/tiny/trained/, `make train-default-mmdit`): complete, loadable as the presets
its model card names, inside the repository's weight budget with the Phantom-Wan default, and trained (its one-step
estimate of held-out cases' clean latents beats the noisy input; the same network at its init does not)."""

from __future__ import annotations

import pytest
import torch

from phantom_core.tiny.default import (
    TRAINED_DIR,
    TRAINED_MMDIT_CLIP_OUTPUT,
    install_trained_mmdit_default,
    trained_mmdit_shipped,
)

pytestmark = pytest.mark.skipif(not trained_mmdit_shipped(), reason="the MMDiT default is not shipped: "
                                                                    "make train-default-mmdit")
TRAINED_RATIO, UNTRAINED_RATIO = 0.5, 0.8  # as tests/core/test_trained_default.py's


def test_files_load_as_the_presets_and_fit_the_budget(tmp_path) -> None:
    from dataclasses import replace

    from phantom_core.mmdit.clip import load_clip_vision
    from phantom_core.mmdit.clip_keys import CLIP_VISION_PRESETS
    from phantom_core.mmdit.config import MMDIT_PRESETS
    from phantom_core.mmdit.load import load_mmdit

    files = install_trained_mmdit_default(tmp_path)
    assert set(files) == {"dit", "clip_vision", "vae", "text_encoder"}
    dit = load_mmdit(files["dit"])
    # the world preset with the pooled text and reference vectors of its motion stage (MODEL_CARD_MMDIT.md, step 4)
    assert dit.config == replace(MMDIT_PRESETS["world"], pooled_text=True, pooled_reference=True)
    tower = load_clip_vision(files["clip_vision"])
    assert tower.config == CLIP_VISION_PRESETS["world"]
    assert all(torch.isfinite(p).all() for p in dit.parameters())
    shipped = sum(p.stat().st_size for p in TRAINED_DIR.glob("*.safetensors"))
    assert shipped < 64 * 2**20, shipped  # both defaults together: the repository's budget


def _x0_error_ratio(dit, vae, text_encoder, tower, sample, sigma: float = 0.6) -> float:
    """MSE of the one-step clean-latent estimate ``x_t - sigma v`` against the clean latents, relative to that of
    ``x_t`` itself (1: no better than the noisy input; 0: perfect)."""
    from phantom_core.mmdit.clip import encode_clip_references
    from phantom_core.references import encode_references
    from phantom_core.world.dataset import sample_tensors

    item = sample_tensors(sample)
    with torch.no_grad():
        x0 = vae.encode(item.video[None])  # (1, 16, 5, 16, 16) normalized
        refs = encode_references(vae, list(sample.references), 128, 128, "letterbox")  # (1, 16, N, 16, 16)
        ref_clip = encode_clip_references(tower, list(sample.references), TRAINED_MMDIT_CLIP_OUTPUT)  # (1, N, T, C)
        context = text_encoder.encode([sample.prompt])[0][None]  # (1, L, 64)
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(sample.index))
        x_t = (1 - sigma) * x0 + sigma * noise
        v = dit(x_t, torch.tensor([1000.0 * sigma]), context, refs, ref_clip=ref_clip)
    return float(((x_t - sigma * v - x0) ** 2).mean() / ((x_t - x0) ** 2).mean())


def test_the_trained_mmdit_denoises_held_out_cases_and_the_untrained_one_does_not(tmp_path) -> None:
    from phantom_core.inference.pipeline import load_clip_tower, load_models
    from phantom_core.training.model import scratch_model
    from phantom_core.world.cases import CaseSet

    files = install_trained_mmdit_default(tmp_path)
    dit, vae, text_encoder = load_models(files["dit"], files["vae"], files["text_encoder"], device="cpu")
    tower = load_clip_tower(files["clip_vision"])
    untrained = scratch_model("mmdit-world", 0, torch.device("cpu")).eval()
    cases = list(CaseSet(single=2, multi=1))
    trained = [_x0_error_ratio(dit, vae, text_encoder, tower, s) for s in cases]
    baseline = [_x0_error_ratio(untrained, vae, text_encoder, tower, s) for s in cases]
    assert max(trained) < TRAINED_RATIO, trained
    assert min(baseline) > UNTRAINED_RATIO, baseline
