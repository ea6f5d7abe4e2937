"""The committed next world VAE (``TRAINED_NEXT_VAE``: world.vae_recipe's ``subjects`` recipe, the MMDiT default's
VAE since 2026-12-07): it loads as the preset its recipe names and reconstructs held-out world cases
better than the Phantom-Wan default's VAE (subject PSNR 16.5 dB against 11.3 dB on these 6 cases), every subject's motion
kept (the shipped VAE turns one of them); a check that fails if the file stops being the trained one. docs/WORLD.md
has the 72-case figures."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from phantom_core.tiny.default import TRAINED_FILES, TRAINED_NEXT_VAE, trained_file
from phantom_core.wan.vae import VAE_PRESETS, load_vae
from phantom_core.world import vae_recipe
from phantom_core.world.baselines import vae_reconstruction
from phantom_core.world.cases import CaseSet
from phantom_core.world.metrics import score_video
from phantom_core.world.sample import WorldConfig
from phantom_core.world.subjects import available_sources

pytestmark = [pytest.mark.skipif("emoji" not in available_sources(),
                                 reason="the held-out subjects include emoji: `make emoji-font`"),
              pytest.mark.usefixtures("single_thread"),
              pytest.mark.slow]  # ~60 s on two CPU cores: 6 held-out videos through two VAEs, one thread
MIN_GAIN_DB = 1.0  # 72 held-out cases: 13.28 dB against 10.17 dB (docs/WORLD.md, seventeenth-session entry)


def test_the_next_vae_keeps_every_held_out_motion_and_beats_the_shipped_vae() -> None:
    next_vae = load_vae(str(trained_file(TRAINED_NEXT_VAE))).eval()
    assert next_vae.config == VAE_PRESETS[vae_recipe.SUBJECTS_PRESET]
    shipped = load_vae(str(trained_file(TRAINED_FILES["vae"]))).eval()
    # the first 5 one-subject cases (3 still, 2 moving up) and a two-subject one (left, down)
    cases = list(CaseSet(single=5, multi=1, config=replace(WorldConfig(), travel=vae_recipe.SUBJECT_TRAVEL)))
    ours, theirs = ([score_video(produce(s), s) for s in cases] for produce in map(vae_reconstruction,
                                                                                   (next_vae, shipped)))
    assert all(sub.measured == sub.prompted for case in ours for sub in case.subjects), \
        [(sub.prompted, sub.measured) for case in ours for sub in case.subjects]
    psnr = [float(np.mean([sub.psnr for case in scores for sub in case.subjects])) for scores in (ours, theirs)]
    assert psnr[0] > psnr[1] + MIN_GAIN_DB, psnr
