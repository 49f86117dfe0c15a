"""Policy-gated promotion end to end: the registry and governance in-process against a real
nats-server, over real gRPC. A version reaches a gated stage only through a request governance
approved under the tenant's policy (the built-in default, or a versioned policy the tenant set);
refusals name the unmet rule; self-approval, a viewer's and an expired request's approvals are
refused and audited; requesting, approving and promoting each appear once in the audit log."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest

from llmstudio.bus import Bus
from llmstudio.config import Settings
from llmstudio.events import EvalCompleted, JobSucceeded
from llmstudio.natsserver import free_port
from llmstudio.storage import LocalArtifactStore
from llmstudio.v1 import governance_pb2 as gpb
from llmstudio.v1 import governance_pb2_grpc, registry_pb2_grpc
from llmstudio.v1 import registry_pb2 as rpb
from services.governance.app import build as build_governance
from services.registry.app import build as build_registry
from tests.support.harness import running

ADMIN = "lls_test-bootstrap-admin-secret-long-enough-for-32-bytes"
SHA = "5e" * 32
MODEL = "smol-lora"


def report_key(dataset: str) -> str:
    return f"tenants/acme/datasets/{dataset}/report.json"


def job(job_id: str, dataset: str) -> JobSucceeded:
    own = "tenants/acme"
    return JobSucceeded(
        job_id=job_id, worker_id="w1", model_name=MODEL,
        spec={"base_model": "/models/base", "method": "lora", "hyperparameters": {}},
        dataset_id=dataset, dataset_sha256=SHA,
        dataset_artifacts={"train": f"{own}/datasets/{dataset}/train.jsonl",
                           "report": report_key(dataset)},
        checkpoint_key=f"{own}/jobs/{job_id}/ckpt", adapter_key=f"{own}/jobs/{job_id}/ckpt",
        steps=10, final_loss=0.5)


def evaluation(job_id: str, base: float, tuned: float) -> EvalCompleted:
    return EvalCompleted(
        evaluation_id=f"ev-{job_id}", job_id=job_id, model_name=MODEL,
        base_metrics={"exact_match": base, "eval_loss": 2.0},
        tuned_metrics={"exact_match": tuned, "eval_loss": 1.0},
        report_key=f"tenants/acme/evaluations/ev-{job_id}/report.json")


def md(key: str):
    return (("x-api-key", key),)


async def eventually(fn, timeout: float = 20.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            result = await fn()
            if result:
                return result
        except grpc.aio.AioRpcError:
            if asyncio.get_running_loop().time() > deadline:
                raise
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.1)


class Stack:
    """Governance and the registry, their stubs, the test's bus and the tenant's keys."""

    def __init__(self, gov_port: int, reg_port: int, bus: Bus, store: LocalArtifactStore):
        self.gov_addr, self.reg_addr = f"127.0.0.1:{gov_port}", f"127.0.0.1:{reg_port}"
        self.gch = grpc.aio.insecure_channel(self.gov_addr)
        self.rch = grpc.aio.insecure_channel(self.reg_addr)
        self.gov = governance_pb2_grpc.GovernanceServiceStub(self.gch)
        self.reg = registry_pb2_grpc.RegistryServiceStub(self.rch)
        self.bus = bus
        self.store = store
        self.keys: dict[str, gpb.CreateApiKeyResponse] = {}

    async def key(self, name: str, role: str) -> str:
        made = await self.gov.CreateApiKey(
            gpb.CreateApiKeyRequest(role=role, tenant="acme", name=name), metadata=md(ADMIN))
        self.keys[name] = made
        # usable at the registry once its key directory saw it
        await eventually(lambda: self.reg.ListModels(rpb.ListModelsRequest(),
                                                     metadata=md(made.secret)))
        return made.secret

    async def version_with(self, job_id: str, dataset: str, pii_rows: int, base: float,
                           tuned: float, number: int) -> rpb.ModelVersion:
        counts = {"email": 2, "phone": pii_rows - 2} if pii_rows else {}
        self.store.put_bytes(report_key(dataset), json.dumps(
            {"pii_rows": pii_rows, "pii_counts": counts}).encode())
        await self.bus.publish(job(job_id, dataset), tenant="acme", actor="alice")
        await self.bus.publish(evaluation(job_id, base, tuned), tenant="acme", actor="evaluator")
        dev = self.keys["dev"].secret

        async def evaluated():
            v = await self.reg.GetVersion(rpb.GetVersionRequest(model_name=MODEL, version=number),
                                          metadata=md(dev))
            return v if v.lineage.evaluation_id else None

        return await eventually(evaluated)

    async def stage_of(self, number: int) -> int:
        v = await self.reg.GetVersion(rpb.GetVersionRequest(model_name=MODEL, version=number),
                                      metadata=md(self.keys["dev"].secret))
        return v.stage

    async def set_stage(self, number: int, stage: int, key: str) -> rpb.ModelVersion:
        return await self.reg.SetStage(
            rpb.SetStageRequest(model_name=MODEL, version=number, stage=stage), metadata=md(key))

    async def request(self, number: int, stage: int, key: str, why: str = "ready"):
        return await self.reg.RequestPromotion(rpb.RequestPromotionRequest(
            model_name=MODEL, version=number, stage=stage, justification=why), metadata=md(key))

    async def decided(self, request_id: str, status: str) -> gpb.PromotionRequest:
        async def check():
            r = await self.gov.GetPromotionRequest(
                gpb.GetPromotionRequestRequest(request_id=request_id), metadata=md(ADMIN))
            return r if r.status == status else None

        return await eventually(check)

    async def audit(self, prefix: str, subject: str = "") -> list[gpb.AuditRecord]:
        return list((await self.gov.QueryAudit(gpb.QueryAuditRequest(
            event_type_prefix=prefix, subject=subject), metadata=md(ADMIN))).records)

    async def close(self) -> None:
        await self.gch.close()
        await self.rch.close()


@pytest.fixture
async def stack(nats_server, tmp_path, monkeypatch, request):
    ttl = getattr(request, "param", None)
    if ttl:
        monkeypatch.setenv("LLMSTUDIO_PROMOTION_REQUEST_TTL_S", str(ttl))
        monkeypatch.setenv("LLMSTUDIO_PROMOTION_SWEEP_EVERY_S", "0.5")
    common = dict(nats_url=nats_server.url, data_dir=tmp_path, bootstrap_admin_key=ADMIN,
                  max_deliver=5, ack_wait_s=5)
    gov_settings = Settings(**common, grpc_port=free_port())
    reg_settings = Settings(**common, grpc_port=free_port())
    bus = Bus(Settings(**common), "scheduler")
    await bus.start()
    async with running("governance", build_governance, gov_settings) as gov_port, \
            running("registry", build_registry, reg_settings) as reg_port:
        s = Stack(gov_port, reg_port, bus, LocalArtifactStore(tmp_path / "artifacts"))
        await s.key("dev", "developer")
        await s.key("reviewer", "reviewer")
        await s.key("viewer", "viewer")
        await s.key("acme-admin", "admin")
        try:
            yield s
        finally:
            await s.close()
    await bus.stop()


def codes_and_details(err: pytest.ExceptionInfo) -> tuple[grpc.StatusCode, str]:
    return err.value.code(), err.value.details()


async def test_default_policy_gates_production_on_a_reviewers_approval(stack):
    s = stack
    dev, reviewer, viewer = (s.keys[k].secret for k in ("dev", "reviewer", "viewer"))
    await s.version_with("job-1", "ds-1", pii_rows=0, base=0.1, tuned=0.9, number=1)

    # Staging needs an evaluation (default policy): SetStage files the request, governance
    # approves it at once, the registry moves the version.
    moved = await s.set_stage(1, rpb.STAGE_STAGING, dev)
    assert moved.stage == rpb.STAGE_STAGING

    # Production needs a reviewer's approval: SetStage is refused naming what is missing.
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await s.set_stage(1, rpb.STAGE_PRODUCTION, dev)
    code, details = codes_and_details(refused)
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "pending_approval" in details
    assert "approvals: 0 of 1 approval(s) by a reviewer other than the requester" in details
    assert await s.stage_of(1) == rpb.STAGE_STAGING
    # RequestPromotion finds the open request SetStage filed.
    pending = await s.request(1, rpb.STAGE_PRODUCTION, dev)
    assert pending.status == "pending_approval" and pending.requester == s.keys["dev"].key_id
    decided = await s.decided(pending.request_id, "pending_approval")
    rules = {v.rule: (v.ok, v.message) for v in decided.verdicts}
    assert rules["from_stage"][0] and rules["evaluated"][0]
    assert rules["metric"] == (
        True, "metric exact_match: tuned 0.9 must be >= base 0.1 (threshold 0.1)")
    assert rules["approvals"][0] is False

    # The requester cannot approve its own request, nor can a viewer: both refused, audited.
    for key, code in ((dev, grpc.StatusCode.PERMISSION_DENIED),
                      (viewer, grpc.StatusCode.PERMISSION_DENIED)):
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await s.gov.Approve(gpb.ApproveRequest(request_id=pending.request_id),
                                metadata=md(key))
        assert bad.value.code() == code
    refusals = await eventually(lambda: _n(s.audit("llmstudio.policy.approval_refused"), 2))
    reasons = [json.loads(r.data_json)["reason"] for r in refusals]
    assert "requested smol-lora-v1 -> production itself" in reasons[0]
    assert "(roles viewer) may not review promotions" in reasons[1]
    assert [r.actor for r in refusals] == [s.keys["dev"].key_id, s.keys["viewer"].key_id]
    assert await s.stage_of(1) == rpb.STAGE_STAGING

    # A reviewer approves: governance decides approved, the registry promotes.
    approved = await s.gov.Approve(gpb.ApproveRequest(request_id=pending.request_id,
                                                      comment="looks good"), metadata=md(reviewer))
    assert approved.status == "approved"
    assert [a.approver for a in approved.approvals] == [s.keys["reviewer"].key_id]
    await eventually(lambda: _equals(s.stage_of(1), rpb.STAGE_PRODUCTION))
    record = await eventually(lambda: _applied(s, pending.request_id, dev))
    assert record.unmet == []

    # Requesting, approving and promoting each appear once in the audit log, and it verifies.
    requested = await eventually(lambda: _n(s.audit(
        "llmstudio.model.promotion_requested", pending.request_id), 1))
    assert json.loads(requested[0].data_json)["to_stage"] == "production"
    approvals = await s.audit("llmstudio.policy.approved", pending.request_id)
    assert [r.actor for r in approvals] == [s.keys["reviewer"].key_id]
    promoted = await eventually(lambda: _n(_to_stage(s, "production"), 1))
    assert promoted[0].actor == s.keys["dev"].key_id
    decisions = await s.audit("llmstudio.policy.decided", pending.request_id)
    assert [json.loads(r.data_json)["status"] for r in decisions] == [
        "pending_approval", "approved"]
    verified = await s.gov.VerifyAudit(gpb.VerifyAuditRequest(), metadata=md(ADMIN))
    assert verified.ok, verified.reason


async def test_a_tenant_policy_names_unmet_thresholds_and_pii(stack):
    s = stack
    dev, admin = s.keys["dev"].secret, s.keys["acme-admin"].secret
    policy = """
stages:
  staging:
    - evaluated: {}
  production:
    - from_stage: {stage: staging}
    - metric: {name: exact_match, compare: base, margin: 0.1}
    - metric: {name: exact_match, min: 0.8}
    - pii_clean: {}
    - approvals: {count: 1, role: reviewer}
"""
    set_ = await s.gov.SetPolicy(gpb.SetPolicyRequest(yaml=policy), metadata=md(admin))
    assert (set_.version, list(set_.gated_stages)) == (1, ["staging", "production"])
    # A version worse than its base, trained on a dataset with PII.
    await s.version_with("job-2", "ds-2", pii_rows=3, base=0.5, tuned=0.45, number=1)
    assert (await s.set_stage(1, rpb.STAGE_STAGING, dev)).stage == rpb.STAGE_STAGING
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await s.set_stage(1, rpb.STAGE_PRODUCTION, dev)
    code, details = codes_and_details(refused)
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "is rejected" in details
    assert "metric exact_match: tuned 0.45 must be >= base 0.5 + 0.1 (threshold 0.6)" in details
    assert "metric exact_match: tuned 0.45 must be >= 0.8 (below the minimum 0.8)" in details
    assert (f"pii_clean: PII found in dataset ds-2 (sha256 {SHA[:12]}): 3 row(s) "
            "(email 2, phone 1)") in details
    assert await s.stage_of(1) == rpb.STAGE_STAGING
    # An invalid policy is refused by field, and stores nothing.
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await s.gov.SetPolicy(gpb.SetPolicyRequest(
            yaml="stages:\n  production:\n    - metric: {name: exact_match, minimum: 1}\n"),
            metadata=md(admin))
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "stages.production[0].metric: unknown option(s) minimum" in bad.value.details()
    # Setting a policy is an admin's: a developer is refused.
    with pytest.raises(grpc.aio.AioRpcError) as denied:
        await s.gov.SetPolicy(gpb.SetPolicyRequest(yaml=policy), metadata=md(dev))
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_policy_versions_and_a_pending_request_reevaluated_under_the_new_one(stack):
    s = stack
    dev, admin = s.keys["dev"].secret, s.keys["acme-admin"].secret
    two_approvals = """
stages:
  production:
    - from_stage: {stage: staging}
    - approvals: {count: 2, role: reviewer}
"""
    await s.gov.SetPolicy(gpb.SetPolicyRequest(yaml=two_approvals), metadata=md(admin))
    await s.version_with("job-3", "ds-3", pii_rows=0, base=0.2, tuned=0.9, number=1)
    # staging is no longer gated under this policy: SetStage moves it directly, once the
    # registry heard of the policy
    await eventually(lambda: _staged(s, dev))
    pending = await s.request(1, rpb.STAGE_PRODUCTION, dev)
    first = await s.decided(pending.request_id, "pending_approval")
    assert first.policy_version == 1
    assert "0 of 2 approval(s)" in [v.message for v in first.verdicts if not v.ok][0]

    # A platform admin sets version 2 for acme: the pending request is re-evaluated under it.
    stricter = """
stages:
  production:
    - from_stage: {stage: staging}
    - metric: {name: exact_match, min: 0.95}
    - approvals: {count: 1, role: reviewer}
"""
    v2 = await s.gov.SetPolicy(gpb.SetPolicyRequest(yaml=stricter, tenant="acme"),
                               metadata=md(ADMIN))
    assert v2.version == 2
    second = await s.decided(pending.request_id, "rejected")
    assert second.policy_version == 2 and second.reason == "re-evaluated: policy v2"
    assert [v.message for v in second.verdicts if not v.ok] == [
        "metric exact_match: tuned 0.9 must be >= 0.95 (below the minimum 0.95)",
        "approvals: 0 of 1 approval(s) by a reviewer other than the requester: missing 1"]
    record = await eventually(lambda: _status(s, pending.request_id, dev, "rejected"))
    assert "metric exact_match: tuned 0.9 must be >= 0.95" in record.unmet[0]

    history = await s.gov.PolicyHistory(gpb.PolicyHistoryRequest(), metadata=md(dev))
    assert [(p.version, p.author) for p in history.policies] == [
        (1, s.keys["acme-admin"].key_id), (2, (await _whoami(s)).key_id)]
    assert history.policies[0].yaml == two_approvals
    now = await s.gov.GetPolicy(gpb.GetPolicyRequest(), metadata=md(dev))
    assert (now.version, now.yaml) == (2, stricter)
    changes = await eventually(lambda: _n(s.audit("llmstudio.policy.changed"), 2))
    assert [json.loads(r.data_json)["version"] for r in changes] == [1, 2]
    assert [r.actor for r in changes] == [s.keys["acme-admin"].key_id, (await _whoami(s)).key_id]


async def test_a_new_evaluation_reevaluates_a_pending_request(stack):
    s = stack
    dev, admin = s.keys["dev"].secret, s.keys["acme-admin"].secret
    await s.gov.SetPolicy(gpb.SetPolicyRequest(yaml="""
stages:
  production:
    - metric: {name: exact_match, min: 0.5}
    - approvals: {count: 1}
"""), metadata=md(admin))
    await s.version_with("job-6", "ds-6", pii_rows=0, base=0.2, tuned=0.9, number=1)
    await eventually(lambda: _staged(s, dev))
    pending = await s.request(1, rpb.STAGE_PRODUCTION, dev)
    await s.decided(pending.request_id, "pending_approval")
    # The version is evaluated again (worse): governance decides the open request again.
    again = evaluation("job-6", base=0.2, tuned=0.3).model_copy(
        update={"evaluation_id": "ev-job-6-b"})
    await s.bus.publish(again, tenant="acme", actor="evaluator")
    rejected = await s.decided(pending.request_id, "rejected")
    assert rejected.reason == "re-evaluated: new evaluation"
    assert [v.message for v in rejected.verdicts if not v.ok][0] == (
        "metric exact_match: tuned 0.3 must be >= 0.5 (below the minimum 0.5)")
    await eventually(lambda: _status(s, pending.request_id, dev, "rejected"))


@pytest.mark.parametrize("stack", [2], indirect=True)
async def test_an_expired_request_cannot_be_approved_and_the_refusal_is_audited(stack):
    s = stack
    dev, reviewer = s.keys["dev"].secret, s.keys["reviewer"].secret
    await s.version_with("job-4", "ds-4", pii_rows=0, base=0.2, tuned=0.9, number=1)
    await s.set_stage(1, rpb.STAGE_STAGING, dev)
    pending = await s.request(1, rpb.STAGE_PRODUCTION, dev)
    await s.decided(pending.request_id, "pending_approval")
    await s.decided(pending.request_id, "expired")  # the sweep expires it
    with pytest.raises(grpc.aio.AioRpcError) as late:
        await s.gov.Approve(gpb.ApproveRequest(request_id=pending.request_id),
                            metadata=md(reviewer))
    assert late.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "expired" in late.value.details()
    [refusal] = await eventually(lambda: _n(s.audit("llmstudio.policy.approval_refused"), 1))
    assert "expired at" in json.loads(refusal.data_json)["reason"]
    await eventually(lambda: _status(s, pending.request_id, dev, "expired"))
    assert await s.stage_of(1) == rpb.STAGE_STAGING
    # a new request can be filed after the expired one
    again = await s.request(1, rpb.STAGE_PRODUCTION, dev)
    assert again.request_id != pending.request_id


async def _n(records, n: int):
    got = await records
    return got if len(got) == n else None


async def _equals(value, expected) -> bool:
    return await value == expected


async def _to_stage(s: Stack, stage: str):
    records = await s.audit("llmstudio.model.stage_changed")
    return [r for r in records if json.loads(r.data_json)["to_stage"] == stage]


async def _status(s: Stack, request_id: str, key: str, status: str):
    r = await s.reg.GetPromotion(rpb.GetPromotionRecordRequest(request_id=request_id),
                                 metadata=md(key))
    return r if r.status == status else None


async def _applied(s: Stack, request_id: str, key: str):
    return await _status(s, request_id, key, "applied")


async def _staged(s: Stack, key: str):
    try:
        return await s.set_stage(1, rpb.STAGE_STAGING, key)
    except grpc.aio.AioRpcError as e:
        if e.code() != grpc.StatusCode.FAILED_PRECONDITION:
            raise
        return None


async def _whoami(s: Stack):
    return await s.gov.WhoAmI(gpb.WhoAmIRequest(), metadata=md(ADMIN))


async def test_cli_sets_policies_promotes_and_approves(stack, tmp_path, monkeypatch, capsys):
    from llmstudio.cli import main

    s = stack
    monkeypatch.setenv("LLMSTUDIO_GOVERNANCE_ADDR", s.gov_addr)
    monkeypatch.setenv("LLMSTUDIO_REGISTRY_ADDR", s.reg_addr)
    empty = tmp_path / "no-stack"
    empty.mkdir()

    async def cli(key: str, *argv: str) -> tuple[int, str]:
        code = await asyncio.to_thread(main, [*argv, "--data-dir", str(empty), "--api-key", key])
        out = capsys.readouterr()
        return code, out.out + out.err

    dev, reviewer, admin = (s.keys[k].secret for k in ("dev", "reviewer", "acme-admin"))
    code, out = await cli(dev, "policies", "get")
    assert code == 0 and out.startswith("# built-in default policy")
    policy = tmp_path / "policy.yaml"
    policy.write_text("stages:\n  production:\n    - approvals: {count: 1}\n")
    code, out = await cli(dev, "policies", "set", str(policy))
    assert code == 1 and out.startswith("error: PERMISSION_DENIED")
    code, out = await cli(admin, "policies", "set", str(policy))
    assert (code, out) == (0, "policy v1 of acme set (gates: production)\n")
    code, out = await cli(dev, "policies", "history")
    assert code == 0 and out.startswith("v1  ") and s.keys["acme-admin"].key_id in out

    await s.version_with("job-5", "ds-5", pii_rows=0, base=0.2, tuned=0.9, number=1)
    await eventually(lambda: _staged(s, dev))
    code, out = await cli(dev, "models", "promote", f"{MODEL}@1", "production",
                          "--justification", "better than base")
    assert code == 0 and ": pending_approval" in out
    assert "unmet: approvals: 0 of 1 approval(s)" in out
    request_id = out.split()[0]
    code, out = await cli(reviewer, "models", "requests", "--status", "pending_approval")
    assert code == 0 and out.startswith(f"{request_id}  {MODEL}@1 -> production")
    code, out = await cli(dev, "models", "approve", request_id)
    assert code == 1 and "itself" in out
    code, out = await cli(reviewer, "models", "approve", request_id, "--comment", "ok")
    assert code == 0 and " approved " in out and s.keys["reviewer"].key_id in out
    await eventually(lambda: _equals(s.stage_of(1), rpb.STAGE_PRODUCTION))
