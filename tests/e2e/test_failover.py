"""Jobs outlive their worker and the control plane its leader, on the embedded stack with two
real trainer workers and two scheduler replicas: a worker killed (SIGKILL), drained (SIGTERM) or
frozen past its lease (SIGSTOP, then SIGCONT) mid-training; each time the job finishes on a
worker that resumed it from a stored checkpoint, never `failed`, with exactly one registered
version. The broker killed mid-job, repeatedly; the leader scheduler killed mid-job."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time

import grpc
import nats
import pytest

from llmstudio import local
from llmstudio.client import Client, job_status_name
from llmstudio.demo_data import word_reversal_rows
from llmstudio.events import JobCheckpointed, JobMetrics, decode
from tests.support.bus import all_stream_messages
from tests.support.waiting import wait_for

pytestmark = pytest.mark.slow

TTL_S = 3.0  # the worker lease: no heartbeat for this long and the job is taken back
LEADER_TTL_S = 2.0  # the placement leader's lease
# (and a message held by a killed replica is delivered again after 3 s)
FAST_LEASE = {"LLMSTUDIO_WORKER_TTL_S": str(TTL_S), "LLMSTUDIO_HEARTBEAT_INTERVAL_S": "0.5",
              "LLMSTUDIO_SCHEDULER_LEASE_TTL_S": str(LEADER_TTL_S), "LLMSTUDIO_ACK_WAIT_S": "3"}
STEPS = 120  # a tiny-model step takes 25-250 ms here: long enough to be hit mid-training




@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from llmstudio.ml.tiny import build_tiny_model

    data_dir = tmp_path_factory.mktemp("failover")
    model_dir = build_tiny_model(data_dir / "models" / "tiny")
    saved = {k: os.environ.get(k) for k in FAST_LEASE}
    os.environ.update(FAST_LEASE)  # the supervisor hands its environment to every service
    try:
        local.up(data_dir, workers=2, schedulers=2, timeout=240)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    client = Client(data_dir=data_dir)
    path = data_dir / "reverse.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in word_reversal_rows(48, seed=1)))
    dataset = client.datasets.push(path, name="reverse")
    yield data_dir, model_dir, client, dataset.id
    client.close()
    local.down(data_dir)


def _submit(stack, name: str, checkpoint_every: int = 4, priority_class: str = "normal",
            steps: int = STEPS):
    _, model_dir, client, dataset_id = stack
    return client.jobs.create({
        "name": name, "base_model": str(model_dir), "dataset": dataset_id,
        "lora": {"r": 8, "alpha": 16},
        "hyperparameters": {"max_steps": steps, "batch_size": 4, "learning_rate": 3e-3,
                            "checkpoint_every": checkpoint_every, "log_every": 1,
                            "max_seq_length": 64},
        "eval": {"max_samples": 4, "max_new_tokens": 4},
    }, priority_class=priority_class)


def _running_with_a_checkpoint(client, job_id: str):
    """The job once it runs and has stored a checkpoint: (job, the pid of its worker)."""
    def ready():
        job = client.jobs.get(job_id)
        running = job_status_name(job.status) == "running" and job.artifacts.get("checkpoint")
        return job if running else None

    job = wait_for(ready, 180, f"{job_id} to run and checkpoint")
    return job


def _worker_pid(data_dir, worker_id: str) -> int:
    """local-worker-2 is the stack's trainer-2."""
    state = local.StackState.load(data_dir)
    return state.services[f"{local.WORKER_PREFIX}{worker_id.rsplit('-', 1)[1]}"].pid


def _finished(client, job_id: str):
    def done():
        job = client.jobs.get(job_id)
        return job if job_status_name(job.status) in ("succeeded", "failed", "cancelled") else None

    return wait_for(done, 300, f"{job_id} to finish")


def _versions(client, name: str) -> list:
    """The model's versions; none while the registry has not registered the first one (the
    job's success reaches it asynchronously)."""
    try:
        return list(client.models.get(name).versions)
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.NOT_FOUND:
            raise
        return []


def _events(data_dir, subject: str, cls) -> list:
    url = local.StackState.load(data_dir).operator_url
    messages = asyncio.run(all_stream_messages(url, subject))
    return [d for d in (decode(m.data)[1] for m in messages) if isinstance(d, cls)]


def _assert_resumed_and_registered_once(stack, job, name: str) -> None:
    data_dir, _, client, _ = stack
    assert job_status_name(job.status) == "succeeded", job.error
    last = job.attempts[-1]
    assert last.reason == "completed" and last.attempt == job.attempt >= 2
    assert last.resumed_from_step >= 4  # from a stored checkpoint, not from step 0
    # the step counter goes on: the resumed attempt's first step is the checkpoint's + 1
    steps = sorted(m.step for m in _events(data_dir, f"llmstudio.metrics.{job.id}", JobMetrics)
                   if m.attempt == last.attempt)
    assert steps[0] == last.resumed_from_step + 1 and steps[-1] == STEPS
    assert job.artifacts["checkpoint"].endswith(f"checkpoint-{STEPS}")
    versions = wait_for(lambda: _versions(client, name), 60, "a version")
    time.sleep(1.0)
    assert [v.lineage.job_id for v in client.models.get(name).versions] == [job.id]
    assert len(versions) == 1


def test_a_killed_worker_s_job_resumes_on_another_and_succeeds(stack):
    data_dir, _, client, _ = stack
    job = _running_with_a_checkpoint(client, _submit(stack, "after-kill").id)
    victim = job.worker_id
    os.killpg(_worker_pid(data_dir, victim), signal.SIGKILL)

    done = _finished(client, job.id)
    first = done.attempts[0]
    assert first.worker_id == victim and first.ended_at
    assert "lost" in first.reason or "reports running nothing" in first.reason
    _assert_resumed_and_registered_once(stack, done, "after-kill")


def test_a_drained_worker_hands_its_job_back_and_it_never_fails(stack):
    data_dir, _, client, _ = stack
    job = _running_with_a_checkpoint(client, _submit(stack, "after-drain").id)
    victim = job.worker_id
    os.kill(_worker_pid(data_dir, victim), signal.SIGTERM)

    statuses = {job_status_name(u.job.status) for u in client.jobs.watch(job.id, timeout=300)}
    assert "failed" not in statuses
    done = client.jobs.get(job.id)
    assert done.attempts[0].reason == (
        f"released: worker {victim} shutting down at step {done.attempts[-1].resumed_from_step}")
    _assert_resumed_and_registered_once(stack, done, "after-drain")


def test_a_frozen_worker_finds_its_lease_gone_and_its_late_reports_change_nothing(stack):
    data_dir, _, client, _ = stack
    job = _running_with_a_checkpoint(client, _submit(stack, "after-freeze").id)
    victim = job.worker_id
    pid = _worker_pid(data_dir, victim)
    os.killpg(pid, signal.SIGSTOP)
    try:
        wait_for(lambda: client.jobs.get(job.id).attempt >= 2, 30, "the job to be requeued")
        time.sleep(1.0)  # the other worker takes it up
    finally:
        os.killpg(pid, signal.SIGCONT)

    done = _finished(client, job.id)
    first = done.attempts[0]
    assert first.worker_id == victim and "lost" in first.reason
    _assert_resumed_and_registered_once(stack, done, "after-freeze")
    # the woken worker stopped on its own: nothing of attempt 1 was announced after the requeue
    # that the scheduler took, and its log says why it stopped
    log = local.log_file(local.StackState.load(data_dir), f"{local.WORKER_PREFIX}"
                         f"{victim.rsplit('-', 1)[1]}")
    wait_for(lambda: "lease lost: job requeued as attempt" in log.read_text(), 30, "the fence")
    checkpoints = _events(data_dir, f"llmstudio.job.checkpointed.{job.id}", JobCheckpointed)
    late = [c for c in checkpoints if c.attempt == 1 and c.step > done.attempts[1]
            .resumed_from_step]
    assert late == [], late


def test_broker_outages_mid_job_never_kill_training_and_every_event_is_audited_once(stack):
    """nats-server killed three times while the job trains, checkpoints (every 2 steps) and
    reports metrics (every step); the supervisor brings it back after 1, 2 and 4 s."""
    import collections

    from tests.e2e.test_walking_skeleton import _stream_event_ids

    data_dir, _, client, _ = stack
    job = _running_with_a_checkpoint(client, _submit(stack, "through-outages",
                                                     checkpoint_every=2).id)
    during = []
    for _ in range(3):
        pid = local.StackState.load(data_dir).nats_pid
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda old=pid: local.StackState.load(data_dir).nats_pid != old, 30,
                  "nats back")
        during.append(job_status_name(client.jobs.get(job.id).status))
        time.sleep(1.5)  # some training between outages
    assert during[:2] == ["running", "running"]  # the outages hit the training

    done = _finished(client, job.id)
    assert job_status_name(done.status) == "succeeded", done.error
    assert [a.reason for a in done.attempts] == ["completed"]  # never taken from its worker
    assert done.artifacts["checkpoint"].endswith(f"checkpoint-{STEPS}")

    url = local.StackState.load(data_dir).operator_url
    wait_for(lambda: _versions(client, "through-outages"), 60, "its version")

    def audited():
        stream_ids = asyncio.run(_stream_event_ids(url))
        audit_ids = [r.event_id for r in client.governance.query_audit(limit=100000)]
        return audit_ids if set(stream_ids) == set(audit_ids) else None

    audit_ids = wait_for(audited, 60, "the audit to hold every stored event")
    assert max(collections.Counter(audit_ids).values()) == 1
    # each of the job's reports was stored once, whatever was retried during the outages
    checkpoints = _events(data_dir, f"llmstudio.job.checkpointed.{job.id}", JobCheckpointed)
    assert len({c.step for c in checkpoints}) == len(checkpoints)


def _leader(nats_url: str) -> str:
    from llmstudio.bus import LEASE_BUCKET as BUCKET
    from services.scheduler.lease import KEY

    async def read() -> str:
        nc = await nats.connect(nats_url)
        try:
            kv = await nc.jetstream().key_value(BUCKET)
            return (await kv.get(KEY)).value.decode()
        finally:
            await nc.close()

    try:
        return asyncio.run(read())
    except Exception:  # noqa: BLE001 - between a lapsed lease and its next holder
        return ""


def test_the_leader_scheduler_killed_mid_job_loses_nothing(stack):
    from llmstudio.grpcutil import channel
    from llmstudio.local import admin_key
    from llmstudio.v1 import jobs_pb2, jobs_pb2_grpc

    data_dir, _, client, _ = stack
    state = local.StackState.load(data_dir)
    leader = wait_for(lambda: _leader(state.operator_url), 30, "a leader")
    survivor = next(n for n in state.schedulers if n != leader)
    job = _running_with_a_checkpoint(client, _submit(stack, "across-failover").id)

    # a WatchJob on the surviving replica, from before the kill to the end
    stub = jobs_pb2_grpc.JobServiceStub(channel(state.services[survivor].addr,
                                                admin_key(data_dir)))
    updates: list = []
    watcher = threading.Thread(target=lambda: updates.extend(
        stub.WatchJob(jobs_pb2.WatchJobRequest(id=job.id), timeout=300)))
    watcher.start()
    wait_for(lambda: updates, 30, "the watch to start")

    os.kill(state.supervisor_pid, signal.SIGSTOP)  # no restart while we look
    try:
        os.kill(state.services[leader].pid, signal.SIGKILL)
        later = _submit(stack, "after-the-leader")  # the client fails over to the survivor
        done = _finished(client, job.id)
        assert job_status_name(done.status) == "succeeded", done.error
        assert _finished(client, later.id).status == jobs_pb2.JOB_STATUS_SUCCEEDED
        assert _leader(state.operator_url) == survivor
    finally:
        os.kill(state.supervisor_pid, signal.SIGCONT)
    watcher.join(60)
    statuses = [job_status_name(u.job.status) for u in updates if u.kind == "status"]
    assert statuses[0] == "running" and statuses[-1] == "succeeded"
    steps = {u.step for u in updates if u.kind == "metrics"}
    assert steps == set(range(1, STEPS + 1))  # every sample, before and after the kill


def _intervals(jobs) -> list[tuple[str, str]]:
    return [(a.started_at, a.ended_at) for j in jobs for a in j.attempts if a.started_at]


def test_two_tenants_at_a_running_quota_of_one_share_two_workers(stack):
    import grpc

    data_dir, _, admin, _ = stack
    keys = {t: admin.governance.create_key("developer", tenant=t).secret
            for t in ("default", "globex")}
    users = {t: Client(api_key=k, data_dir=data_dir) for t, k in keys.items()}

    def known(user) -> bool:  # new keys reach every service through the key bucket
        try:
            user.jobs.get_quota()
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.UNAUTHENTICATED:
                raise
            return False
        return True

    for user in users.values():
        wait_for(lambda u=user: known(u), 30, "the new key to be known")
    try:
        with pytest.raises(grpc.RpcError) as e:  # urgent is for admins
            users["globex"].jobs.create({"base_model": "x", "dataset": "y"},
                                        priority_class="urgent")
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        for tenant in users:
            admin.jobs.set_quota(tenant, max_running=1)
        _, model_dir, _, _ = stack
        submitted = {t: [] for t in users}
        for tenant, user in users.items():
            path = data_dir / f"{tenant}.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in word_reversal_rows(24, 2)))
            dataset = user.datasets.push(path, name=f"{tenant}-rows").id
            for i in range(4):
                submitted[tenant].append(user.jobs.create({
                    "name": f"{tenant}-{i}", "base_model": str(model_dir), "dataset": dataset,
                    "lora": {"r": 4, "alpha": 8},
                    "hyperparameters": {"max_steps": 6, "batch_size": 4, "max_seq_length": 64},
                    "eval": {"max_samples": 2, "max_new_tokens": 2}}).id)
        done = {t: [_finished(users[t], j) for j in ids] for t, ids in submitted.items()}
    finally:
        for tenant, user in users.items():
            admin.jobs.set_quota(tenant)  # no limits again
            user.close()
    for jobs in done.values():
        assert [job_status_name(j.status) for j in jobs] == ["succeeded"] * 4
        runs = sorted(_intervals(jobs))
        # one at a time: each of the tenant's jobs started after the previous one ended
        assert all(later[0] >= earlier[1] for earlier, later in zip(runs, runs[1:],
                                                                           strict=False))
    # and the tenants ran side by side: each one's first job ran while the other's did
    (a0, a1), (b0, b1) = (min(_intervals(jobs)) for jobs in done.values())
    assert a0 < b1 and b0 < a1


def test_an_urgent_job_preempts_a_low_one_which_resumes_and_finishes(stack):
    _, _, admin, _ = stack
    # long enough to be still running when the urgent job is queued, on a fast machine too
    lows = [_submit(stack, f"low-{i}", priority_class="low", steps=400,
                    checkpoint_every=20).id for i in range(2)]
    for job_id in lows:
        _running_with_a_checkpoint(admin, job_id)
    urgent = _submit(stack, "urgent", priority_class="urgent", steps=8)
    assert job_status_name(_finished(admin, urgent.id).status) == "succeeded"
    ended = [_finished(admin, j) for j in lows]
    assert [job_status_name(j.status) for j in ended] == ["succeeded", "succeeded"]
    preempted = [j for j in ended if len(j.attempts) > 1]
    assert len(preempted) == 1  # one worker was enough for it
    low = preempted[0]
    first, last = low.attempts[0], low.attempts[-1]
    assert first.reason.startswith(f"released: preempted by {urgent.id} at step ")
    stopped_at = int(first.reason.rsplit(" ", 1)[1])
    assert last.resumed_from_step == stopped_at and last.reason == "completed"
