"""GetLineage end to end: governance and the registry in-process on a real nats-server, over
real gRPC. The dataset, scheduler, trainer and evaluator events are published as those services
publish them (each from its own service's bus); the registry registers the version, a developer
requests production and a reviewer approves it. The lineage of the promoted version, read from
governance's audit log, reaches the dataset's sha256 (and the version it was derived from) and
the approver's key id; another tenant's key finds nothing; PROV-JSON has the expected shape."""

from __future__ import annotations

import json

import grpc
import pytest

from llmstudio.bus import Bus
from llmstudio.config import Settings
from llmstudio.events import (
    DatasetRegistered,
    EvalCompleted,
    JobAssigned,
    JobCheckpointed,
    JobCompleted,
    JobStarted,
    JobSubmitted,
    JobSucceeded,
)
from llmstudio.natsserver import free_port
from llmstudio.storage import LocalArtifactStore
from llmstudio.v1 import governance_pb2 as gpb
from llmstudio.v1 import governance_pb2_grpc, registry_pb2_grpc
from llmstudio.v1 import registry_pb2 as rpb
from services.governance.app import build as build_governance
from services.registry.app import build as build_registry
from tests.integration.test_promotion import eventually, md
from tests.support.harness import running

ADMIN = "lls_test-bootstrap-admin-secret-long-enough-for-32-bytes"
MODEL = "smol-lora"
SHA_RAW, SHA = "1a" * 32, "2b" * 32
OWN = "tenants/acme"
REPORT = f"{OWN}/datasets/ds-clean/report.json"
CKPT = f"{OWN}/jobs/job-1/checkpoints/step-5"
FINAL = f"{OWN}/jobs/job-1/final"


@pytest.fixture
async def stack(nats_server, tmp_path):
    common = dict(nats_url=nats_server.url, data_dir=tmp_path, bootstrap_admin_key=ADMIN,
                  max_deliver=5, ack_wait_s=5)
    buses = {name: Bus(Settings(**common), name)
             for name in ("dataset", "scheduler", "trainer", "evaluator")}
    for bus in buses.values():
        await bus.start()
    async with running("governance", build_governance,
                       Settings(**common, grpc_port=free_port())) as gov_port, \
            running("registry", build_registry,
                    Settings(**common, grpc_port=free_port())) as reg_port:
        gch = grpc.aio.insecure_channel(f"127.0.0.1:{gov_port}")
        rch = grpc.aio.insecure_channel(f"127.0.0.1:{reg_port}")
        gov = governance_pb2_grpc.GovernanceServiceStub(gch)
        reg = registry_pb2_grpc.RegistryServiceStub(rch)
        keys = {}
        for name, role, tenant in (("dev", "developer", "acme"), ("reviewer", "reviewer", "acme"),
                                   ("viewer", "viewer", "acme"), ("other", "admin", "globex")):
            keys[name] = await gov.CreateApiKey(gpb.CreateApiKeyRequest(
                role=role, tenant=tenant, name=name), metadata=md(ADMIN))
            await eventually(lambda k=keys[name]: reg.ListModels(
                rpb.ListModelsRequest(), metadata=md(k.secret)))
        try:
            yield gov, reg, buses, keys, LocalArtifactStore(tmp_path / "artifacts")
        finally:
            await gch.close()
            await rch.close()
    for bus in buses.values():
        await bus.stop()


async def publish_training(buses, dev_key: str) -> None:
    """A raw upload, its cleaned derivative, a job on it: assigned, started, checkpointed,
    completed by the worker and accepted by the scheduler; then its evaluation."""
    ds = buses["dataset"]
    await ds.publish(DatasetRegistered(
        dataset_id="ds-raw", name="support", sha256=SHA_RAW, format="chat", num_rows=12,
        train_rows=10, validation_rows=2, artifacts={}), tenant="acme", actor=dev_key)
    await ds.publish(DatasetRegistered(
        dataset_id="ds-clean", name="support", sha256=SHA, format="chat", num_rows=10,
        train_rows=8, validation_rows=2, artifacts={"report": REPORT}, version=2,
        parent_id="ds-raw", transformation='{"op":"derive","pii":"redact"}'),
        tenant="acme", actor=dev_key)
    spec = {"base_model": "/models/base", "method": "lora", "hyperparameters": {}}
    sched, trainer = buses["scheduler"], buses["trainer"]
    await sched.publish(JobSubmitted(job_id="job-1", dataset_id="ds-clean", model_name=MODEL,
                                     spec=spec), tenant="acme", actor=dev_key)
    await sched.publish(JobAssigned(job_id="job-1", worker_id="worker-7"), tenant="acme",
                        actor=dev_key)
    await trainer.publish(JobStarted(job_id="job-1", worker_id="worker-7"), tenant="acme",
                          actor="worker-7")
    await trainer.publish(JobCheckpointed(job_id="job-1", step=5, checkpoint_key=CKPT),
                          tenant="acme", actor="worker-7")
    done = dict(job_id="job-1", worker_id="worker-7", model_name=MODEL, spec=spec,
                dataset_id="ds-clean", dataset_sha256=SHA,
                dataset_artifacts={"train": f"{OWN}/datasets/ds-clean/train.jsonl",
                                   "report": REPORT},
                checkpoint_key=FINAL, adapter_key=FINAL, steps=10, final_loss=0.4)
    await trainer.publish(JobCompleted(**done), tenant="acme", actor="worker-7")
    await sched.publish(JobSucceeded(**done), tenant="acme", actor=dev_key)
    await buses["evaluator"].publish(EvalCompleted(
        evaluation_id="ev-1", job_id="job-1", model_name=MODEL,
        base_metrics={"exact_match": 0.1, "eval_loss": 2.0},
        tuned_metrics={"exact_match": 0.8, "eval_loss": 1.0},
        report_key=f"{OWN}/evaluations/ev-1/report.json"), tenant="acme", actor=dev_key)


async def test_lineage_of_a_promoted_version(stack):
    gov, reg, buses, keys, artifacts = stack
    dev, reviewer, viewer = (keys[k].secret for k in ("dev", "reviewer", "viewer"))
    artifacts.put_bytes(REPORT, json.dumps({"pii_rows": 0, "pii_counts": {}}).encode())
    await publish_training(buses, keys["dev"].key_id)

    async def evaluated():
        v = await reg.GetVersion(rpb.GetVersionRequest(model_name=MODEL, version=1),
                                 metadata=md(dev))
        return v if v.lineage.evaluation_id else None

    await eventually(evaluated)
    staged = await reg.SetStage(rpb.SetStageRequest(
        model_name=MODEL, version=1, stage=rpb.STAGE_STAGING), metadata=md(dev))
    assert staged.stage == rpb.STAGE_STAGING
    asked = await reg.RequestPromotion(rpb.RequestPromotionRequest(
        model_name=MODEL, version=1, stage=rpb.STAGE_PRODUCTION, justification="beats base"),
        metadata=md(dev))

    async def pending():
        r = await gov.GetPromotionRequest(gpb.GetPromotionRequestRequest(
            request_id=asked.request_id), metadata=md(reviewer))
        return r.status == "pending_approval"

    await eventually(pending)
    await gov.Approve(gpb.ApproveRequest(request_id=asked.request_id, comment="ship it"),
                      metadata=md(reviewer))

    async def promoted_lineage():
        # the stage change reaches the audit log after the registry moved the version
        g = await gov.GetLineage(gpb.GetLineageRequest(model_name=MODEL, version=1),
                                 metadata=md(viewer))
        to_prod = [n for n in g.nodes if n.kind == "stage_change"
                   and n.attributes["to_stage"] == "production"]
        return g if to_prod and to_prod[0].attributes.get("request_id") else None

    g = await eventually(promoted_lineage)
    nodes = {n.id: n for n in g.nodes}
    edges = {(e.source, e.target, e.relation) for e in g.edges}
    assert g.tenant == "acme" and g.root == f"version/{MODEL}@1"

    # the dataset's sha256, and the upload it was derived from
    clean, raw = nodes["dataset/ds-clean"], nodes["dataset/ds-raw"]
    assert clean.hashes["sha256"] == SHA and raw.hashes["sha256"] == SHA_RAW
    assert ("dataset/ds-raw", "dataset/ds-clean", "derived") in edges
    assert clean.actors[0] == keys["dev"].key_id and clean.trace_ids
    # job -> attempt on its worker -> checkpoints -> evaluation -> version
    assert ("dataset/ds-clean", "job/job-1", "used") in edges
    attempt = nodes["attempt/job-1/1"]
    assert attempt.attributes["worker_id"] == "worker-7"
    assert attempt.attributes["status"] == "succeeded"
    assert ("attempt/job-1/1", f"checkpoint/{CKPT}", "generated") in edges
    assert nodes[f"checkpoint/{FINAL}"].hashes["checkpoint_key"] == FINAL
    assert (f"checkpoint/{FINAL}", g.root, "registered") in edges
    assert ("evaluation/ev-1", g.root, "evidence") in edges
    assert nodes[g.root].hashes["dataset_sha256"] == SHA
    # the request, the reviewer's approval (its key id) and the stage change it authorized
    request = nodes[f"request/{asked.request_id}"]
    assert request.attributes["status"] == "approved"
    assert request.attributes["requester"] == keys["dev"].key_id
    approver = keys["reviewer"].key_id
    approval = nodes[f"approval/{asked.request_id}/{approver}"]
    assert approval.actors == [approver] and approval.attributes["comment"] == "ship it"
    assert (request.id, approval.id, "reviewed") in edges
    to_prod = next(n for n in g.nodes if n.kind == "stage_change"
                   and n.attributes["to_stage"] == "production")
    assert (request.id, to_prod.id, "authorized") in edges
    # every node's events are audit records, each with a time and a sequence
    assert all(n.events and all(e.sequence > 0 and e.time for e in n.events) for n in g.nodes)

    # another tenant's key finds no such version, not even by naming the tenant
    with pytest.raises(grpc.aio.AioRpcError) as other:
        await gov.GetLineage(gpb.GetLineageRequest(model_name=MODEL, version=1),
                             metadata=md(keys["other"].secret))
    assert other.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as named:
        await gov.GetLineage(gpb.GetLineageRequest(model_name=MODEL, version=1, tenant="acme"),
                             metadata=md(keys["other"].secret))
    assert named.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # a platform admin names the tenant
    by_admin = await gov.GetLineage(gpb.GetLineageRequest(
        model_name=MODEL, version=1, tenant="acme"), metadata=md(ADMIN))
    assert {n.id for n in by_admin.nodes} >= set(nodes)
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await gov.GetLineage(gpb.GetLineageRequest(model_name=MODEL, version=9),
                             metadata=md(viewer))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND

    # PROV-JSON: entities, activities, agents and their relations
    prov = json.loads((await gov.GetLineage(gpb.GetLineageRequest(
        model_name=MODEL, version=1, prov=True), metadata=md(viewer))).prov_json)
    assert prov["entity"]["lls:dataset/ds-clean"]["lls:sha256"] == SHA
    assert f"lls:version/{MODEL}@1" in prov["entity"]
    assert "lls:job/job-1" in prov["activity"]
    assert f"lls:agent/{approver}" in prov["agent"]
    assert {"prov:activity": f"lls:approval/{asked.request_id}/{approver}",
            "prov:agent": f"lls:agent/{approver}"} in prov["wasAssociatedWith"].values()
    assert {"prov:generatedEntity": "lls:dataset/ds-clean",
            "prov:usedEntity": "lls:dataset/ds-raw"} in prov["wasDerivedFrom"].values()
    assert {"prov:activity": "lls:job/job-1",
            "prov:entity": "lls:dataset/ds-clean"} in prov["used"].values()
    assert {"prov:entity": f"lls:checkpoint/{FINAL}",
            "prov:activity": "lls:attempt/job-1/1"} in prov["wasGeneratedBy"].values()
