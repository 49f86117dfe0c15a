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


@register
class PolicyChanged(EventData):
    """A tenant admin set a new version of the tenant's promotion policy (stream GOVERNANCE)."""

    TYPE = "llmstudio.policy.changed.v1"
    SUBJECT = "llmstudio.policy.changed"
    ENTITY = "policy_id"

    policy_id: str  # a hash of tenant and version: subject-safe (tenant names may hold dots)
    tenant: str
    version: int
    author: str  # the author's key id
    sha256: str  # of the YAML text as stored
    yaml: str
    gated_stages: list[str]  # the stages a promotion request must pass to reach


@register
class PolicyDecided(EventData):
    """Governance's decision on a promotion request: every rule's verdict and the status; sent
    again whenever it changes (an approval, a rejection, expiry, a policy change or a new
    evaluation re-evaluated it)."""

    TYPE = "llmstudio.policy.decided.v1"
    SUBJECT = "llmstudio.policy.decided"
    ENTITY = "request_id"

    request_id: str
    ref: str
    model_name: str
    version: int
    stage: str
    status: str  # pending_approval | rejected | approved | expired
    policy_version: int  # 0: the built-in default policy
    # [{"rule": kind, "ok": bool, "message": "... threshold and measured value ..."}]
    verdicts: list[dict[str, object]]
    approvals: list[str] = []  # the approvers' key ids
    requester: str = ""
    reason: str = ""  # why the status changed (a rejection's reason, "expired", ...)


@register
class PromotionApproved(EventData):
    """A reviewer approved a promotion request (one record per approval)."""

    TYPE = "llmstudio.policy.approved.v1"
    SUBJECT = "llmstudio.policy.approved"
    ENTITY = "request_id"

    request_id: str
    ref: str
    approver: str  # key id
    role: str
    comment: str = ""


@register
class PromotionRejected(EventData):
    """A reviewer rejected a promotion request."""

    TYPE = "llmstudio.policy.rejected.v1"
    SUBJECT = "llmstudio.policy.rejected"
    ENTITY = "request_id"

    request_id: str
    ref: str
    reviewer: str  # key id
    reason: str


@register
class ApprovalRefused(EventData):
    """An approval or rejection governance refused (self-approval, a role that may not approve,
    an expired or closed request): kept in the audit log like the approvals themselves."""

    TYPE = "llmstudio.policy.approval_refused.v1"
    SUBJECT = "llmstudio.policy.approval_refused"
    ENTITY = "request_id"

    request_id: str
    caller: str  # key id
    action: str  # approve | reject
    reason: str
