"""GovernanceService over gRPC: translate proto <-> domain; domain errors become status codes."""

from __future__ import annotations

from llmstudio.auth import Principal, current_principal
from llmstudio.v1 import common_pb2, governance_pb2, governance_pb2_grpc

from .core import ApiKey, AuditRecord, canonical_json
from .lineage import Lineage, to_prov
from .policy import Policy
from .usecases import AuditLog, KeyManager, Lineages, Promotions, PromotionView


class GovernanceApi(governance_pb2_grpc.GovernanceServiceServicer):
    # "admin" lets a call in; the use cases narrow it to the tenants the caller administers.
    PERMISSIONS = {
        "CreateApiKey": "admin",
        "RevokeApiKey": "admin",
        "ListApiKeys": "admin",
        "WhoAmI": "read",
        "QueryAudit": "admin",
        "VerifyAudit": "admin",
        "SetPolicy": "admin",
        "GetPolicy": "read",
        "PolicyHistory": "read",
        "ListPromotionRequests": "read",
        "GetPromotionRequest": "read",
        # let in with "read": the use case refuses a key that may not approve, and audits it
        "Approve": "read",
        "Reject": "read",
        "GetLineage": "read",
    }

    def __init__(self, keys: KeyManager, audit: AuditLog, promotions: Promotions,
                 lineages: Lineages):
        self.keys = keys
        self.audit = audit
        self.promotions = promotions
        self.lineages = lineages

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


    async def SetPolicy(self, request, context):
        caller = current_principal()
        policy = await self.promotions.set_policy(caller, request.tenant, request.yaml)
        return _policy(request.tenant or caller.tenant, policy)

    async def GetPolicy(self, request, context):
        caller = current_principal()
        policy = await self.promotions.get_policy(caller, request.tenant, request.version)
        return _policy(request.tenant or caller.tenant, policy)

    async def PolicyHistory(self, request, context):
        caller = current_principal()
        policies = await self.promotions.history(caller, request.tenant)
        return governance_pb2.PolicyHistoryResponse(
            policies=[_policy(request.tenant or caller.tenant, p) for p in policies])

    async def ListPromotionRequests(self, request, context):
        views = await self.promotions.list_requests(
            current_principal(), request.status, request.tenant, request.limit)
        return governance_pb2.ListPromotionRequestsResponse(requests=[_request(v) for v in views])

    async def GetPromotionRequest(self, request, context):
        return _request(await self.promotions.get(current_principal(), request.request_id))

    async def Approve(self, request, context):
        return _request(await self.promotions.approve(
            current_principal(), request.request_id, request.comment))

    async def Reject(self, request, context):
        return _request(await self.promotions.reject(
            current_principal(), request.request_id, request.reason))

    async def GetLineage(self, request, context):
        lineage = await self.lineages.get(
            current_principal(), request.model_name, request.version, request.tenant)
        return _lineage(lineage, request.prov)


def _lineage(g: Lineage, prov: bool) -> governance_pb2.LineageGraph:
    return governance_pb2.LineageGraph(
        tenant=g.tenant, model_name=g.model_name, version=g.version, root=g.root,
        nodes=[governance_pb2.LineageNode(
            id=n.id, kind=n.kind, label=n.label, time=n.time, hashes=n.hashes,
            attributes=n.attributes, actors=n.actors, trace_ids=n.trace_ids,
            events=[governance_pb2.LineageEvent(
                sequence=e.sequence, event_id=e.event_id, event_type=e.event_type, time=e.time,
                actor=e.actor, trace_id=e.trace_id) for e in n.events])
            for n in g.nodes],
        edges=[governance_pb2.LineageEdge(source=e.source, target=e.target, relation=e.relation)
               for e in g.edges],
        prov_json=canonical_json(to_prov(g)) if prov else "")


def _policy(tenant: str, p: Policy) -> governance_pb2.Policy:
    return governance_pb2.Policy(
        tenant=tenant, version=p.version, yaml=p.yaml, sha256=p.sha256, author=p.author,
        created_at=p.created_at, gated_stages=p.gated_stages)


def _request(v: PromotionView) -> governance_pb2.PromotionRequest:
    r = v.row
    return governance_pb2.PromotionRequest(
        request_id=r.request_id, tenant=r.tenant, model_name=r.facts.get("model_name", ""),
        version=int(r.facts.get("version", 0)), stage=r.stage, requester=r.requester,
        justification=r.facts.get("justification", ""), status=r.status,
        policy_version=r.policy_version,
        verdicts=[governance_pb2.RuleVerdict(rule=str(d["rule"]), ok=bool(d["ok"]),
                                             message=str(d["message"])) for d in r.verdicts],
        approvals=[governance_pb2.PromotionApproval(
            approver=a.approver, roles=list(a.roles), time=a.time, comment=a.comment)
            for a in v.approvals],
        reason=r.reason, created_at=r.created_at, expires_at=r.expires_at,
        updated_at=r.updated_at)


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
