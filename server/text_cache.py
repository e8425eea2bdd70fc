"""A bounded LRU cache of text-encoder outputs: a repeated prompt chunk (the same negative prompt, a rerun with another
seed) skips the encoder. Shared by the worker thread and the service's info calls, so it takes a lock."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

import numpy as np

# One SD 1.x chunk is 77 x 768 float32 (236 KB), an SDXL chunk over both encoders 77 x 2048 (631 KB): 4096 entries
# and 256 MB hold a few hundred distinct prompts of either, a small part of a served model's memory.
DEFAULT_MAX_ENTRIES = 4096
DEFAULT_MAX_BYTES = 256 * 1024 * 1024

Value = tuple[np.ndarray, ...]


@dataclass(frozen=True)
class CacheStats:
    hits: int
    misses: int
    entries: int
    bytes: int
    max_entries: int
    max_bytes: int

    @property
    def hit_rate(self) -> float:
        looked_up = self.hits + self.misses
        return self.hits / looked_up if looked_up else 0.0


class TextEncoderCache:
    """Least-recently-used entries go first once either bound is passed; an entry larger than the byte bound is not
    kept. Values are made read-only, so no caller can change what another will read."""

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES, max_bytes: int = DEFAULT_MAX_BYTES):
        if max_entries < 0 or max_bytes < 0:
            raise ValueError(f"text cache bounds must be >= 0, got {max_entries} entries and {max_bytes} bytes")
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._entries: OrderedDict[Hashable, Value] = OrderedDict()
        self._bytes = self._hits = self._misses = 0
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> Value | None:
        with self._lock:
            value = self._entries.get(key)
            if value is None:
                self._misses += 1
                return None
            self._entries.move_to_end(key)
            self._hits += 1
            return value

    def put(self, key: Hashable, value: Value) -> None:
        size = sum(array.nbytes for array in value)
        if size > self.max_bytes or self.max_entries == 0:
            return
        value = tuple(_frozen(array) for array in value)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= sum(array.nbytes for array in old)
            self._entries[key] = value
            self._bytes += size
            while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= sum(array.nbytes for array in evicted)

    def clear(self) -> None:
        """Forgets every entry (the counts stay): the next lookups miss."""
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(
                self._hits, self._misses, len(self._entries), self._bytes, self.max_entries, self.max_bytes
            )


def _frozen(array: np.ndarray) -> np.ndarray:
    copy = np.array(array, copy=True)
    copy.flags.writeable = False
    return copy
