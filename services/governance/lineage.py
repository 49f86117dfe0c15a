"""The lineage graph of a model version, pure: audit records in, a graph out.

Governance's audit log holds every domain event with its envelope (time, actor, tenant, trace
id), so it holds the whole history of a version: the dataset it was trained on (and the versions
that dataset was derived from), the job and each attempt at it (with its worker), the
checkpoints, the evaluations, the version, its promotion requests with governance's decisions,
the approvals, rejections and refused reviews, the stage changes and alias moves. This module
reads that history and returns it as nodes and edges; the use case only fetches the records
(`references` says which entities to fetch next) and `to_prov` exports the same graph as W3C
PROV-JSON.

Edges point downstream (source -> target): dataset -> job -> attempt -> checkpoint -> evaluation
-> version -> promotion request -> approval, request -> stage change. Relations:

    derived     a parent dataset -> the dataset derived from it
    used        an entity -> the activity that used it (dataset -> job, checkpoint ->
                evaluation, version -> request / stage change / alias move)
    ran         job -> one of its attempts
    generated   an attempt (or the job) -> a checkpoint it wrote
    registered  the final checkpoint (or the job) -> the version registered from it
    evidence    an evaluation -> the version it measured, or the request that rests on it
    reviewed    a request -> an approval, a rejection or a refused review of it
    authorized  the approved request -> the stage change it allowed
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .core import AuditRecord, canonical_json

ENTITY_KINDS = ("dataset", "checkpoint", "version")
# The order nodes are listed and a tree's children are shown in.
KIND_ORDER = ("dataset", "job", "attempt", "checkpoint", "evaluation", "version",
              "promotion_request", "approval", "rejection", "refusal", "stage_change", "alias")
# Attempt-scoped job events (their data's `attempt` names the attempt).
ATTEMPT_EVENTS = ("job.assigned", "job.started", "job.checkpointed", "job.completed",
                  "job.released", "job.release_requested", "job.failed", "job.cancelled",
                  "job.succeeded")
MAX_DATASET_DEPTH = 100  # parents followed at most (a cycle cannot loop forever)


@dataclass(frozen=True)
class LineageEvent:
    """One audit record behind a node: where to find it in the log."""

    sequence: int
    event_id: str
    event_type: str
    time: str
    actor: str
    trace_id: str


@dataclass
class Node:
    id: str
    kind: str
    label: str
    time: str = ""  # its first event's
    hashes: dict[str, str] = field(default_factory=dict)
    attributes: dict[str, str] = field(default_factory=dict)
    actors: list[str] = field(default_factory=list)
    trace_ids: list[str] = field(default_factory=list)
    events: list[LineageEvent] = field(default_factory=list)

    def add(self, record: AuditRecord, *actors: str) -> None:
        """Note `record` as one of this node's events, its actor (and `actors`) and trace id."""
        if any(e.sequence == record.sequence for e in self.events):
            return
        self.events.append(LineageEvent(record.sequence, record.event_id, record.event_type,
                                        record.time, record.actor, record.trace_id))
        self.events.sort(key=lambda e: e.sequence)
        if not self.time or record.time < self.time:
            self.time = record.time
        for actor in (record.actor, *actors):
            if actor and actor not in self.actors:
                self.actors.append(actor)
        if record.trace_id and record.trace_id not in self.trace_ids:
            self.trace_ids.append(record.trace_id)

    @property
    def end_time(self) -> str:
        return max((e.time for e in self.events), default=self.time)

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "label": self.label, "time": self.time,
                "hashes": dict(self.hashes), "attributes": dict(self.attributes),
                "actors": list(self.actors), "trace_ids": list(self.trace_ids),
                "events": [e.__dict__ for e in self.events]}


@dataclass(frozen=True, order=True)
class Edge:
    source: str
    target: str
    relation: str


@dataclass
class Lineage:
    tenant: str
    model_name: str
    version: int
    root: str  # the version's node
    nodes: list[Node]
    edges: list[Edge]

    def node(self, node_id: str) -> Node | None:
        return next((n for n in self.nodes if n.id == node_id), None)

    def of_kind(self, kind: str) -> list[Node]:
        return [n for n in self.nodes if n.kind == kind]

    def as_dict(self) -> dict[str, Any]:
        return {"tenant": self.tenant, "model_name": self.model_name, "version": self.version,
                "root": self.root, "nodes": [n.as_dict() for n in self.nodes],
                "edges": [e.__dict__ for e in self.edges]}


@dataclass(frozen=True)
class _Rec:
    record: AuditRecord
    kind: str  # "job.started" of "llmstudio.job.started.v1"
    data: dict[str, Any]


def event_kind(event_type: str) -> str:
    parts = event_type.split(".")
    return ".".join(parts[1:-1]) if len(parts) >= 4 else event_type


def data_fragment(key: str, value: Any) -> str:
    """The text `"key":value` as it stands in a record's canonical data JSON (to find the
    records naming a value without reading every record)."""
    return f"{canonical_json(key)}:{canonical_json(value)}"


def _parse(records: Iterable[AuditRecord], tenant: str) -> list[_Rec]:
    seen: set[int] = set()
    out = []
    for r in sorted(records, key=lambda r: r.sequence):
        if r.sequence in seen or (tenant and r.tenant != tenant):
            continue
        seen.add(r.sequence)
        try:
            data = json.loads(r.data_json)
        except ValueError:
            continue
        if isinstance(data, dict):
            out.append(_Rec(r, event_kind(r.event_type), data))
    return out


def _of_version(rec: _Rec, model_name: str, version: int) -> bool:
    return rec.data.get("model_name") == model_name and rec.data.get("version") == version


def references(records: Iterable[AuditRecord], model_name: str, version: int, tenant: str = ""
               ) -> tuple[set[str], set[str]]:
    """What the graph of `model_name`@`version` needs besides `records`: the entity ids whose
    records to fetch (jobs, datasets and their parents, promotion requests) and the job ids
    whose evaluations to fetch. Fetch until neither grows."""
    recs = _parse(records, tenant)
    jobs: set[str] = set()
    entities: set[str] = set()
    for rec in recs:
        if rec.kind in ("model.version_registered", "model.promotion_requested") and _of_version(
                rec, model_name, version):
            jobs.add(str(rec.data.get("job_id", "")))
            entities.add(str(rec.data.get("request_id", "")))
            entities.add(str(rec.data.get("dataset_id", "")))
    for rec in recs:
        if rec.record.entity in jobs and "dataset_id" in rec.data:
            entities.add(str(rec.data["dataset_id"]))
    for rec in recs:
        if rec.kind == "dataset.registered" and rec.record.entity in entities:
            entities.add(str(rec.data.get("parent_id", "")))
    jobs.discard("")
    entities.discard("")
    return entities | jobs, jobs


class _Builder:
    def __init__(self) -> None:
        self.nodes: dict[str, Node] = {}
        self.edges: set[Edge] = set()

    def node(self, node_id: str, kind: str, label: str) -> Node:
        if node_id not in self.nodes:
            self.nodes[node_id] = Node(node_id, kind, label)
        return self.nodes[node_id]

    def edge(self, source: str, target: str, relation: str) -> None:
        if source in self.nodes and target in self.nodes and source != target:
            self.edges.add(Edge(source, target, relation))


def build_lineage(records: Iterable[AuditRecord], model_name: str, version: int,
                  tenant: str = "") -> Lineage | None:
    """The lineage graph of `model_name`@`version` from audit records (any superset of its
    own: records of other versions, jobs and tenants are left out); None when no record
    registers that version (of `tenant`, when named)."""
    recs = _parse(records, tenant)
    registered = next((r for r in recs if r.kind == "model.version_registered"
                       and _of_version(r, model_name, version)), None)
    if registered is None:
        return None
    tenant = registered.record.tenant
    recs = [r for r in recs if r.record.tenant == tenant]
    b = _Builder()
    ref = f"{model_name}@{version}"
    vnode = b.node(f"version/{ref}", "version", ref)
    vnode.add(registered.record)
    job_id = str(registered.data.get("job_id", ""))
    vnode.attributes.update(ref=str(registered.data.get("ref", "")), job_id=job_id)
    if registered.data.get("dataset_sha256"):
        vnode.hashes["dataset_sha256"] = str(registered.data["dataset_sha256"])

    job_recs = [r for r in recs if r.record.entity == job_id and r.kind.startswith("job.")]
    job = _job(b, job_id, job_recs) if job_id else None
    succeeded = next((r for r in job_recs if r.kind == "job.succeeded"), None)

    # datasets: the job's (and the requests'), then the versions each was derived from
    promotion_recs = [r for r in recs if r.kind == "model.promotion_requested"
                      and _of_version(r, model_name, version)]
    dataset_ids = [str(r.data["dataset_id"]) for r in job_recs + promotion_recs
                   if r.data.get("dataset_id")]
    registrations = {r.record.entity: r for r in recs if r.kind == "dataset.registered"}
    validations = [r for r in recs if r.kind == "dataset.validated" and r.data.get("job_id")
                   == job_id]
    dataset_sha = (str(succeeded.data.get("dataset_sha256", "")) if succeeded else "") or \
        vnode.hashes.get("dataset_sha256", "")
    used = []
    for dataset_id in dict.fromkeys(dataset_ids):
        used.append(_dataset(b, dataset_id, registrations, dataset_sha))
    if not used and dataset_sha:  # its registration is not in the log: known by hash only
        node = b.node(f"dataset/sha256:{dataset_sha}", "dataset", f"sha256 {dataset_sha[:12]}")
        node.hashes["sha256"] = dataset_sha
        node.attributes["registered"] = "not in the audit log"
        used.append(node)
    for node in used:
        for v in validations:
            if v.data.get("dataset_id") == node.attributes.get("dataset_id"):
                node.add(v.record)
        if job:
            b.edge(node.id, job.id, "used")

    # attempts and checkpoints
    attempts = _attempts(b, job_id, job_recs)
    if job:
        for a in attempts.values():
            b.edge(job.id, a.id, "ran")
    for r in job_recs:
        if r.kind == "job.checkpointed" and r.data.get("checkpoint_key"):
            ckpt = _checkpoint(b, str(r.data["checkpoint_key"]))
            ckpt.add(r.record)
            ckpt.attributes.setdefault("step", str(r.data.get("step", "")))
            ckpt.attributes.setdefault("attempt", str(r.data.get("attempt", 1)))
            source = attempts.get(int(r.data.get("attempt", 1)))
            b.edge((source or job or vnode).id, ckpt.id, "generated")
    output: Node | None = job
    if succeeded and succeeded.data.get("checkpoint_key"):
        final = _checkpoint(b, str(succeeded.data["checkpoint_key"]))
        final.add(succeeded.record)
        final.attributes["final"] = "true"
        final.attributes.setdefault("step", str(succeeded.data.get("steps", "")))
        final.attributes.setdefault("attempt", str(succeeded.data.get("attempt", 1)))
        if succeeded.data.get("adapter_key"):
            final.hashes["adapter_key"] = str(succeeded.data["adapter_key"])
        source = attempts.get(int(succeeded.data.get("attempt", 1)))
        b.edge((source or job or vnode).id, final.id, "generated")
        output = final
    if output:
        b.edge(output.id, vnode.id, "registered")

    # evaluations of the job's output
    evaluations: dict[str, Node] = {}
    for r in recs:
        if r.kind in ("eval.completed", "eval.failed") and job_id and \
                r.data.get("job_id") == job_id:
            ev = _evaluation(b, r)
            evaluations[ev.attributes["evaluation_id"]] = ev
            if output:
                b.edge(output.id, ev.id, "used")
            if r.kind == "eval.completed":
                b.edge(ev.id, vnode.id, "evidence")

    # promotion requests, the decisions and reviews on them, stage changes and alias moves
    requests = _requests(b, vnode, promotion_recs, recs, evaluations)
    for r in recs:
        if r.kind == "model.stage_changed" and _of_version(r, model_name, version):
            _stage_change(b, vnode, r, requests)
        elif r.kind == "model.alias_moved" and r.data.get("model_name") == model_name and (
                version in (r.data.get("version"), r.data.get("previous_version"))):
            _alias_move(b, vnode, r)

    rank = {k: i for i, k in enumerate(KIND_ORDER)}
    nodes = sorted(b.nodes.values(), key=lambda n: (rank.get(n.kind, len(rank)), n.time, n.id))
    return Lineage(tenant, model_name, version, vnode.id, nodes, sorted(b.edges))


def _job(b: _Builder, job_id: str, job_recs: list[_Rec]) -> Node:
    job = b.node(f"job/{job_id}", "job", job_id)
    job.attributes["job_id"] = job_id
    for r in job_recs:
        if r.kind in ATTEMPT_EVENTS and r.kind not in ("job.succeeded", "job.failed",
                                                       "job.cancelled"):
            continue
        job.add(r.record)
        if r.kind == "job.submitted":
            spec = r.data.get("spec") or {}
            job.attributes["submitted_by"] = r.record.actor
            for key in ("base_model", "method"):
                if isinstance(spec, dict) and spec.get(key):
                    job.attributes[key] = str(spec[key])
            job.attributes["model_name"] = str(r.data.get("model_name", ""))
        elif r.kind in ("job.succeeded", "job.failed", "job.cancelled"):
            job.attributes["status"] = r.kind.split(".")[1]
            if r.kind == "job.succeeded":
                job.attributes["steps"] = str(r.data.get("steps", ""))
                job.attributes["final_loss"] = str(r.data.get("final_loss", ""))
        elif r.kind == "job.queued" and r.data.get("dataset_sha256"):
            job.hashes["dataset_sha256"] = str(r.data["dataset_sha256"])
    return job


def _attempts(b: _Builder, job_id: str, job_recs: list[_Rec]) -> dict[int, Node]:
    attempts: dict[int, Node] = {}
    for r in job_recs:
        if r.kind not in ATTEMPT_EVENTS and r.kind != "job.requeued":
            continue
        number = int(r.data.get("attempt", 1))
        if r.kind == "job.requeued":  # names the next attempt; ends the one before
            number -= 1
            if number not in attempts:
                continue
        a = attempts.get(number)
        if a is None:
            a = attempts[number] = b.node(f"attempt/{job_id}/{number}", "attempt",
                                          str(number))
            a.attributes.update(attempt=str(number), status="running")
        worker = str(r.data.get("worker_id", ""))
        if worker and r.kind != "job.requeued":
            a.attributes["worker_id"] = worker
        a.add(r.record, worker if r.kind != "job.requeued" else "")
        status = {"job.completed": "completed", "job.succeeded": "succeeded",
                  "job.failed": "failed", "job.released": "released",
                  "job.cancelled": "cancelled", "job.requeued": "requeued"}.get(r.kind)
        if status and not (status == "completed" and a.attributes["status"] == "succeeded"):
            a.attributes["status"] = status
        if r.kind == "job.started" and r.data.get("resumed_from_step"):
            a.attributes["resumed_from_step"] = str(r.data["resumed_from_step"])
        if r.kind in ("job.failed", "job.requeued", "job.released") and r.data.get("reason"):
            a.attributes["reason"] = str(r.data["reason"])
    return attempts


def _dataset(b: _Builder, dataset_id: str, registrations: dict[str, _Rec], sha: str) -> Node:
    """The dataset's node and those of the versions it was derived from, linked."""
    first = None
    child: Node | None = None
    for _ in range(MAX_DATASET_DEPTH):
        known = f"dataset/{dataset_id}" in b.nodes
        node = b.node(f"dataset/{dataset_id}", "dataset", dataset_id)
        node.attributes["dataset_id"] = dataset_id
        first = first or node
        if child is not None:
            b.edge(node.id, child.id, "derived")
        reg = registrations.get(dataset_id)
        if reg is None:
            node.attributes["registered"] = "not in the audit log"
            if node is first and sha:
                node.hashes.setdefault("sha256", sha)
            break
        d = reg.data
        node.add(reg.record)
        node.label = f"{d.get('name', dataset_id)} v{d.get('version', 1)}"
        node.hashes["sha256"] = str(d.get("sha256", ""))
        for key in ("name", "version", "format", "num_rows", "train_rows", "validation_rows",
                    "transformation", "parent_id"):
            if d.get(key) not in (None, ""):
                node.attributes[key] = str(d[key])
        parent = str(d.get("parent_id", ""))
        if not parent or known:
            break
        child, dataset_id = node, parent
    assert first is not None
    return first


def _checkpoint(b: _Builder, key: str) -> Node:
    node = b.node(f"checkpoint/{key}", "checkpoint", key.rsplit("/", 2)[-1] if "/" in key
                  else key)
    node.hashes["checkpoint_key"] = key
    return node


def _evaluation(b: _Builder, r: _Rec) -> Node:
    evaluation_id = str(r.data.get("evaluation_id", r.record.entity))
    ev = b.node(f"evaluation/{evaluation_id}", "evaluation", evaluation_id)
    ev.add(r.record)
    ev.attributes["evaluation_id"] = evaluation_id
    ev.attributes["status"] = r.kind.split(".")[1]
    if r.kind == "eval.completed":
        ev.attributes["tuned_metrics"] = canonical_json(r.data.get("tuned_metrics", {}))
        ev.attributes["base_metrics"] = canonical_json(r.data.get("base_metrics", {}))
        if r.data.get("report_key"):
            ev.hashes["report_key"] = str(r.data["report_key"])
    elif r.data.get("reason"):
        ev.attributes["reason"] = str(r.data["reason"])
    return ev


def _requests(b: _Builder, vnode: Node, promotion_recs: list[_Rec], recs: list[_Rec],
              evaluations: dict[str, Node]) -> dict[str, tuple[Node, list[_Rec]]]:
    """Each request's node, with the policy.decided records on it (in order)."""
    out: dict[str, tuple[Node, list[_Rec]]] = {}
    for r in promotion_recs:
        rid = str(r.data.get("request_id", r.record.entity))
        if rid not in out:
            node = b.node(f"request/{rid}", "promotion_request",
                          f"{rid} -> {r.data.get('to_stage', '')}")
            node.attributes.update(
                request_id=rid, to_stage=str(r.data.get("to_stage", "")),
                from_stage=str(r.data.get("from_stage", "")),
                requester=str(r.data.get("requester", "")),
                justification=str(r.data.get("justification", "")))
            out[rid] = (node, [])
            b.edge(vnode.id, node.id, "used")
        node = out[rid][0]
        node.add(r.record, str(r.data.get("requester", "")))
        evaluation = str(r.data.get("evaluation_id", ""))
        if evaluation:
            node.attributes["evaluation_id"] = evaluation
            if evaluation in evaluations:
                b.edge(evaluations[evaluation].id, node.id, "evidence")
    for r in recs:
        rid = r.record.entity
        if rid not in out or not r.kind.startswith("policy."):
            continue
        node, decisions = out[rid]
        if r.kind == "policy.decided":
            node.add(r.record)
            decisions.append(r)
            node.attributes.update(
                status=str(r.data.get("status", "")),
                policy_version=str(r.data.get("policy_version", 0)),
                verdicts=canonical_json(r.data.get("verdicts", [])))
        elif r.kind == "policy.approved":
            approver = str(r.data.get("approver", r.record.actor))
            a = b.node(f"approval/{rid}/{approver}", "approval", approver)
            a.add(r.record, approver)
            a.attributes.update(approver=approver, role=str(r.data.get("role", "")),
                                comment=str(r.data.get("comment", "")))
            b.edge(node.id, a.id, "reviewed")
        elif r.kind == "policy.rejected":
            reviewer = str(r.data.get("reviewer", r.record.actor))
            a = b.node(f"rejection/{rid}/{reviewer}", "rejection", reviewer)
            a.add(r.record, reviewer)
            a.attributes.update(reviewer=reviewer, reason=str(r.data.get("reason", "")))
            b.edge(node.id, a.id, "reviewed")
        elif r.kind == "policy.approval_refused":
            caller = str(r.data.get("caller", r.record.actor))
            a = b.node(f"refusal/{r.record.event_id}", "refusal",
                       f"{r.data.get('action', 'review')} by {caller}")
            a.add(r.record, caller)
            a.attributes.update(caller=caller, action=str(r.data.get("action", "")),
                                reason=str(r.data.get("reason", "")))
            b.edge(node.id, a.id, "reviewed")
    return out


def _stage_change(b: _Builder, vnode: Node, r: _Rec,
                  requests: dict[str, tuple[Node, list[_Rec]]]) -> None:
    src, dst = str(r.data.get("from_stage", "")), str(r.data.get("to_stage", ""))
    node = b.node(f"stage/{vnode.label}/{r.record.sequence}", "stage_change", f"{src} -> {dst}")
    node.add(r.record)
    node.attributes.update(from_stage=src, to_stage=dst)
    b.edge(vnode.id, node.id, "used")
    # the request approved for that stage most recently before the change authorized it
    best: tuple[int, Node] | None = None
    for req, decisions in requests.values():
        if req.attributes.get("to_stage") != dst:
            continue
        for d in decisions:
            if d.data.get("status") == "approved" and d.record.sequence < r.record.sequence and (
                    best is None or d.record.sequence > best[0]):
                best = (d.record.sequence, req)
    if best:
        node.attributes["request_id"] = best[1].attributes["request_id"]
        b.edge(best[1].id, node.id, "authorized")


def _alias_move(b: _Builder, vnode: Node, r: _Rec) -> None:
    alias = str(r.data.get("alias", ""))
    to = int(r.data.get("version") or 0)
    label = f"@{alias} -> v{to}" if to else f"@{alias} removed"
    node = b.node(f"alias/{vnode.label}/{r.record.sequence}", "alias", label)
    node.add(r.record)
    node.attributes.update(alias=alias, version=str(to),
                           previous_version=str(r.data.get("previous_version", 0)))
    b.edge(vnode.id, node.id, "used")


# -- W3C PROV-JSON ----------------------------------------------------------------------------

PREFIX = "lls"
NAMESPACE = "urn:llmstudio:"
_RELATION = {"evidence": "wasInfluencedBy"}


def _qn(node_id: str) -> str:
    return f"{PREFIX}:{node_id}"


def _agent_qn(actor: str) -> str:
    return f"{PREFIX}:agent/{actor}"


def to_prov(lineage: Lineage) -> dict[str, Any]:
    """The graph as a W3C PROV-JSON document: datasets, checkpoints and the version are
    entities, everything else an activity, the actors (key ids, workers, services) agents;
    edges become used / wasGeneratedBy / wasDerivedFrom / wasInformedBy / wasInfluencedBy,
    actors wasAssociatedWith (activities) and wasAttributedTo (entities)."""
    doc: dict[str, Any] = {"prefix": {PREFIX: NAMESPACE}, "entity": {}, "activity": {},
                           "agent": {}}

    def relate(kind: str, body: dict[str, Any]) -> None:
        section = doc.setdefault(kind, {})
        section[f"_:{kind}{len(section) + 1}"] = body

    entities = set()
    for n in lineage.nodes:
        attrs: dict[str, Any] = {"prov:type": f"{PREFIX}:{n.kind}", "prov:label": n.label}
        attrs.update({f"{PREFIX}:{k}": v for k, v in n.hashes.items()})
        attrs.update({f"{PREFIX}:{k}": v for k, v in n.attributes.items() if v != ""})
        if n.trace_ids:
            attrs[f"{PREFIX}:trace_ids"] = list(n.trace_ids)
        attrs[f"{PREFIX}:audit_sequences"] = [e.sequence for e in n.events]
        if n.kind in ENTITY_KINDS:
            entities.add(n.id)
            if n.time:
                attrs[f"{PREFIX}:time"] = n.time
            doc["entity"][_qn(n.id)] = attrs
        else:
            if n.time:
                attrs["prov:startTime"] = n.time
                attrs["prov:endTime"] = n.end_time
            doc["activity"][_qn(n.id)] = attrs
        for actor in n.actors:
            doc["agent"].setdefault(_agent_qn(actor), {"prov:type": "prov:Agent",
                                                       "prov:label": actor})
            if n.kind in ENTITY_KINDS:
                relate("wasAttributedTo", {"prov:entity": _qn(n.id),
                                           "prov:agent": _agent_qn(actor)})
            else:
                relate("wasAssociatedWith", {"prov:activity": _qn(n.id),
                                             "prov:agent": _agent_qn(actor)})
    for e in lineage.edges:
        src, dst = _qn(e.source), _qn(e.target)
        src_entity, dst_entity = e.source in entities, e.target in entities
        if e.relation in _RELATION:
            relate("wasInfluencedBy", {"prov:influencee": dst, "prov:influencer": src})
        elif src_entity and dst_entity:
            relate("wasDerivedFrom", {"prov:generatedEntity": dst, "prov:usedEntity": src})
        elif src_entity:
            relate("used", {"prov:activity": dst, "prov:entity": src})
        elif dst_entity:
            relate("wasGeneratedBy", {"prov:entity": dst, "prov:activity": src})
        else:
            relate("wasInformedBy", {"prov:informed": dst, "prov:informant": src})
    return doc
