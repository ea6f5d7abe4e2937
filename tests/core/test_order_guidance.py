"""tools.order_guidance: the wrapped velocity is v + w (v - v_reversed) for calls with two or more references, the
model's own velocity otherwise, and bad weights are refused by name."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tools.order_guidance import OrderGuided, main


class Weighted(nn.Module):
    """A velocity model that depends on the references' order: x + sum_k (k + 1) * mean(ref k) (+ the CLIP
    features' order, likewise), so reversing two references changes it."""

    def __init__(self):
        super().__init__()
        self.config = "the model's config"

    def forward(self, x, t, context, ref_latents, ref_clip=None):
        n = ref_latents.shape[2]
        k = torch.arange(1, n + 1, dtype=x.dtype)
        v = x + (ref_latents.mean((1, 3, 4)) * k).sum(1).view(-1, 1, 1, 1, 1)
        if ref_clip is not None:
            v = v + 0.5 * (ref_clip.mean((2, 3)) * k).sum(1).view(-1, 1, 1, 1, 1)
        return v


def test_two_references_are_amplified_along_their_order_and_other_calls_are_not():
    gen = torch.Generator().manual_seed(0)
    model = Weighted()
    x, t, context = torch.randn(3, 16, 2, 4, 4, generator=gen), torch.full((3,), 500.0), torch.randn(3, 5, 8)
    refs, clip = torch.randn(3, 16, 2, 4, 4, generator=gen), torch.randn(3, 2, 3, 8, generator=gen)
    refs[2] = 0  # the v_neg row: all-zero references
    clip[2] = 0
    guided = OrderGuided(model, 2.0)
    v, v_rev = model(x, t, context, refs, clip), model(x, t, context, refs.flip(2), clip.flip(1))
    want = v + 2.0 * (v - v_rev)
    got = guided(x, t, context, refs, ref_clip=clip)
    torch.testing.assert_close(got[:2], want[:2], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[2], v[2], rtol=0, atol=0)  # v_neg unchanged
    assert (got[:2] - v[:2]).abs().max() > 1e-3  # the order mattered
    one = refs[:, :, :1]
    torch.testing.assert_close(guided(x, t, context, one), model(x, t, context, one), rtol=0, atol=0)
    torch.testing.assert_close(OrderGuided(model, 0.0)(x, t, context, refs, ref_clip=clip), v, rtol=0, atol=0)
    assert guided.config == "the model's config"  # attributes are the model's
    for weight in (-1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="order guidance weight is .*; it must be a finite number >= 0"):
            OrderGuided(model, weight)


def test_the_cli_refuses_a_bad_weight(capsys):
    with pytest.raises(SystemExit):
        main(["--weight", "-1", "--dit", "d.safetensors"])
    assert "--weight is -1.0; it must be a finite number >= 0" in capsys.readouterr().err


def test_evaluate_runs_on_the_wrapped_model(tmp_path, monkeypatch):
    """One two-subject case of the shipped MMDiT default, 2 steps: every model call goes through OrderGuided, the
    two-reference ones twice, and evaluate writes its report; the loader is restored after."""
    import phantom_core.world.cli as world_cli

    load, calls = world_cli._load, []
    forward = OrderGuided.forward
    monkeypatch.setattr(OrderGuided, "forward", lambda self, *a, **k: calls.append(a[3].shape[2]) or forward(
        self, *a, **k))
    out = tmp_path / "eval"
    assert main(["--weight", "1", "--model", "default-mmdit", "--cases-single", "0", "--cases-multi", "1",
                 "--steps", "2", "--device", "cpu", "--no-progress", "--out", str(out)]) == 0
    assert calls and set(calls) == {2} and (out / "metrics.json").is_file()
    assert world_cli._load is load
