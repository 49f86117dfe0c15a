"""Transactional outbox: the events a use case announces are written with its state change, then
published.

A use case adds its events inside its store transaction; `flush()` publishes them oldest first
and deletes each once JetStream has acked it. If publishing fails (NATS down, the process dies)
the rows stay and the background loop publishes them later. An envelope's id is fixed when it is
written, so a row published twice (acked, not yet deleted) is dropped by JetStream's dedup.

Each event is published inside a producer span whose parent is the trace stored with it: the
trace of the call or event that caused it, or for a work item the job's own CreateJob trace, so
a worker's spans join the job's trace.
"""

from __future__ import annotations

import asyncio
import logging

from opentelemetry import trace

from llmstudio import telemetry
from llmstudio.bus import Bus
from llmstudio.events import Envelope, EventData, make_envelope

from .store import SchedulerStore, Unit

log = logging.getLogger(__name__)


class Outbox:
    def __init__(self, store: SchedulerStore, bus: Bus):
        self.store = store
        self.bus = bus
        self._lock = asyncio.Lock()
        self._tracer = trace.get_tracer(bus.service)

    def add(
        self, unit: Unit, data: EventData, *, tenant: str, actor: str = "",
        traceparent: str | None = None,
    ) -> None:
        """Queue an event in the caller's transaction, in `traceparent`'s trace (default: the
        current one)."""
        env = make_envelope(data, source=self.bus.service, tenant=tenant, actor=actor)
        tp = telemetry.traceparent() if traceparent is None else traceparent
        unit.enqueue(data.subject(), env.model_dump_json(), tp)

    async def flush(self) -> None:
        """Publish every queued event; on failure log it and leave the rest to `run()`."""
        try:
            await self._publish_pending()
        except Exception as e:  # noqa: BLE001 - the rows stay; the loop retries
            log.warning("outbox: publish failed, will retry: %s", e)

    async def _publish_pending(self) -> None:
        async with self._lock:
            while True:
                with self.store.unit() as u:
                    pending = u.pending_events()
                if not pending:
                    return
                for event in pending:
                    env = Envelope.model_validate_json(event.envelope)
                    parent = telemetry.extract(
                        {"traceparent": event.traceparent} if event.traceparent else {}
                    )
                    with self._tracer.start_as_current_span(
                        f"publish {env.type}", context=parent, kind=trace.SpanKind.PRODUCER,
                        attributes={"messaging.destination": event.subject, "event.id": env.id},
                    ):
                        await self.bus.publish_envelope(env, event.subject)
                    with self.store.unit() as u:
                        u.remove_event(event.id)

    async def run(self, interval_s: float = 2.0) -> None:
        """Background task: publish what failed flushes left behind."""
        while True:
            await asyncio.sleep(interval_s)
            await self.flush()
