"""TrainConfig: every setting of a training run, frozen, from a TOML file and/or command-line flags.

A run is fully determined by its config, the model files and the data: the same config on the same machine
gives the same loss curve (see ``loop.py``). The TOML file is flat (one key per field, the field names below):

    dataset = "data/my_subject"          # a folder or a .jsonl manifest (dataset.py)
    dit = "models/Phantom-Wan-1.3B.pth"  # or "scratch:tiny" to train from the upstream random init
    vae = "models/Wan2.1_VAE.pth"
    text_encoder = "models/umt5_xxl_fp16.safetensors"
    out = "loras/my_subject.safetensors"
    mode = "lora"
    steps = 2000
    width = 832
    height = 480
    frames = 81

Condition-dropout defaults (``text_dropout`` 0.2, ``reference_dropout`` 0.1, nested, see ``objective.py``):
Phantom's sampler (paper Eq. 5) evaluates the model on (prompt, references), (negative prompt, references) and
(negative prompt, no references); those are the three conditions training must keep meaningful. With one
uniform draw per sample, 10% of samples see neither text nor references (the ``v_neg`` pass), a further 10%
see the references without text (the ``v_img`` pass) and 80% both. The paper drops the VAE reference features
at 0.7 because its CLIP image features still carry the reference; Phantom-Wan has no CLIP branch, so dropping
the references that often would leave 70% of the steps without any subject and train mostly text-to-video.
We drop them at 0.1 and rely on cross-pair data (README) against copy-paste, the failure the paper's high rate
fights.

The paper's MMDiT (``dit = "scratch:mmdit-<preset>"`` or an MMDiT checkpoint, detected by its keys) reads each
reference twice: VAE latents and CLIP features (``clip_vision``: the tower's file; its features are cached with the
latents). ``reference_dropout`` (the ``v_neg`` condition) zeroes both, as the sampler's ``v_neg`` pass does;
``vae_reference_dropout`` (the paper's 0.7) zeroes the VAE latents alone, on a draw of its own (independent of the
nested text / reference draw, so the ``v_img`` condition still sees VAE latents as often as the others), and keeps
the CLIP features: it needs them. ``clip_reference_dropout`` zeroes the CLIP features alone, at the other end of
that draw (never both); not the paper's, it makes a model read the VAE latents, whose order RoPE tells apart, when
the CLIP tokens alone would carry the look. ``vae_references = false`` gives the model no VAE reference latents at
all (the paper's "CLIP only" ablation); a model without a CLIP branch (``clip_dim`` 0) is the "VAE only" one.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from phantom_core.inference.settings import SETTING_RANGES, Range
from phantom_core.references import REFERENCE_MODES
from phantom_core.sampling.loop import SOLVERS

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser from PyPI (requirements.txt)
    import tomli as tomllib

TRAIN_MODES = ("lora", "full")
TIMESTEP_SAMPLING = ("uniform", "logit_normal", "shifted")
LR_SCHEDULES = ("constant", "cosine")
PRECISIONS = ("auto", "bf16", "fp32")
SCRATCH_PREFIX = "scratch:"  # dit = "scratch:<DIT_PRESETS name>": build and init_weights(), no checkpoint
MMDIT_PREFIX = "mmdit-"  # dit = "scratch:mmdit-<MMDIT_PRESETS name>": the paper's MMDiT from scratch
CLIP_OUTPUT_CHOICES = ("tokens", "pooled")  # mmdit.clip.CLIP_OUTPUTS (not imported: it loads PIL and the loaders)


def cpu_bf16_fast() -> bool:
    """Whether this CPU computes bf16 matrix products natively (oneDNN sees AVX512-BF16 or AMX), i.e. whether
    ``precision = "bf16"`` speeds CPU training up rather than emulating bf16 more slowly than fp32."""
    import torch

    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _f(default: Any, help: str) -> Any:  # noqa: A002 (the CLI's word)
    """A dataclass field carrying its command-line help."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run (units: px, frames, optimizer steps). Validated on construction.

    Raises:
        ValueError: naming the field, the value received and what is valid.
    """

    # -- data
    dataset: str = _f("", "dataset folder or .jsonl manifest (see the README's Training section)")
    width: int = _f(832, "training width in px, a multiple of 16")
    height: int = _f(480, "training height in px, a multiple of 16")
    frames: int = _f(81, "frames per clip, 4k+1 (the first ones of each clip are used)")
    ref_mode: str = _f("letterbox", f"how references fit the frame: {' | '.join(REFERENCE_MODES)} (as sampling)")
    cache_dir: str = _f("", "where latents and text contexts are cached (default: <run_dir>/cache)")
    # -- models
    dit: str = _f("", f"DiT checkpoint to train, or '{SCRATCH_PREFIX}<preset>' (e.g. scratch:tiny) from random init")
    vae: str = _f("", "Wan2.1 VAE (encodes the clips and references once, decodes validation videos)")
    text_encoder: str = _f("", "umT5 text encoder (encodes the captions once)")
    tokenizer: str = _f("", "umT5 spiece.model when the text encoder file has none embedded")
    clip_vision: str = _f("", "CLIP vision file (ComfyUI clip_vision, open_clip): the references' CLIP features are "
                              "cached and given to an MMDiT with a CLIP branch")
    clip_output: str = _f("tokens", f"which CLIP features: {' | '.join(CLIP_OUTPUT_CHOICES)} (penultimate tokens or "
                                    "the pooled embedding; the MMDiT's clip_dim must be their width)")
    # -- what is trained
    mode: str = _f("lora", f"{' | '.join(TRAIN_MODES)}: a LoRA adapter on the frozen DiT, or every weight")
    lora_rank: int = _f(16, "LoRA rank r")
    lora_alpha: float = _f(16.0, "LoRA alpha (the update is scaled by alpha / rank)")
    lora_targets: tuple[str, ...] = _f((), "LoRA target Linears by name pattern (default: the attention and "
                                           "FFN Linears of every block)")
    lora_dropout: float = _f(0.0, "dropout on the LoRA input during training")
    # -- optimisation
    steps: int = _f(1000, "optimizer steps")
    learning_rate: float = _f(1e-4, "AdamW learning rate (after warm-up)")
    batch_size: int = _f(1, "samples per micro-batch and rank (global batch = batch_size x grad_accum x ranks)")
    grad_accum: int = _f(1, "micro-batches accumulated per optimizer step")
    weight_decay: float = _f(0.01, "AdamW weight decay")
    adam_beta1: float = _f(0.9, "AdamW beta1")
    adam_beta2: float = _f(0.999, "AdamW beta2")
    warmup_steps: int = _f(0, "linear learning-rate warm-up steps")
    lr_schedule: str = _f("constant", f"{' | '.join(LR_SCHEDULES)} after warm-up (cosine decays to 0)")
    max_grad_norm: float = _f(1.0, "clip the gradient norm to this (0: no clipping)")
    ema_decay: float = _f(0.0, "keep an exponential moving average of the trained weights with this decay (e.g. "
                               "0.999) and write it as out (0: none; training.ema; not with fsdp)")
    gradient_checkpointing: bool = _f(True, "recompute each block's activations in the backward pass")
    precision: str = _f("auto", f"{' | '.join(PRECISIONS)}: auto = bf16 autocast on CUDA, fp32 on the CPU; bf16 "
                                            "also on the CPU")
    # -- objective
    timesteps: str = _f("shifted", f"timestep sampling: {' | '.join(TIMESTEP_SAMPLING)}")
    shift: float = _f(5.0, "time shift of 'shifted' sampling (the sampler's shift; Phantom-Wan samples at 5)")
    logit_mean: float = _f(0.0, "mean of 'logit_normal' sampling (SD3: 0)")
    logit_std: float = _f(1.0, "std of 'logit_normal' sampling (SD3: 1)")
    text_dropout: float = _f(0.2, "probability that a sample's text is replaced by dropped_prompt's")
    reference_dropout: float = _f(0.1, "probability that a sample's references are all-zero latents (nested "
                                       "with text_dropout: see the module docs)")
    vae_reference_dropout: float = _f(0.0, "probability, on a draw of its own, that a sample's VAE reference "
                                           "latents are zeroed while its CLIP features stay (the paper: 0.7; needs "
                                           "CLIP features)")
    clip_reference_dropout: float = _f(0.0, "probability, on the VAE drop's draw, that a sample's CLIP features "
                                            "are zeroed while its VAE latents stay, never both (not the paper's; "
                                            "needs CLIP features; with vae_reference_dropout at most 1)")
    vae_references: bool = _f(True, "give the model the references' VAE latents (false: the paper's CLIP-only "
                                    "ablation, an MMDiT with a CLIP branch)")
    temporal_weight: float = _f(0.0, "weight of a term added to the velocity MSE: the MSE of the frame-to-frame "
                                     "change of the clean estimate (objective.temporal_mse; 0: the paper's plain loss)")
    dropped_prompt: str = _f("", "the prompt a dropped text becomes ('' = empty, the unconditional context)")
    seed: int = _f(0, "seed of the data order, noise, timesteps, dropout and a from-scratch init")
    # -- output
    out: str = _f("", "the final file: the LoRA (mode lora) or the DiT checkpoint (mode full), .safetensors")
    run_dir: str = _f("", "checkpoints, log.jsonl, loss.png, validation videos (default: <out>.run next to out)")
    checkpoint_every: int = _f(500, "write a checkpoint every N steps (and always at the end)")
    keep_checkpoints: int = _f(2, "how many of the latest checkpoints to keep (0: all)")
    resume: bool = _f(False, "continue from the latest checkpoint in run_dir, if any")
    # -- validation
    validate_every: int = _f(0, "sample validation_prompt + validation_references every N steps (0: never)")
    validation_prompt: str = _f("", "the validation prompt")
    validation_references: tuple[str, ...] = _f((), "the validation reference images (1 to 4)")
    validation_steps: int = _f(20, "sampling steps of the validation video")
    validation_solver: str = _f("unipc", f"solver of the validation video: {' | '.join(SOLVERS)}")
    validation_w_img: float = _f(5.0, "w_img of the validation video")
    validation_w_text: float = _f(7.5, "w_text of the validation video")
    validation_seed: int = _f(42, "noise seed of the validation video")
    # -- runtime
    device: str = _f("auto", "auto (cuda:<local rank> when available, else cpu), cpu, cuda, cuda:1, ...")
    fsdp: bool = _f(False, "shard the model across ranks with FSDP (for a model that does not fit one GPU)")

    def __post_init__(self) -> None:
        validate_config(self)

    @property
    def run_path(self) -> Path:
        """The run folder: ``run_dir``, else ``<out without suffix>.run`` beside ``out``."""
        if self.run_dir:
            return Path(self.run_dir)
        out = Path(self.out)
        return out.with_name(out.stem + ".run")

    @property
    def cache_path(self) -> Path:
        """The latent / context cache: ``cache_dir``, else ``<run_path>/cache``."""
        return Path(self.cache_dir) if self.cache_dir else self.run_path / "cache"

    def to_json(self) -> dict[str, Any]:
        """The config as a JSON-ready dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(TrainConfig)}

# what TrainConfig accepts for each number; the Train LoRA node's widgets declare exactly these (compared through
# /object_info by tests/nodes/test_validation.py). Sizes, frames and the validation sampler's are sampling's own.
TRAIN_RANGES: dict[str, Range] = {
    **{name: SETTING_RANGES[name] for name in ("width", "height", "frames", "shift")},
    "lora_rank": Range(1, 1024, 1, "LoRA rank"),
    "lora_alpha": Range(0.001, 4096.0, meaning="LoRA alpha: the update is scaled by alpha / rank"),
    "lora_dropout": Range(0.0, 0.95, meaning="dropout probability on the LoRA input"),
    "steps": Range(1, 10**8, 1, "optimizer steps"),
    "learning_rate": Range(1e-9, 1.0, meaning="AdamW learning rate"),
    "batch_size": Range(1, 4096, 1, "samples per micro-batch and rank"),
    "grad_accum": Range(1, 4096, 1, "micro-batches per optimizer step"),
    "weight_decay": Range(0.0, 10.0, meaning="AdamW weight decay"),
    "adam_beta1": Range(0.0, 0.9999, meaning="AdamW beta1"),
    "adam_beta2": Range(0.0, 0.99999, meaning="AdamW beta2"),
    "warmup_steps": Range(0, 10**8, 1, "warm-up steps"),
    "max_grad_norm": Range(0.0, 1e6, meaning="gradient clipping norm, 0 = none"),
    "ema_decay": Range(0.0, 0.99999, meaning="EMA decay of the weights, 0 = no average"),
    "logit_mean": Range(-10.0, 10.0, meaning="logit-normal mean"),
    "logit_std": Range(0.01, 10.0, meaning="logit-normal standard deviation"),
    "text_dropout": Range(0.0, 1.0, meaning="a probability"),
    "reference_dropout": Range(0.0, 1.0, meaning="a probability"),
    "vae_reference_dropout": Range(0.0, 1.0, meaning="a probability"),
    "clip_reference_dropout": Range(0.0, 1.0, meaning="a probability"),
    "temporal_weight": Range(0.0, 1000.0, meaning="weight of the temporal term, 0 = the plain loss"),
    "seed": Range(0, 2**63 - 1, 1, "the run seed"),
    "checkpoint_every": Range(1, 10**8, 1, "steps between checkpoints"),
    "keep_checkpoints": Range(0, 10**6, 1, "0 keeps all"),
    "validate_every": Range(0, 10**8, 1, "0 = no validation"),
    "validation_steps": SETTING_RANGES["steps"],
    "validation_w_img": SETTING_RANGES["w_img"],
    "validation_w_text": SETTING_RANGES["w_text"],
    "validation_seed": SETTING_RANGES["seed"],
}
assert set(TRAIN_RANGES) == {n for n, f in FIELDS.items() if type(f.default) in (int, float)}, "unranged number"


def _check(ok: bool, name: str, value: Any, valid: str) -> None:
    if not ok:
        raise ValueError(f"train config: {name} is {value!r}; valid: {valid}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def validate_config(c: TrainConfig) -> None:
    """Raise ``ValueError`` naming the first invalid field of ``c`` (numbers: ``TRAIN_RANGES``)."""
    for name, f in FIELDS.items():
        value, kind = getattr(c, name), type(f.default)
        if kind is bool:
            _check(isinstance(value, bool), name, value, "true or false")
        elif kind is str:
            _check(isinstance(value, str), name, value, "a string")
        elif kind is tuple:
            _check(isinstance(value, tuple) and all(isinstance(v, str) for v in value), name, value,
                   "a list of strings")
        elif (message := TRAIN_RANGES[name].error(name, value)) is not None:
            raise ValueError(f"train config: {message}")
    for name, options in (("ref_mode", REFERENCE_MODES), ("mode", TRAIN_MODES), ("timesteps", TIMESTEP_SAMPLING),
                          ("lr_schedule", LR_SCHEDULES), ("precision", PRECISIONS), ("validation_solver", SOLVERS),
                          ("clip_output", CLIP_OUTPUT_CHOICES)):
        _check(getattr(c, name) in options, name, getattr(c, name), " | ".join(options))
    _check(c.vae_reference_dropout + c.clip_reference_dropout <= 1, "clip_reference_dropout", c.clip_reference_dropout,
           f"at most 1 - vae_reference_dropout ({1 - c.vae_reference_dropout:g}): one draw drops one encoding")
    _check(not (c.clip_reference_dropout and not c.vae_references), "clip_reference_dropout",
           c.clip_reference_dropout, "0 without VAE references (vae_references false)")
    _check(not (c.ema_decay and c.fsdp), "ema_decay", c.ema_decay, "0 with fsdp (an FSDP rank holds shards)")
    _check(len(c.validation_references) <= 4, "validation_references", c.validation_references, "0 to 4 images")
    if c.validate_every:
        _check(bool(c.validation_prompt) and bool(c.validation_references), "validate_every", c.validate_every,
               "0, unless validation_prompt and 1 to 4 validation_references are given")
    if c.out:
        _check(Path(c.out).suffix == ".safetensors", "out", c.out, "a path ending in .safetensors")


def load_config(path: str | os.PathLike | None = None, **overrides: Any) -> TrainConfig:
    """A ``TrainConfig`` from a flat TOML file (optional) with ``overrides`` (e.g. command-line flags) on top.

    Lists become tuples; relative paths in the file are kept as written (relative to the working directory).

    Raises:
        ValueError: an unreadable TOML file, an unknown key (listing the known ones), or an invalid value.
    """
    values: dict[str, Any] = {}
    if path is not None:
        try:
            values = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise ValueError(f"train config {path}: cannot be read as TOML: {err}") from err
    values.update(overrides)
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise ValueError(f"train config: unknown keys {unknown}; known keys: {', '.join(FIELDS)}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    for name, f in FIELDS.items():  # TOML `shift = 5` is an int; ints where floats are expected are fine
        if type(f.default) is float and _is_int(values.get(name)):
            values[name] = float(values[name])
    return TrainConfig(**values)
