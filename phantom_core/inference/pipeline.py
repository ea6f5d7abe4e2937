"""The standalone generation pipeline: references + prompt -> Phantom video, without ComfyUI.

Two entry points:

- :func:`generate` works on loaded models and returns the decoded video tensor;
- :func:`generate_to_file` loads every model file first (so a bad file fails before any sampling), generates,
  writes the MP4 atomically and a JSON sidecar ``<out>.json`` (every setting, the seed, file hashes) from
  which the same video can be regenerated bit for bit on the same machine (format: ``phantom_core.inference.sidecar``,
  whose functions are re-exported here for existing callers).

The steps are those of upstream ``Phantom_Wan_S2V.generate`` (svjack/Phantom ``phantom_wan/subject2video.py``):
encode prompt and negative prompt with umT5, VAE-encode each reference alone, draw the seeded noise, sample with
Phantom's three-pass guidance, decode with the VAE.

The velocity model is the Phantom-Wan DiT or the paper's MMDiT (``phantom_core.mmdit``; :func:`load_models` tells
them apart by their keys). An MMDiT with a CLIP branch also reads the references' CLIP features: :func:`generate`
takes the CLIP vision tower (``clip_vision``, :func:`load_clip_tower`) and which of its features (``clip_output``),
as the nodes take them (``PhantomCLIPEncodeReferences``) and the trainer caches them (``clip_vision`` /
``clip_output``). They are a model input, not a sampling setting: ``GenerationSettings`` does not hold them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from phantom_core.inference.parallel import ParallelRun, ParallelSampling
from phantom_core.inference.settings import (
    GenerationSettings,
    resolve_seed,
)
from phantom_core.inference.sidecar import (
    build_sidecar,
    default_sidecar_path,
    runtime_record,
    write_sidecar,
)
from phantom_core.inference.threads import cpu_threads
from phantom_core.loading.fp8 import CastLinear, default_compute_dtype, is_fp8
from phantom_core.log import logger
from phantom_core.lora.apply import apply_loras
from phantom_core.mmdit.clip import CLIP_OUTPUTS, ClipOutput, ClipVision, encode_clip_references, load_clip_vision
from phantom_core.mmdit.inputs import clip_features_for
from phantom_core.mmdit.load import load_any_dit
from phantom_core.mmdit.model import PhantomMMDiT
from phantom_core.references import MAX_REFERENCES, encode_references, open_reference, uniform_reference_warning
from phantom_core.sampling.cache import StepCache
from phantom_core.sampling.loop import StepCallback, check_batch_passes, sample_from_seed
from phantom_core.video_io import to_uint8_frames, write_mp4
from phantom_core.wan.attention import check_attention, resolve_attention, use_attention
from phantom_core.wan.block_compile import set_compiled
from phantom_core.wan.umt5 import load_text_encoder
from phantom_core.wan.vae import load_vae

BATCH_PASSES_NAMES = {True: "on", False: "off"}  # the sidecar records batch_passes as its word

# ---------------------------------------------------------------------------------------------- generation


def _as_images(references: Sequence[Image.Image | str | os.PathLike]) -> list[Image.Image]:
    """PIL images as they are; paths opened with ``open_reference`` (RGB, EXIF orientation, alpha over white)."""
    if isinstance(references, (str, os.PathLike, Image.Image)):
        references = [references]
    images = []
    for k, ref in enumerate(references, start=1):
        if isinstance(ref, Image.Image):
            images.append(ref)
            continue
        try:
            images.append(open_reference(ref))
        except (OSError, ValueError) as err:
            raise ValueError(f"reference {k} ({ref}) cannot be read as an image: {err}") from err
    if not 1 <= len(images) <= MAX_REFERENCES:
        raise ValueError(f"references: got {len(images)}; Phantom takes 1 to {MAX_REFERENCES} reference images")
    for k, image in enumerate(images, start=1):
        if (warning := uniform_reference_warning(image, f"reference {k}")) is not None:
            logger.warning("%s", warning)
    return images


def check_compatible(dit: Any, vae: Any, text_encoder: Any) -> None:
    """Raise ``ValueError`` when the three models cannot work together (text width, latent channels); ``dit``: a
    Phantom-Wan DiT or an MMDiT (both configs name them ``text_dim`` and ``in_dim``)."""
    text_dim, d_model = dit.config.text_dim, text_encoder.spec.d_model
    if text_dim != d_model:
        raise ValueError(f"the DiT expects {text_dim}-wide text features but the text encoder gives {d_model}; "
                         "use the umT5 encoder that belongs to this DiT")
    if dit.config.in_dim != vae.config.z_dim:
        raise ValueError(f"the DiT takes {dit.config.in_dim} latent channels but the VAE has {vae.config.z_dim}")


def check_clip_vision(dit: Any, clip_vision: ClipVision | None, clip_output: str) -> None:
    """Raise ``ValueError`` before any work when the CLIP tower does not fit ``dit``: ``clip_output`` not one of
    ``CLIP_OUTPUTS``; a DiT that reads CLIP features (``config.clip_dim > 0``: an MMDiT with a CLIP branch) without a
    tower; a tower whose ``clip_output`` features are not ``clip_dim`` wide. A tower given to a DiT without CLIP
    input (the Phantom-Wan DiT, a "VAE only" MMDiT) is accepted: :func:`generate` ignores it with a warning, as the
    sampler node does (``mmdit.inputs.clip_features_for``)."""
    if clip_output not in CLIP_OUTPUTS:
        raise ValueError(f"clip_output is {clip_output!r}; valid: {', '.join(CLIP_OUTPUTS)}")
    clip_dim = getattr(dit.config, "clip_dim", 0)
    if clip_dim and clip_vision is None:
        raise ValueError(f"clip_vision: none given, but this {type(dit).__name__} reads {clip_dim}-wide CLIP features "
                         "of the references; pass the CLIP vision tower it was trained with (load_clip_tower)")
    if clip_dim and clip_vision.output_width(clip_output) != clip_dim:
        raise ValueError(f"clip_vision: its {clip_output!r} features are {clip_vision.output_width(clip_output)} wide "
                         f"but this {type(dit).__name__} reads {clip_dim}; use the tower and clip_output (tokens / "
                         "pooled) it was trained with")


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def attention_choice(attention: str | None, dit: Any) -> tuple[str, str]:
    """``(choice, back-end)``: the attention choice in effect under ``use_attention(attention)`` (None: as set
    outside, ``$PHANTOM_ATTENTION`` or ``auto``) and the back-end it runs ``dit``'s attention with on its device and
    compute dtype. Raises ``ValueError`` (``wan.attention.resolve_attention``) before any sampling."""
    with use_attention(attention) as chosen:
        return chosen, resolve_attention(chosen, _device_of(dit).type, dit.compute_dtype, dit.config.head_dim)


@torch.no_grad()
def generate(dit: Any, vae: Any, text_encoder: Any, references: Sequence[Image.Image | str | os.PathLike],
             settings: GenerationSettings, *, callback: StepCallback | None = None,
             parallel: ParallelRun | None = None, attention: str | None = None,
             batch_passes: bool | str = "auto", clip_vision: ClipVision | None = None,
             clip_output: ClipOutput = "tokens") -> Tensor | None:
    """Generate one video from loaded models (:func:`load_models`, or ``load_any_dit``, ``load_vae``,
    ``load_text_encoder`` and, for an MMDiT with a CLIP branch, :func:`load_clip_tower`).

    Args:
        dit: ``PhantomWanDiT`` or ``PhantomMMDiT``; sampling runs on its device, the model call in its compute
            dtype.
        vae: ``WanVAE`` (encodes the references, decodes the result) on any device.
        text_encoder: ``UMT5TextEncoder`` of the DiT's text width.
        references: 1 to 4 PIL images or image paths, in order.
        settings: see :class:`GenerationSettings`; a seed of -1 draws a random seed (logged; call
            :func:`resolve_seed` first to know it).
        callback: ``callback(step, steps, x0_pred)`` after each sampling step; it may raise to abort.
        parallel: this rank's part in a torchrun launch (``inference.parallel``; every rank calls this; rank 0's
            settings, seed, context and reference latents are broadcast and used by all); None: one process.
        attention: the DiT's attention back-end (``wan.attention.ATTENTION_CHOICES``: auto, sdpa, flash, sage,
            math); None: as set outside (``use_attention``, ``$PHANTOM_ATTENTION``), else auto.
        batch_passes: ``"auto"`` / ``"on"`` / ``"off"``: the guidance passes of a step as one batched forward
            (``sampling.loop.sample_phantom``; auto: unless they would not fit the free GPU memory).
        clip_vision: the CLIP vision tower (``mmdit.clip.ClipVision``) of an MMDiT with a CLIP branch, required
            for it; its features of each reference (``encode_clip_references``) go to the DiT as ``ref_clip``.
            Ignored, with a warning, for a DiT without CLIP input (:func:`check_clip_vision`).
        clip_output: which features: ``"tokens"`` (penultimate block, the default, as the node and the trainer)
            or ``"pooled"``; their width must be the MMDiT's ``clip_dim``.
    Returns:
        Video ``[1, 3, frames, height, width]`` float32 in [-1, 1] on the VAE's device; None on ranks other than 0
        (they sample with rank 0, which alone decodes).
    Raises:
        ValueError: bad references, models that do not belong together, an attention back-end that is unknown,
            not installed or unfit for the DiT's device and dtype, or a parallel layout that does not fit the world
            size or the DiT's heads, an MMDiT under ``parallel`` (one process only), a missing or unfit CLIP tower
            (before any sampling).
    """
    # 1. inputs: seed (rank 0's, under torchrun), reference images, model compatibility
    check_clip_vision(dit, clip_vision, clip_output)
    if parallel is not None and isinstance(dit, PhantomMMDiT):  # refused on every rank, before any collective
        raise ValueError("parallel: the MMDiT runs in one process only (guidance and sequence parallelism are made "
                         "for the Phantom-Wan DiT); launch without torchrun / --parallel")
    settings = resolve_seed(settings) if parallel is None else parallel.from_main(resolve_seed(settings))
    images = _as_images(references)
    check_compatible(dit, vae, text_encoder)
    attention, backend = attention_choice(attention, dit)
    logger.info("attention: %s (%s)", backend, attention)
    device = _device_of(dit)
    # 2. text context (real tokens; the DiT zero-pads to 512 itself)
    context, context_neg = text_encoder.encode([settings.prompt, settings.negative_prompt])  # (L1, D), (L2, D)
    context, context_neg = context[None].to(device), context_neg[None].to(device)  # (1, L, D)
    # 3. references: each VAE-encoded alone as a 1-frame latent, normalized
    refs = encode_references(vae, images, settings.width, settings.height, settings.ref_mode)  # (1, 16, N, h, w)
    refs = refs.to(device)
    ref_clip = None if clip_vision is None else encode_clip_references(clip_vision, images, clip_output)
    ref_clip = clip_features_for(dit, ref_clip)  # (1, N, T, C), or None for a DiT without CLIP input (warned)
    ref_clip = None if ref_clip is None else ref_clip.to(device)
    plan = ParallelSampling()
    if parallel is not None:  # every rank feeds the DiT rank 0's bits; the layout fits the world and the heads
        context, context_neg, refs = parallel.share_tensors(*(t.contiguous() for t in (context, context_neg, refs)))
        plan = parallel.sampling(dit)
    # 4. noise from the seed (CPU generator: the same draw on any device) and sampling
    cache = StepCache(settings.cache_threshold) if settings.cache_threshold > 0 else None
    window = (settings.image_guidance_start, settings.image_guidance_end)
    with plan.parallel_model(dit) as model, use_attention(attention):
        latents = sample_from_seed(model, settings.seed, settings.latent_shape, refs, context, context_neg,
                                   image_guidance_window=window, cache=cache, pass_runner=plan.pass_runner,
                                   steps=settings.steps, shift=settings.shift, solver=settings.solver,
                                   w_img=settings.w_img, w_text=settings.w_text, callback=callback,
                                   model_dtype=dit.compute_dtype, batch_passes=batch_passes,
                                   ref_clip=ref_clip)  # (1, 16, F, h, w) fp32
    if cache is not None:
        logger.info("step cache: %d of %d pass evaluations reused (%.0f%%)", cache.reused,
                    cache.computed + cache.reused, 100 * cache.saved_fraction)
    if parallel is not None and not parallel.is_main:
        return None
    # 5. decode
    return vae.decode(latents.to(_device_of(vae)))  # (1, 3, frames, H, W) in [-1, 1]


def log_progress(step: int, total: int, x0_pred: Tensor) -> None:
    """A step callback that logs ``step i/n`` at INFO level (the library's progress report)."""
    logger.info("sampling step %d/%d", step + 1, total)


def resolve_compute_dtype(dtype: torch.dtype | None, compute_dtype: torch.dtype | None,
                          device: torch.device | str) -> torch.dtype:
    """The activation dtype of a model loaded with weight ``dtype`` on ``device``.

    ``compute_dtype`` when given; else a forced float ``dtype`` itself (fp32 / fp16 / bf16); else (stored dtype
    kept, or fp8 weights) bf16 on CUDA and fp32 elsewhere (``fp8.default_compute_dtype``): a bf16 or fp8 file is
    upcast per layer during the forward, never wholesale in memory.
    """
    if compute_dtype is not None:
        return compute_dtype
    if dtype is not None and not is_fp8(dtype):
        return dtype
    return default_compute_dtype(device)


def apply_dit_loras(dit: Any, loras: Sequence[tuple[str | os.PathLike, float]]) -> Any:
    """Apply ``loras`` (``[(file, strength)]``) to a loaded DiT: merged into float weights (no cost per step);
    as adapters when the Linear weights are fp8, so the stored fp8 weights are not rounded a second time
    (``phantom_core.lora.apply``). Raises ``ValueError`` naming the LoRA file."""
    if not loras:
        return dit
    fp8 = any(isinstance(m, CastLinear) and is_fp8(m.weight.dtype) for m in dit.modules())
    return apply_loras(dit, list(loras), merge=not fp8)


def load_models(dit_path: str | os.PathLike, vae_path: str | os.PathLike,
                text_encoder_path: str | os.PathLike, *, tokenizer_path: str | os.PathLike | None = None,
                dtype: torch.dtype | None = None, device: torch.device | str = "cpu",
                compute_dtype: torch.dtype | None = None,
                text_encoder_device: torch.device | str | None = None,
                loras: Sequence[tuple[str | os.PathLike, float]] = (), compiled: bool = False,
                block_swap: int = 0) -> tuple[Any, Any, Any]:
    """Load DiT, VAE and text encoder, each error re-raised naming the role and file; then check compatibility.

    The DiT file may hold a Phantom-Wan DiT or an MMDiT (``mmdit.load.load_any_dit``, by its keys); an MMDiT with
    a CLIP branch also needs its CLIP vision tower (:func:`load_clip_tower`) in :func:`generate`.

    Args:
        tokenizer_path: umT5's ``spiece.model`` (or its folder) when the text encoder file has none embedded
            (upstream Wan's ``.pth``).
        dtype: weight dtype of the DiT and the text encoder. None keeps each file's stored dtype (a bf16 umT5 stays
            bf16, an fp8 file stays fp8: a 5.7 B encoder is never upcast wholesale); fp32 / fp16 / bf16 cast every
            weight; an fp8 dtype stores the Linear weights in 8 bits. The VAE always runs in float32 (as
            upstream Wan; it is small).
        device: where the DiT and the VAE run.
        compute_dtype: activation dtype of the DiT and the text encoder; None: see :func:`resolve_compute_dtype`
            (decided per model, from its own device).
        text_encoder_device: where the text encoder runs; None: ``device``. ``"cpu"`` keeps it off the GPU while
            the DiT holds it (:func:`generate` moves the context to the DiT's device).
        loras: ``[(LoRA file, strength)]`` applied to the DiT (:func:`apply_dit_loras`).
        compiled: ``torch.compile`` each DiT block (``wan.block_compile``, inductor) after the LoRAs are applied;
            compilation happens at the first forward.
        block_swap: DiT blocks kept on the CPU and streamed to ``device`` per forward (``wan.block_swap``); 0: off.
    Raises ``ValueError`` / ``FileNotFoundError`` naming the file (or ``block_swap`` out of range).
    """
    te_device = device if text_encoder_device is None else text_encoder_device
    dit = _load_one("DiT", dit_path, lambda p: load_any_dit(
        p, dtype=dtype, device=device, compute_dtype=resolve_compute_dtype(dtype, compute_dtype, device),
        block_swap=block_swap))
    for path, _ in loras:
        if not Path(path).is_file():
            raise FileNotFoundError(f"LoRA file {path} does not exist")
    dit = set_compiled(apply_dit_loras(dit, loras), compiled)
    vae = _load_one("VAE", vae_path, lambda p: load_vae(p, dtype=torch.float32, device=device))
    if tokenizer_path is not None and not Path(tokenizer_path).exists():
        raise FileNotFoundError(f"tokenizer file {tokenizer_path} does not exist")
    text_encoder = _load_one("text encoder", text_encoder_path, lambda p: load_text_encoder(
        p, tokenizer_path, dtype=dtype, device=te_device,
        compute_dtype=resolve_compute_dtype(dtype, compute_dtype, te_device)))
    try:
        check_compatible(dit, vae, text_encoder)
    except ValueError as err:
        raise ValueError(f"{err} (DiT {dit_path}, VAE {vae_path}, text encoder {text_encoder_path})") from err
    return dit, vae, text_encoder


def load_clip_tower(path: str | os.PathLike, *, device: torch.device | str = "cpu") -> ClipVision:
    """The CLIP vision tower of an MMDiT (``mmdit.clip.load_clip_vision``, float32 on ``device``: it is small and
    runs once per video). Raises ``FileNotFoundError`` / ``ValueError`` naming the file."""
    return _load_one("CLIP vision", path, lambda p: load_clip_vision(p, dtype=torch.float32, device=device))


def _load_one(role: str, path: str | os.PathLike, load: Any) -> Any:
    """Run ``load(path)``; any failure becomes an error naming the role, the file and the problem."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{role} file {path} does not exist")
    started = time.perf_counter()
    try:
        model = load(path)
    except Exception as err:  # the loaders raise ValueError; anything else still names the file and the role
        reason = str(err) if isinstance(err, ValueError) else f"{type(err).__name__}: {err}"
        if reason.startswith(str(path)):  # the loader named the file already: "<role> file <path> is truncated..."
            raise ValueError(f"{role} file {reason}") from err
        raise ValueError(f"{role} file {path} cannot be loaded as a {role} checkpoint: {reason}") from err
    logger.info("loaded %s %s in %.1f s", role, path, time.perf_counter() - started)
    return model


def generate_to_file(dit_path: str | os.PathLike, vae_path: str | os.PathLike,
                     text_encoder_path: str | os.PathLike, ref_paths: Sequence[str | os.PathLike],
                     settings: GenerationSettings, out_path: str | os.PathLike, *,
                     dtype: torch.dtype | None = None, device: torch.device | str = "cpu",
                     compute_dtype: torch.dtype | None = None,
                     text_encoder_device: torch.device | str | None = None,
                     progress: bool = True, callback: StepCallback | None = None,
                     sidecar_path: str | os.PathLike | None = None,
                     tokenizer_path: str | os.PathLike | None = None,
                     loras: Sequence[tuple[str | os.PathLike, float]] = (),
                     parallel: ParallelRun | None = None, attention: str | None = None,
                     compiled: bool = False, block_swap: int = 0, batch_passes: bool | str = "auto",
                     clip_vision_path: str | os.PathLike | None = None,
                     clip_output: ClipOutput = "tokens", threads: int | None = None) -> tuple[Path, Path]:
    """Generate a video from model files and write ``out_path`` (MP4, atomic) plus its JSON sidecar.

    Order: validate the output path and the references, load all three models (every bad file fails here,
    before sampling); sample and decode; write the MP4; hash the inputs and write the sidecar
    (``<out>.json`` unless ``sidecar_path``) recording every setting, the seed actually used, dtype and device,
    sha256 and size of every model file (an index and each of its shards) and reference, and versions.

    Args:
        dit_path / vae_path / text_encoder_path: checkpoint files (DiT: also a sharded index or its folder).
        ref_paths: 1 to 4 reference image files. settings: see :class:`GenerationSettings`.
        tokenizer_path: sentencepiece model for a text encoder file without an embedded one.
        out_path: the ``.mp4`` to write.
        dtype / device / compute_dtype / text_encoder_device: see :func:`load_models` (default: stored weight
            dtypes, compute bf16 on CUDA / fp32 on the CPU, text encoder on ``device``).
        progress: log each sampling step (INFO). callback: also called after each step.
        loras: ``[(LoRA file, strength)]`` applied to the DiT (:func:`apply_dit_loras`), recorded in the sidecar.
        parallel: this rank's part in a torchrun launch (``inference.parallel``): every rank loads and samples,
            rank 0 alone writes the MP4 and the sidecar (which records the layout under ``runtime["parallel"]``).
        attention: the DiT's attention back-end (see :func:`generate`). compiled: see :func:`load_models`. Both
            recorded in the sidecar's ``runtime`` (with the back-end ``attention`` resolved to).
        block_swap: see :func:`load_models` (memory only: the video is the same). batch_passes: see
            :func:`generate` (recorded in the sidecar's ``runtime``).
        clip_vision_path / clip_output: the CLIP vision tower of an MMDiT with a CLIP branch (:func:`load_clip_tower`)
            and its features (:func:`generate`), recorded in the sidecar's ``models["clip_vision"]``.
        threads: torch's CPU thread count for the call (``inference.threads``; None: as it is), recorded in the
            sidecar's ``runtime["threads"]``.
    Returns:
        ``(mp4_path, sidecar_path)``: the files written (by rank 0; the other ranks return the same paths).
    Raises:
        FileNotFoundError / ValueError: naming the file or setting at fault, before sampling starts.
    """
    out = Path(out_path)
    if out.suffix.lower() != ".mp4":
        raise ValueError(f"output: got {out}; the output file must end in .mp4")
    settings = resolve_seed(settings)
    images = _as_images(list(ref_paths))
    if attention is not None:
        check_attention(attention)  # unknown or not installed: refused before any model loads
    check_batch_passes(batch_passes)
    with cpu_threads(threads):
        runtime = {"dtype": dtype, "compute_dtype": compute_dtype, "device": device,
                   "text_encoder_device": text_encoder_device}
        dit, vae, text_encoder = load_models(dit_path, vae_path, text_encoder_path, tokenizer_path=tokenizer_path,
                                             loras=loras, compiled=compiled, block_swap=block_swap, **runtime)
        attention, backend = attention_choice(attention, dit)
        tower = None if clip_vision_path is None else load_clip_tower(clip_vision_path, device=device)

        def on_step(step: int, total: int, x0_pred: Tensor) -> None:
            if progress:
                log_progress(step, total, x0_pred)
            if callback is not None:
                callback(step, total, x0_pred)

        started = time.perf_counter()
        video = generate(dit, vae, text_encoder, images, settings, callback=on_step, parallel=parallel,
                         attention=attention, batch_passes=batch_passes, clip_vision=tower,
                         clip_output=clip_output)  # (1, 3, T, H, W)
        seconds = time.perf_counter() - started
        side = Path(sidecar_path) if sidecar_path is not None else default_sidecar_path(out)
        if video is None:  # a rank other than 0 under torchrun: it writes nothing
            return out, side
        write_mp4(to_uint8_frames(video), out, fps=settings.fps, quality=settings.quality)
        ran = runtime_record(**runtime, models=(dit, vae, text_encoder), attention=attention, compiled=compiled,
                             attention_used=backend, batch_passes=BATCH_PASSES_NAMES.get(batch_passes, batch_passes),
                             threads=torch.get_num_threads())
        record = build_sidecar(settings, dit_path=dit_path, vae_path=vae_path, text_encoder_path=text_encoder_path,
                               ref_paths=ref_paths, runtime=ran, out_path=out, seconds=seconds,
                               tokenizer_path=tokenizer_path, loras=loras, clip_vision_path=clip_vision_path,
                               clip_output=clip_output)
        if parallel is not None:
            record["runtime"]["parallel"] = parallel.describe()
        write_sidecar(record, side)
        return out, side
