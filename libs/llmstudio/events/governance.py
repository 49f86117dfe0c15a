"""Governance events (stream GOVERNANCE) and the dead-letter report (stream DEADLETTER)."""

from __future__ import annotations

from .base import EventData, register


@register
class ApiKeyCreated(EventData):
    TYPE = "llmstudio.governance.apikey_created.v1"
    SUBJECT = "llmstudio.governance.apikey_created"
    ENTITY = "key_id"

    key_id: str
    tenant: str
    roles: list[str]
    name: str = ""


@register
class ApiKeyRevoked(EventData):
    TYPE = "llmstudio.governance.apikey_revoked.v1"
    SUBJECT = "llmstudio.governance.apikey_revoked"
    ENTITY = "key_id"

    key_id: str


@register
class DeadLettered(EventData):
    """A message a consumer could not process: parked here, with why, never redelivered."""

    TYPE = "llmstudio.deadletter.parked.v1"
    SUBJECT = "llmstudio.deadletter"
    ENTITY = "consumer"

    consumer: str
    original_subject: str
    reason: str
    deliveries: int
    payload: str  # the original bytes, utf-8 with replacement
