"""Scoped administration, tried as a tenant admin would try to reach past its tenant: a real
governance gRPC server on real NATS. An admin of tenant A manages A's keys and reads A's audit
only; an admin of the platform tenant reaches every tenant."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from llmstudio.config import Settings
from llmstudio.natsserver import free_port
from llmstudio.v1 import governance_pb2 as pb
from llmstudio.v1 import governance_pb2_grpc
from services.governance.app import build
from tests.support.harness import running

PLATFORM_ADMIN = "lls_test-bootstrap-platform-admin-secret-long-enough"


@pytest.fixture
def settings(nats_server, tmp_path):
    return Settings(nats_url=nats_server.url, data_dir=tmp_path, grpc_port=free_port(),
                    bootstrap_admin_key=PLATFORM_ADMIN, max_deliver=3, ack_wait_s=5)


class Governance:
    def __init__(self, port: int):
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self.stub = governance_pb2_grpc.GovernanceServiceStub(self.channel)

    async def call(self, method: str, request, key: str):
        return await getattr(self.stub, method)(
            request, metadata=[("x-api-key", key)], timeout=10)

    async def refusal(self, method: str, request, key: str) -> tuple[grpc.StatusCode, str]:
        try:
            await self.call(method, request, key)
        except grpc.aio.AioRpcError as e:
            return e.code(), e.details()
        return grpc.StatusCode.OK, ""

    async def key(self, role: str, tenant: str, by: str = PLATFORM_ADMIN
                  ) -> pb.CreateApiKeyResponse:
        return await self.call("CreateApiKey", pb.CreateApiKeyRequest(
            role=role, tenant=tenant, name=f"{tenant}-{role}"), by)

    async def audit(self, key: str, tenant: str = "") -> list[pb.AuditRecord]:
        reply = await self.call("QueryAudit", pb.QueryAuditRequest(tenant=tenant), key)
        return list(reply.records)


async def test_tenant_admin_reaches_only_its_own_tenant(settings):
    async with running("governance", build, settings) as port:
        gov = Governance(port)
        admin_a = await gov.key("admin", "tenant-a")
        admin_b = await gov.key("admin", "tenant-b")
        dev_b = await gov.key("developer", "tenant-b")
        viewer_a = await gov.key("viewer", "tenant-a", by=admin_a.secret)  # its own tenant: yes
        assert viewer_a.principal.tenant == "tenant-a"

        # keys: A's admin cannot create, list or revoke B's
        code, details = await gov.refusal("CreateApiKey", pb.CreateApiKeyRequest(
            role="admin", tenant="tenant-b"), admin_a.secret)
        assert code == grpc.StatusCode.PERMISSION_DENIED
        assert details.startswith("tenant:") and "'tenant-a'" in details and "'tenant-b'" in details
        # nor make itself a platform admin
        code, _ = await gov.refusal("CreateApiKey", pb.CreateApiKeyRequest(
            role="admin", tenant="default"), admin_a.secret)
        assert code == grpc.StatusCode.PERMISSION_DENIED
        code, details = await gov.refusal(
            "ListApiKeys", pb.ListApiKeysRequest(tenant="tenant-b"), admin_a.secret)
        assert code == grpc.StatusCode.PERMISSION_DENIED and "'tenant-b'" in details
        # another tenant's key is as unknown as a key that does not exist
        code, details = await gov.refusal(
            "RevokeApiKey", pb.RevokeApiKeyRequest(key_id=dev_b.key_id), admin_a.secret)
        assert code == grpc.StatusCode.NOT_FOUND and dev_b.key_id in details
        who = await gov.call("WhoAmI", pb.WhoAmIRequest(), dev_b.secret)  # B's key still works
        assert who.key_id == dev_b.key_id

        # its own tenant it does manage; a listing shows its tenant's keys and nothing else
        listed = await gov.call("ListApiKeys", pb.ListApiKeysRequest(), admin_a.secret)
        assert {k.key_id for k in listed.keys} == {admin_a.key_id, viewer_a.key_id}
        assert {k.tenant for k in listed.keys} == {"tenant-a"}
        assert (await gov.call("RevokeApiKey", pb.RevokeApiKeyRequest(key_id=viewer_a.key_id),
                               admin_a.secret)).revoked
        live = await gov.call("ListApiKeys", pb.ListApiKeysRequest(), admin_a.secret)
        assert [k.key_id for k in live.keys] == [admin_a.key_id]
        every = await gov.call("ListApiKeys", pb.ListApiKeysRequest(include_revoked=True),
                               admin_a.secret)
        revoked = {k.key_id: k.revoked_at for k in every.keys}
        assert revoked[admin_a.key_id] == "" and revoked[viewer_a.key_id] != ""

        # the platform admin reaches B: lists and revokes B's keys
        b_keys = await gov.call("ListApiKeys", pb.ListApiKeysRequest(tenant="tenant-b"),
                                PLATFORM_ADMIN)
        assert {k.key_id for k in b_keys.keys} == {admin_b.key_id, dev_b.key_id}
        assert (await gov.call("RevokeApiKey", pb.RevokeApiKeyRequest(key_id=dev_b.key_id),
                               PLATFORM_ADMIN)).revoked

        # audit: every key event above is a record of its key's tenant
        async def all_audited():
            records = await gov.audit(PLATFORM_ADMIN)
            return records if len(records) == 7 else None  # 1 bootstrap + 4 created + 2 revoked

        everything = await _poll(all_audited)
        by_tenant = {t: {r.event_id for r in everything if r.tenant == t}
                     for t in ("default", "tenant-a", "tenant-b")}
        assert [len(by_tenant[t]) for t in ("default", "tenant-a", "tenant-b")] == [1, 3, 3]

        # A's admin reads A's records only, and is refused B's by name
        mine = await gov.audit(admin_a.secret)
        assert {r.event_id for r in mine} == by_tenant["tenant-a"]
        assert {r.event_id for r in await gov.audit(admin_a.secret, "tenant-a")} == \
            by_tenant["tenant-a"]
        code, details = await gov.refusal(
            "QueryAudit", pb.QueryAuditRequest(tenant="tenant-b"), admin_a.secret)
        assert code == grpc.StatusCode.PERMISSION_DENIED and "'tenant-b'" in details
        # the platform admin narrows to one tenant when it asks
        assert {r.event_id for r in await gov.audit(PLATFORM_ADMIN, "tenant-b")} == \
            by_tenant["tenant-b"]

        # VerifyAudit: the platform admin sees the whole chain; A's admin whether it holds and
        # how many records A has, nothing that counts or locates the others'
        full = await gov.call("VerifyAudit", pb.VerifyAuditRequest(), PLATFORM_ADMIN)
        assert (full.ok, full.records) == (True, 7) and full.head_hash == everything[-1].hash
        scoped = await gov.call("VerifyAudit", pb.VerifyAuditRequest(), admin_a.secret)
        assert (scoped.ok, scoped.records, scoped.head_hash, scoped.anchored_records) == (
            True, 3, "", 0)

        # audit reads are admin-only now: a developer or a viewer is refused, even for its own
        viewer_b = await gov.key("viewer", "tenant-b", by=admin_b.secret)
        for key in (viewer_b.secret, admin_b.secret):
            assert (await gov.call("WhoAmI", pb.WhoAmIRequest(), key)).tenant == "tenant-b"
        for method, request in (("QueryAudit", pb.QueryAuditRequest()),
                                ("VerifyAudit", pb.VerifyAuditRequest()),
                                ("ListApiKeys", pb.ListApiKeysRequest())):
            code, details = await gov.refusal(method, request, viewer_b.secret)
            assert code == grpc.StatusCode.PERMISSION_DENIED and "may not admin" in details
        await gov.channel.close()


async def test_a_tenant_may_lose_its_last_admin_but_the_platform_may_not(settings):
    async with running("governance", build, settings) as port:
        gov = Governance(port)
        me = await gov.call("WhoAmI", pb.WhoAmIRequest(), PLATFORM_ADMIN)
        admin_a = await gov.key("admin", "tenant-a")
        # A's only admin revokes itself: a platform admin can issue A another
        assert (await gov.call("RevokeApiKey", pb.RevokeApiKeyRequest(key_id=admin_a.key_id),
                               admin_a.secret)).revoked
        again = await gov.key("admin", "tenant-a")
        assert again.principal.tenant == "tenant-a"
        # a tenant admin is not a platform admin: it does not count as the platform's spare
        code, details = await gov.refusal(
            "RevokeApiKey", pb.RevokeApiKeyRequest(key_id=me.key_id), PLATFORM_ADMIN)
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "platform admin" in details
        spare = await gov.key("admin", "default")
        assert (await gov.call("RevokeApiKey", pb.RevokeApiKeyRequest(key_id=me.key_id),
                               spare.secret)).revoked
        await gov.channel.close()


async def _poll(check, timeout: float = 10.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not (result := await check()):
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.1)
    return result
