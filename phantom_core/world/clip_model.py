"""A tiny CLIP learned in the miniature world, whose image tower gives the Phantom MMDiT its reference features.

Phantom (arXiv 2502.11079, Eq. 1) feeds each reference's CLIP image features to the text stream; the world has no
pretrained CLIP, so one is trained here: open_clip's ``CLIP`` (a ViT image tower and a causal text transformer)
with open_clip's symmetric InfoNCE loss (``open_clip.loss.ClipLoss``, Radford et al. 2021), on the world's training
subjects only (``world.subjects``: the held-out subjects are never seen).

- **images**: each subject's cut-out as a cross-pair reference (``world.pairs.cross_pair_reference``: another scale,
  and a flip, a small rotation or a lighting change), composited and letterboxed on white and resized exactly as
  ``mmdit.clip.ClipVision.preprocess`` does at sampling time. ``ClipTrainConfig.variants`` of them per subject are
  rendered once (uint8) and drawn at random each step.
- **captions**: ``"a photo of a <name>"``, tokenized by open_clip's ``SimpleTokenizer`` (OpenAI's BPE, 49,408 pieces,
  shipped with open_clip): the world's sentencepiece (512 pieces) was trained for umT5 on whole prompts and needs the
  text stage's file; the BPE needs nothing and splits the names into English words the held-out names share.
- **image tower**: ``CLIP_VISION_PRESETS["world"]``: 64 px in 16 px patches (17 tokens of width 128, 3 blocks).
  ``"tiny"``'s 32 px would shrink the 128 px references 4x (a small subject to a few pixels); 64 px in 8 px
  patches (65 tokens) costs 2.4x the step time (1.1 s against 0.46 s a step of 128, one thread) and appends 4x the
  tokens to every MMDiT window.

``stage_clip(work)`` trains (resumably: checkpoints in ``<work>/clip_run``), measures zero-shot retrieval on the
held-out subjects (a reference image -> its name among all held-out names, top-1 / top-5) against the same tower
at its random init, and writes the image tower in open_clip's ``visual.*`` layout, which
``mmdit.clip.load_clip_vision`` reads. open_clip is imported only inside the functions that use it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from phantom_core.log import logger
from phantom_core.mmdit.clip_keys import CLIP_VISION_PRESETS, ClipVisionConfig
from phantom_core.references import to_rgb
from phantom_core.world.pairs import cross_pair_reference
from phantom_core.world.render import SIZE_FRACTIONS, VideoFormat, subject_box_size
from phantom_core.world.subjects import Subject, split_subjects

CLIP_STAGE_FILE, CLIP_RUN, CLIP_REPORT = "clip_vision.safetensors", "clip_run", "clip_report.json"
CLIP_SEED = 11079 + 20  # the recipe seed (default_model.RECIPE_SEED) plus a stream of its own
CLIP_SOURCES = ("emoji", "photo", "shape")  # default_model.RECIPE_SOURCES
OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ClipTrainConfig:
    """The tiny CLIP's training: tower preset, text tower, optimisation (AdamW, warm-up then cosine), data."""

    vision: str = "world"  # a CLIP_VISION_PRESETS name
    text_width: int = 128
    text_layers: int = 2
    text_heads: int = 2
    context_length: int = 24  # tokens of a caption, start and end included (the longest world name has 11 words)
    steps: int = 900
    batch_size: int = 128
    learning_rate: float = 1e-3
    warmup_steps: int = 50
    weight_decay: float = 0.1
    variants: int = 4  # cross-pair references rendered per subject
    seed: int = CLIP_SEED
    checkpoint_every: int = 100

    def __post_init__(self) -> None:
        if self.vision not in CLIP_VISION_PRESETS:
            raise ValueError(f"ClipTrainConfig.vision is {self.vision!r}; valid: {', '.join(CLIP_VISION_PRESETS)}")
        for name in ("steps", "batch_size", "variants", "checkpoint_every", "context_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"ClipTrainConfig.{name} is {getattr(self, name)}; it must be >= 1")

    @property
    def tower(self) -> ClipVisionConfig:
        return CLIP_VISION_PRESETS[self.vision]


def caption(name: str) -> str:
    """The caption of a subject name."""
    return f"a photo of a {name}"


def build_clip(config: ClipTrainConfig, seed: int) -> nn.Module:
    """open_clip ``CLIP`` with ``config.tower`` as its image tower (embedding width = the tower's ``output_dim``),
    initialised by open_clip from ``seed``."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    v = config.tower
    torch.manual_seed(seed)
    vision = CLIPVisionCfg(layers=v.layers, width=v.width, head_width=v.head_width, mlp_ratio=v.mlp_dim / v.width,
                           patch_size=v.patch_size, image_size=v.image_size)
    text = CLIPTextCfg(context_length=config.context_length, vocab_size=49408, width=config.text_width,
                       heads=config.text_heads, layers=config.text_layers)
    return CLIP(v.output_dim, vision, text, quick_gelu=v.quick_gelu)


def tokenize(names: Sequence[str], config: ClipTrainConfig) -> Tensor:
    """Captions of ``names`` -> int64 ``(n, context_length)`` BPE tokens (open_clip's ``SimpleTokenizer``)."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=config.context_length)([caption(n) for n in names])


def reference_pixels(subjects: Sequence[Subject], variants: int, seed: int, image_size: int,
                     fmt: VideoFormat = VideoFormat()) -> Tensor:
    """uint8 ``(S, variants, 3, image_size, image_size)``: cross-pair references of each subject (a size class
    drawn as the world does, then ``cross_pair_reference``), prepared as ``ClipVision.preprocess`` prepares them
    (white letterbox, bicubic), before the mean / std normalisation; deterministic from ``(seed, subject, variant)``.
    """
    from open_clip.transform import image_transform

    transform = image_transform(image_size, is_train=False, resize_mode="longest", fill_color=255)
    mean, std = torch.tensor(OPENAI_MEAN).view(3, 1, 1), torch.tensor(OPENAI_STD).view(3, 1, 1)
    out = torch.empty(len(subjects), variants, 3, image_size, image_size, dtype=torch.uint8)
    sizes = sorted(SIZE_FRACTIONS)
    for i, subject in enumerate(subjects):
        cutout = subject.image()
        for v in range(variants):
            rng = np.random.default_rng([seed, i, v])
            box = subject_box_size(cutout, sizes[int(rng.integers(len(sizes)))], fmt)
            image, _, _ = cross_pair_reference(cutout, box, fmt, rng)
            x = transform(to_rgb(image)) * std + mean  # (3, S, S) in [0, 1], multiples of 1/255
            out[i, v] = (x * 255).round().clamp(0, 255).to(torch.uint8)
        if (i + 1) % 500 == 0:
            logger.info("clip references: %d/%d subjects", i + 1, len(subjects))
    return out


def normalise(pixels: Tensor) -> Tensor:
    """uint8 ``(..., 3, S, S)`` -> float32 pixels normalised with OpenAI CLIP's mean / std (as ``preprocess``)."""
    mean, std = torch.tensor(OPENAI_MEAN).view(3, 1, 1), torch.tensor(OPENAI_STD).view(3, 1, 1)
    return (pixels.float() / 255 - mean) / std


def _batch(step: int, config: ClipTrainConfig, subjects: int, variants: int) -> tuple[Tensor, Tensor]:
    """The subjects (distinct: one positive per caption) and variants of ``step``, from ``(seed, step)``."""
    gen = torch.Generator().manual_seed(int(np.random.SeedSequence([config.seed, step]).generate_state(1)[0]))
    chosen = torch.randperm(subjects, generator=gen)[: config.batch_size]
    return chosen, torch.randint(variants, (len(chosen),), generator=gen)


def _clip_lr_factor(step: int, config: ClipTrainConfig) -> float:
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


ClipProgress = Callable[[int, int, str], None]


def train_clip(config: ClipTrainConfig, pixels: Tensor, tokens: Tensor, run_dir: str | Path | None = None,
               progress: ClipProgress | None = None) -> tuple[nn.Module, list[float]]:
    """Train open_clip's CLIP with ``ClipLoss`` on ``pixels`` (uint8 ``(S, V, 3, s, s)``) and their captions'
    ``tokens`` (``(S, context_length)``); resumable from ``run_dir``'s checkpoints (the same losses as an
    uninterrupted run: each step's batch depends on ``(seed, step)`` alone). Returns ``(model, losses)``.

    Raises:
        ValueError: ``pixels`` and ``tokens`` of different subject counts, or fewer than 2 subjects.
    """
    from open_clip.loss import ClipLoss

    from phantom_core.training.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint

    if len(pixels) != len(tokens) or len(pixels) < 2:
        raise ValueError(f"train_clip: {len(pixels)} subjects' images and {len(tokens)} captions; need the same "
                         "number, at least 2")
    model = build_clip(config, config.seed).train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": rest, "weight_decay": 0.0}], lr=config.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _clip_lr_factor(s, config))
    start, losses = 0, []
    folder = Path(run_dir) / "checkpoints" if run_dir else None
    if folder is not None and (found := list_checkpoints(folder)):
        state = load_checkpoint(found[-1][1], model, optimizer, scheduler)
        start, losses = state["step"], list(state["losses"])
        logger.info("clip: resumed from %s (step %d)", found[-1][1], start)
    loss_fn = ClipLoss()
    for step in range(start, config.steps):
        chosen, variant = _batch(step, config, len(pixels), pixels.shape[1])
        image_features, text_features, scale = model(normalise(pixels[chosen, variant]), tokens[chosen])
        loss = loss_fn(image_features, text_features, scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # CLIP's cap on the temperature
        losses.append(float(loss.detach()))
        if progress is not None:
            progress(step + 1, config.steps, f"loss {losses[-1]:.3f}")
        if folder is not None and ((step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps):
            save_checkpoint(folder, step + 1, model, optimizer, scheduler, {"losses": losses}, asdict(config), keep=1)
    return model.eval(), losses


@torch.no_grad()
def retrieval_accuracy(model: nn.Module, pixels: Tensor, tokens: Tensor, ks: Sequence[int] = (1, 5)
                       ) -> dict[str, float]:
    """Zero-shot retrieval: image ``i`` (uint8 ``(N, 3, s, s)``) -> its caption among all ``N`` captions
    (``tokens (N, L)``, one per image, in the same order). Returns ``{"top1": ..., "top5": ..., "n": N}``,
    fractions in [0, 1]."""
    model.eval()
    image = nn.functional.normalize(model.encode_image(normalise(pixels)), dim=-1)  # (N, E)
    text = nn.functional.normalize(model.encode_text(tokens), dim=-1)  # (N, E)
    ranks = (image @ text.T).argsort(dim=1, descending=True)  # (N, N)
    hit = ranks == torch.arange(len(pixels))[:, None]
    return {**{f"top{k}": float(hit[:, :k].any(dim=1).float().mean()) for k in ks}, "n": len(pixels)}


def vision_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The image tower in open_clip's layout (``visual.*``), float32, contiguous."""
    return {f"visual.{k}": v.detach().float().contiguous() for k, v in model.visual.state_dict().items()}


def save_vision_tower(model: nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write the image tower (``vision_state_dict``) atomically as safetensors; returns ``path``."""
    from safetensors.torch import save_file

    from phantom_core.loading.disk import atomic_write

    with atomic_write(path) as tmp:
        save_file(vision_state_dict(model), str(tmp), metadata={"format": "pt", **(metadata or {})})
    return Path(path)


def stage_clip(work: str | Path, config: ClipTrainConfig = ClipTrainConfig(),
               progress: ClipProgress | None = None) -> Path:
    """Train the world CLIP (resumable), print and save its held-out retrieval figures (``clip_report.json``),
    write ``<work>/clip_vision.safetensors``; a no-op when that file exists. Returns its path."""
    work = Path(work)
    path = work / CLIP_STAGE_FILE
    if path.is_file():
        return path
    train_subjects, test_subjects = split_subjects("train", CLIP_SOURCES), split_subjects("test", CLIP_SOURCES)
    size = config.tower.image_size
    pixels = reference_pixels(train_subjects, config.variants, config.seed, size)
    model, losses = train_clip(config, pixels, tokenize([s.name for s in train_subjects], config),
                               work / CLIP_RUN, progress)
    test_pixels = reference_pixels(test_subjects, 1, config.seed + 1, size)[:, 0]
    test_tokens = tokenize([s.name for s in test_subjects], config)
    report = {"trained": retrieval_accuracy(model, test_pixels, test_tokens),
              "random_init": retrieval_accuracy(build_clip(config, config.seed + 2), test_pixels, test_tokens),
              "first_loss": losses[0], "last_loss": float(np.mean(losses[-20:])), "config": asdict(config)}
    logger.info("clip held-out retrieval among %d names: top-1 %.1f%% top-5 %.1f%% (random init: %.1f%% / %.1f%%)",
                report["trained"]["n"], 100 * report["trained"]["top1"], 100 * report["trained"]["top5"],
                100 * report["random_init"]["top1"], 100 * report["random_init"]["top5"])
    from phantom_core.loading.disk import atomic_write

    with atomic_write(work / CLIP_REPORT) as tmp:
        tmp.write_text(json.dumps(report, indent=1), encoding="utf-8")
    return save_vision_tower(model, path, {"retrieval": json.dumps(report["trained"])})
