"""Signed events against a real nats-server: a consumer takes only what the event's signer
signed and may emit; everything else is parked as a security event, never handled."""

from __future__ import annotations

import asyncio
import base64
import json

import nats
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from llmstudio.bus import Bus
from llmstudio.config import Settings
from llmstudio.events import (
    DeadLettered,
    JobCompleted,
    WorkerHeartbeat,
    decode,
    make_envelope,
)
from llmstudio.signing import SIGNATURE_HEADER, SigningKey, ensure_keys, key_path
from tests.support.waiting import wait_for_async

SERVICES = ("trainer", "dataset", "registry")


def completed(job_id: str) -> JobCompleted:
    return JobCompleted(
        job_id=job_id, worker_id="w-1", model_name="m", spec={}, dataset_id="ds-1",
        dataset_sha256="ab" * 32, dataset_artifacts={}, checkpoint_key="ckpt/x",
        adapter_key="adapters/x", steps=1, final_loss=0.5)


@pytest.fixture
def keys(tmp_path):
    trust = ensure_keys(tmp_path / "keys", SERVICES)
    return tmp_path / "keys", trust


def settings_of(nats_server, tmp_path, keys, service: str) -> Settings:
    keys_dir, trust = keys
    return Settings(nats_url=nats_server.url, data_dir=tmp_path, max_deliver=3,
                    signing_key_file=key_path(keys_dir, service), trusted_signers_file=trust)


class Tap:
    """Every dead-letter record on the bus (`tap.record` is the subscription's callback)."""

    def __init__(self):
        self.parked: list[DeadLettered] = []

    async def record(self, msg) -> None:
        _, data = decode(msg.data)
        self.parked.append(data)


async def test_only_what_its_signer_signed_and_may_emit_is_handled(nats_server, tmp_path, keys):
    handled = []

    async def on_completed(env, data):
        handled.append(data.job_id)

    registry = Bus(settings_of(nats_server, tmp_path, keys, "registry"), "registry")
    registry.subscribe(JobCompleted, durable="completed", handler=on_completed)
    trainer = Bus(settings_of(nats_server, tmp_path, keys, "trainer"), "trainer")
    dataset = Bus(settings_of(nats_server, tmp_path, keys, "dataset"), "dataset")
    nc = await nats.connect(nats_server.url)
    tap = Tap()
    await nc.subscribe("llmstudio.deadletter.>", cb=tap.record)
    for bus in (registry, trainer, dataset):
        await bus.start()
    js = nc.jetstream()
    try:
        await trainer.publish(completed("job-genuine"), tenant="acme")

        def as_trainer(job_id: str) -> tuple[str, bytes]:
            env = make_envelope(completed(job_id), source="trainer", tenant="acme")
            return f"llmstudio.job.completed.{job_id}", env.model_dump_json().encode()

        # unsigned, claiming to be the trainer
        subject, payload = as_trainer("job-unsigned")
        await js.publish(subject, payload)
        # signed with a key nobody trusts
        subject, payload = as_trainer("job-foreign-key")
        stranger = SigningKey("trainer", Ed25519PrivateKey.generate())
        await js.publish(subject, payload,
                         headers={SIGNATURE_HEADER: stranger.sign(subject, payload)})
        # signed by the dataset service's real key, claiming to be the trainer
        subject, payload = as_trainer("job-other-signer")
        dataset_key = SigningKey.load("dataset", key_path(keys[0], "dataset"))
        await js.publish(subject, payload,
                         headers={SIGNATURE_HEADER: dataset_key.sign(subject, payload)})
        # genuinely the dataset service's, but completing jobs is not its to announce
        await dataset.publish(completed("job-not-entitled"), tenant="acme")
        # the trainer's genuine signature, replayed on another job's subject
        subject, payload = as_trainer("job-replayed")
        signature = SigningKey.load("trainer", key_path(keys[0], "trainer")).sign(
            subject, payload)
        await js.publish("llmstudio.job.completed.job-elsewhere", payload,
                         headers={SIGNATURE_HEADER: signature})

        forged = ["job-unsigned", "job-foreign-key", "job-other-signer", "job-not-entitled",
                  "job-elsewhere"]
        await wait_for_async(lambda: len(tap.parked) >= len(forged), 20, "forgeries parked")
        await asyncio.sleep(0.5)
        assert handled == ["job-genuine"]
        reasons = {p.original_subject.rsplit(".", 1)[1]: p.reason for p in tap.parked}
        assert set(reasons) == set(forged)
        assert all(r.startswith("security: ") for r in reasons.values())
        assert "unsigned" in reasons["job-unsigned"]
        assert "bad signature" in reasons["job-foreign-key"]
        assert "bad signature" in reasons["job-other-signer"]
        assert "'dataset' may not emit llmstudio.job.completed.v1" in reasons["job-not-entitled"]
        assert "bad signature" in reasons["job-elsewhere"]
        assert {p.consumer for p in tap.parked} == {"registry-completed"}
        # each record keeps the forged envelope, for whoever investigates
        assert all(json.loads(p.payload)["type"] == JobCompleted.TYPE for p in tap.parked)
    finally:
        await nc.close()
        for bus in (registry, trainer, dataset):
            await bus.stop()


async def test_a_forged_heartbeat_is_dropped_and_a_flood_of_them_parked_once(
        nats_server, tmp_path, keys):
    beats = []

    async def on_beat(env, data):
        beats.append(data.worker_id)

    scheduler = Bus(settings_of(nats_server, tmp_path, keys, "registry"), "registry")
    scheduler.subscribe_core(WorkerHeartbeat, on_beat)
    trainer = Bus(settings_of(nats_server, tmp_path, keys, "trainer"), "trainer")
    nc = await nats.connect(nats_server.url)
    tap = Tap()
    await nc.subscribe("llmstudio.deadletter.>", cb=tap.record)
    await scheduler.start()
    await trainer.start()
    try:
        for i in range(20):  # worker ids of its own choosing, no signature
            env = make_envelope(WorkerHeartbeat(worker_id=f"w-forged-{i}", state="idle"),
                                source="trainer", tenant="system")
            await nc.publish(f"llmstudio.worker.heartbeat.w-forged-{i}",
                             env.model_dump_json().encode())
        await trainer.publish_core(WorkerHeartbeat(worker_id="w-real", state="idle"))
        await wait_for_async(lambda: beats, 10, "the genuine heartbeat")
        await asyncio.sleep(0.5)
        assert beats == ["w-real"]
        assert len(tap.parked) == 1 and tap.parked[0].reason.startswith("security: unsigned")
        assert tap.parked[0].original_subject == "llmstudio.worker.heartbeat.w-forged-0"
    finally:
        await nc.close()
        await scheduler.stop()
        await trainer.stop()


def test_a_key_file_that_is_not_a_key_is_refused_at_start(tmp_path):
    bad = tmp_path / "trainer.key"
    bad.write_text(base64.b64encode(b"short").decode())
    with pytest.raises(ValueError, match="not an ed25519 key"):
        Bus(Settings(data_dir=tmp_path, signing_key_file=bad), "trainer")
    trust = tmp_path / "signers.json"
    trust.write_text('["not", "a", "map"]')
    with pytest.raises(ValueError, match="not a JSON object"):
        Bus(Settings(data_dir=tmp_path, trusted_signers_file=trust), "trainer")


def test_every_event_type_names_who_may_emit_it():
    from llmstudio.events import EMITTERS, EVENT_TYPES
    from llmstudio.events.emitters import ANY_SERVICE

    assert set(EMITTERS) == set(EVENT_TYPES.values())
    assert all(services and services <= ANY_SERVICE for services in EMITTERS.values())
