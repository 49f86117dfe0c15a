"""The trainer-worker against a real nats-server, real training steps on a tiny Llama."""

from __future__ import annotations

import asyncio
import contextlib
import json

import nats
import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

from llmstudio import telemetry  # noqa: E402
from llmstudio.bus import Bus  # noqa: E402
from llmstudio.config import Settings  # noqa: E402
from llmstudio.events import (  # noqa: E402
    JobCancelled,
    JobCancelRequested,
    JobCheckpointed,
    JobCompleted,
    JobFailed,
    JobMetrics,
    JobReleased,
    JobReleaseRequested,
    JobRequeued,
    JobStarted,
    WorkerHeartbeat,
    WorkItem,
    decode,
)
from llmstudio.ml.tiny import build_tiny_model  # noqa: E402
from llmstudio.storage import LocalArtifactStore  # noqa: E402
from services.trainer.app import build  # noqa: E402
from services.trainer.store import TrainerStore  # noqa: E402
from tests.support.harness import running  # noqa: E402
from tests.support.models import config_only_model  # noqa: E402

WORKER = "w-test"
ROWS = [{"prompt": f"say {w} twice:", "completion": f" {w} {w}"}
        for w in ("apple", "river", "stone", "cat", "dog", "moon", "sun", "tree",
                  "bird", "fish", "rain", "snow", "fire", "wind", "road", "ship")]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "m"))


class Harness:
    """The trainer in-process plus a client bus that records job events and heartbeats."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.store = LocalArtifactStore(settings.data_dir / "artifacts")
        self.events: list = []  # (envelope, data) of job.* and metrics.*
        self.traces: dict[str, str] = {}  # event id -> trace id the handler continued
        self.heartbeats: list[WorkerHeartbeat] = []
        self.bus = Bus(settings, "test")

        async def record(env, data):
            self.traces[env.id] = telemetry.current_trace_id()
            self.events.append((env, data))

        self.bus.subscribe_subject("jobs", "llmstudio.job.>", record)
        self.bus.subscribe_subject("metrics", "llmstudio.metrics.>", record)

    def of(self, cls, job_id: str) -> list:
        return [d for _, d in self.events if isinstance(d, cls) and d.job_id == job_id]

    def envelopes(self, job_id: str) -> list:
        return [e for e, d in self.events if getattr(d, "job_id", None) == job_id]

    async def wait(self, pred, timeout=30.0, what="condition"):
        deadline = asyncio.get_running_loop().time() + timeout
        while not pred():
            assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
            await asyncio.sleep(0.05)

    def work_item(self, job_id: str, model_dir: str, **hp) -> WorkItem:
        key = self.store.put_blob("\n".join(json.dumps(r) for r in ROWS).encode(),
                                  "tenants/acme/datasets")
        hyper = {"max_steps": 8, "batch_size": 4, "learning_rate": 1e-2, "log_every": 2,
                 "checkpoint_every": 4, "seed": 3}
        hyper.update(hp)
        spec = {"base_model": model_dir, "dataset": "ds-1", "hyperparameters": hyper,
                "lora": {"r": 4, "alpha": 8}}
        return WorkItem(worker_id=WORKER, job_id=job_id, model_name="tiny-lora", spec=spec,
                        dataset_id="ds-1", dataset_sha256="ab" * 32,
                        dataset_artifacts={"train": key})


@pytest.fixture
async def harness(nats_server, tmp_path):
    settings = Settings(nats_url=nats_server.url, data_dir=tmp_path, worker_id=WORKER,
                        heartbeat_interval_s=0.2)
    h = Harness(settings)
    nc = await nats.connect(nats_server.url)

    async def on_beat(msg):
        h.heartbeats.append(decode(msg.data)[1])

    await nc.subscribe("llmstudio.worker.heartbeat.>", cb=on_beat)
    await h.bus.start()
    # The trainer in its own exit stack: a test may stop it and still watch what it published.
    h.trainer = contextlib.AsyncExitStack()
    await h.trainer.enter_async_context(running("trainer", build, settings))
    try:
        yield h
    finally:
        await h.trainer.aclose()
        await h.bus.stop()
        await nc.close()


@pytest.mark.slow
async def test_job_runs_to_completion_with_metrics_checkpoints_and_heartbeats(harness, model_dir):
    h = harness
    await h.wait(lambda: h.heartbeats, what="a heartbeat")
    assert h.heartbeats[0].worker_id == WORKER and h.heartbeats[0].state == "idle"
    assert h.heartbeats[0].device in ("cpu", "cuda")

    sent = await h.bus.publish(h.work_item("job-1", model_dir), tenant="acme", actor="alice")
    await h.wait(lambda: h.of(JobCompleted, "job-1") or h.of(JobFailed, "job-1"), what="the end")
    assert not h.of(JobFailed, "job-1"), h.of(JobFailed, "job-1")

    assert h.of(JobStarted, "job-1")[0].worker_id == WORKER
    steps = [m.step for m in h.of(JobMetrics, "job-1")]
    assert len(steps) >= 2 and steps == sorted(steps) and len(set(steps)) == len(steps)
    assert steps[-1] == 8  # the last sample went out before the outcome (not awaited per step)
    assert all(m.max_steps == 8 and m.loss > 0 for m in h.of(JobMetrics, "job-1"))

    ckpts = h.of(JobCheckpointed, "job-1")
    assert [c.step for c in ckpts] == [4, 8]
    for c in ckpts:
        assert h.store.exists(f"{c.checkpoint_key}/manifest.json")
        assert h.store.exists(f"{c.checkpoint_key}/adapter_model.safetensors")

    done = h.of(JobCompleted, "job-1")[0]
    assert done.steps == 8 and done.worker_id == WORKER and done.model_name == "tiny-lora"
    assert done.adapter_key == done.checkpoint_key == "tenants/acme/jobs/job-1/checkpoint-8"
    assert done.dataset_artifacts["train"] and done.spec["hyperparameters"]["max_steps"] == 8
    assert done.final_loss > 0

    # every event of the job (metrics and checkpoints come from the training thread): the work
    # item's tenant/actor, and one trace, the one JobCompleted names
    envs = h.envelopes("job-1")
    assert {e.tenant for e in envs} == {"acme"} and {e.actor for e in envs} == {"alice"}
    assert len(done.trace_id) == 32 and done.trace_id != "0" * 32
    assert {h.traces[e.id] for e in envs} == {done.trace_id}
    assert sent.tenant == "acme"

    # busy while training, idle again afterwards; the local work dir is gone
    assert any(b.state == "busy" and b.job_id == "job-1" for b in h.heartbeats)
    n = len(h.heartbeats)
    await h.wait(lambda: len(h.heartbeats) > n and h.heartbeats[-1].state == "idle", what="idle")
    assert not (h.settings.data_dir / "work" / "job-1").exists()


async def test_missing_model_dir_fails_with_the_path(harness, tmp_path):
    h = harness
    missing = str(tmp_path / "no-such-model")
    await h.bus.publish(h.work_item("job-2", missing), tenant="acme")
    await h.wait(lambda: h.of(JobFailed, "job-2"), what="JobFailed")
    failed = h.of(JobFailed, "job-2")[0]
    assert missing in failed.reason and failed.worker_id == WORKER
    assert not h.of(JobCompleted, "job-2")


async def test_a_work_item_naming_another_tenants_dataset_fails_before_reading_it(
        harness, tmp_path):
    """Work for tenant globex that names acme's train split: failed with the reason, nothing
    stored for globex (its key check comes before any read)."""
    h = harness
    model = config_only_model(tmp_path / "model")
    await h.bus.publish(h.work_item("job-7", str(model)), tenant="globex")
    await h.wait(lambda: h.of(JobFailed, "job-7"), what="JobFailed")
    reason = h.of(JobFailed, "job-7")[0].reason
    assert "tenants/acme/datasets/" in reason and "not under tenant 'globex'" in reason
    assert not h.of(JobCheckpointed, "job-7") and not h.store.list("tenants/globex/")


async def test_an_attempt_that_ended_here_is_not_run_again_after_a_restart(harness, tmp_path):
    """The worker records each attempt with its reports (trainer_runs, one transaction with the
    outbox row): a work item redelivered after the worker restarted is recognised and dropped."""
    h = harness
    item = h.work_item("job-5", str(tmp_path / "no-such-model"))
    await h.bus.publish(item, tenant="acme")
    await h.wait(lambda: h.of(JobFailed, "job-5"), what="JobFailed")
    await h.trainer.aclose()
    runs = TrainerStore(h.settings.db_url("trainer"))
    with runs.unit() as u:
        assert u.status("job-5", item.attempt) == "failed" and u.pending_events() == []
    runs.dispose()

    h.trainer = contextlib.AsyncExitStack()
    await h.trainer.enter_async_context(running("trainer", build, h.settings))
    await h.bus.publish(item, tenant="acme")  # a new envelope: not a JetStream duplicate
    await h.bus.publish(h.work_item("job-6", str(tmp_path / "gone")), tenant="acme")
    await h.wait(lambda: h.of(JobFailed, "job-6"), what="the next job")
    assert len(h.of(JobStarted, "job-5")) == len(h.of(JobFailed, "job-5")) == 1


@pytest.mark.slow
async def test_cancel_stops_a_running_job(harness, model_dir):
    h = harness
    await h.bus.publish(h.work_item("job-3", model_dir, max_steps=100_000, checkpoint_every=0),
                        tenant="acme")
    await h.wait(lambda: h.of(JobMetrics, "job-3"), what="training to start")
    await h.bus.publish(JobCancelRequested(job_id="job-3"), tenant="acme")
    await h.wait(lambda: h.of(JobCancelled, "job-3") or h.of(JobFailed, "job-3"), what="cancel")
    assert h.of(JobCancelled, "job-3")[0].reason == "cancelled"
    await asyncio.sleep(0.5)
    assert not h.of(JobCompleted, "job-3") and not h.of(JobFailed, "job-3")
    # the steps done before the cancel were checkpointed, not lost
    ckpt = h.of(JobCheckpointed, "job-3")[-1]
    assert ckpt.step < 100_000 and h.store.exists(f"{ckpt.checkpoint_key}/manifest.json")


@pytest.mark.slow
async def test_shutdown_checkpoints_and_hands_the_job_back(harness, model_dir):
    h = harness
    await h.bus.publish(h.work_item("job-4", model_dir, max_steps=100_000, checkpoint_every=0),
                        tenant="acme")
    await h.wait(lambda: h.of(JobMetrics, "job-4"), what="training to start")
    await h.trainer.aclose()  # SIGTERM, in-process
    await h.wait(lambda: h.of(JobReleased, "job-4"), what="JobReleased")
    await asyncio.sleep(0.3)
    (released,) = h.of(JobReleased, "job-4")
    assert not h.of(JobFailed, "job-4") and not h.of(JobCancelled, "job-4")
    assert not h.of(JobCompleted, "job-4")
    ckpt = h.of(JobCheckpointed, "job-4")[-1]  # checkpointed at once, not at checkpoint_every
    assert (released.worker_id, released.attempt, released.step) == (WORKER, 1, ckpt.step)
    assert released.checkpoint_key == ckpt.checkpoint_key
    assert released.reason == f"worker {WORKER} shutting down at step {ckpt.step}"
    assert h.store.exists(f"{ckpt.checkpoint_key}/manifest.json")


@pytest.mark.slow
async def test_job_restarted_elsewhere_resumes_from_its_newest_stored_checkpoint(
    harness, model_dir, tmp_path
):
    """A previous worker got job-5 to step 4 and stored checkpoint-4 (and half of a
    checkpoint-6, no manifest); this worker resumes from step 4, keeps only the newest
    checkpoint in the store, and finishes at max_steps."""
    from llmstudio.jobspec import JobSpec
    from services.trainer.recipes import TrainRequest, train

    h = harness
    item = h.work_item("job-5", model_dir, keep_last_checkpoints=1, log_every=1)
    calls = []

    def stop_after_4() -> bool:
        calls.append(1)
        return len(calls) > 4

    first = await asyncio.to_thread(train, TrainRequest(
        JobSpec.model_validate(item.spec), ROWS, tmp_path / "earlier", should_stop=stop_after_4,
    ))
    assert first.steps == 4
    h.store.put_dir("tenants/acme/jobs/job-5/checkpoint-4", first.adapter_dir)
    h.store.put_bytes("tenants/acme/jobs/job-5/checkpoint-6/adapter_model.safetensors",
                      b"partial upload")

    await h.bus.publish(item, tenant="acme")
    await h.wait(lambda: h.of(JobCompleted, "job-5") or h.of(JobFailed, "job-5"), what="the end")
    assert not h.of(JobFailed, "job-5"), h.of(JobFailed, "job-5")
    steps = [m.step for m in h.of(JobMetrics, "job-5")]
    assert steps and min(steps) == 5 and max(steps) == 8  # the step counter goes on
    assert h.of(JobStarted, "job-5")[0].resumed_from_step == 4
    assert [c.step for c in h.of(JobCheckpointed, "job-5")] == [8]
    done = h.of(JobCompleted, "job-5")[0]
    assert done.steps == 8 and done.checkpoint_key == "tenants/acme/jobs/job-5/checkpoint-8"
    # keep_last_checkpoints=1 in the store too: checkpoint-4 is gone, manifest and all
    manifests = [k for k in h.store.list("tenants/acme/jobs/job-5/")
                 if k.endswith("manifest.json")]
    assert manifests == ["tenants/acme/jobs/job-5/checkpoint-8/manifest.json"]
    assert not h.store.list("tenants/acme/jobs/job-5/checkpoint-4/")


@pytest.mark.slow
async def test_a_job_requeued_elsewhere_stops_here_and_uploads_and_reports_nothing(
        harness, model_dir):
    h = harness
    await h.bus.publish(h.work_item("job-6", model_dir, max_steps=100_000, checkpoint_every=3,
                                    log_every=1), tenant="acme")
    await h.wait(lambda: h.of(JobCheckpointed, "job-6"), what="a first checkpoint")
    # an older attempt's requeue is not about this attempt: training goes on
    await h.bus.publish(JobRequeued(job_id="job-6", attempt=1, reason="old"), tenant="acme")
    seen = len(h.of(JobMetrics, "job-6"))
    await h.wait(lambda: len(h.of(JobMetrics, "job-6")) > seen + 3, what="more steps")
    # the scheduler took the job back (this worker was silent past the TTL)
    await h.bus.publish(JobRequeued(job_id="job-6", attempt=2, worker_id=WORKER,
                                    reason=f"worker {WORKER} lost"), tenant="acme")
    n = len(h.heartbeats)
    await h.wait(lambda: len(h.heartbeats) > n and h.heartbeats[-1].state == "idle",
                 what="the worker to stop the job")
    uploaded = {k.split("/")[4] for k in h.store.list("tenants/acme/jobs/job-6/")}
    reported = len(h.of(JobCheckpointed, "job-6"))
    await asyncio.sleep(1.0)
    # nothing after the fence: no outcome, no new checkpoint announced or uploaded (the stop's
    # final checkpoint included)
    for cls in (JobCompleted, JobFailed, JobReleased, JobCancelled):
        assert not h.of(cls, "job-6"), cls
    assert len(h.of(JobCheckpointed, "job-6")) == reported
    assert {k.split("/")[4] for k in h.store.list("tenants/acme/jobs/job-6/")} == uploaded
    assert {c.checkpoint_key.split("/")[4] for c in h.of(JobCheckpointed, "job-6")} == uploaded


@pytest.mark.slow
async def test_a_release_request_checkpoints_and_hands_the_job_back(harness, model_dir):
    h = harness
    await h.bus.publish(h.work_item("job-7", model_dir, max_steps=100_000, checkpoint_every=0),
                        tenant="acme")
    await h.wait(lambda: h.of(JobMetrics, "job-7"), what="training to start")
    # another attempt's or worker's request is not for this run
    await h.bus.publish(JobReleaseRequested(job_id="job-7", worker_id=WORKER, attempt=2,
                                            reason="preempted by job-x"), tenant="acme")
    await h.bus.publish(JobReleaseRequested(job_id="job-7", worker_id="w-other", attempt=1,
                                            reason="preempted by job-x"), tenant="acme")
    seen = len(h.of(JobMetrics, "job-7"))
    await h.wait(lambda: len(h.of(JobMetrics, "job-7")) > seen + 2, what="more steps")
    assert not h.of(JobReleased, "job-7")
    await h.bus.publish(JobReleaseRequested(job_id="job-7", worker_id=WORKER, attempt=1,
                                            reason="preempted by job-u"), tenant="acme")
    await h.wait(lambda: h.of(JobReleased, "job-7"), what="JobReleased")
    (released,) = h.of(JobReleased, "job-7")
    ckpt = h.of(JobCheckpointed, "job-7")[-1]
    assert released.reason == f"preempted by job-u at step {ckpt.step}"
    assert released.checkpoint_key == ckpt.checkpoint_key
    assert h.store.exists(f"{ckpt.checkpoint_key}/manifest.json")

    # a request that overtook its work item: handed back at once, nothing run
    await h.bus.publish(JobReleaseRequested(job_id="job-8", worker_id=WORKER, attempt=1,
                                            reason="paused by key-1"), tenant="acme")

    async def request_handled() -> bool:  # by the worker's release consumer (acked)
        info = await h.bus.js.consumer_info("JOBS", f"trainer-release-{WORKER}")
        return info.num_pending == 0 and info.num_ack_pending == 0

    deadline = asyncio.get_running_loop().time() + 30
    while not await request_handled():
        assert asyncio.get_running_loop().time() < deadline, "release request never handled"
        await asyncio.sleep(0.05)
    await h.bus.publish(h.work_item("job-8", model_dir), tenant="acme")
    await h.wait(lambda: h.of(JobReleased, "job-8"), what="the early release")
    assert h.of(JobReleased, "job-8")[0].reason == "paused by key-1 before it started"
    assert not h.of(JobStarted, "job-8") and not h.of(JobMetrics, "job-8")
