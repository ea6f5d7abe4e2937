"""The recipe of the world's MMDiT default: the paper's own network (``mmdit``) trained in the miniature world on the
Phantom-Wan recipe's files, next to the Phantom-Wan DiT it is compared with.

Given a work folder that already holds the Phantom-Wan recipe's stages ``text``, ``vae`` and ``latents``
(``world.default_model``: ``umt5.safetensors``, ``vae.safetensors``, ``latents/index.json``), three more stages,
each resumable:

1. ``clip``: the world CLIP (``world.clip_model.stage_clip``) -> ``clip_vision.safetensors``.
2. ``clip_features``: each cached training triplet's references regenerated from its index (the generator is
   deterministic: ``default_model._raw_samples``) and encoded by that tower (``mmdit.clip.encode_clip_references``,
   the penultimate tokens: ``[N, 17, 128]``) -> ``mmdit_clip_features/part_NNNN.safetensors`` (sample name -> ref_clip).
   The Phantom-Wan latent cache is only read.
3. ``mmdit``: ``MMDIT_PRESETS["world"]`` (4,853,024 parameters, against the Phantom-Wan "world" DiT's 4,862,272) from
   SD3's init, full training with the general trainer in the two phases of ``default_model.stage_dit`` and with
   its settings (``DIT_TRAIN``, ``DIT_LONG_TRAIN``: steps, batch, learning rates, timestep shifts, dropouts), on the
   cached latents plus the CLIP features -> ``mmdit_<variant>.safetensors`` (``load_mmdit`` reads it).

The paper's ablation variants (``MMDIT_VARIANTS``): ``both`` (VAE and CLIP references), ``vae`` (no CLIP branch:
``MMDIT_PRESETS["world-vae"]``, 4,790,944 parameters), ``clip`` (no VAE reference tokens: ``vae_references`` off).
``both`` drops the VAE latents alone with the paper's probability 0.7 (``MMDIT_VAE_DROPOUT``, on a draw of its
own; the CLIP features stay), on top of ``DIT_TRAIN``'s nested text / reference dropout (0.2 / 0.1), which drops the
VAE latents and the CLIP features together. ``tools/train_default.py --model mmdit --variant both`` runs the stages;
``stage_mmdit_export`` ships ``both`` as the second embedded default, beside the Phantom-Wan one (``make
train-default-mmdit``; ``generate --model default-mmdit``).
"""

from __future__ import annotations

import os
import re
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor

from phantom_core.log import logger
from phantom_core.mmdit.config import TEXT_POSITION_SCALE
from phantom_core.world.clip_model import CLIP_STAGE_FILE, ClipProgress, stage_clip

MMDIT_VARIANTS = ("both", "vae", "clip")
MMDIT_PRESET_OF = {"both": "world", "vae": "world-vae", "clip": "world"}  # MMDIT_PRESETS names
MMDIT_VAE_DROPOUT = 0.7  # the paper's VAE-reference dropout (its CLIP features carry the reference meanwhile)
CLIP_OUTPUT = "tokens"
# phase 2's steps: the shipped MMDiT default had 2,000 (DIT_LONG_TRAIN's 3,000 did not fit its session);
# PHANTOM_MMDIT_LONG_STEPS changes it (the ablation variants are compared at one value)
MMDIT_LONG_STEPS = int(os.environ.get("PHANTOM_MMDIT_LONG_STEPS", 2000))
FEATURES_DIR, FEATURES_PART = "mmdit_clip_features", 200  # samples per part file
_INDEX = re.compile(r"world_(?:[a-z]+_)?(\d+)-")  # world_00012-... or world_test_00012-...


def check_variant(variant: str) -> None:
    """Raise ``ValueError`` (listing the valid ones) for an unknown variant."""
    if variant not in MMDIT_VARIANTS:
        raise ValueError(f"MMDiT variant is {variant!r}; valid: {', '.join(MMDIT_VARIANTS)} (VAE and CLIP references, "
                         "VAE only, CLIP only)")


def parameter_counts() -> dict[str, int]:
    """Parameters of the world MMDiT variants and of the Phantom-Wan "world" DiT (built on the meta device)."""
    from phantom_core.mmdit.config import MMDIT_PRESETS
    from phantom_core.mmdit.model import PhantomMMDiT
    from phantom_core.wan.dit import DIT_PRESETS, PhantomWanDiT

    def count(m: torch.nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())

    out = {f"mmdit-{name}": count(PhantomMMDiT(MMDIT_PRESETS[name], device="meta")) for name in ("world", "world-vae")}
    return {**out, "phantom-wan-world": count(PhantomWanDiT(DIT_PRESETS["world"], device="meta"))}


def _sample_indices(work: Path) -> tuple[list[tuple[int, str]], dict]:
    """``(world index, cache file name)`` of every cached triplet, in the cache's order, and the index's ``world``
    record (``travel``, ``subjects`` where every scene has that many; ``{}`` in an index without one)."""
    import json

    from phantom_core.world.default_model import LATENT_INDEX

    index = Path(work) / LATENT_INDEX
    if not index.is_file():
        raise ValueError(f"{index} is missing: run the Phantom-Wan recipe's text, vae and latents stages first "
                         "(python -m tools.train_default --stages text,vae,latents)")
    record = json.loads(index.read_text(encoding="utf-8"))
    out = []
    for name in record["files"]:
        if not (m := _INDEX.match(name)):
            raise ValueError(f"{index}: cache file {name!r} is not a world sample (world_NNNNN-<key>.safetensors)")
        out.append((int(m.group(1)), name))
    return out, record.get("world", {})


def stage_clip_features(work: str | Path, clip_path: str | Path | None = None, split: str = "train",
                        seed: int | None = None) -> Path:
    """Encode the references of every cached triplet with the world CLIP (resumable, ``FEATURES_PART`` samples a
    part file); returns the features folder. The references are rendered again from the cache's index: the recipe's
    world with the index's ``travel`` and ``subjects``, drawn from ``split`` with ``seed`` (None: the recipe's
    training seed, ``default_model._raw_samples``' default; ``tools.motion_run``'s held-out caches give theirs).
    Raises ``ValueError`` when a regenerated sample does not match its cache file (another generator version, split
    or seed: rebuild the latents, or give the cache's own)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from phantom_core.loading.disk import atomic_write
    from phantom_core.mmdit.clip import encode_clip_references, load_clip_vision
    from phantom_core.world.default_model import LATENT_DIR, WORLD, _raw_samples

    work = Path(work)
    folder = work / FEATURES_DIR
    samples, world = _sample_indices(work)
    config = replace(WORLD, travel=world["travel"]) if "travel" in world else WORLD
    draw = {"split": split, "count": world.get("subjects")} | ({} if seed is None else {"seed": seed})
    tower = None
    for part in range(0, len(samples), FEATURES_PART):
        path = folder / f"part_{part // FEATURES_PART:04d}.safetensors"
        if path.is_file():
            continue
        tower = tower or load_clip_vision(clip_path or work / CLIP_STAGE_FILE)
        chunk = samples[part: part + FEATURES_PART]
        features = {}
        for (i, file), raw in zip(chunk, _raw_samples([i for i, _ in chunk], config, **draw)):
            with safe_open(str(work / LATENT_DIR / file), framework="pt") as st:
                meta, refs = st.metadata(), st.get_slice("ref_latents").get_shape()[1]
            stored = (meta["name"], refs, meta.get("caption", raw.caption))
            if (raw.name, len(raw.references), raw.caption) != stored:
                raise ValueError(f"world sample {i} regenerates as {raw.name} ({raw.caption!r}, {len(raw.references)} "
                                 f"references) but {file} holds {meta['name']} ({meta.get('caption')!r}, {refs}): "
                                 "rebuild the latent cache, or give its split and seed")
            features[raw.name] = encode_clip_references(tower, list(raw.references), CLIP_OUTPUT)[0].contiguous()
        with atomic_write(path) as tmp:
            save_file(features, str(tmp))
        logger.info("mmdit clip features: %d/%d samples", part + len(chunk), len(samples))
    return folder


def clip_feature_table(work: str | Path) -> dict[str, Tensor]:
    """Sample name -> ``ref_clip [N, T, C]`` float32 from ``stage_clip_features``' part files."""
    from safetensors.torch import load_file

    table: dict[str, Tensor] = {}
    for path in sorted((Path(work) / FEATURES_DIR).glob("part_*.safetensors")):
        table.update(load_file(str(path)))
    return table


def with_clip_features(data, table: dict[str, Tensor]):
    """``data`` (a latent dataset) as an ``InMemoryLatents`` whose every sample carries its ``ref_clip`` from
    ``table`` (``clip_feature_table``). Raises ``ValueError`` for a sample without features."""
    from phantom_core.training.cache import InMemoryLatents

    samples = [data[i] for i in range(len(data))]
    missing = [s.name for s in samples if s.name not in table]
    if missing:
        raise ValueError(f"{len(missing)} cached samples have no CLIP features (first: {missing[0]}); run the "
                         "clip_features stage")
    return InMemoryLatents([replace(s, ref_clip=table[s.name]) for s in samples], data.dropped_context)


def mmdit_dataset(work: str | Path, variant: str, limit: int | None = None):
    """The Phantom-Wan recipe's latent cache (first ``limit`` samples), with each sample's CLIP features unless
    ``variant`` is ``vae`` (an ``InMemoryLatents``). Raises ``ValueError`` for a sample without features."""
    from phantom_core.training.cache import InMemoryLatents
    from phantom_core.world.default_model import cached_latents

    data = cached_latents(work, limit)
    if variant != "vae":
        return with_clip_features(data, clip_feature_table(work))
    return InMemoryLatents([data[i] for i in range(len(data))], data.dropped_context)


def mmdit_settings(variant: str, phase: int, clip_path: str, vae_dropout: float = MMDIT_VAE_DROPOUT) -> dict:
    """The ``TrainConfig`` values of a phase (1 or 2) of ``variant``: ``DIT_TRAIN`` / ``DIT_LONG_TRAIN`` with the
    MMDiT preset (phase 2: ``MMDIT_LONG_STEPS`` steps), the CLIP file and the variant's reference inputs
    (``vae_dropout`` for ``both`` only)."""
    from phantom_core.world.default_model import DIT_LONG_TRAIN, DIT_TRAIN

    check_variant(variant)
    base = DIT_TRAIN if phase == 1 else {**DIT_LONG_TRAIN, "steps": MMDIT_LONG_STEPS}
    return {**base, "dit": f"scratch:mmdit-{MMDIT_PRESET_OF[variant]}", "clip_output": CLIP_OUTPUT,
            "clip_vision": "" if variant == "vae" else clip_path, "vae_references": variant != "clip",
            "vae_reference_dropout": vae_dropout if variant == "both" else 0.0}


def stage_mmdit(work: str | Path, variant: str = "both", progress: ClipProgress | None = None,
                vae_dropout: float = MMDIT_VAE_DROPOUT, steps: tuple[int, int] | None = None) -> Path:
    """Train the world MMDiT ``variant`` in the two phases of ``default_model.stage_dit`` (resumable) ->
    ``<work>/mmdit_<variant>.safetensors``. ``steps``: override the two phases' steps (quick checks)."""
    from phantom_core.inference.settings import WAN_NEGATIVE_PROMPT
    from phantom_core.training.config import load_config
    from phantom_core.training.loop import train

    check_variant(variant)
    work = Path(work)
    path, phase1 = work / f"mmdit_{variant}.safetensors", work / f"mmdit_{variant}_phase1.safetensors"
    if path.is_file():
        return path
    counts = parameter_counts()
    logger.info("MMDiT %s: %d parameters (Phantom-Wan world DiT: %d)", variant,
                counts[f"mmdit-{MMDIT_PRESET_OF[variant]}"], counts["phantom-wan-world"])
    data = mmdit_dataset(work, variant)
    clip_path = str(work / CLIP_STAGE_FILE)
    report = progress or (lambda s, t, note: logger.info("mmdit step %d/%d %s", s, t, note) if s % 10 == 0 else 0)
    for phase, out in ((1, phase1), (2, path)):
        if out.is_file():
            continue
        settings = mmdit_settings(variant, phase, clip_path, vae_dropout)
        if phase == 2:
            settings["dit"] = str(phase1)
        if steps is not None:
            settings.update(steps=steps[phase - 1], warmup_steps=min(settings["warmup_steps"], steps[phase - 1]))
        config = load_config(None, **settings, out=str(out), run_dir=str(work / f"mmdit_{variant}_run{phase}"),
                             resume=True, dropped_prompt=WAN_NEGATIVE_PROMPT)
        train(config, dataset=data, callback=lambda step, total, loss: report(step, total, f"loss {loss:.4f}"))
    return path


def train_mmdit_default(work: str | Path, variant: str = "both", progress: ClipProgress | None = None,
                        vae_dropout: float = MMDIT_VAE_DROPOUT) -> Path:
    """Stages 1-3 (``clip``, ``clip_features`` unless ``variant`` is ``vae``, ``mmdit``) in ``work``; returns the
    MMDiT file."""
    check_variant(variant)
    if variant != "vae":
        stage_clip(work, progress=progress)
        stage_clip_features(work)
    return stage_mmdit(work, variant, progress, vae_dropout)


def stage_mmdit_export(work: str | Path, variant: str = "both", dit: str | Path | None = None,
                       vae: str | Path | None = None) -> dict[str, Path]:
    """Copy the trained MMDiT (``dit``, default ``mmdit_<variant>.safetensors``; the shipped default is ``both``
    after ``tools.train_default``'s motion stages, which give their file), the world CLIP tower and the VAE of its
    latents into ``phantom_core/tiny/trained/`` (atomically; what ``install_trained_mmdit_default`` installs).

    The MMDiT learned on latents of ``vae`` (default ``work``'s ``vae.safetensors``) and ``work``'s umT5. The umT5 is
    always the shipped Phantom-Wan default's, and so is the VAE while ``TRAINED_MMDIT_FILES["vae"]`` names that
    default's file: raises ``ValueError`` naming both files unless each such file is byte-identical to the one the
    MMDiT learned with (export the Phantom-Wan default from this folder first: ``python -m tools.train_default --work
    <work> --stages export``). A VAE of the MMDiT's own is written from ``vae``. Raises ``FileNotFoundError`` naming a
    missing stage file."""
    from phantom_core.loading.disk import atomic_write
    from phantom_core.tiny.default import TRAINED_FILES, TRAINED_MMDIT_FILES, trained_file
    from phantom_core.world.default_model import TEXT_STAGE_FILE, VAE_STAGE_FILE

    check_variant(variant)
    work = Path(work)
    sources = {"dit": Path(dit) if dit else work / f"mmdit_{variant}.safetensors",
               "clip_vision": work / CLIP_STAGE_FILE}
    shared = {"vae": Path(vae) if vae else work / VAE_STAGE_FILE, "text_encoder": work / TEXT_STAGE_FILE}  # in order
    if Path(TRAINED_MMDIT_FILES["vae"]).name != Path(TRAINED_FILES["vae"]).name:  # a VAE of the MMDiT's own
        sources["vae"] = shared.pop("vae")
    for path in sources.values():
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: run the MMDiT stages first (python -m tools.train_default "
                                    f"--work {work} --model mmdit --variant {variant})")
    for role, ours in shared.items():
        shipped = trained_file(TRAINED_FILES[role])
        if not (ours.is_file() and shipped.is_file() and ours.read_bytes() == shipped.read_bytes()):
            raise ValueError(f"the MMDiT in {work} was trained on {ours}, which is not byte-identical to the shipped "
                             f"Phantom-Wan default's {shipped}, and the MMDiT default ships with that one: export the "
                             f"Phantom-Wan default from this folder first (python -m tools.train_default --work {work} "
                             "--stages export), or train the MMDiT in the folder the shipped default came from")
    out = {}
    for role, source in sources.items():
        target = trained_file(TRAINED_MMDIT_FILES[role])
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(target) as tmp:
            tmp.write_bytes(source.read_bytes())
        logger.info("export mmdit %s: %s (%.1f MiB)", role, target, target.stat().st_size / 2**20)
        out[role] = target
    return out


def with_pooled_vectors(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """A copy of the MMDiT ``model`` (float32, CPU) with SD3's pooled-text vector and the pooled-reference vector
    (``MMDiTConfig.pooled_text`` / ``pooled_reference``: an MLP of the mean umT5 token and of the mean reference
    token, each added to every block's adaLN vector) added to it. The two MLPs are Xavier-initialised from ``seed``
    with their last Linear zero, so the copy computes exactly what ``model`` computes until training moves them
    (the lever of docs/WORLD.md: a global vector of the subject and of the prompt that every block sees).

    Raises:
        ValueError: ``model`` is not a ``PhantomMMDiT``, or has the vectors already.
    """
    out = _extended(model, "pooled vectors", ("pooled_text", "pooled_reference"), ("y_embedder.", "r_embedder."), seed)
    for mlp in (out.y_embedder.mlp, out.r_embedder.mlp):
        torch.nn.init.zeros_(mlp[2].weight)
        torch.nn.init.zeros_(mlp[2].bias)
    return out


def with_text_positions(model: torch.nn.Module, scale: float = TEXT_POSITION_SCALE) -> torch.nn.Module:
    """A copy of the MMDiT ``model`` (float32, CPU) with learned positions in its text stream
    (``MMDiTConfig.text_positions``: the text tokens' position embedding and the CLIP tokens' reference index
    embedding), started as ``scale`` times the sin-cos table (``PhantomMMDiT.set_text_positions``; the world umT5
    gives a motion word the same features in either clause: docs/WORLD.md). ``scale`` 0: the copy computes exactly
    what ``model`` computes until training moves them; the default gives the positions a size the blocks notice
    at once (zero-initialised ones stayed at 3% of the tokens' size over 1,750 steps), at the cost of a velocity
    that differs from the model's at first.

    Raises:
        ValueError: ``model`` is not a ``PhantomMMDiT``, or has the positions already.
    """
    out = _extended(model, "text positions", ("text_positions",), ("text_pos_embed", "clip_index_embed"), 0)
    out.set_text_positions(scale)
    return out


def with_reference_index(model: torch.nn.Module, scale: float = TEXT_POSITION_SCALE) -> torch.nn.Module:
    """A copy of the MMDiT ``model`` (float32, CPU) with a learned index on each reference's VAE tokens
    (``MMDiTConfig.reference_index``: ``ref_index_embed``), so that a video token which copies a reference's look
    also carries which reference (and so which clause) it is. It starts as the model's own trained
    ``clip_index_embed`` where it has one (reference k carries one index vector in both streams), else as ``scale``
    times the sin-cos rows ``set_text_positions`` gives the CLIP indices.

    Raises:
        ValueError: ``model`` is not a ``PhantomMMDiT``, or has the index already.
    """
    out = _extended(model, "a reference index", ("reference_index",), ("ref_index_embed",), 0)
    with torch.no_grad():
        if hasattr(model, "clip_index_embed"):
            out.ref_index_embed.copy_(model.clip_index_embed.float())
        else:  # init_weights set the sin-cos rows at TEXT_POSITION_SCALE
            out.ref_index_embed.mul_(scale / TEXT_POSITION_SCALE)
    return out


def with_reference_key_mask(model: torch.nn.Module, threshold: float) -> torch.nn.Module:
    """A float32 CPU copy of the MMDiT ``model`` whose references' background tokens are no keys
    (``MMDiTConfig.reference_key_mask`` = ``threshold``: the white letterbox, which took 93% of the world MMDiT's
    attention to its VAE reference tokens, docs/WORLD.md). No weight changes; the velocity does wherever there
    are references.

    Raises:
        ValueError: ``model`` is not a ``PhantomMMDiT``, has a key mask already, or ``threshold`` is outside
            ``(0, 1)``.
    """
    from phantom_core.mmdit.model import PhantomMMDiT

    if not isinstance(model, PhantomMMDiT):
        raise ValueError(f"model is a {type(model).__name__}; a reference key mask is an MMDiT's (PhantomMMDiT)")
    if model.config.reference_key_mask:
        raise ValueError(f"model already has a reference key mask ({model.config.reference_key_mask})")
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold is {threshold}; the reference key mask takes a fraction in (0, 1)")
    out = PhantomMMDiT(replace(model.config, reference_key_mask=threshold), device="meta").to_empty(device="cpu")
    sd = {k: v.float() for k, v in model.state_dict().items()}
    out.load_state_dict({**sd, "reference_key_mask": torch.tensor(threshold)})
    return out


def _extended(model: torch.nn.Module, what: str, flags: tuple[str, ...], prefixes: tuple[str, ...],
              seed: int) -> torch.nn.Module:
    """A float32 CPU copy of the MMDiT ``model`` with the config ``flags`` (together: ``what``) switched on: its
    weights loaded, the new ones (keys starting with ``prefixes``) as ``init_weights`` from ``seed`` makes them.
    ``ValueError`` for a model that is not a ``PhantomMMDiT`` or has one of the flags already."""
    from phantom_core.mmdit.model import PhantomMMDiT

    if not isinstance(model, PhantomMMDiT):
        raise ValueError(f"model is a {type(model).__name__}; {what} are an MMDiT's (PhantomMMDiT)")
    if any(getattr(model.config, flag) for flag in flags):
        raise ValueError(f"model already has {what} ({' / '.join(flags)})")
    out = PhantomMMDiT(replace(model.config, **dict.fromkeys(flags, True)), device="meta").to_empty(device="cpu")
    out.init_weights(torch.Generator().manual_seed(seed))
    missing, unexpected = out.load_state_dict({k: v.float() for k, v in model.state_dict().items()}, strict=False)
    if unexpected or any(not k.startswith(prefixes) for k in missing):
        raise ValueError(f"model's weights do not fit its config: missing {missing}, unexpected {unexpected}")
    return out
