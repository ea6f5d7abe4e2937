"""Training Phantom: the rectified-flow objective with reference conditioning, LoRA and full fine-tune.

    config.py       TrainConfig (frozen; from TOML and/or flags) and its validation
    objective.py    timestep sampling, x_t, the velocity target, condition dropout, the video-only loss
    dataset.py      a dataset folder / JSONL manifest -> samples; clips cut and resized; bad samples reported
    cache.py        VAE latents + umT5 contexts computed once, cached as safetensors; the latent dataset interface
    clip_features.py  the references' CLIP features (an MMDiT's ref_clip), cached in the same files
    order.py        the deterministic, resumable, per-rank sharded batch order
    checkpoint.py   atomic training checkpoints (trainable weights, optimizer, scheduler, RNG states, position)
    runlog.py       the JSON-lines step log and the loss plot PNG
    distributed.py  torch.distributed: process group, DDP / FSDP, rank-0 I/O, mean over ranks
    model.py        the model to train (checkpoint or from scratch, full or LoRA) and its final file
    validation.py   sample a fixed prompt + references every N steps and save the video
    loop.py         train(config) -> TrainResult: data -> noise -> loss -> step -> log -> checkpoint
    cli.py          `python -m phantom_core train`
"""
