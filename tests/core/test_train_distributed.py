"""torch.distributed on the CPU (gloo, 2 processes): DDP and FSDP give the loss curve and the weights of one
process training the same global batch. The ranks sum their half-batch gradients in another order than one
process averaging the whole batch, so the curves agree to a tolerance (relative 1e-4 asserted; ~1e-7 observed),
not bit for bit; training on half the batch instead moves the losses by ~5%."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from phantom_core.training.config import TrainConfig
from phantom_core.training.loop import train
from phantom_core.training.runlog import read_log
from tests.support.training import distributed_worker, micro_dit, random_latents
from tools.comfy_launcher import free_port

pytestmark = pytest.mark.usefixtures("single_thread")
COMMON = dict(steps=3, grad_accum=2, learning_rate=1e-3, text_dropout=0.3, reference_dropout=0.2, seed=5,
              checkpoint_every=3, timesteps="uniform")
RUNS = {"ddp_full": dict(COMMON, mode="full", batch_size=1),
        "ddp_lora": dict(COMMON, mode="lora", batch_size=1, lora_rank=4, lora_alpha=4.0),
        "fsdp_full": dict(COMMON, mode="full", batch_size=1, fsdp=True),
        "fsdp_lora": dict(COMMON, mode="lora", batch_size=1, lora_rank=4, lora_alpha=4.0, fsdp=True)}


def test_two_gloo_ranks_train_like_one_process_with_the_same_global_batch(tmp_path):
    mp.spawn(distributed_worker, args=(2, free_port(), str(tmp_path), RUNS), nprocs=2, join=True)
    for name, fields in RUNS.items():
        single = TrainConfig(**{**fields, "batch_size": 2, "fsdp": False}, out=str(tmp_path / f"one_{name}.safetensors"))
        one = train(single, dataset=random_latents(6, seed=1), model=micro_dit(seed=2))
        ranks = [r["loss"] for r in read_log(tmp_path / name / "log.jsonl")]
        assert len(ranks) == 3 and len(set(ranks)) == 3, name
        torch.testing.assert_close(torch.tensor(ranks), torch.tensor(one.losses), rtol=1e-4, atol=0, msg=name)
        a, b = load_file(str(tmp_path / f"{name}.safetensors")), load_file(str(one.out))
        assert a.keys() == b.keys(), name
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=f"{name}: {key}")
        assert (tmp_path / name / "checkpoints" / "step_000003").is_dir()  # rank 0 wrote it
