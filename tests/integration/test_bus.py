"""The bus against a real nats-server: delivery, dedup, retries, dead letter."""

from __future__ import annotations

import asyncio
import json

import nats
import pytest

from llmstudio.bus import Bus, PublishFailed, subscription_subject
from llmstudio.config import Settings
from llmstudio.events import (
    DeadLettered,
    JobCompleted,
    JobFailed,
    JobQueued,
    JobStarted,
    decode,
    make_envelope,
)
from tests.support.bus import all_stream_messages


async def _wait(pred, timeout=10.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not pred():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.05)


@pytest.fixture
def settings(nats_server, tmp_path):
    return Settings(nats_url=nats_server.url, data_dir=tmp_path, max_deliver=3, ack_wait_s=5)


async def test_event_delivered_once_and_deduplicated(settings):
    seen = []

    async def on_queued(env, data):
        seen.append((env.id, data.job_id))

    bus = Bus(settings, "t1")
    bus.subscribe(JobQueued, durable="queued", handler=on_queued)
    await bus.start()
    try:
        env = await bus.publish(JobQueued(job_id="job-1", dataset_sha256="ab"), tenant="acme")
        await bus.publish_envelope(env, "llmstudio.job.queued.job-1")  # same id: dropped
        await _wait(lambda: len(seen) >= 1)
        await asyncio.sleep(0.5)
        assert seen == [(env.id, "job-1")]
        assert env.tenant == "acme" and env.type == "llmstudio.job.queued.v1"
    finally:
        await bus.stop()


async def test_invalid_event_is_dead_lettered_not_redelivered(settings):
    calls = []
    parked = []

    async def on_queued(env, data):
        calls.append(data)

    async def on_dead(env, data):
        parked.append(data)

    bus = Bus(settings, "t2")
    bus.subscribe(JobQueued, durable="queued", handler=on_queued)
    bus.subscribe(DeadLettered, durable="dead", handler=on_dead, entity=">")
    await bus.start()
    try:
        nc = await nats.connect(settings.nats_url)
        js = nc.jetstream()
        bad = {"specversion": "1.0", "id": "x1", "type": "llmstudio.job.queued.v1",
               "source": "evil", "subject": "job-2", "tenant": "acme", "data": {"job_id": "job-2"}}
        await js.publish("llmstudio.job.queued.job-2", json.dumps(bad).encode())
        await js.publish("llmstudio.job.queued.job-3", b"not json at all")
        await _wait(lambda: len(parked) >= 2)
        await asyncio.sleep(1.0)
        assert calls == []
        assert len(parked) == 2
        reasons = sorted(p.reason for p in parked)
        assert "dataset_sha256" in reasons[0] or "dataset_sha256" in reasons[1]
        assert all(isinstance(p, DeadLettered) and p.consumer == "t2-queued" for p in parked)
        assert {p.original_subject for p in parked} == {
            "llmstudio.job.queued.job-2", "llmstudio.job.queued.job-3"}
        await nc.close()
    finally:
        await bus.stop()


async def test_failing_handler_retried_then_parked(settings):
    attempts = []
    parked = []

    async def flaky(env, data):
        attempts.append(data.job_id)
        raise RuntimeError("database is down")

    async def on_dead(env, data):
        parked.append(data)

    bus = Bus(settings, "t3")
    bus.subscribe(JobQueued, durable="queued", handler=flaky)
    bus.subscribe(DeadLettered, durable="dead", handler=on_dead, entity=">")
    await bus.start()
    try:
        await bus.publish(JobQueued(job_id="job-9", dataset_sha256="cd"), tenant="acme")
        await _wait(lambda: parked, timeout=20)
        await asyncio.sleep(1.0)
        assert attempts == ["job-9"] * settings.max_deliver
        assert "database is down" in parked[0].reason and parked[0].deliveries == 3
        env, data = decode(parked[0].payload.encode())
        assert data.job_id == "job-9"
    finally:
        await bus.stop()


def test_subscription_subject_comes_from_the_event_classes():
    assert subscription_subject((JobQueued,)) == "llmstudio.job.queued.*"
    assert subscription_subject((DeadLettered,), ">") == "llmstudio.deadletter.>"
    assert subscription_subject((JobCompleted, JobFailed)) == "llmstudio.job.>"
    with pytest.raises(ValueError, match="different domains"):
        subscription_subject((JobQueued, DeadLettered))


async def test_typed_subscription_routes_by_type_and_parks_a_mismatch(settings):
    """A handler sees only the types it subscribed to: another type of the domain is skipped,
    and an event published on a subscribed subject with another type (forged or a bug) is
    parked at the first delivery, not handed over."""
    ended, parked = [], []

    async def on_ended(env, data):
        ended.append(type(data).__name__)

    async def on_dead(env, data):
        parked.append(data)

    bus = Bus(settings, "t4")
    bus.subscribe((JobCompleted, JobFailed), durable="ended", handler=on_ended)
    bus.subscribe(DeadLettered, durable="dead", handler=on_dead, entity=">")
    await bus.start()
    try:
        await bus.publish(JobStarted(job_id="j1", worker_id="w1"), tenant="acme")
        await bus.publish(JobFailed(job_id="j1", reason="boom"), tenant="acme")
        forged = make_envelope(JobStarted(job_id="j2", worker_id="w1"), source="x", tenant="acme")
        await bus.publish_envelope(forged, "llmstudio.job.completed.j2")
        await _wait(lambda: ended and parked)
        await asyncio.sleep(0.5)
        assert ended == ["JobFailed"]
        assert len(parked) == 1 and parked[0].deliveries == 1
        assert parked[0].original_subject == "llmstudio.job.completed.j2"
        assert "llmstudio.job.started.v1 on a subject of" in parked[0].reason
    finally:
        await bus.stop()


async def test_an_ordered_batch_is_stored_in_order_and_a_failure_says_how_many_were(settings):
    bus = Bus(settings, "t1")
    await bus.start()

    def queued(n: int) -> tuple[str, bytes, dict[str, str]]:
        env = make_envelope(JobQueued(job_id=f"job-{n}", dataset_sha256="ab"), source="t1",
                            tenant="acme")
        return f"llmstudio.job.queued.job-{n}", env.model_dump_json().encode(), {
            "Nats-Msg-Id": env.id}

    try:
        await bus.publish_in_order([queued(n) for n in range(200)])
        stored = await all_stream_messages(settings.nats_url, "llmstudio.job.queued.>")
        assert [decode(m.data)[1].job_id for m in stored] == [f"job-{n}" for n in range(200)]

        # no stream holds the third one's subject: the first two count as stored
        orphan = ("llmstudio.nowhere.x", b"{}", {"Nats-Msg-Id": "orphan"})
        with pytest.raises(PublishFailed) as failed:
            await bus.publish_in_order([queued(200), queued(201), orphan, queued(202)])
        assert failed.value.stored == 2
        # one over the server's message size: refused before it is sent, after the first
        too_big = ("llmstudio.job.queued.big", b"x" * (bus.nc.max_payload + 1), {})
        with pytest.raises(PublishFailed) as failed:
            await bus.publish_in_order([queued(203), too_big, queued(204)])
        assert failed.value.stored == 1
    finally:
        await bus.stop()
