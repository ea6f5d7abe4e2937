"""Latents and text contexts computed once and cached on disk, and the latent dataset the training loop reads.

Training runs no VAE and no text encoder per step: ``build_cache`` VAE-encodes each clip (normalized latents,
``[16, F, h, w]``) and each reference on its own (``references.encode_references``, as sampling does:
``[16, N, h, w]``), umT5-encodes each caption once (``[L, D]``, the real tokens) and the dropped prompt, and
writes one safetensors file per sample:

    <cache_dir>/<sample name>-<key>.safetensors   latents, ref_latents, context (float32) + name / caption
    <cache_dir>/dropped-<key>.safetensors          context of the dropped prompt
    <cache_dir>/models.json                        fingerprints of the VAE and text encoder that made the cache

With a CLIP vision tower (``clip``, ``clip_features.ClipFeatures``) each sample file also holds ``ref_clip``
(``[N, T, C]``: each reference's CLIP features, ``mmdit.clip.encode_clip_references``) and the tower's fingerprint
in its metadata; a file without them, or with another tower's, gets them added (the VAE latents are kept).

The key hashes everything that determines the tensors (the sample's files with their sizes and modification
times, the caption, the training size and frame count, the reference mode, the models' fingerprints), so a
changed clip, size or model is re-encoded and an unchanged one never is; without fingerprints the
cache is read with the fingerprints it recorded (``models.json``), and the models are loaded only when something
must be encoded.

The training loop reads any ``LatentDataset``: a ``CachedLatents`` here, or ``InMemoryLatents`` filled by a
procedural generator.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save
from torch import Tensor, nn

from phantom_core.loading.disk import atomic_write
from phantom_core.log import logger
from phantom_core.references import encode_references
from phantom_core.training.clip_features import ClipFeatures, add_clip_features
from phantom_core.training.dataset import BadSample, RawSample, SampleSpec, load_sample, report_bad

MODELS_FILE = "models.json"


@dataclass(frozen=True)
class LatentSample:
    """One encoded training sample: normalized ``latents [16, F, h, w]``, ``ref_latents [16, N, h, w]`` (clean),
    ``context [L, D]`` (the caption's real umT5 tokens), and for an MMDiT with a CLIP branch the references'
    ``ref_clip [N, T, C]`` (None without); float32."""

    name: str
    latents: Tensor
    ref_latents: Tensor
    context: Tensor
    ref_clip: Tensor | None = None


class LatentDataset(Protocol):
    """What the training loop reads: indexable samples, their buckets, the dropped prompt's context ``[L, D]``."""

    dropped_context: Tensor

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> LatentSample: ...

    def bucket(self, index: int) -> Hashable:
        """Samples with equal buckets can be stacked into one batch (same latent shape and reference count)."""
        ...


def sample_bucket(latent_shape: Sequence[int], ref_shape: Sequence[int]) -> tuple[int, ...]:
    """The bucket of a sample: ``(F, h, w, N)`` from its latents ``[16, F, h, w]`` and refs ``[16, N, h, w]``."""
    return (*latent_shape[1:], ref_shape[1])


class InMemoryLatents:
    """A ``LatentDataset`` held in memory (a procedural generator's output, tests)."""

    def __init__(self, samples: Sequence[LatentSample], dropped_context: Tensor) -> None:
        self.samples, self.dropped_context = list(samples), dropped_context

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> LatentSample:
        return self.samples[index]

    def bucket(self, index: int) -> Hashable:
        s = self.samples[index]
        return sample_bucket(s.latents.shape, s.ref_latents.shape)


class CachedLatents:
    """A ``LatentDataset`` of cache files (``build_cache``); ``in_memory`` loads them all once, else per access."""

    def __init__(self, files: Sequence[Path], dropped_context: Tensor, in_memory: bool = False) -> None:
        self.files, self.dropped_context = list(files), dropped_context
        self._buckets, self.names = [], []
        for f in self.files:  # headers only: shapes and names
            with safe_open(str(f), framework="pt") as st:
                shapes = (st.get_slice("latents").get_shape(), st.get_slice("ref_latents").get_shape())
                self.names.append(st.metadata()["name"])
            self._buckets.append(sample_bucket(*shapes))
        self._loaded = [self._read(i) for i in range(len(self.files))] if in_memory else None

    def _read(self, index: int) -> LatentSample:
        t = load_file(str(self.files[index]))
        return LatentSample(self.names[index], t["latents"], t["ref_latents"], t["context"], t.get("ref_clip"))

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> LatentSample:
        return self._loaded[index] if self._loaded is not None else self._read(index)

    def bucket(self, index: int) -> Hashable:
        return self._buckets[index]


def module_fingerprint(module: nn.Module) -> str:
    """A cheap identity of a model's weights: sha256 over every tensor's name, shape, dtype and up to 16 values
    spread over it (float64). Different weights give different fingerprints in practice; no full pass."""
    h = hashlib.sha256(type(module).__name__.encode())
    for name, t in module.state_dict().items():
        flat = t.detach().reshape(-1)
        picks = flat[:: max(1, flat.numel() // 16)][:16].to(device="cpu", dtype=torch.float64)
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode() + picks.numpy().tobytes())
    return h.hexdigest()[:16]


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_stamp(path: Path) -> list[Any]:
    """``[path, size, mtime_ns]`` of a file, or of every file in a folder of frames."""
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    return [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def sample_key(sample: SampleSpec | RawSample, settings: dict[str, Any], models: dict[str, str]) -> str:
    """The cache key of one sample: its files' stamps (a ``SampleSpec``) or its pixels' hash (a ``RawSample``),
    its caption, the encoding ``settings`` and the models' fingerprints."""
    if isinstance(sample, SampleSpec):
        content: Any = [_file_stamp(p) for p in (sample.video, *sample.references)]
    else:
        digest = hashlib.sha256(sample.video.float().numpy().tobytes())
        for img in sample.references:
            digest.update(img.tobytes() + str(img.size).encode())
        content = digest.hexdigest()
    return _key(sample.name, content, sample.caption, settings, models)


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:80] or "sample"


def _write_tensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    data = save({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata)
    with atomic_write(path) as tmp:
        tmp.write_bytes(data)


def file_fingerprint(path: str | os.PathLike) -> str:
    """A model file's identity without reading it: hash of its resolved path(s), sizes and modification times."""
    return _key(_file_stamp(Path(path)))


def _models_record(cache_dir: Path, fingerprints: dict[str, str] | None) -> dict[str, str]:
    """``fingerprints`` (recorded in ``models.json``), or the recorded ones when None."""
    record = cache_dir / MODELS_FILE
    if fingerprints is not None:
        with atomic_write(record) as tmp:
            tmp.write_text(json.dumps(fingerprints, sort_keys=True))
        return fingerprints
    if not record.is_file():
        raise ValueError(f"no latent cache in {cache_dir} ({MODELS_FILE} missing); give the VAE and the text "
                         "encoder to encode the dataset")
    return json.loads(record.read_text(encoding="utf-8"))


Encoders = Callable[[], tuple[Any, Any]]
"""``() -> (vae, text_encoder)``: called at most once, only when something must be encoded."""


def build_cache(samples: Iterable[SampleSpec | RawSample], cache_dir: str | os.PathLike, *,
                encoders: Encoders | None, fingerprints: dict[str, str] | None, frames: int, width: int,
                height: int, ref_mode: str = "letterbox", dropped_prompt: str = "", in_memory: bool = False,
                bad: list[BadSample] | None = None, clip: ClipFeatures | None = None
                ) -> tuple[CachedLatents, list[BadSample]]:
    """Encode whatever is not cached yet and return the cached dataset (in ``samples`` order).

    Args:
        samples: ``SampleSpec``s (``dataset.read_dataset``; decoded only when not cached) and/or ``RawSample``s.
        encoders: ``() -> (vae, text_encoder)``: a ``WanVAE`` (``encode`` -> normalized latents) and a
            ``UMT5TextEncoder``; called only when a sample or the dropped prompt is not cached. None: read only.
        fingerprints: ``{"vae": ..., "text_encoder": ...}`` identities of the models (``module_fingerprint``,
            ``file_fingerprint``), part of every key; None: those the cache recorded.
        frames, width, height, ref_mode: the training clip length and size, and how references fit the frame.
        dropped_prompt: the prompt a dropped text becomes (its context is cached too).
        in_memory: load every cached sample into memory once (small datasets: no file reads per step).
        bad: samples already found bad (listed with the new ones in the result).
        clip: the CLIP tower whose reference features each file must also hold (``ref_clip``), or None.
    Returns:
        ``(dataset, bad samples)``: every sample that could not be used is in the list with its reason (and
        logged), never raised.
    Raises:
        ValueError: no sample is usable, or something is not cached and ``encoders`` is None.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    models = _models_record(cache_dir, fingerprints)
    settings = {"frames": frames, "width": width, "height": height, "ref_mode": ref_mode}
    bad, files, to_encode, pairs = list(bad or []), [], [], []
    for sample in samples:
        path = cache_dir / f"{_safe_name(sample.name)}-{sample_key(sample, settings, models)}.safetensors"
        files.append(path)
        pairs.append((sample, path))
        if not path.is_file():
            to_encode.append((sample, path))
    dropped_path = cache_dir / f"dropped-{_key(dropped_prompt, models['text_encoder'])}.safetensors"
    if (to_encode or not dropped_path.is_file()) and encoders is None:
        first = to_encode[0][0].name if to_encode else f"the dropped prompt {dropped_prompt!r}"
        raise ValueError(f"{len(to_encode)} sample(s) are not in the cache {cache_dir} (first: {first}); give "
                         "the VAE and the text encoder to encode them")
    vae, text_encoder = encoders() if to_encode or not dropped_path.is_file() else (None, None)
    failed = _encode_samples(to_encode, vae, text_encoder, settings)
    if not dropped_path.is_file():
        with torch.no_grad():
            context = text_encoder.encode([dropped_prompt])[0]  # (L, D)
        _write_tensors(dropped_path, {"context": context}, {"prompt": dropped_prompt})
    if clip is not None:
        failed += add_clip_features([(s, p) for s, p in pairs if p.is_file()], clip, settings)
    bad += failed
    report_bad(failed)
    kept = [f for f in files if f.is_file()]  # in dataset order; a sample that failed has no file
    if not kept:
        raise ValueError(f"no usable training sample ({len(bad)} skipped: "
                         + "; ".join(f"{b.name}: {b.reason}" for b in bad[:5]) + ")")
    logger.info("latent cache %s: %d samples (%d encoded now), %d skipped", cache_dir, len(kept),
                len(to_encode) - len(failed), len(bad))
    return CachedLatents(kept, load_file(str(dropped_path))["context"], in_memory=in_memory), bad


@torch.no_grad()
def _encode_samples(todo: list[tuple[SampleSpec | RawSample, Path]], vae: Any, text_encoder: Any,
                    settings: dict[str, Any]) -> list[BadSample]:
    """Encode and write each sample; returns those that failed (with the reason)."""
    failed = []
    contexts: dict[str, Tensor] = {}
    for k, (sample, path) in enumerate(todo):
        try:
            raw = sample if isinstance(sample, RawSample) else load_sample(
                sample, settings["frames"], settings["width"], settings["height"])
            _check_raw(raw, settings)
            refs = encode_references(vae, list(raw.references), settings["width"], settings["height"],
                                     settings["ref_mode"])  # (1, 16, N, h, w); ValueError for bad references
        except ValueError as err:
            failed.append(BadSample(sample.name, str(err)))
            continue
        if raw.caption not in contexts:
            contexts[raw.caption] = text_encoder.encode([raw.caption])[0]  # (L, D)
        latents = vae.encode(raw.video[None])  # (1, 16, F, h, w), on the VAE's device and dtype
        _write_tensors(path, {"latents": latents[0], "ref_latents": refs[0], "context": contexts[raw.caption]},
                       {"name": raw.name, "caption": raw.caption})
        logger.info("cached sample %d/%d: %s", k + 1, len(todo), raw.name)
    return failed


def _check_raw(raw: RawSample, settings: dict[str, Any]) -> None:
    want = (3, settings["frames"], settings["height"], settings["width"])
    if tuple(raw.video.shape) != want:
        raise ValueError(f"its video is {tuple(raw.video.shape)}; training needs [3, T, H, W] = {want}")
