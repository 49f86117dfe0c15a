"""The lineage graph, pure: hand-made audit records (the events the services publish, as the
audit handler stores them) in, nodes and edges out; and its W3C PROV-JSON export."""

from __future__ import annotations

import json

from llmstudio.events import (
    ApprovalRefused,
    DatasetRegistered,
    DatasetValidated,
    EvalCompleted,
    EventData,
    JobAssigned,
    JobCheckpointed,
    JobCompleted,
    JobRequeued,
    JobStarted,
    JobSubmitted,
    JobSucceeded,
    ModelPromotionRequested,
    ModelStageChanged,
    ModelVersionRegistered,
    PolicyDecided,
    PromotionApproved,
)
from services.governance.core import AuditEvent, AuditRecord, canonical_json, chain
from services.governance.lineage import build_lineage, references, to_prov

SHA_PARENT, SHA = "aa" * 32, "bb" * 32
OWN = "tenants/acme"
CKPT1 = f"{OWN}/jobs/job-1/attempt-1/step-5"
FINAL = f"{OWN}/jobs/job-1/final"


class Log:
    """An audit log in the making: each event chained after the last, one trace id each."""

    def __init__(self) -> None:
        self.records: list[AuditRecord] = []

    def add(self, data: EventData, source: str, actor: str, tenant: str = "acme") -> AuditRecord:
        n = len(self.records) + 1
        record = chain(AuditEvent(
            event_id=f"e{n}", event_type=data.TYPE, subject=data.subject(),
            entity=data.entity_id(), source=source, tenant=tenant, actor=actor,
            time=f"2025-01-01T00:{n // 60:02d}:{n % 60:02d}Z",
            data_json=canonical_json(data.model_dump(mode="json")), trace_id=f"{n:032x}"),
            self.records[-1] if self.records else None)
        self.records.append(record)
        return record


def succeeded(job_id: str = "job-1", attempt: int = 2, cls=JobSucceeded, **kw):
    return cls(job_id=job_id, worker_id="w2", model_name="smol", spec={"method": "lora"},
               dataset_id="ds-2", dataset_sha256=SHA, dataset_artifacts={},
               checkpoint_key=FINAL, adapter_key=FINAL, steps=10, final_loss=0.5,
               attempt=attempt, **kw)


def promoted_history(log: Log) -> None:
    """ds-1 -> derived ds-2 -> job-1 (attempt 1 lost on w1, attempt 2 on w2) -> checkpoints ->
    evaluation -> smol@1 -> staging, then a production request: a self-approval refused, a
    reviewer's approval, production."""
    log.add(DatasetRegistered(dataset_id="ds-1", name="support", sha256=SHA_PARENT,
                              format="chat", num_rows=10, train_rows=9, validation_rows=1,
                              artifacts={}), "dataset", "k-alice")
    log.add(DatasetRegistered(dataset_id="ds-2", name="support", sha256=SHA, format="chat",
                              num_rows=8, train_rows=7, validation_rows=1, artifacts={},
                              version=2, parent_id="ds-1",
                              transformation='{"op":"derive","dedup":true}'),
            "dataset", "k-alice")
    log.add(JobSubmitted(job_id="job-1", dataset_id="ds-2", model_name="smol",
                         spec={"base_model": "/models/base", "method": "lora"}),
            "scheduler", "k-dev")
    log.add(DatasetValidated(job_id="job-1", dataset_id="ds-2", sha256=SHA, artifacts={}),
            "dataset", "k-dev")
    log.add(JobAssigned(job_id="job-1", worker_id="w1"), "scheduler", "k-dev")
    log.add(JobStarted(job_id="job-1", worker_id="w1"), "trainer", "w1")
    log.add(JobCheckpointed(job_id="job-1", step=5, checkpoint_key=CKPT1), "trainer", "w1")
    log.add(JobRequeued(job_id="job-1", attempt=2, worker_id="w1", reason="worker lost"),
            "scheduler", "k-dev")
    log.add(JobAssigned(job_id="job-1", worker_id="w2", attempt=2), "scheduler", "k-dev")
    log.add(JobStarted(job_id="job-1", worker_id="w2", attempt=2, resumed_from_step=5),
            "trainer", "w2")
    log.add(succeeded(cls=JobCompleted), "trainer", "w2")
    log.add(succeeded(), "scheduler", "k-dev")
    log.add(EvalCompleted(evaluation_id="ev-1", job_id="job-1", model_name="smol",
                          base_metrics={"exact_match": 0.1}, tuned_metrics={"exact_match": 0.9},
                          report_key=f"{OWN}/evaluations/ev-1/report.json"),
            "evaluator", "k-dev")
    log.add(ModelVersionRegistered(ref="smol-v1", model_name="smol", version=1, job_id="job-1",
                                   dataset_sha256=SHA), "registry", "k-dev")
    for rid, to_stage in (("req-s", "staging"), ("req-p", "production")):
        log.add(ModelPromotionRequested(
            request_id=rid, ref="smol-v1", model_name="smol", version=1,
            from_stage="development" if rid == "req-s" else "staging", to_stage=to_stage,
            requester="k-dev", justification="beats base", evaluation_id="ev-1",
            dataset_id="ds-2", dataset_sha256=SHA), "registry", "k-dev")
        status = "approved" if rid == "req-s" else "pending_approval"
        log.add(PolicyDecided(request_id=rid, ref="smol-v1", model_name="smol", version=1,
                              stage=to_stage, status=status, policy_version=0,
                              verdicts=[{"rule": "evaluated", "ok": True, "message": "ok"}],
                              requester="k-dev"), "governance", "governance")
        if rid == "req-s":
            log.add(ModelStageChanged(ref="smol-v1", model_name="smol", version=1,
                                      from_stage="development", to_stage="staging"),
                    "registry", "k-dev")
    log.add(ApprovalRefused(request_id="req-p", caller="k-dev", action="approve",
                            reason="self-approval"), "governance", "k-dev")
    log.add(PromotionApproved(request_id="req-p", ref="smol-v1", approver="k-rev",
                              role="reviewer", comment="lgtm"), "governance", "k-rev")
    log.add(PolicyDecided(request_id="req-p", ref="smol-v1", model_name="smol", version=1,
                          stage="production", status="approved", policy_version=0, verdicts=[],
                          approvals=["k-rev"], requester="k-dev"), "governance", "governance")
    log.add(ModelStageChanged(ref="smol-v1", model_name="smol", version=1,
                              from_stage="staging", to_stage="production"), "registry", "k-rev")


def noise(log: Log) -> None:
    """Another version of the model, another model, and the same names in another tenant."""
    log.add(ModelVersionRegistered(ref="smol-v2", model_name="smol", version=2, job_id="job-2",
                                   dataset_sha256="cc" * 32), "registry", "k-dev")
    log.add(JobSubmitted(job_id="job-2", dataset_id="ds-9", model_name="smol", spec={}),
            "scheduler", "k-dev")
    log.add(ModelStageChanged(ref="other-v1", model_name="other", version=1,
                              from_stage="development", to_stage="staging"),
            "registry", "k-dev")
    log.add(ModelStageChanged(ref="smol-v1", model_name="smol", version=1,
                              from_stage="staging", to_stage="archived"),
            "registry", "k-mallory", tenant="globex")
    log.add(EvalCompleted(evaluation_id="ev-x", job_id="job-1", model_name="smol",
                          base_metrics={}, tuned_metrics={}, report_key=""),
            "evaluator", "k-mallory", tenant="globex")


def graph():
    log = Log()
    promoted_history(log)
    noise(log)
    lineage = build_lineage(log.records, "smol", 1, "acme")
    assert lineage is not None
    return lineage, log


def edges_of(lineage) -> set[tuple[str, str, str]]:
    return {(e.source, e.target, e.relation) for e in lineage.edges}


def test_the_graph_runs_from_the_datasets_to_production():
    g, _ = graph()
    assert g.root == "version/smol@1" and g.tenant == "acme"
    kinds = {n.id: n.kind for n in g.nodes}
    assert kinds == {
        "dataset/ds-1": "dataset", "dataset/ds-2": "dataset", "job/job-1": "job",
        "attempt/job-1/1": "attempt", "attempt/job-1/2": "attempt",
        f"checkpoint/{CKPT1}": "checkpoint", f"checkpoint/{FINAL}": "checkpoint",
        "evaluation/ev-1": "evaluation", "version/smol@1": "version",
        "request/req-s": "promotion_request", "request/req-p": "promotion_request",
        "approval/req-p/k-rev": "approval", "refusal/e20": "refusal",
        "stage/smol@1/17": "stage_change", "stage/smol@1/23": "stage_change",
    }
    assert edges_of(g) == {
        ("dataset/ds-1", "dataset/ds-2", "derived"),
        ("dataset/ds-2", "job/job-1", "used"),
        ("job/job-1", "attempt/job-1/1", "ran"),
        ("job/job-1", "attempt/job-1/2", "ran"),
        ("attempt/job-1/1", f"checkpoint/{CKPT1}", "generated"),
        ("attempt/job-1/2", f"checkpoint/{FINAL}", "generated"),
        (f"checkpoint/{FINAL}", "evaluation/ev-1", "used"),
        (f"checkpoint/{FINAL}", "version/smol@1", "registered"),
        ("evaluation/ev-1", "version/smol@1", "evidence"),
        ("evaluation/ev-1", "request/req-s", "evidence"),
        ("evaluation/ev-1", "request/req-p", "evidence"),
        ("version/smol@1", "request/req-s", "used"),
        ("version/smol@1", "request/req-p", "used"),
        ("version/smol@1", "stage/smol@1/17", "used"),
        ("version/smol@1", "stage/smol@1/23", "used"),
        ("request/req-s", "stage/smol@1/17", "authorized"),
        ("request/req-p", "stage/smol@1/23", "authorized"),
        ("request/req-p", "approval/req-p/k-rev", "reviewed"),
        ("request/req-p", "refusal/e20", "reviewed"),
    }
    # listed upstream first
    assert [n.kind for n in g.nodes][:3] == ["dataset", "dataset", "job"]


def test_nodes_carry_hashes_times_actors_and_trace_ids():
    g, log = graph()
    ds = g.node("dataset/ds-2")
    assert ds and ds.hashes == {"sha256": SHA} and ds.label == "support v2"
    assert ds.attributes["parent_id"] == "ds-1"
    assert ds.actors == ["k-alice", "k-dev"]  # registered by alice, validated for dev's job
    assert ds.time == log.records[1].time and ds.trace_ids[0] == log.records[1].trace_id
    assert g.node("dataset/ds-1").hashes == {"sha256": SHA_PARENT}
    first, second = g.node("attempt/job-1/1"), g.node("attempt/job-1/2")
    assert first.attributes["status"] == "requeued" and first.attributes["worker_id"] == "w1"
    assert first.attributes["reason"] == "worker lost"
    assert second.attributes == {"attempt": "2", "status": "succeeded", "worker_id": "w2",
                                 "resumed_from_step": "5"}
    assert "w2" in second.actors
    final = g.node(f"checkpoint/{FINAL}")
    assert final.hashes == {"checkpoint_key": FINAL, "adapter_key": FINAL}
    assert final.attributes["final"] == "true"
    job = g.node("job/job-1")
    assert job.attributes["status"] == "succeeded" and job.attributes["submitted_by"] == "k-dev"
    ev = g.node("evaluation/ev-1")
    assert json.loads(ev.attributes["tuned_metrics"]) == {"exact_match": 0.9}
    assert ev.hashes["report_key"].endswith("ev-1/report.json")
    version = g.node("version/smol@1")
    assert version.hashes == {"dataset_sha256": SHA}
    request = g.node("request/req-p")
    assert request.attributes["status"] == "approved"
    assert request.attributes["requester"] == "k-dev"
    approval = g.node("approval/req-p/k-rev")
    assert approval.actors == ["k-rev"] and approval.attributes["role"] == "reviewer"
    assert g.node("stage/smol@1/23").attributes == {
        "from_stage": "staging", "to_stage": "production", "request_id": "req-p"}
    # every event points back at its audit record
    seqs = {e.sequence for n in g.nodes for e in n.events}
    assert all(log.records[s - 1].event_id == f"e{s}" for s in seqs)


def test_other_tenants_versions_and_models_stay_out():
    g, log = graph()
    assert not any("globex" in n.id or "k-mallory" in n.actors for n in g.nodes)
    assert g.node("evaluation/ev-x") is None and g.node("job/job-2") is None
    assert build_lineage(log.records, "smol", 1, "globex") is None  # not registered there
    assert build_lineage(log.records, "smol", 3, "acme") is None
    v2 = build_lineage(log.records, "smol", 2, "acme")
    assert v2 and {n.kind for n in v2.nodes} == {"version", "job", "dataset"}
    assert v2.node("dataset/ds-9").attributes["registered"] == "not in the audit log"


def test_references_name_what_to_fetch_until_nothing_new():
    log = Log()
    promoted_history(log)
    noise(log)
    by_entity = {}
    for r in log.records:
        if r.tenant == "acme":
            by_entity.setdefault(r.entity, []).append(r)
    version_records = [r for r in log.records if r.event_type.startswith("llmstudio.model.")]
    entities, jobs = references(version_records, "smol", 1, "acme")
    assert jobs == {"job-1"}
    assert entities == {"job-1", "ds-2", "req-s", "req-p"}
    fetched = version_records + [r for e in entities for r in by_entity[e]]
    entities, _ = references(fetched, "smol", 1, "acme")
    assert "ds-1" in entities  # ds-2's parent, once ds-2's registration is read
    fetched += by_entity["ds-1"]
    assert references(fetched, "smol", 1, "acme")[0] == entities


def test_a_version_without_its_job_records_still_reaches_its_dataset_hash():
    log = Log()
    log.add(ModelVersionRegistered(ref="smol-v1", model_name="smol", version=1, job_id="job-1",
                                   dataset_sha256=SHA), "registry", "k-dev")
    g = build_lineage(log.records, "smol", 1)
    assert g is not None
    dataset = g.of_kind("dataset")[0]
    assert dataset.hashes == {"sha256": SHA}
    assert ("job/job-1", "version/smol@1", "registered") in edges_of(g)
    assert (dataset.id, "job/job-1", "used") in edges_of(g)


def test_prov_json_has_entities_activities_agents_and_their_relations():
    g, _ = graph()
    doc = to_prov(g)
    assert doc["prefix"] == {"lls": "urn:llmstudio:"}
    assert set(doc["entity"]) == {f"lls:{n.id}" for n in g.nodes
                                  if n.kind in ("dataset", "checkpoint", "version")}
    assert "lls:job/job-1" in doc["activity"] and "lls:approval/req-p/k-rev" in doc["activity"]
    assert doc["entity"]["lls:dataset/ds-2"]["lls:sha256"] == SHA
    job = doc["activity"]["lls:job/job-1"]
    assert job["prov:startTime"] <= job["prov:endTime"]
    assert {"lls:agent/k-rev", "lls:agent/w2", "lls:agent/k-alice"} <= set(doc["agent"])

    def rel(kind):
        return list(doc[kind].values())

    assert {"prov:generatedEntity": "lls:dataset/ds-2",
            "prov:usedEntity": "lls:dataset/ds-1"} in rel("wasDerivedFrom")
    assert {"prov:generatedEntity": "lls:version/smol@1",
            "prov:usedEntity": f"lls:checkpoint/{FINAL}"} in rel("wasDerivedFrom")
    assert {"prov:activity": "lls:job/job-1", "prov:entity": "lls:dataset/ds-2"} in rel("used")
    assert {"prov:entity": f"lls:checkpoint/{FINAL}",
            "prov:activity": "lls:attempt/job-1/2"} in rel("wasGeneratedBy")
    assert {"prov:activity": "lls:approval/req-p/k-rev",
            "prov:agent": "lls:agent/k-rev"} in rel("wasAssociatedWith")
    assert {"prov:entity": "lls:dataset/ds-2",
            "prov:agent": "lls:agent/k-alice"} in rel("wasAttributedTo")
    assert {"prov:informed": "lls:approval/req-p/k-rev",
            "prov:informant": "lls:request/req-p"} in rel("wasInformedBy")
    # every relation names declared records only
    declared = set(doc["entity"]) | set(doc["activity"]) | set(doc["agent"])
    for kind in ("used", "wasGeneratedBy", "wasDerivedFrom", "wasInformedBy",
                 "wasInfluencedBy", "wasAssociatedWith", "wasAttributedTo"):
        for body in doc[kind].values():
            assert set(body.values()) <= declared, (kind, body)
    json.dumps(doc)  # serializable as is


def test_the_cli_prints_the_graph_as_a_tree():
    from llmstudio.cli.lineage import parse_version_ref, render_tree
    from services.governance.api import _lineage

    g, _ = graph()
    message = _lineage(g, prov=True)
    assert json.loads(message.prov_json) == json.loads(json.dumps(to_prov(g)))
    tree = render_tree(message).splitlines()
    assert tree[0] == "lineage of smol@1 (tenant acme)"
    # the upload at the top, the derived dataset under it, the job under that, ...
    assert tree[1].startswith(f"dataset support v1  sha256 {SHA_PARENT[:12]}")
    assert tree[2].startswith("└─ derived: dataset support v2")
    assert tree[3].startswith("   └─ used: job job-1")
    text = "\n".join(tree)
    assert "ran: attempt 2" in text and "worker_id=w2" in text
    assert "reviewed: approval k-rev" in text and "by k-rev" in text
    assert "authorized: stage_change staging -> production" in text
    # each node once in full; reached again, named
    assert sum(line.endswith("version smol@1 (above)") for line in tree) >= 1
    assert sum("version smol@1  dataset_sha256" in line for line in tree) == 1
    assert parse_version_ref("my-model@3") == ("my-model", 3)
