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


@register
class AuthenticationFailed(EventData):
    """Calls a service refused for their credentials (unknown key, or a role without the
    permission): at most one per caller address and service each interval, counting the rest."""

    TYPE = "llmstudio.governance.auth_failed.v1"
    SUBJECT = "llmstudio.governance.auth_failed"
    ENTITY = "service"

    service: str
    method: str
    peer: str  # the caller's address as gRPC reports it (ipv4:127.0.0.1:53412)
    code: str  # UNAUTHENTICATED or PERMISSION_DENIED
    reason: str
    key_id: str = ""  # the key's id when it was known (a role without the permission)
    refused: int = 1  # refusals of this caller the record stands for (the others suppressed)


@register
class AuditCheckpointed(EventData):
    """Governance signed a checkpoint of the audit chain (stream AUDIT, not itself audited: the
    chain it anchors does not grow by its own announcements)."""

    TYPE = "llmstudio.audit.checkpointed.v1"
    SUBJECT = "llmstudio.audit.checkpointed"
    ENTITY = "checkpoint"

    checkpoint: int  # its number (audit/checkpoints/<number, 12 digits>.json)
    first_sequence: int
    records: int  # the chain's head sequence it anchors
    head_hash: str
    object_key: str
    key_id: str  # the signing key's fingerprint (audit/keys/<key_id>.pem)
