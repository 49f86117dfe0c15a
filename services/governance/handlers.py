"""Bus handlers: every event of every audited stream goes into the audit log."""

from __future__ import annotations

from llmstudio import telemetry
from llmstudio.bus import AUDITED_STREAMS, STREAMS, Bus, delivered_subject
from llmstudio.events import Envelope, EventData, ModelPromotionRequested

from .core import AuditEvent, audit_consumers, canonical_json, iso_utc
from .usecases import AuditLog, Promotions


class AuditHandlers:
    def __init__(self, audit: AuditLog):
        self.audit = audit

    def subscribe(self, bus: Bus) -> None:
        # Whole streams, every type (untyped on purpose): the log keeps every event.
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
        # The NATS subject it travelled on; outside a handler, the one it is published on.
        subject=delivered_subject() or data.subject(),
        entity=env.subject,
        source=env.source,
        tenant=env.tenant,
        actor=env.actor,
        time=iso_utc(env.time),
        data_json=canonical_json(env.data),
        trace_id=telemetry.current_trace_id(),
    )


class PromotionHandlers:
    """The registry's promotion requests: decided under the tenant's policy (idempotent)."""

    def __init__(self, promotions: Promotions):
        self.promotions = promotions

    def subscribe(self, bus: Bus) -> None:
        bus.subscribe(ModelPromotionRequested, durable="promotion-requested",
                      handler=self.on_requested)

    async def on_requested(self, env: Envelope, data: ModelPromotionRequested) -> None:
        await self.promotions.on_requested(env.tenant, data)
