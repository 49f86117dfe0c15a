"""Bus handlers: every event of every audited stream goes into the audit log."""

from __future__ import annotations

from opentelemetry import trace

from llmstudio import telemetry
from llmstudio.bus import AUDITED_STREAMS, STREAMS, Bus
from llmstudio.events import Envelope, EventData

from .audit import AuditLog
from .core import AuditEvent, audit_consumers, canonical_json, iso_utc


class AuditHandlers:
    def __init__(self, audit: AuditLog):
        self.audit = audit

    def subscribe(self, bus: Bus) -> None:
        streams = {name: STREAMS[name].subjects for name in AUDITED_STREAMS}
        for consumer, subject in audit_consumers(streams):
            bus.subscribe_subject(consumer, subject, self.on_event)

    async def on_event(self, env: Envelope, data: EventData) -> None:
        # Idempotent: the log skips an event id it already holds.
        await self.audit.append(audit_event(env, data))


def audit_event(env: Envelope, data: EventData) -> AuditEvent:
    return AuditEvent(
        event_id=env.id,
        event_type=env.type,
        subject=_delivered_subject(data),
        entity=env.subject,
        source=env.source,
        tenant=env.tenant,
        actor=env.actor,
        time=iso_utc(env.time),
        data_json=canonical_json(env.data),
        trace_id=telemetry.current_trace_id(),
    )


def _delivered_subject(data: EventData) -> str:
    # Handlers are not given the NATS subject; the bus records it on the consumer span it runs
    # the handler in. Without a recording span, the subject the event is published on.
    attributes = getattr(trace.get_current_span(), "attributes", None) or {}
    return attributes.get("messaging.destination") or data.subject()
