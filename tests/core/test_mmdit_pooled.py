"""The MMDiT's global conditioning vectors: the pooled text (``MMDiTConfig.pooled_text``, SD3's ``y_embedder``: the
mean of the real umT5 tokens through an MLP; zero padding does not count) and the pooled references
(``pooled_reference``, ``r_embedder``: the mean reference token through an MLP), both added to the timestep
conditioning; checkpoints carry them."""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from phantom_core.mmdit.config import MMDIT_PRESETS
from phantom_core.mmdit.load import infer_mmdit_config, load_mmdit
from phantom_core.mmdit.model import PhantomMMDiT
from tests.support.weights import random_state_dict

CFG = replace(MMDIT_PRESETS["tiny"], pooled_text=True, pooled_reference=True)


def _model(seed: int = 3) -> PhantomMMDiT:
    model = PhantomMMDiT(CFG).eval()
    model.load_state_dict(random_state_dict(model, seed=seed))
    return model


@torch.no_grad()
def test_pooled_vector_is_the_mlp_of_the_real_tokens_mean():
    """``_pooled_text`` equals Linear -> SiLU -> Linear of the mean over the rows that are not all zero, written out
    by hand here (tolerance 1e-5, float32)."""
    model = _model()
    g = torch.Generator().manual_seed(0)
    ctx = torch.randn(2, 6, CFG.text_dim, generator=g)
    ctx[0, 4:] = 0.0  # sample 0 has 4 real tokens, sample 1 has 6
    mlp = model.y_embedder.mlp
    for b, n in ((0, 4), (1, 6)):
        mean = ctx[b, :n].mean(0)
        expected = F.linear(F.silu(F.linear(mean, mlp[0].weight, mlp[0].bias)), mlp[2].weight, mlp[2].bias)
        assert torch.allclose(model._pooled_text(ctx)[b], expected, atol=1e-5)
    assert torch.allclose(model._pooled_text(torch.zeros(1, 3, CFG.text_dim)),
                          mlp[2](F.silu(mlp[0](torch.zeros(CFG.text_dim)))), atol=1e-6)


@torch.no_grad()
def test_output_hears_the_prompt_through_the_pooled_vector_and_ignores_padding():
    """With the text stream's attention to the video cut (its Linear zeroed), only the pooled vector carries the
    prompt: two prompts then give different velocities, while the same prompt zero-padded gives the same one
    (1e-5). Without ``pooled_text`` the cut model's velocity does not depend on the prompt."""
    g = torch.Generator().manual_seed(1)
    x, refs = torch.randn(1, 16, 3, 16, 16, generator=g), torch.randn(1, 16, 1, 16, 16, generator=g)
    a, b = torch.randn(1, 5, CFG.text_dim, generator=g), torch.randn(1, 5, CFG.text_dim, generator=g)
    t = torch.tensor([600.0])
    model = _model()
    model.context_embedder.weight.zero_()
    model.context_embedder.bias.zero_()
    assert (model(x, t, a, refs) - model(x, t, b, refs)).abs().max() > 1e-3
    assert torch.allclose(model(x, t, a, refs), model(x, t, F.pad(a, (0, 0, 0, 7)), refs), atol=1e-5)
    plain = PhantomMMDiT(replace(CFG, pooled_text=False)).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("y_embedder.")})
    plain.context_embedder.weight.zero_()
    plain.context_embedder.bias.zero_()
    assert torch.allclose(plain(x, t, a, refs), plain(x, t, b, refs), atol=1e-6)


def test_checkpoints_carry_the_pooled_path_and_it_is_inferred():
    sd = PhantomMMDiT(CFG, device="meta").state_dict()
    assert sd["y_embedder.mlp.0.weight"].shape == (CFG.dim, CFG.text_dim)
    assert infer_mmdit_config(sd) == CFG
    assert sd["r_embedder.mlp.0.weight"].shape == (CFG.dim, CFG.dim)
    bare = {k: v for k, v in sd.items() if not k.startswith(("y_embedder.", "r_embedder."))}
    assert infer_mmdit_config(bare) == MMDIT_PRESETS["tiny"]
    loaded = load_mmdit(random_state_dict(PhantomMMDiT(CFG, device="meta"), seed=2))
    assert loaded.config.pooled_text and loaded.config.pooled_reference
    fresh = PhantomMMDiT(CFG, device="meta").to_empty(device="cpu")
    fresh.init_weights(torch.Generator().manual_seed(0))
    assert fresh.y_embedder.mlp[0].weight.abs().max() > 0 and fresh.y_embedder.mlp[0].bias.abs().max() == 0


@torch.no_grad()
def test_pooled_reference_adds_the_mlp_of_the_mean_reference_token_to_the_conditioning():
    """The conditioning vector grows by ``r_embedder(mean of every reference token)``, checked by capturing ``c`` at
    the ``run_blocks`` seam (1e-5), against the same call without references, which adds nothing."""
    model = _model(seed=4)
    seen = []
    original = model.run_blocks

    def spy(tokens, ctx, c, cos, sin, plans):
        seen.append((tokens, c))
        return original(tokens, ctx, c, cos, sin, plans)

    model.run_blocks = spy
    g = torch.Generator().manual_seed(2)
    x, ctx = torch.randn(1, 16, 3, 16, 16, generator=g), torch.randn(1, 5, CFG.text_dim, generator=g)
    refs = torch.randn(1, 16, 2, 16, 16, generator=g)
    t = torch.tensor([300.0])
    model(x, t, ctx)
    base = seen[-1][1]
    model(x, t, ctx, refs)
    tokens, c = seen[-1]
    video = 3 * 8 * 8  # 3 frames of 8 x 8 tokens
    mlp = model.r_embedder.mlp
    expected = base + mlp[2](F.silu(mlp[0](tokens[:, video:].mean(1))))
    assert torch.allclose(c, expected, atol=1e-5) and (c - base).abs().max() > 1e-3
