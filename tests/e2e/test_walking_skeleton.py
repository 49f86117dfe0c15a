"""The walking skeleton end to end: the embedded stack (real nats-server, every service as a
subprocess), a tiny Llama, real training steps, evaluation, registration, audit and tracing."""

from __future__ import annotations

import asyncio
import collections
import json
import sqlite3
from pathlib import Path

import grpc
import nats
import pytest

from llmstudio import local
from llmstudio.bus import AUDITED_STREAMS
from llmstudio.client import Client, job_status_name, to_dict
from llmstudio.demo_data import word_reversal_rows
from llmstudio.events import InvalidEvent, JobQueued, decode, make_envelope
from llmstudio.v1 import jobs_pb2, jobs_pb2_grpc
from tests.support.waiting import wait_for

pytestmark = pytest.mark.slow

STEPS = 12




@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from llmstudio.ml.tiny import build_tiny_model

    data_dir = tmp_path_factory.mktemp("stack")
    model_dir = build_tiny_model(data_dir / "models" / "tiny")
    local.up(data_dir, timeout=240)
    client = Client(data_dir=data_dir)
    yield data_dir, model_dir, client
    client.close()
    local.down(data_dir)


@pytest.fixture(scope="module")
def finished_job(stack):
    """Push a dataset, submit a job over gRPC and watch it to the end."""
    data_dir, model_dir, client = stack
    path = data_dir / "reverse.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in word_reversal_rows(48, seed=1)))
    ds = client.datasets.push(path, name="reverse", validation_fraction=0.2)
    spec = {
        "name": "tiny-reverse", "base_model": str(model_dir), "dataset": ds.id,
        "lora": {"r": 8, "alpha": 16},
        "hyperparameters": {"max_steps": STEPS, "batch_size": 4, "learning_rate": 3e-3,
                            "checkpoint_every": 6, "max_seq_length": 64},
        "eval": {"max_samples": 8, "max_new_tokens": 8},
    }
    job = client.jobs.create(spec)
    updates = list(client.jobs.watch(job.id, timeout=300))
    return ds, job, updates


def test_watch_streams_metrics_and_job_succeeds(stack, finished_job):
    _, _, client = stack
    ds, job, updates = finished_job
    assert job_status_name(job.status) == "validating_files"
    statuses = [job_status_name(u.job.status) for u in updates if u.kind == "status"]
    assert statuses[-1] == "succeeded", (statuses, updates[-1].job.error)
    assert "running" in statuses, statuses
    steps = [u.step for u in updates if u.kind == "metrics"]
    assert len(steps) >= 3, steps
    # Every logged step once, the last included (the watch waits for samples handled after the
    # job's end); one redelivered after a failed first handling may come late
    assert sorted(steps) == list(range(1, STEPS + 1)), steps
    final = wait_for(lambda: (j := client.jobs.get(job.id)).metrics.get("step") == STEPS and j,
                      30, "the last metrics sample on the job")
    assert final.metrics["loss"] > 0
    assert all("loss" in u.metrics for u in updates if u.kind == "metrics")
    assert any(u.kind == "checkpoint" for u in updates)


def test_checkpoint_is_complete_in_the_artifact_store(stack, finished_job):
    data_dir, _, client = stack
    _, job, _ = finished_job
    final = client.jobs.get(job.id)
    key = final.artifacts["checkpoint"]
    manifest = data_dir / "artifacts" / key / "manifest.json"
    assert manifest.exists(), key
    listed = json.loads(manifest.read_text())
    names = json.dumps(listed)
    assert "adapter_model.safetensors" in names and "trainer_state.json" in names


def test_evaluation_and_registered_version_with_lineage(stack, finished_job):
    _, _, client = stack
    ds, job, _ = finished_job
    ev = wait_for(lambda: next((e for e in client.evaluations.list(job.id)
                                 if e.status in ("completed", "failed")), None), 180, "evaluation")
    assert ev.status == "completed", ev.error
    assert set(ev.base_metrics) >= {"eval_loss", "exact_match", "perplexity"}
    assert ev.tuned_metrics["eval_loss"] < ev.base_metrics["eval_loss"]

    def version():
        try:
            m = client.models.get("tiny-reverse")
        except grpc.RpcError:
            return None
        return next((v for v in m.versions if "tuned_eval_loss" in v.metrics), None)

    v = wait_for(version, 60, "registered version with metrics")
    assert v.lineage.dataset_sha256 == ds.sha256
    assert v.lineage.job_id == job.id and v.lineage.dataset_id == ds.id
    assert v.lineage.evaluation_id == ev.id
    assert v.lineage.trace_id == client.jobs.get(job.id).trace_id
    promoted = client.models.set_stage("tiny-reverse", v.version, "staging")
    assert promoted.stage == 2


def test_the_registered_version_answers_through_the_openai_api(stack, finished_job):
    """Deployed on the embedded stack, the tuned version answers the official openai client
    (the stack's serving service learned the version from the bus) and gRPC Generate alike."""
    openai = pytest.importorskip("openai")
    _, _, client = stack

    def deployed():
        try:
            return client.serving.deploy("tiny-reverse@1", name="reverse")
        except grpc.RpcError as e:
            if e.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS):
                return None
            raise

    d = wait_for(deployed, 60, "a deployment of the registered version")
    assert (d.model_name, d.version, d.status) == ("tiny-reverse", 1, "ready")
    prompt = word_reversal_rows(1, seed=3)[0]["prompt"]
    api = openai.OpenAI(base_url=client.serving.openai_base_url, api_key=client.api_key)
    assert "reverse" in [m.id for m in api.models.list().data]
    answer = api.completions.create(model="reverse", prompt=prompt, max_tokens=6, temperature=0)
    chunks = list(client.serving.generate("reverse", prompt, max_tokens=6, temperature=0.0))
    assert answer.choices[0].text == "".join(c.text for c in chunks)
    assert answer.usage.completion_tokens == chunks[-1].completion_tokens > 0


def test_one_trace_links_every_service_of_the_job(stack, finished_job):
    data_dir, _, client = stack
    _, job, _ = finished_job
    trace_id = client.jobs.get(job.id).trace_id
    assert len(trace_id) == 32

    def services():
        spans = [json.loads(line) for line in
                 (data_dir / "traces.jsonl").read_text().splitlines() if line.strip()]
        found = {s["service"] for s in spans if s["trace_id"] == trace_id}
        return found if found >= {"dataset", "scheduler", "trainer", "evaluator",
                                  "registry"} else None

    assert wait_for(services, 60, "spans of every service in the job's trace")


async def _stream_event_ids(nats_url: str) -> list[str]:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    ids = []
    for stream in AUDITED_STREAMS:
        info = await js.stream_info(stream)
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            if info.state.messages == 0:
                break
            msg = await js.get_msg(stream, seq)
            try:
                env, _ = decode(msg.data)
            except InvalidEvent:  # not an event: audited as its dead-letter record instead
                continue
            ids.append(env.id)
    await nc.close()
    return ids


def test_bad_input_is_refused_with_the_right_status(stack):
    data_dir, model_dir, client = stack
    broken = data_dir / "broken.jsonl"
    broken.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": \n')
    with pytest.raises(grpc.RpcError) as e:
        client.datasets.push(broken, name="broken")
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "broken.jsonl:2" in e.value.details()

    not_a_model = data_dir / "models" / "not-a-model"  # in the stack's model root
    not_a_model.mkdir(parents=True, exist_ok=True)
    with pytest.raises(grpc.RpcError) as e:
        client.jobs.create({"base_model": str(not_a_model), "dataset": "ds-x"})
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "config.json missing" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:  # outside it: refused, whether it exists or not
        client.jobs.create({"base_model": str(data_dir), "dataset": "ds-x"})
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "LLMSTUDIO_MODEL_ROOTS" in e.value.details()

    with grpc.insecure_channel(client.addr("scheduler")) as bare:  # no x-api-key metadata
        with pytest.raises(grpc.RpcError) as e:
            jobs_pb2_grpc.JobServiceStub(bare).ListJobs(jobs_pb2.ListJobsRequest(), timeout=10)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED

    viewer_secret = client.governance.create_key("viewer", name="e2e-viewer").secret
    viewer = Client(api_key=viewer_secret, data_dir=data_dir)
    assert wait_for(lambda: _whoami_ok(viewer), 10, "viewer key to propagate")
    assert viewer.jobs.list() is not None
    with pytest.raises(grpc.RpcError) as e:
        viewer.jobs.create({"base_model": str(model_dir), "dataset": "ds-x"})
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED


def _whoami_ok(c: Client) -> bool:
    try:
        return c.governance.whoami().roles == ["viewer"]
    except grpc.RpcError:
        return False


def test_invalid_event_is_dead_lettered_and_audited(stack):
    data_dir, _, client = stack
    state = local.running_stack(data_dir)

    async def publish_bad():
        nc = await nats.connect(state.operator_url)
        env = make_envelope(JobQueued(job_id="job-bad", dataset_sha256="x"),
                            source="e2e", tenant="default")
        raw = json.loads(env.model_dump_json())
        del raw["data"]["dataset_sha256"]
        await nc.jetstream().publish("llmstudio.job.queued.job-bad", json.dumps(raw).encode())
        await nc.close()
        return env.id

    asyncio.run(publish_bad())
    records = wait_for(lambda: client.governance.query_audit("llmstudio.deadletter."), 30,
                        "dead-letter record in the audit log")
    payloads = [json.loads(r.data_json) for r in records]
    assert any(p["original_subject"] == "llmstudio.job.queued.job-bad"
               and "dataset_sha256" in p["reason"] for p in payloads)


def test_audit_has_every_event_once_and_detects_tampering(stack, finished_job):
    data_dir, _, client = stack
    state = local.running_stack(data_dir)
    # Wait for the evaluation's and the registry's events to be audited too.
    wait_for(lambda: client.governance.query_audit("llmstudio.model."), 60, "model events")
    wait_for(lambda: client.governance.query_audit("llmstudio.eval."), 60, "eval events")

    def audited_matches_streams():
        stream_ids = asyncio.run(_stream_event_ids(state.operator_url))
        audit_ids = [r.event_id for r in client.governance.query_audit(limit=10000)]
        if set(stream_ids) == set(audit_ids):
            return stream_ids, audit_ids
        print("stream-only", set(stream_ids) - set(audit_ids), "audit-only",
              set(audit_ids) - set(stream_ids))
        return None

    stream_ids, audit_ids = wait_for(audited_matches_streams, 30, "audit to catch up")
    counts = collections.Counter(audit_ids)
    assert counts and max(counts.values()) == 1
    types = {r.event_type for r in client.governance.query_audit(limit=10000)}
    assert {"llmstudio.dataset.registered.v1", "llmstudio.job.submitted.v1",
            "llmstudio.job.completed.v1", "llmstudio.eval.completed.v1",
            "llmstudio.model.version_registered.v1"} <= types

    ok = client.governance.verify_audit()
    assert ok.ok and ok.records == len(audit_ids)

    db = sqlite3.connect(Path(data_dir) / "governance.db")
    target = len(audit_ids) // 2
    db.execute("UPDATE governance_audit_log SET data_json = ? WHERE sequence = ?",
               ('{"forged":true}', target))
    db.commit()
    db.close()
    broken = client.governance.verify_audit()
    assert not broken.ok and broken.first_bad_sequence == target
    assert to_dict(broken)["reason"]


def test_two_versions_of_the_demo_model_compare_side_by_side(stack, finished_job):
    """A second job of the demo's word-reversal task with other hyperparameters registers v2;
    CompareVersions shows both evaluations' metric deltas and the hyperparameters that differ."""
    _, model_dir, client = stack
    ds, first, _ = finished_job
    spec = {
        "name": "tiny-reverse", "base_model": str(model_dir), "dataset": ds.id,
        "lora": {"r": 8, "alpha": 16},
        "hyperparameters": {"max_steps": 6, "batch_size": 4, "learning_rate": 1e-3,
                            "checkpoint_every": 6, "max_seq_length": 64},
        "eval": {"max_samples": 8, "max_new_tokens": 8},
    }
    second = client.jobs.create(spec)
    list(client.jobs.watch(second.id, timeout=300))

    def evaluated_versions():
        versions = client.models.get("tiny-reverse").versions
        done = [v for v in versions if "tuned_eval_loss" in v.metrics]
        return done if len(done) >= 2 else None

    v1, v2 = sorted(wait_for(evaluated_versions, 180, "two evaluated versions"),
                    key=lambda v: v.version)[:2]
    assert (v1.lineage.job_id, v2.lineage.job_id) == (first.id, second.id)
    c = client.models.compare("tiny-reverse", v1.version, v2.version)
    metrics = {m.name: m for m in c.metrics}
    loss = metrics["tuned_eval_loss"]
    assert (loss.a, loss.b) == (v1.metrics["tuned_eval_loss"], v2.metrics["tuned_eval_loss"])
    assert abs(loss.delta - (loss.b - loss.a)) <= 1e-12 * max(1.0, abs(loss.a))
    differing = {d.key: (d.a, d.b) for d in c.hyperparameters if not d.same}
    assert differing["max_steps"] == (str(STEPS), "6")
    assert json.loads(differing["learning_rate"][0]) == 3e-3
    assert json.loads(differing["learning_rate"][1]) == 1e-3
    assert all(d.same for d in c.dataset if d.key in ("dataset_id", "dataset_sha256"))
