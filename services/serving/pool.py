"""The generation engines this process holds.

One engine per base model, with the adapters of every version fine-tuned from it loaded on it
(`Engine.add_adapter`: one base in memory however many adapters); a full fine-tune is a model
of its own. Checkpoints come from the artifact store (verified against their manifests) into a
local cache. At most `max_models` engines are loaded; the least recently used one with no
request running is closed to make room.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import shutil
from collections import OrderedDict, defaultdict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from llmstudio.artifactkeys import check_tenant_key
from llmstudio.config import Settings
from llmstudio.errors import ResourceExhausted
from llmstudio.ml.checkpoint import checkpoint_kind
from llmstudio.modelroots import check_model_root
from llmstudio.storage import ArtifactStore

from .core import ServedVersion
from .engine import Engine

log = logging.getLogger(__name__)


@dataclass
class _Loaded:
    engine: Engine
    running: int = 0  # requests generating on it now
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one adapter load at a time


class ModelPool:
    def __init__(self, artifacts: ArtifactStore, settings: Settings):
        self.artifacts = artifacts
        self.settings = settings
        self.cache = settings.data_dir / "serving-cache"
        self._engines: OrderedDict[str, _Loaded] = OrderedDict()  # least recently used first
        self._loading = asyncio.Lock()  # models load one at a time (memory)
        self._fetching: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    @asynccontextmanager
    async def engine_for(self, v: ServedVersion) -> AsyncIterator[tuple[Engine, str | None]]:
        """(engine, adapter name or None) serving `v`, held for the caller's request: neither
        the engine nor the adapter is unloaded while it runs."""
        check_tenant_key(v.checkpoint_key, v.tenant, "the version's checkpoint")
        async with self._fetching[v.checkpoint_key]:  # the first request downloads it
            local = await asyncio.to_thread(self._checkpoint, v.checkpoint_key)
        full = checkpoint_kind(local) == "full"
        key = f"full:{v.checkpoint_key}" if full else f"base:{v.base_model}"
        loaded = await self._load(key, local if full else Path(v.base_model), full, v.base_model)
        loaded.running += 1
        try:
            with contextlib.ExitStack() as held:
                adapter = None
                if not full:
                    adapter = v.checkpoint_key
                    async with loaded.lock:  # loaded and pinned before another load evicts it
                        if not loaded.engine.has_adapter(adapter):
                            await asyncio.to_thread(loaded.engine.add_adapter, adapter, local)
                        held.enter_context(loaded.engine.hold_adapter(adapter))
                yield loaded.engine, adapter
        finally:
            loaded.running -= 1

    def _checkpoint(self, key: str) -> Path:
        """The checkpoint's files in the local cache (downloaded and verified once)."""
        dest = self.cache / hashlib.sha256(key.encode()).hexdigest()[:32]
        if not (dest / ".complete").is_file():
            shutil.rmtree(dest, ignore_errors=True)
            self.artifacts.get_dir(key, dest)
            (dest / ".complete").touch()
        return dest

    async def _load(self, key: str, path: Path, full: bool, base_model: str) -> _Loaded:
        """The engine under `key`, loaded from `path` unless it is; `base_model` gives the
        tokenizer (a full fine-tune's too: training never changes it)."""
        async with self._loading:
            if (loaded := self._engines.get(key)) is not None:
                self._engines.move_to_end(key)
                return loaded
            # the scheduler checked it at submit; checked again: this process reads the folder
            check_model_root("base_model", base_model, self.settings.model_roots,
                             "LLMSTUDIO_MODEL_ROOTS")
            await self._make_room()
            s = self.settings
            options = {"max_batch_size": s.serving_max_batch_size,
                       "max_queue": s.serving_max_queue,
                       "adapter_memory_bytes": s.serving_adapter_memory_mb << 20,
                       "tokenizer_dir": base_model}
            log.info("loading %s", key)
            load: Callable[..., Engine] = Engine.for_full_model if full else Engine
            engine = await asyncio.to_thread(load, str(path), **options)
            await engine.start()
            loaded = self._engines[key] = _Loaded(engine)
            return loaded

    async def _make_room(self) -> None:
        while len(self._engines) >= max(1, self.settings.serving_max_models):
            idle = next((k for k, e in self._engines.items() if not e.running), None)
            if idle is None:
                raise ResourceExhausted(
                    f"{len(self._engines)} models are loaded and busy "
                    f"(LLMSTUDIO_SERVING_MAX_MODELS={self.settings.serving_max_models})")
            log.info("unloading %s (least recently used)", idle)
            await self._engines.pop(idle).engine.close()

    async def close(self) -> None:
        for loaded in self._engines.values():
            await loaded.engine.close()
        self._engines.clear()
