"""The library's ``generate`` and the world's ``evaluate`` with the paper's MMDiT and its CLIP reference features.

Tiny random files written to a temporary folder: the MMDiT (``MMDIT_PRESETS["tiny"]``, and its "VAE only" variant
without a CLIP branch), a CLIP vision tower (``CLIP_VISION_PRESETS["tiny"]``, ComfyUI's transformers layout) and
the embedded tiny VAE and umT5. ``generate`` must equal the sampler driven directly (``sample_from_seed`` with
``ref_clip=encode_clip_references(...)``, then the VAE decode) to 1e-5 (absolute; pixels in [-1, 1]): the same
functions run in the same order on the CPU, so only a difference of inputs could break it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from phantom_core.__main__ import build_parser, main
from phantom_core.inference.parallel import ParallelRun
from phantom_core.inference.pipeline import generate, load_clip_tower, load_models
from phantom_core.inference.settings import GenerationSettings
from phantom_core.mmdit.clip import encode_clip_references
from phantom_core.mmdit.clip_keys import CLIP_VISION_PRESETS
from phantom_core.mmdit.config import MMDIT_PRESETS
from phantom_core.mmdit.load import load_any_dit
from phantom_core.mmdit.model import PhantomMMDiT
from phantom_core.references import encode_references
from phantom_core.sampling.loop import sample_from_seed
from phantom_core.tiny.default import write_tiny_default
from tests.support.networks import random_clip_state_dict, save_safetensors
from tests.support.weights import random_state_dict

pytestmark = pytest.mark.usefixtures("single_thread")
TOLERANCE = 1e-5
VAE_ONLY = replace(MMDIT_PRESETS["tiny"], clip_dim=0)
SETTINGS = GenerationSettings(prompt="a red ball rolls to the left", negative_prompt="blurry", width=32, height=32,
                              frames=5, steps=2, solver="euler", w_img=3.0, w_text=4.0, seed=5)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("generate_mmdit")
    paths = dict(write_tiny_default(root / "models"))
    paths["mmdit"] = save_safetensors(random_state_dict(PhantomMMDiT(MMDIT_PRESETS["tiny"], device="meta"), seed=21),
                                      root / "mmdit.safetensors")
    paths["mmdit_vae"] = save_safetensors(random_state_dict(PhantomMMDiT(VAE_ONLY, device="meta"), seed=23),
                                          root / "mmdit_vae.safetensors")
    paths["clip"] = save_safetensors(random_clip_state_dict(CLIP_VISION_PRESETS["tiny"], seed=22),
                                     root / "clip_vision.safetensors")
    return paths


@pytest.fixture(scope="module")
def models(files) -> tuple:
    """(MMDiT, VAE, text encoder, CLIP tower) loaded through the pipeline's loaders."""
    return (*load_models(files["mmdit"], files["vae"], files["text_encoder"]), load_clip_tower(files["clip"]))


@pytest.fixture(scope="module")
def references() -> list[Image.Image]:
    rng = np.random.default_rng(4)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((40, 48), (48, 32))]


def direct(dit, vae, text_encoder, images, ref_clip) -> torch.Tensor:
    """The video sampled and decoded by hand, as the sampler node does (``sample_from_seed(..., ref_clip=)``)."""
    context, context_neg = text_encoder.encode([SETTINGS.prompt, SETTINGS.negative_prompt])  # (L1, D), (L2, D)
    refs = encode_references(vae, images, SETTINGS.width, SETTINGS.height, SETTINGS.ref_mode)  # (1, 16, N, h, w)
    latents = sample_from_seed(dit, SETTINGS.seed, SETTINGS.latent_shape, refs, context[None], context_neg[None],
                               steps=SETTINGS.steps, shift=SETTINGS.shift, solver=SETTINGS.solver,
                               w_img=SETTINGS.w_img, w_text=SETTINGS.w_text, model_dtype=dit.compute_dtype,
                               ref_clip=ref_clip)  # (1, 16, F, h, w)
    return vae.decode(latents)  # (1, 3, T, H, W)


def test_the_dit_file_loads_as_an_mmdit_and_fits_the_vae_and_text_encoder(models):
    dit, _, _, tower = models
    assert isinstance(dit, PhantomMMDiT) and dit.config == MMDIT_PRESETS["tiny"]  # check_compatible passed
    assert tower.output_width("tokens") == dit.config.clip_dim


def test_generate_feeds_the_references_clip_features_like_the_sampler_driven_directly(models, references):
    dit, vae, text_encoder, tower = models
    video = generate(dit, vae, text_encoder, references, SETTINGS, clip_vision=tower)
    assert video.shape == (1, 3, SETTINGS.frames, SETTINGS.height, SETTINGS.width)
    ref_clip = encode_clip_references(tower, references, "tokens")  # (1, 2, 17, 128)
    torch.testing.assert_close(video, direct(dit, vae, text_encoder, references, ref_clip), rtol=0, atol=TOLERANCE)
    without = direct(dit, vae, text_encoder, references, None)
    assert (video - without).abs().max() > 100 * TOLERANCE  # the CLIP features did change the video


def test_a_missing_or_unfit_tower_is_refused_before_sampling(models, references):
    dit, vae, text_encoder, tower = models
    with pytest.raises(ValueError, match="clip_vision: none given.*128-wide"):
        generate(dit, vae, text_encoder, references, SETTINGS)
    with pytest.raises(ValueError, match="'pooled' features are 64 wide.*reads 128"):
        generate(dit, vae, text_encoder, references, SETTINGS, clip_vision=tower, clip_output="pooled")
    with pytest.raises(ValueError, match="clip_output is 'cls'; valid: tokens, pooled"):
        generate(dit, vae, text_encoder, references, SETTINGS, clip_vision=tower, clip_output="cls")
    with pytest.raises(ValueError, match="MMDiT runs in one process only"):  # refused before any collective
        generate(dit, vae, text_encoder, references, SETTINGS, clip_vision=tower,
                 parallel=ParallelRun("guidance", dist_context=None))


def test_a_vae_only_mmdit_needs_no_tower_and_ignores_one_with_a_warning(files, models, references, caplog):
    _, vae, text_encoder, tower = models
    dit, _, _ = load_models(files["mmdit_vae"], files["vae"], files["text_encoder"])
    assert dit.config.clip_dim == 0
    plain = generate(dit, vae, text_encoder, references, SETTINGS)
    with caplog.at_level(logging.WARNING, logger="phantom"):
        given = generate(dit, vae, text_encoder, references, SETTINGS, clip_vision=tower)
    assert any("CLIP features are ignored" in r.getMessage() for r in caplog.records)
    torch.testing.assert_close(given, plain, rtol=0, atol=TOLERANCE)


def test_block_swap_loads_an_mmdit_too(files):
    model = load_any_dit(files["mmdit"], block_swap=1, device="cpu")
    assert isinstance(model, PhantomMMDiT) and model.block_swap.swapped == (1,)
    with pytest.raises(ValueError, match="block_swap is 1 with trainable=True"):
        load_any_dit(files["mmdit"], block_swap=1, trainable=True)


def test_evaluate_parses_and_checks_the_clip_options(files, capsys):
    args = build_parser().parse_args(["evaluate", "--dit", "m.safetensors", "--clip-vision", "c.safetensors",
                                      "--clip-output", "pooled"])
    assert (args.clip_vision, args.clip_output) == ("c.safetensors", "pooled")
    assert build_parser().parse_args(["evaluate"]).clip_output == "tokens"
    small = ["--quick", "1", "--steps", "2", "--device", "cpu", "--size", "64", "--frames", "5", "--no-progress"]
    assert main(["evaluate", "--baseline", "paste", "--clip-vision", str(files["clip"]), *small]) == 2
    assert "--clip-vision and --clip-only go with --dit" in capsys.readouterr().err
    model_files = ["--dit", str(files["mmdit"]), "--vae", str(files["vae"]), "--text-encoder",
                   str(files["text_encoder"])]
    assert main(["evaluate", *model_files, *small]) == 2
    assert "reads 128-wide CLIP features of the references; give --clip-vision PATH" in capsys.readouterr().err
    vae_only = ["--dit", str(files["mmdit_vae"]), "--vae", str(files["vae"]), "--text-encoder",
                str(files["text_encoder"])]
    assert main(["evaluate", *vae_only, "--clip-only", *small]) == 2
    err = capsys.readouterr().err
    assert "--clip-only: --dit" in err and "has no CLIP branch" in err


@torch.no_grad()
def test_clip_only_drops_the_vae_reference_latents(files):
    """The CLIP-only setting gives the model the references' CLIP features and no VAE latents: the output with any
    reference latents equals the plain model's without them, and differs from the plain model's with them."""
    from phantom_core.mmdit.inputs import clip_references_only

    plain, clip_only = load_any_dit(files["mmdit"]), clip_references_only(load_any_dit(files["mmdit"]))
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 16, 2, 8, 8, generator=g), torch.randn(1, 5, plain.config.text_dim, generator=g)
    refs = torch.randn(1, 16, 1, 8, 8, generator=g)
    clip = torch.randn(1, 1, 3, plain.config.clip_dim, generator=g)
    t = torch.tensor([500.0])
    without = plain(x, t, ctx, None, ref_clip=clip)
    torch.testing.assert_close(clip_only(x, t, ctx, refs, ref_clip=clip), without, rtol=0, atol=1e-6)
    assert (plain(x, t, ctx, refs, ref_clip=clip) - without).abs().max() > 1e-4
    with pytest.raises(ValueError, match="has no CLIP branch"):
        clip_references_only(load_any_dit(files["mmdit_vae"]))


def test_evaluate_runs_an_mmdit_with_its_clip_tower(files, tmp_path, capsys):
    out = tmp_path / "mmdit"
    assert main(["evaluate", "--dit", str(files["mmdit"]), "--vae", str(files["vae"]), "--text-encoder",
                 str(files["text_encoder"]), "--clip-vision", str(files["clip"]), "--quick", "1", "--steps", "2",
                 "--device", "cpu", "--size", "64", "--frames", "5", "--no-progress", "--out", str(out)]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["summary"]["all"]["cases"] == 2  # one single- and one two-subject case
    assert report["options"]["clip_vision"] == str(files["clip"]) and report["options"]["clip_output"] == "tokens"
    assert "motion direction accuracy (%)" in capsys.readouterr().out
