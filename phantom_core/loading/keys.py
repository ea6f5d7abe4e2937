"""Generic checks of state-dict keys, shared by every network's loader (DiT, VAE, text encoder).

Nothing here knows a network: it compares a state dict with the ``{key: shape}`` a loader expects, keeps the part
of a bundle under a prefix, and puts a checkpoint's path in front of a loader's error.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor

from phantom_core.log import logger


def short_listing(items: list[str], limit: int = 10) -> str:
    """Up to ``limit`` of ``items`` comma-separated, then ``", ... (N more)"`` (for error messages)."""
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more

def keep_prefixed(sd: dict[str, Tensor], prefixes: tuple[str, ...]) -> dict[str, Tensor]:
    """The tensors under the first of ``prefixes`` that any key carries, prefix dropped; ``sd`` itself if none.

    A bundle (e.g. a full ComfyUI checkpoint: DiT, VAE and text encoder under their own prefixes) keeps only the
    part asked for; how many tensors were ignored is logged.
    """
    for prefix in prefixes:
        kept = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        if kept:
            if len(kept) < len(sd):
                logger.info("kept %d '%s*' tensors, ignored %d others", len(kept), prefix, len(sd) - len(kept))
            return kept
    return sd

def key_problems(expected: dict[str, tuple[int, ...]], sd: dict[str, Tensor], allowed_extra: set[str] = frozenset()
                 ) -> list[str]:
    """Missing keys, unexpected keys (less ``allowed_extra``) and wrong shapes of ``sd`` against ``expected``
    (key -> shape), each as "N what: up to 10 names"; [] when ``sd`` matches."""
    missing = sorted(set(expected) - set(sd))
    extra = sorted(set(sd) - set(expected) - allowed_extra)
    wrong = sorted(f"{k} {tuple(sd[k].shape)} (expected {tuple(expected[k])})"
                   for k in set(expected) & set(sd) if tuple(sd[k].shape) != tuple(expected[k]))
    return [f"{len(v)} {what}: {short_listing(v)}"
            for what, v in (("missing keys", missing), ("unexpected keys", extra), ("wrong shapes", wrong)) if v]

def key_shape(sd: dict[str, Tensor], key: str, ndim: int, what: str) -> tuple[int, ...]:
    """The shape of ``sd[key]``, which must be an ``ndim``-D tensor; else ``ValueError("<what> state dict: <key> is
    <shape or missing>; expected a <ndim>-D tensor")`` (for the loaders' shape inference)."""
    if key not in sd or sd[key].ndim != ndim:
        got = tuple(sd[key].shape) if key in sd else "missing"
        raise ValueError(f"{what} state dict: {key} is {got}; expected a {ndim}-D tensor")
    return tuple(sd[key].shape)

@contextmanager
def errors_name_file(source: object) -> Iterator[None]:
    """Put the checkpoint's path in front of a ValueError raised inside (when ``source`` is a path), so a
    message like "this checkpoint is a VAE ..." says which file it is about."""
    try:
        yield
    except ValueError as err:
        if isinstance(source, (str, os.PathLike)) and str(source) not in str(err):
            raise ValueError(f"{source}: {err}") from err
        raise
