"""Bookkeeping of the LoRA adapters loaded on one base model: names, sizes, pins, LRU eviction
within a memory budget. Thread-safe; it touches no model (the engine loads and deletes the
adapters' weights, under its model lock, as this cache tells it).

Each adapter gets an internal peft name (`a0`, `a1`, ...): a caller's name may hold dots or be
"__base__", which peft's module dicts cannot take.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass


@dataclass
class AdapterEntry:
    name: str
    internal: str
    path: str
    nbytes: int
    pins: int = 0  # requests queued or running with it: never evicted nor deleted while > 0
    last_used: float = 0.0
    removing: bool = False  # removed by the caller while pinned: deleted at the last unpin


class AdapterCache:
    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self._lock = threading.RLock()
        self._by_name: dict[str, AdapterEntry] = {}
        self._by_internal: dict[str, AdapterEntry] = {}
        self._ids = itertools.count()

    def new_internal_name(self) -> str:
        return f"a{next(self._ids)}"

    def __contains__(self, name: str) -> bool:
        with self._lock:
            return name in self._by_name

    def path_of(self, name: str) -> str | None:
        with self._lock:
            entry = self._by_name.get(name)
            return entry.path if entry is not None else None

    def names(self) -> list[str]:
        with self._lock:
            return list(self._by_name)

    def sizes(self) -> dict[str, int]:
        with self._lock:
            return {e.name: e.nbytes for e in self._by_name.values()}

    def loaded_internals(self) -> set[str]:
        """Every adapter whose weights are on the model (removed-but-pinned ones included)."""
        with self._lock:
            return set(self._by_internal)

    def total_bytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._by_internal.values())

    def add(self, name: str, internal: str, path: str, nbytes: int) -> None:
        with self._lock:
            if name in self._by_name:
                raise ValueError(f"adapter {name!r} is already loaded")
            entry = AdapterEntry(name, internal, path, nbytes, last_used=time.monotonic())
            self._by_name[name] = entry
            self._by_internal[internal] = entry

    def pin(self, name: str) -> str:
        """Mark `name` used now by one more request; return its internal name. KeyError if it
        is not loaded."""
        with self._lock:
            entry = self._by_name.get(name)
            if entry is None:
                raise KeyError(f"adapter {name!r} is not loaded")
            entry.pins += 1
            entry.last_used = time.monotonic()
            return entry.internal

    def unpin(self, internal: str) -> str | None:
        """One request with it ended; return the internal name to delete now when the adapter
        was removed meanwhile and this was its last request."""
        with self._lock:
            entry = self._by_internal.get(internal)
            if entry is None:
                return None
            entry.pins -= 1
            entry.last_used = time.monotonic()
            if entry.removing and entry.pins <= 0:
                del self._by_internal[internal]
                return internal
            return None

    def remove(self, name: str) -> str | None:
        """Forget `name` (KeyError if not loaded); return its internal name to delete now, or
        None when requests still use it (deleted at the last unpin)."""
        with self._lock:
            entry = self._by_name.pop(name, None)
            if entry is None:
                raise KeyError(f"adapter {name!r} is not loaded")
            if entry.pins > 0:
                entry.removing = True
                return None
            del self._by_internal[entry.internal]
            return entry.internal

    def evictions(self, keep: str | None = None) -> list[str]:
        """Least recently used adapters to delete so the loaded ones fit the budget (never a
        pinned one, nor `keep`); forgotten here, returned as internal names. The total may stay
        over budget when everything else is in use."""
        with self._lock:
            out: list[str] = []
            total = self.total_bytes()
            candidates = sorted(
                (e for e in self._by_name.values() if e.pins <= 0 and e.name != keep),
                key=lambda e: e.last_used,
            )
            for entry in candidates:
                if total <= self.budget_bytes:
                    break
                del self._by_name[entry.name]
                del self._by_internal[entry.internal]
                total -= entry.nbytes
                out.append(entry.internal)
            return out
