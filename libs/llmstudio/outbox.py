"""Transactional outbox: the events a use case announces are written with its state change, then
published.

A service defines its outbox table on its own MetaData (`outbox_table(metadata, "registry")` is
`registry_outbox`), gives its transaction class the outbox queries (`OutboxUnit`), and wires one
`Outbox` publisher on its store and bus.

The outbox is the only way a service publishes a domain event. A use case runs as
`await outbox.transact(fn)`: `fn(unit)` changes state and adds its events (`Outbox.add`) in one
transaction, in a worker thread; then the events are flushed. `flush()` publishes them
oldest first and deletes each once JetStream has acked it. If publishing fails (NATS down, the
process dies) the rows stay and are published by the next flush: by the next use case, or by the
background loop (`run()`). A row nats-py refuses for good (a subject that is no subject, a payload
over the server's limit) is replaced by its dead letter and logged at ERROR, so the rows after
it still go out. An envelope's id is fixed when it is written, so a row published twice
(acked, not yet deleted) is dropped by JetStream's dedup window.

Each event is published inside a producer span whose parent is the trace stored with it: the
trace of the call or event that caused it, or an explicit one (e.g. a job's own CreateJob trace,
so a worker's spans join the job's trace).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar, Protocol, TypeVar

from nats.errors import BadHeaderError, BadSubjectError, MaxPayloadError
from opentelemetry import trace
from sqlalchemy import Column, Connection, Integer, MetaData, String, Table, Text, select

from . import telemetry
from .bus import Bus, PublishFailed
from .events import DeadLettered, Envelope, EventData, make_envelope

log = logging.getLogger(__name__)
R = TypeVar("R")

# What nats-py refuses before sending, whatever the server's state: a row failing so is parked
# (`Outbox._park`), never retried. Anything else (NATS away, no ack) is retried.
REFUSED_FOR_GOOD = (BadSubjectError, MaxPayloadError, BadHeaderError)
DEAD_LETTER_PAYLOAD_CHARS = 65536  # of the refused envelope, kept in its dead letter


def outbox_table(metadata: MetaData, prefix: str) -> Table:
    """The outbox table `<prefix>_outbox` on `metadata` (the services may share one database)."""
    return Table(
        f"{prefix}_outbox",
        metadata,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("subject", String(512), nullable=False),
        Column("envelope", Text, nullable=False),  # the CloudEvents JSON, id fixed at write time
        Column("traceparent", String(128), nullable=False, default=""),
        Column("created_at", String(40), nullable=False),
    )


def now_iso() -> str:
    """UTC, fixed width, so the strings sort in time order."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class PendingEvent:
    id: int
    subject: str
    envelope: str
    traceparent: str


class OutboxUnit:
    """The outbox queries of one transaction, on its connection `conn`: the base of a store's
    unit class, which sets `outbox_table`."""

    outbox_table: ClassVar[Table]

    def __init__(self, conn: Connection):
        self.conn = conn

    def enqueue(self, subject: str, envelope: str, traceparent: str,
                now: str | None = None) -> None:
        self.conn.execute(self.outbox_table.insert(), {  # a constant statement: compiled once
            "subject": subject, "envelope": envelope, "traceparent": traceparent,
            "created_at": now or now_iso()})

    def pending_events(self, limit: int = 100) -> list[PendingEvent]:
        table = self.outbox_table
        rows = self.conn.execute(select(table).order_by(table.c.id).limit(limit))
        return [PendingEvent(r.id, r.subject, r.envelope, r.traceparent) for r in rows]

    def remove_events(self, event_ids: list[int]) -> None:
        table = self.outbox_table
        self.conn.execute(table.delete().where(table.c.id.in_(event_ids)))


class OutboxStore(Protocol):
    """A store whose units carry the outbox queries (`UnitOfWorkStore` with an `OutboxUnit`)."""

    async def in_unit(self, fn: Callable[..., R], *args: Any) -> R: ...


class Outbox:
    """Publishes what use cases wrote to the outbox. `flush()` raises when an event cannot be
    published (the rows stay); `try_flush()` logs instead; `run()` retries in the background.
    A service whose use cases must never fail on publishing (their change is committed: the
    caller must hear it was made) passes `defer_failures=True`: then `flush()`, and so
    `transact`, log a failed publish and leave it to `run()`."""

    def __init__(
        self, store: OutboxStore, bus: Bus, *, interval_s: float = 5.0,
        defer_failures: bool = False,
    ):
        self.store = store
        self.bus = bus
        self.interval_s = interval_s
        self.defer_failures = defer_failures
        self._lock = asyncio.Lock()
        self._tracer = trace.get_tracer(bus.service)
        # use cases committed through `transact`, and how many of the first of them have every
        # event published: a flush waiting for the lock skips the read when a flush that read
        # after its commit has published all (under load one read serves many use cases)
        self._committed = 0
        self._published_through = 0

    def add(
        self, unit: OutboxUnit, data: EventData, *, tenant: str, actor: str = "",
        traceparent: str | None = None,
    ) -> None:
        """Queue an event in the caller's transaction, in `traceparent`'s trace (default: the
        current one)."""
        env = make_envelope(data, source=self.bus.service, tenant=tenant, actor=actor)
        tp = telemetry.traceparent() if traceparent is None else traceparent
        unit.enqueue(data.subject(), env.model_dump_json(), tp)

    async def flush(self, commit: int = 0) -> None:
        """Publish every queued event, oldest first; raise if one cannot be published (unless
        `defer_failures`). `commit`: only what `transact`'s commit number `commit` queued
        must go out (done already when a later read published everything)."""
        if self.defer_failures:
            await self.try_flush(commit)
        else:
            await self.publish_pending(commit)

    async def publish_pending(self, commit: int = 0) -> None:
        """Publish every queued event, oldest first; raise if one cannot be published (what
        `flush()` and `try_flush()` share)."""
        async with self._lock:
            if commit and self._published_through >= commit:
                return
            read_after = self._committed
            while True:
                pending = await self.store.in_unit(OutboxUnit.pending_events)
                if not pending:
                    self._published_through = read_after
                    return
                # In order, pipelined (Bus.publish_in_order: the stream keeps their order); the
                # rows stored are deleted in one transaction, also when one fails.
                stored = 0
                refused: tuple[PendingEvent, BaseException] | None = None
                try:
                    await self._publish(pending)
                    stored = len(pending)
                except PublishFailed as e:
                    stored = e.stored
                    if not isinstance(e.__cause__, REFUSED_FOR_GOOD):
                        raise
                    refused = (pending[stored], e.__cause__)
                finally:
                    if stored:
                        await self.store.in_unit(
                            OutboxUnit.remove_events, [event.id for event in pending[:stored]])
                if refused is not None:  # out of the way: the rows after it go out next
                    await self.store.in_unit(self._park, *refused)

    async def try_flush(self, commit: int = 0) -> bool:
        """`flush()`, but a failure is logged and left to `run()`; False if something is left."""
        try:
            await self.publish_pending(commit)
        except Exception as e:  # noqa: BLE001 - the rows stay; the loop retries
            log.warning("outbox: publish failed, will retry: %s", e)
            return False
        return True

    async def run(self, interval_s: float | None = None) -> None:
        """Background task: publish what failed flushes left behind, every `interval_s`."""
        while True:
            await self.try_flush()
            await asyncio.sleep(self.interval_s if interval_s is None else interval_s)

    async def transact(self, fn: Callable[..., R], *args: Any) -> R:
        """A use case: `fn(unit, *args)` in one transaction in a worker thread (its events added
        with `add`), then its events flushed. Returns what `fn` returns."""
        result = await self.store.in_unit(fn, *args)
        self._committed += 1
        await self.flush(self._committed)
        return result

    def _park(self, unit: OutboxUnit, event: PendingEvent, cause: BaseException) -> None:
        """Replace a row NATS will never take with its dead letter (`llmstudio.deadletter.
        <service>-outbox`, the envelope in its payload), in one transaction: retried, it would
        hold back every event written after it, of every tenant."""
        env = Envelope.model_validate_json(event.envelope)
        log.error("outbox: event %s (%s) on subject %r can never be published: %s; parked on "
                  "the dead-letter subject", env.id, env.type, event.subject, cause)
        unit.remove_events([event.id])
        self.add(unit, DeadLettered(
            consumer=f"{self.bus.service}-outbox", original_subject=event.subject,
            reason=f"refused by NATS: {cause}", deliveries=1,
            payload=event.envelope[:DEAD_LETTER_PAYLOAD_CHARS],
        ), tenant=env.tenant, actor=self.bus.service, traceparent=event.traceparent)

    async def _publish(self, pending: list[PendingEvent]) -> None:
        """Each event in a producer span (child of the trace stored with it) that ends with
        the batch's acks."""
        spans, messages = [], []
        try:
            for event in pending:
                env = Envelope.model_validate_json(event.envelope)
                parent = telemetry.extract(
                    {"traceparent": event.traceparent} if event.traceparent else {})
                span = self._tracer.start_span(
                    f"publish {env.type}", context=parent, kind=trace.SpanKind.PRODUCER,
                    attributes={"messaging.destination": event.subject, "event.id": env.id})
                spans.append(span)
                with trace.use_span(span):
                    headers = telemetry.inject({"Nats-Msg-Id": env.id, "ce-type": env.type})
                messages.append((event.subject, event.envelope.encode(), headers))
            await self.bus.publish_in_order(messages)
        finally:
            for span in spans:
                span.end()
