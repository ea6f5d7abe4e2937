"""The references' CLIP features (``ref_clip``) for training an MMDiT with a CLIP branch, cached with the latents.

Phantom (arXiv 2502.11079, Eq. 1) feeds each reference's CLIP image features to the text stream. They are computed
once, as the VAE latents are: the tower (``mmdit.clip.load_clip_vision``) encodes each sample's references alone
(``encode_clip_references``: white letterbox, the tower's input size), and the result ``[N, T, C]`` is stored in
the sample's cache file as ``ref_clip``, with the tower's fingerprint and output in the file's metadata
(``clip_vision``), so that another tower or output is encoded again and the same one never is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save
from torch import Tensor

from phantom_core.loading.disk import atomic_write
from phantom_core.log import logger
from phantom_core.training.dataset import BadSample, RawSample, SampleSpec, load_sample

METADATA_KEY = "clip_vision"
ClipEncoder = Callable[[Sequence[Image.Image]], Tensor]
"""``encode(references) -> [N, T, C]`` float32 CLIP features of 1-4 reference images."""


@dataclass(frozen=True)
class ClipFeatures:
    """A CLIP tower for the cache: ``load()`` (called at most once, only when something must be encoded) returns
    the encoder; ``fingerprint`` names the tower and its output (kept in every file it made)."""

    load: Callable[[], ClipEncoder]
    fingerprint: str


def file_clip_features(path: str, output: str, device: torch.device) -> ClipFeatures:
    """``ClipFeatures`` of a CLIP vision file (``mmdit.clip.load_clip_vision``: float32 on ``device``) and its
    ``output`` (``"tokens"`` / ``"pooled"``), fingerprinted by the file's stamp and the output."""
    from phantom_core.training.cache import file_fingerprint

    def load() -> ClipEncoder:
        from phantom_core.mmdit.clip import encode_clip_references, load_clip_vision

        tower = load_clip_vision(path, device=device)
        return lambda images: encode_clip_references(tower, list(images), output)[0].float().cpu()  # (N, T, C)

    return ClipFeatures(load, f"{file_fingerprint(path)}:{output}")


def has_clip_features(path: Path, fingerprint: str) -> bool:
    """Whether the cache file ``path`` holds ``ref_clip`` made by the tower of ``fingerprint``."""
    with safe_open(str(path), framework="pt") as st:
        return "ref_clip" in st.keys() and (st.metadata() or {}).get(METADATA_KEY) == fingerprint


def write_clip_features(path: Path, ref_clip: Tensor, fingerprint: str) -> None:
    """Add (or replace) ``ref_clip`` ``[N, T, C]`` in the cache file ``path``, atomically, keeping its tensors and
    metadata. Raises ``ValueError`` when N differs from the file's reference count."""
    with safe_open(str(path), framework="pt") as st:
        metadata = dict(st.metadata() or {})
    tensors = load_file(str(path))
    refs = tensors["ref_latents"].shape[1]
    if ref_clip.ndim != 3 or ref_clip.shape[0] != refs:
        raise ValueError(f"{path.name}: CLIP features of shape {tuple(ref_clip.shape)} for {refs} references; "
                         "expected [N, T, C] with N the reference count")
    tensors["ref_clip"] = ref_clip.detach().float().cpu().contiguous()
    data = save({k: v.contiguous() for k, v in tensors.items()}, metadata={**metadata, METADATA_KEY: fingerprint})
    with atomic_write(path) as tmp:
        tmp.write_bytes(data)


@torch.no_grad()
def add_clip_features(pairs: Sequence[tuple[SampleSpec | RawSample, Path]], clip: ClipFeatures,
                      settings: dict[str, Any]) -> list[BadSample]:
    """Give every cached file of ``pairs`` (sample, its cache file) that lacks them the references' CLIP features;
    a ``SampleSpec`` is decoded again for its references. Returns the samples that failed (with the reason)."""
    todo = [(s, p) for s, p in pairs if not has_clip_features(p, clip.fingerprint)]
    if not todo:
        return []
    encode, failed = clip.load(), []
    for k, (sample, path) in enumerate(todo):
        try:
            raw = sample if isinstance(sample, RawSample) else load_sample(
                sample, settings["frames"], settings["width"], settings["height"])
            write_clip_features(path, encode(raw.references), clip.fingerprint)
        except ValueError as err:
            failed.append(BadSample(sample.name, str(err)))
            path.unlink(missing_ok=True)  # a sample without its CLIP features cannot train a CLIP-branch model
            continue
        if (k + 1) % 100 == 0 or k + 1 == len(todo):
            logger.info("CLIP features: %d/%d samples", k + 1, len(todo))
    return failed
