"""Where rephrase results are kept: an in-memory LRU, optionally mirrored to one JSON file per entry.

`RephraseCache` stores `RephraseResult`s under an opaque key; what goes into the key (every input and setting
that changes the answer) is the rephraser's business (`rephraser.cache_key`). `DEFAULT_CACHE` is the
process-wide instance `Rephraser` uses when given none, so a re-queued ComfyUI workflow never asks the model
again. Files are written atomically (`phantom_core.loading.disk.atomic_write`); an unreadable file is logged and
ignored.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

from phantom_core.loading.disk import atomic_write
from phantom_core.log import logger
from phantom_core.rephrase.types import RephraseResult


class RephraseCache:
    """In-memory LRU of `RephraseResult` by `cache_key`, optionally mirrored to JSON files in `directory`."""

    def __init__(self, max_entries: int = 256, directory: str | Path | None = None):
        self.max_entries = max_entries
        self.directory = Path(directory) if directory is not None else None
        self._entries: OrderedDict[str, RephraseResult] = OrderedDict()

    def get(self, key: str) -> RephraseResult | None:
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        path = self.directory / f"{key}.json" if self.directory else None
        if path is None or not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            result = RephraseResult(data["prompt"], tuple(data["descriptions"]), data["language"], data["raw"],
                                    data["validated"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            logger.warning("rephraser: ignoring unreadable cache file %s (%s)", path, err)
            return None
        self._remember(key, result)
        return result

    def put(self, key: str, result: RephraseResult) -> None:
        self._remember(key, result)
        if self.directory is not None:
            with atomic_write(self.directory / f"{key}.json") as tmp:
                tmp.write_text(json.dumps(result.to_json(), ensure_ascii=False, indent=1), encoding="utf-8")

    def clear(self) -> None:
        """Forget the in-memory entries (files in `directory` are kept)."""
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def _remember(self, key: str, result: RephraseResult) -> None:
        self._entries[key] = result
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)


DEFAULT_CACHE = RephraseCache()
"""The process-wide cache used when `Rephraser` gets none (so re-queued ComfyUI workflows are free)."""
