"""The embedded stack trusts only its services' signatures: an envelope of a valid shape that
its claimed signer did not sign is parked by every consumer and audited as a security event;
nothing it announces happens."""

from __future__ import annotations

import asyncio
import json

import nats
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from llmstudio import local
from llmstudio.events import JobCompleted, JobSucceeded, make_envelope
from llmstudio.signing import SIGNATURE_HEADER, SigningKey, key_path
from tests.support.waiting import wait_for

pytestmark = pytest.mark.slow


def test_a_forged_completion_registers_nothing_and_is_audited(deployed):
    data_dir, client = deployed
    state = local.running_stack(data_dir)
    forged = JobCompleted(
        job_id="job-forged", worker_id="local-worker-1", model_name="stolen", spec={},
        dataset_id="ds-x", dataset_sha256="ab" * 32, dataset_artifacts={},
        checkpoint_key="tenants/other/ckpt", adapter_key="/etc", steps=1, final_loss=0.1)
    env = make_envelope(forged, source="trainer", tenant="default", actor="local-worker-1")
    subject, payload = forged.subject(), env.model_dump_json().encode()

    async def publish() -> None:
        nc = await nats.connect(state.operator_url)
        signature = SigningKey("trainer", Ed25519PrivateKey.generate()).sign(subject, payload)
        await nc.jetstream().publish(subject, payload, headers={SIGNATURE_HEADER: signature})
        await nc.close()

    asyncio.run(publish())

    def parked():
        records = client.governance.query_audit("llmstudio.deadletter.")
        found = [p for r in records if (p := json.loads(r.data_json))["original_subject"]
                 == subject]
        return found if len(found) >= 2 else None

    # the registry's and the evaluator's JobSucceeded consumers never see it (the scheduler
    # announces successes); the scheduler's and governance's consumers of job.completed park it
    found = wait_for(parked, 60, "security records of the forged completion")
    assert all(p["reason"].startswith("security: bad signature") for p in found)
    consumers = {p["consumer"] for p in found}
    assert "scheduler-jobs" in consumers, consumers
    assert any(c.startswith("governance-") for c in consumers), consumers
    # the forged event itself is not in the audit as genuine; no model appeared
    audited = client.governance.query_audit("llmstudio.job.completed")
    assert all(r.event_id != env.id for r in audited)
    assert all(m.name != "stolen" for m in client.models.list())


def test_a_success_naming_another_tenants_artifacts_is_refused_by_every_consumer(deployed):
    """A JobSucceeded genuinely signed (the scheduler's own key: a compromised service) for
    tenant default whose checkpoint is tenant other's: the registry and the evaluator park it as
    a security event; no version is registered, nothing is evaluated."""
    data_dir, client = deployed
    state = local.running_stack(data_dir)
    foreign = "tenants/other/jobs/job-x/checkpoint-8"
    succeeded = JobSucceeded(
        job_id="job-crossing", worker_id="local-worker-1", model_name="crossing",
        spec={"base_model": "/models/m", "dataset": "ds-x"}, dataset_id="ds-x",
        dataset_sha256="ab" * 32,
        dataset_artifacts={"validation": "tenants/default/datasets/ab/v.jsonl"},
        checkpoint_key=foreign, adapter_key=foreign, steps=1, final_loss=0.1)
    env = make_envelope(succeeded, source="scheduler", tenant="default", actor="scheduler")
    subject, payload = succeeded.subject(), env.model_dump_json().encode()
    scheduler_key = SigningKey.load("scheduler", key_path(data_dir / "keys", "scheduler"))

    async def publish() -> None:
        nc = await nats.connect(state.operator_url)
        await nc.jetstream().publish(
            subject, payload, headers={SIGNATURE_HEADER: scheduler_key.sign(subject, payload)})
        await nc.close()

    asyncio.run(publish())

    def parked():
        records = client.governance.query_audit("llmstudio.deadletter.")
        found = {p["consumer"]: p["reason"] for r in records
                 if (p := json.loads(r.data_json))["original_subject"] == subject}
        return found if {"registry-job-succeeded", "evaluator-job-succeeded"} <= set(found) \
            else None

    found = wait_for(parked, 60, "both consumers to park the crossing success")
    for reason in found.values():
        assert reason.startswith("security: ") and foreign in reason, reason
        assert "not under tenant 'default'" in reason
    assert all(m.name != "crossing" for m in client.models.list())
    assert not client.evaluations.list(job_id="job-crossing")
