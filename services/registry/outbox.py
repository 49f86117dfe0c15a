"""Transactional outbox: events are written with the state change that causes them, then
published.

A use case adds its events to the outbox inside its store transaction; `flush()` then publishes
them in order and deletes each once JetStream has acked it. If publishing fails (NATS down, the
process dies), the rows stay and are published by the next flush: by the next use case, or by
the background loop. Each envelope's id is fixed when it is written, so a row published twice
(acked but not yet deleted) is dropped by JetStream's dedup window.
"""

from __future__ import annotations

import asyncio
import logging

from opentelemetry import context as otel_context

from llmstudio import telemetry
from llmstudio.bus import Bus
from llmstudio.events import Envelope, EventData, make_envelope

from .core import now_iso
from .store import RegistryStore, Unit

log = logging.getLogger(__name__)


class Outbox:
    def __init__(self, store: RegistryStore, bus: Bus):
        self.store = store
        self.bus = bus
        self._lock = asyncio.Lock()

    def add(self, unit: Unit, data: EventData, *, tenant: str, actor: str) -> None:
        """Queue an event in the caller's transaction; it carries the current trace."""
        env = make_envelope(data, source=self.bus.service, tenant=tenant, actor=actor)
        unit.enqueue(data.subject(), env.model_dump_json(), telemetry.traceparent(), now_iso())

    async def flush(self) -> None:
        """Publish every queued event, oldest first; raise if one cannot be published."""
        async with self._lock:
            while True:
                with self.store.unit() as u:
                    pending = u.pending_events()
                if not pending:
                    return
                for event in pending:
                    env = Envelope.model_validate_json(event.envelope)
                    carrier = {"traceparent": event.traceparent} if event.traceparent else {}
                    token = otel_context.attach(telemetry.extract(carrier))
                    try:
                        await self.bus.publish_envelope(env, event.subject)
                    finally:
                        otel_context.detach(token)
                    with self.store.unit() as u:
                        u.remove_event(event.id)

    async def run(self, interval_s: float = 5.0) -> None:
        """Background task: publish what failed flushes left behind."""
        while True:
            try:
                await self.flush()
            except Exception as e:  # noqa: BLE001 - keep retrying until NATS is back
                log.warning("outbox: publish failed, will retry: %s", e)
            await asyncio.sleep(interval_s)
