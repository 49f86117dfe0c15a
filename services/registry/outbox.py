"""The registry's transactional outbox: the shared one (`llmstudio.outbox`) on the registry's
store, table `registry_outbox`.

A use case adds its events inside its store transaction; `flush()` publishes them in order and
raises if NATS is down (the rows stay: the next flush or the background loop, every 5 s,
publishes them).
"""

from __future__ import annotations

from llmstudio import outbox
from llmstudio.bus import Bus

from .store import RegistryStore


class Outbox(outbox.Outbox):
    def __init__(self, store: RegistryStore, bus: Bus):
        super().__init__(store, bus, interval_s=5.0)
