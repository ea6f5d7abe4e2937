"""The exponential moving average of the trained weights (``training.ema``, ``TrainConfig.ema_decay``): its update
rule, that the final file holds the average, and that a resumed run continues the average exactly."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from phantom_core.training.checkpoint import list_checkpoints
from phantom_core.training.config import TrainConfig
from phantom_core.training.ema import WeightEMA, ema_decay_at
from phantom_core.training.loop import train
from tests.support.training import micro_dit, random_latents

pytestmark = pytest.mark.usefixtures("single_thread")


class Stop(Exception):
    """Raised by the step callback: the run is interrupted."""


def test_the_average_follows_the_documented_update_and_skips_frozen_parameters():
    layer = nn.Linear(3, 2)
    layer.bias.requires_grad_(False)
    ema = WeightEMA(layer, 0.9)
    assert set(ema.average) == {"weight"}
    expected = layer.weight.detach().double().clone()
    for step in range(1, 6):
        with torch.no_grad():
            layer.weight.add_(torch.randn(2, 3, generator=torch.Generator().manual_seed(step)))
        ema.update(step)
        d = min(0.9, (1 + step) / (10 + step))
        expected = d * expected + (1 - d) * layer.weight.detach().double()
    torch.testing.assert_close(ema.average["weight"].double(), expected, rtol=0, atol=1e-6)
    assert ema_decay_at(1, 0.999) == pytest.approx(2 / 11) and ema_decay_at(10**6, 0.999) == 0.999
    current = layer.weight.detach().clone()
    with ema.applied():
        torch.testing.assert_close(layer.weight.detach(), expected.float(), rtol=0, atol=1e-6)
    assert torch.equal(layer.weight.detach(), current)  # the trained values come back after the block
    with pytest.raises(ValueError, match="ema_decay"):
        WeightEMA(layer, 1.0)


def test_bad_ema_settings_are_refused():
    with pytest.raises(ValueError, match="ema_decay"):
        TrainConfig(ema_decay=1.0)
    with pytest.raises(ValueError, match="ema_decay"):
        TrainConfig(ema_decay=0.99, fsdp=True)


def _config(tmp_path, name: str, **kw) -> TrainConfig:
    settings = dict(out=str(tmp_path / f"{name}.safetensors"), mode="full", steps=6, batch_size=2,
                    checkpoint_every=2, keep_checkpoints=2, learning_rate=1e-2, seed=3, ema_decay=0.5)
    return TrainConfig(**{**settings, **kw})


def test_the_final_file_is_the_average_and_a_resumed_run_continues_it(tmp_path):
    data = random_latents(4, seed=1)
    whole = train(_config(tmp_path, "whole"), dataset=data, model=micro_dit(seed=2))
    run_dir = _config(tmp_path, "whole").run_path
    last = load_file(str(list_checkpoints(run_dir / "checkpoints")[-1][1] / "trainable.safetensors"))
    state = torch.load(list_checkpoints(run_dir / "checkpoints")[-1][1] / "state.pt", weights_only=True)
    out = load_file(str(whole.out))
    moved = [k for k in last if not torch.allclose(last[k].float(), out[k].float(), rtol=0, atol=1e-7)]
    assert moved, "the written weights are the last iterate, not the average"
    for k in out:  # the file is the checkpointed average (stored in the weights' dtype)
        torch.testing.assert_close(out[k].float(), state["ema"][k].to(out[k].dtype).float(), rtol=0, atol=0)

    def interrupt(step, total, loss):
        if step == 5:
            raise Stop
    with pytest.raises(Stop):
        train(_config(tmp_path, "cut"), dataset=data, model=micro_dit(seed=2), callback=interrupt)
    resumed = train(_config(tmp_path, "cut", resume=True), dataset=data, model=micro_dit(seed=2))
    a, b = load_file(str(whole.out)), load_file(str(resumed.out))
    assert a.keys() == b.keys()
    for k in a:  # same code path on the same machine; a tolerance anyway (the average is restored from disk)
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="ema_decay"):  # the average of another decay cannot be continued
        train(_config(tmp_path, "cut", resume=True, ema_decay=0.9, steps=8), dataset=data, model=micro_dit(seed=2))
