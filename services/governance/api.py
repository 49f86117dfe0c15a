"""GovernanceService over gRPC: translate proto <-> domain; domain errors become status codes."""

from __future__ import annotations

from llmstudio.auth import Principal, current_principal
from llmstudio.v1 import common_pb2, governance_pb2, governance_pb2_grpc

from .core import ApiKey, AuditRecord
from .usecases import AuditLog, KeyManager


class GovernanceApi(governance_pb2_grpc.GovernanceServiceServicer):
    # "admin" lets a call in; the use cases narrow it to the tenants the caller administers.
    PERMISSIONS = {
        "CreateApiKey": "admin",
        "RevokeApiKey": "admin",
        "ListApiKeys": "admin",
        "WhoAmI": "read",
        "QueryAudit": "admin",
        "VerifyAudit": "admin",
    }

    def __init__(self, keys: KeyManager, audit: AuditLog):
        self.keys = keys
        self.audit = audit

    async def CreateApiKey(self, request, context):
        key, secret = await self.keys.create(
            request.role, request.tenant, request.name, current_principal())
        return governance_pb2.CreateApiKeyResponse(
            key_id=key.key_id, secret=secret, principal=_principal(key.principal()))

    async def RevokeApiKey(self, request, context):
        await self.keys.revoke(request.key_id, current_principal())
        return governance_pb2.RevokeApiKeyResponse(revoked=True)

    async def ListApiKeys(self, request, context):
        keys = await self.keys.list(current_principal(), request.tenant, request.include_revoked)
        return governance_pb2.ListApiKeysResponse(keys=[_key(k) for k in keys])

    async def WhoAmI(self, request, context):
        return _principal(current_principal())

    async def QueryAudit(self, request, context):
        records = await self.audit.query(
            current_principal(), event_type_prefix=request.event_type_prefix,
            entity=request.subject, tenant=request.tenant, after_sequence=request.after_sequence,
            limit=request.limit)
        return governance_pb2.QueryAuditResponse(records=[_record(r) for r in records])

    async def VerifyAudit(self, request, context):
        result = await self.audit.verify(current_principal())
        return governance_pb2.VerifyAuditResponse(
            ok=result.ok, records=result.records, first_bad_sequence=result.first_bad_sequence,
            reason=result.reason, head_hash=result.head_hash,
            checkpoint_seq=result.checkpoint_seq, anchored_records=result.anchored_records,
            checkpoint_time=result.checkpoint_time)


def _principal(p: Principal) -> common_pb2.Principal:
    return common_pb2.Principal(key_id=p.key_id, tenant=p.tenant, roles=list(p.roles), name=p.name)


def _key(k: ApiKey) -> governance_pb2.ApiKeyInfo:
    return governance_pb2.ApiKeyInfo(
        key_id=k.key_id, tenant=k.tenant, roles=list(k.roles), name=k.name,
        created_at=k.created_at, created_by=k.created_by, revoked_at=k.revoked_at or "")


def _record(r: AuditRecord) -> governance_pb2.AuditRecord:
    # The proto's `subject` is the CloudEvents subject (the entity id), as in QueryAuditRequest.
    return governance_pb2.AuditRecord(
        sequence=r.sequence, event_id=r.event_id, event_type=r.event_type, subject=r.entity,
        source=r.source, tenant=r.tenant, actor=r.actor, time=r.time, data_json=r.data_json,
        prev_hash=r.prev_hash, hash=r.hash, trace_id=r.trace_id)
