"""The scheduler's pure domain: state machine, spec validation, worker table, placement."""

from __future__ import annotations

import dataclasses

import pytest

from llmstudio.errors import InvalidArgument
from services.scheduler.core import (
    ACTIVE,
    TERMINAL,
    Happening,
    Job,
    Report,
    Status,
    Worker,
    WorkerTable,
    assigned,
    attempts_summary,
    cannot_run,
    disowned,
    exhausted,
    latest_metrics,
    lost_assignments,
    names_a_path,
    parse_spec,
    place,
    refuse_on,
    reported,
    requeued,
    transition,
)

NOW = "2025-01-02T00:00:00.000000Z"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def job(job_id: str, *, priority: int = 0, created_at: str = "2025-01-01T00:00:00.000000Z",
        status: Status = Status.QUEUED, worker_id: str = "", spec: dict | None = None,
        memory: float = 0.0) -> Job:
    return Job(id=job_id, tenant="acme", status=status, spec=spec or {}, model_name="m",
               dataset_id="d", priority=priority, created_by="k", created_at=created_at,
               updated_at=created_at, worker_id=worker_id,
               memory_estimate={"total": memory} if memory else {})


# -- state machine ------------------------------------------------------------------------------

def test_happy_path_moves_forward():
    s = Status.VALIDATING_FILES
    s = transition(s, Happening.VALIDATED)
    assert s == Status.QUEUED
    s = transition(s, Happening.STARTED)
    assert s == Status.RUNNING
    assert transition(s, Happening.COMPLETED) == Status.SUCCEEDED


@pytest.mark.parametrize("terminal", sorted(TERMINAL))
@pytest.mark.parametrize("happening", list(Happening))
def test_terminal_states_are_final(terminal, happening):
    assert transition(terminal, happening) is None


@pytest.mark.parametrize("current", sorted(ACTIVE))
def test_failure_and_cancel_end_any_active_job(current):
    assert transition(current, Happening.FAILED) == Status.FAILED
    assert transition(current, Happening.CANCELLED) == Status.CANCELLED


def test_out_of_place_happenings_are_ignored():
    # a redelivered DatasetValidated must not move a running job back to queued
    assert transition(Status.RUNNING, Happening.VALIDATED) is None
    assert transition(Status.QUEUED, Happening.REJECTED) is None
    # a worker can't start a job whose files are not validated yet
    assert transition(Status.VALIDATING_FILES, Happening.STARTED) is None
    assert transition(Status.VALIDATING_FILES, Happening.COMPLETED) is None
    assert transition(Status.RUNNING, Happening.STARTED) is None
    # completion overtaking its JobStarted still completes the job
    assert transition(Status.QUEUED, Happening.COMPLETED) == Status.SUCCEEDED


def test_a_completion_report_adds_the_outputs_to_the_job():
    running = dataclasses.replace(job("job-1", status=Status.RUNNING, worker_id="w-1"),
                                  artifacts={"checkpoint": "ck/1"},
                                  metrics={"step": 3.0, "loss": 1.5})
    done = reported(running, Report(Happening.COMPLETED, "w-1",
                                    artifacts={"checkpoint": "ck/3", "adapter": "ad/x"},
                                    metrics={"final_loss": 1.4, "steps": 3.0}), NOW)
    assert done.status == Status.SUCCEEDED and done.worker_id == "w-1" and done.error == ""
    assert done.artifacts == {"checkpoint": "ck/3", "adapter": "ad/x"}
    assert done.metrics == {"step": 3.0, "loss": 1.5, "final_loss": 1.4, "steps": 3.0}


def test_a_failure_report_keeps_its_reason_and_a_cancellation_its_worker():
    running = job("job-1", status=Status.RUNNING, worker_id="w-1")
    failed = reported(running, Report(Happening.FAILED, "w-1", reason="out of memory"), NOW)
    assert failed.status == Status.FAILED and failed.error == "out of memory"
    cancelled = reported(running, Report(Happening.CANCELLED, reason="stopped at step 2"), NOW)
    assert cancelled.status == Status.CANCELLED and cancelled.worker_id == "w-1"
    assert cancelled.error == ""
    # a start from the worker the job was just assigned to records it
    on_w2 = job("job-2", worker_id="w-2")
    assert reported(on_w2, Report(Happening.STARTED, "w-2"), NOW).status == Status.RUNNING


def test_reports_that_no_longer_apply_change_nothing():
    on_w2 = job("job-1", worker_id="w-2")
    taken_back_from = Report(Happening.STARTED, "w-1")
    assert taken_back_from.from_another_worker(on_w2)
    assert reported(on_w2, taken_back_from, NOW) is None
    done = job("job-1", status=Status.SUCCEEDED, worker_id="w-1")
    assert reported(done, Report(Happening.FAILED, "w-1", reason="late"), NOW) is None
    assert not Report(Happening.CANCELLED).from_another_worker(on_w2)


# -- spec ---------------------------------------------------------------------------------------

def test_parse_spec_coerces_struct_floats_to_ints():
    spec = parse_spec({"base_model": "org/model", "dataset": "ds-1",
                       "hyperparameters": {"max_steps": 8.0, "batch_size": 2.0},
                       "lora": {"r": 4.0}})
    assert spec.hyperparameters.max_steps == 8 and isinstance(spec.hyperparameters.max_steps, int)
    assert spec.lora.r == 4
    assert spec.model_name() == "model-lora"


def test_parse_spec_names_the_bad_field():
    with pytest.raises(InvalidArgument) as e:
        parse_spec({"base_model": "m", "dataset": "d", "hyperparameters": {"learning_rate": -1}})
    assert e.value.field == "spec.hyperparameters.learning_rate"
    assert "greater than 0" in e.value.reason


def test_parse_spec_reports_every_problem():
    with pytest.raises(InvalidArgument) as e:
        parse_spec({"dataset": "d", "epochs": 3, "hyperparameters": {"max_steps": 2.5}})
    message = str(e.value)
    assert e.value.field == "spec.base_model"
    assert "spec.epochs: Extra inputs are not permitted" in message
    assert "spec.hyperparameters.max_steps" in message


def test_parse_spec_rejects_empty_names():
    with pytest.raises(InvalidArgument) as e:
        parse_spec({"base_model": "m", "dataset": "  "})
    assert e.value.field == "spec.dataset"


@pytest.mark.parametrize("value,expected", [
    ("/models/tiny", True), ("./tiny", True), ("../tiny", True), ("~/tiny", True), (".", True),
    ("HuggingFaceTB/SmolLM2-135M", False), ("gpt2", False),
])
def test_names_a_path(value, expected):
    assert names_a_path(value) is expected


def test_latest_metrics_keeps_the_newest_step_and_extra_keys():
    current = {"step": 5.0, "loss": 1.0, "final_loss": 0.9}
    assert latest_metrics(current, {"step": 3.0, "loss": 2.0}) == current
    assert latest_metrics(current, {"step": 6.0, "loss": 0.8}) == {
        "step": 6.0, "loss": 0.8, "final_loss": 0.9}


# -- workers and placement ----------------------------------------------------------------------

def test_worker_is_live_within_ttl_then_forgotten():
    clock = Clock()
    table = WorkerTable(ttl_s=10, clock=clock)
    table.heartbeat("w1", "idle", device="cuda:0")
    clock.now += 9
    assert [w.worker_id for w in table.live()] == ["w1"]
    assert table.live()[0].device == "cuda:0"
    assert not table.is_lost("w1")
    clock.now += 2
    assert table.is_lost("w1")
    assert table.live() == []
    assert table.is_lost("w1")  # still lost once forgotten


def test_unknown_worker_gets_one_ttl_after_start():
    clock = Clock()
    table = WorkerTable(ttl_s=10, clock=clock)
    assert not table.is_lost("w-from-before-restart")
    clock.now += 10.5
    assert table.is_lost("w-from-before-restart")


def test_place_orders_by_priority_then_age_onto_free_idle_workers():
    clock = Clock()
    table = WorkerTable(ttl_s=10, clock=clock)
    for wid, state in [("w3", "idle"), ("w1", "idle"), ("w2", "busy"), ("w4", "idle")]:
        table.heartbeat(wid, state)
    jobs = [
        job("job-old-low", priority=0, created_at="2025-01-01T00:00:00.000000Z"),
        job("job-new-high", priority=5, created_at="2025-01-03T00:00:00.000000Z"),
        job("job-old-high", priority=5, created_at="2025-01-02T00:00:00.000000Z"),
        job("job-newest-low", priority=0, created_at="2025-01-04T00:00:00.000000Z"),
    ]
    # w4 is idle by heartbeat but already holds an assignment it has not picked up yet
    pairs = place(jobs, table.live(), holding={"w4"})
    assert pairs == [("job-old-high", "w1"), ("job-new-high", "w3")]


def test_place_with_no_free_worker_places_nothing():
    assert place([job("job-1")], [], holding=set()) == []


GIB = 1024**3


def worker(wid: str, device: str = "cpu", memory: int = 0, bf16: bool = False) -> Worker:
    return Worker(wid, "idle", "", device, 0.0, memory_bytes=memory, bf16=bf16)


def full_spec(**kw) -> dict:
    return {"base_model": "/m", "dataset": "d", **kw}


def test_workers_report_memory_and_bf16():
    table = WorkerTable(ttl_s=10, clock=Clock())
    table.heartbeat("w1", "idle", device="cuda:0", memory_bytes=8 * GIB, bf16=True)
    (w,) = table.live()
    assert (w.memory_bytes, w.bf16, w.gpu) == (8 * GIB, True, True)


def test_a_job_goes_only_to_a_worker_that_can_run_it():
    fp16 = job("job-fp16", spec=full_spec(precision="fp16"))
    bf16 = job("job-bf16", spec=full_spec(precision="bf16"))
    paged = job("job-paged", spec=full_spec(hyperparameters={"optimizer": "paged_adamw_8bit"}))
    big = job("job-big", memory=10 * GIB)
    cpu, gpu = worker("cpu"), worker("gpu", device="cuda:0", memory=24 * GIB)
    assert "fp16" in cannot_run(fp16, cpu) and not cannot_run(fp16, gpu)
    assert "paged_adamw_8bit" in cannot_run(paged, cpu)
    assert "bf16" in cannot_run(bf16, cpu) and not cannot_run(bf16, worker("amx", bf16=True))
    assert "GiB" in cannot_run(big, worker("small", memory=4 * GIB))
    assert not cannot_run(big, worker("unknown-memory"))  # 0: not reported, not checked
    assert not cannot_run(big, gpu)


def test_place_skips_workers_too_small_or_without_the_device():
    jobs = [
        job("job-big", priority=9, memory=10 * GIB),
        job("job-fp16", priority=5, spec=full_spec(precision="fp16")),
        job("job-small", priority=0, memory=1 * GIB),
    ]
    workers = [worker("a-small", memory=2 * GIB), worker("b-large", memory=64 * GIB)]
    # the big job passes over the small worker; the fp16 job has no GPU and waits;
    # the small job behind it still gets the small worker
    assert place(jobs, workers, holding=set()) == [("job-big", "b-large"),
                                                   ("job-small", "a-small")]
    assert place(jobs[:1], workers[:1], holding=set()) == []


def test_submit_refuses_a_gpu_spec_when_every_live_worker_is_a_cpu():
    spec = parse_spec(full_spec(precision="fp16"))
    why = refuse_on(spec, [worker("w1"), worker("w2", memory=16 * GIB)])
    assert why.startswith("precision fp16 needs a CUDA GPU")
    assert "live workers: w1 (cpu), w2 (cpu, 16.0 GiB free)" in why
    assert refuse_on(spec, []) == ""  # nobody live: it waits for a capable worker
    assert refuse_on(spec, [worker("w1"), worker("g", device="cuda")]) == ""
    assert refuse_on(parse_spec(full_spec()), [worker("w1")]) == ""


def test_lost_assignments_are_the_jobs_of_silent_workers():
    clock = Clock()
    table = WorkerTable(ttl_s=10, clock=clock)
    table.heartbeat("gone-1", "idle")
    table.heartbeat("gone-2", "busy")
    clock.now += 11
    table.heartbeat("alive", "busy")
    held = [
        job("job-a", worker_id="gone-1", status=Status.QUEUED),
        job("job-b", worker_id="gone-2", status=Status.RUNNING),
        job("job-c", worker_id="alive", status=Status.RUNNING),
    ]
    assert [j.id for j in lost_assignments(held, table)] == ["job-a", "job-b"]


def test_a_running_job_its_live_worker_no_longer_runs_is_disowned():
    clock = Clock()
    table = WorkerTable(ttl_s=10, clock=clock)
    running = [job(f"job-{w}", worker_id=w, status=Status.RUNNING) for w in "abcde"]
    since = {j.id: clock.now for j in running}
    table.heartbeat("a", "busy", "job-a")  # runs it
    table.heartbeat("b", "idle")  # forgot it (restarted under the same id)
    table.heartbeat("c", "busy", "job-x")  # runs another job
    table.heartbeat("d", "idle", ended=("job-d", 1))  # ended it: the report is on its way
    table.heartbeat("e", "idle", ended=("job-e", 7))  # ended another attempt of it
    assert disowned(running, table, since, settle_s=2) == []  # too early to tell
    clock.now += 3
    for w, state, job_id, ended in [("a", "busy", "job-a", ("", 0)), ("b", "idle", "", ("", 0)),
                                    ("c", "busy", "job-x", ("", 0)),
                                    ("d", "idle", "", ("job-d", 1)),
                                    ("e", "idle", "", ("job-e", 7))]:
        table.heartbeat(w, state, job_id, ended=ended)
    assert [j.id for j in disowned(running, table, since, settle_s=2)] == [
        "job-b", "job-c", "job-e"]


def test_silence_while_the_scheduler_was_cut_off_is_forgiven():
    clock = Clock()
    table = WorkerTable(ttl_s=10, clock=clock)
    table.heartbeat("w", "busy", "job-1")
    clock.now += 30
    assert table.is_lost("w") and table.is_lost("never-seen")
    table.forgive_silence()
    assert not table.is_lost("w") and not table.is_lost("never-seen")
    clock.now += 11
    assert table.is_lost("w")


# -- attempts -----------------------------------------------------------------------------------

def test_an_attempt_is_recorded_from_placement_to_its_end():
    placed = assigned(job("job-1"), "w-1", "t1")
    assert placed.worker_id == "w-1" and placed.attempt == 1
    started = reported(placed, Report(Happening.STARTED, "w-1", attempt=1), "t2")
    done = reported(started, Report(Happening.COMPLETED, "w-1", attempt=1), "t3")
    (a,) = done.attempts
    assert (a.attempt, a.worker_id, a.assigned_at, a.started_at, a.ended_at, a.reason) == (
        1, "w-1", "t1", "t2", "t3", "completed")


def test_a_requeued_job_runs_as_the_next_attempt_which_resumes():
    running = reported(assigned(job("job-1"), "w-1", "t1"),
                       Report(Happening.STARTED, "w-1", attempt=1), "t2")
    again = requeued(running, "worker w-1 lost", "t3", lost=True)
    assert again.status == Status.QUEUED and again.worker_id == "" and again.attempt == 2
    assert again.attempts[0].reason == "worker w-1 lost" and again.attempts[0].lost
    second = reported(assigned(again, "w-2", "t4"),
                      Report(Happening.STARTED, "w-2", attempt=2, resumed_from_step=10), "t5")
    assert second.status == Status.RUNNING and second.attempts[1].resumed_from_step == 10
    assert attempts_summary(second) == (
        "attempt 1 on w-1: worker w-1 lost; attempt 2 on w-2: running")
    # a finished job is not requeued
    done = reported(second, Report(Happening.COMPLETED, "w-2", attempt=2), "t6")
    assert requeued(done, "late", "t7", lost=True) is None


def test_reports_of_an_older_attempt_are_fenced_off():
    first = assigned(job("job-1"), "w-1", "t1")
    second = assigned(requeued(first, "worker w-1 lost", "t2", lost=False), "w-1", "t3")
    # the same worker, but the attempt it ran before: its late completion changes nothing
    late = Report(Happening.COMPLETED, "w-1", attempt=1)
    assert late.stale(second) and reported(second, late, "t4") is None
    assert reported(second, Report(Happening.STARTED, "w-1", attempt=2), "t4") is not None


def test_lost_attempts_count_toward_max_attempts_and_released_ones_do_not():
    j = job("job-1", spec={"max_attempts": 2})
    j = requeued(assigned(j, "w-1", "t"), "released: draining", "t", lost=False)
    assert not exhausted(j)  # a drain is not a loss
    j = requeued(assigned(j, "w-2", "t"), "worker w-2 lost", "t", lost=True)
    assert j.lost_attempts == 1 and exhausted(j)  # one more loss would be the second of 2
    assert exhausted(job("job-2", spec={"max_attempts": 1}))


def test_metrics_sample_keeps_only_reported_optional_metrics():
    from services.scheduler.core import metrics_sample

    s = metrics_sample(step=3, max_steps=9, loss=1.0, learning_rate=0.1, tokens_per_s=5.0,
                       samples_per_s=1.0, epoch=0.2, grad_norm=0.5, eval_loss=None)
    assert s["grad_norm"] == 0.5 and "eval_loss" not in s and s["step"] == 3.0


def test_waiting_jobs_age_into_higher_classes_but_never_urgent():
    from datetime import UTC, datetime, timedelta

    from services.scheduler.core import PriorityClass, effective_priority

    submitted = datetime(2025, 1, 1, tzinfo=UTC)
    low = job("low", priority=PriorityClass.LOW, created_at="2025-01-01T00:00:00.000000Z")
    urgent = job("urgent", priority=PriorityClass.URGENT)
    after = submitted + timedelta(seconds=150)
    assert effective_priority(low, after, aging_s=100) == 1.5
    assert effective_priority(low, submitted + timedelta(days=9), aging_s=100) == 2.0
    assert effective_priority(urgent, after, aging_s=100) == 3.0
    assert effective_priority(low, after, aging_s=0) == 0.0  # aging off
    # a low job that waited long enough goes before a newer normal one
    normal = job("normal", priority=PriorityClass.NORMAL, created_at="2025-01-01T00:02:00.000000Z")
    pairs = place([normal, low], [worker("w")], set(), now=after, aging_s=100)
    assert pairs == [("low", "w")]
    assert place([normal, low], [worker("w")], set(), now=after, aging_s=1000) == [("normal", "w")]


def test_priority_class_is_bounded_by_the_callers_roles():
    from llmstudio.errors import PermissionDenied
    from services.scheduler.core import PriorityClass, priority_class

    assert priority_class("", ["developer"]) == PriorityClass.NORMAL
    assert priority_class("high", ["developer"]) == PriorityClass.HIGH
    assert priority_class("urgent", ["admin"]) == PriorityClass.URGENT
    with pytest.raises(PermissionDenied):
        priority_class("urgent", ["developer"])
    with pytest.raises(InvalidArgument):
        priority_class("asap", ["admin"])


def test_preemption_takes_the_lowest_class_below_the_waiting_job_and_never_the_same_class():
    from services.scheduler.core import PriorityClass, preemptions

    table = WorkerTable(ttl_s=10, clock=Clock())
    for w in ("w-low", "w-low-newer", "w-normal", "w-high", "w-cpu"):
        table.heartbeat(w, "busy", device="cuda" if w != "w-cpu" else "cpu")

    def running(job_id, worker_id, cls, assigned_at):
        return dataclasses.replace(job(job_id, worker_id=worker_id, status=Status.RUNNING,
                                       priority=cls), assigned_at=assigned_at)

    busy = [running("low-1", "w-low", PriorityClass.LOW, "t1"),
            running("low-2", "w-low-newer", PriorityClass.LOW, "t2"),
            running("normal", "w-normal", PriorityClass.NORMAL, "t0"),
            running("high", "w-high", PriorityClass.HIGH, "t0")]
    urgent = job("urgent", priority=PriorityClass.URGENT)
    high = job("high-2", priority=PriorityClass.HIGH)
    # the newest of the lowest class goes first; each waiting job takes one victim
    pairs = preemptions([urgent, high], busy, table, set())
    assert [(v.id, j.id) for v, j in pairs] == [("low-2", "urgent"), ("low-1", "high-2")]
    # one already being preempted is not asked again; the same class is never preempted
    assert [v.id for v, _ in preemptions([urgent], busy, table, {"low-1", "low-2"})] == ["normal"]
    assert preemptions([high], busy[2:], table, {"normal"}) == []
    assert preemptions([job("normal-2", priority=PriorityClass.NORMAL)], busy[2:], table,
                       set()) == []
    # a victim whose worker could not run the waiting job frees nothing for it
    gpu_job = job("fp16", priority=PriorityClass.URGENT, spec=full_spec(precision="fp16"))
    on_cpu = [running("low-cpu", "w-cpu", PriorityClass.LOW, "t9")]
    assert preemptions([gpu_job], on_cpu, table, set()) == []


def test_a_paused_running_job_is_paused_once_handed_back():
    on_worker = dataclasses.replace(
        reported(assigned(job("job-1"), "w-1", "t1"), Report(Happening.STARTED, "w-1"), "t2"),
        pause_requested=True)
    paused = requeued(on_worker, "released: paused by k at step 4", "t3", lost=False)
    assert paused.status == Status.PAUSED and not paused.pause_requested
    assert paused.attempt == 2 and paused.worker_id == ""
    assert transition(Status.PAUSED, Happening.RESUMED) == Status.QUEUED
    assert transition(Status.PAUSED, Happening.CANCELLED) == Status.CANCELLED


# -- quotas and fair share ----------------------------------------------------------------------

def tenant_job(job_id: str, tenant: str, created_at: str, **kw) -> Job:
    return dataclasses.replace(job(job_id, created_at=created_at, **kw), tenant=tenant)


def test_free_capacity_is_shared_by_weighted_dominant_share():
    from services.scheduler.core import Quota, Usage

    workers = [worker(f"w{i}") for i in range(4)]
    # acme submitted everything first, but globex holds nothing: they alternate
    queued = [tenant_job(f"a{i}", "acme", f"2025-01-01T00:00:0{i}.000000Z") for i in range(4)]
    queued += [tenant_job(f"g{i}", "globex", f"2025-01-02T00:00:0{i}.000000Z") for i in range(4)]
    pairs = place(queued, workers, set())
    assert [j for j, _ in pairs] == ["a0", "g0", "a1", "g1"]
    # a tenant holding more of the fleet goes after one holding less
    usage = Usage()
    usage.add(tenant_job("held", "acme", "t"), on_gpu=False)
    assert [j for j, _ in place(queued, workers[:1], set(), usage=usage)] == ["g0"]
    # weight 3 vs 1: acme gets three of four free workers
    quotas = {"acme": Quota("acme", weight=3.0)}
    placed = [j for j, _ in place(queued, workers, set(), quotas=quotas)]
    assert sorted(placed) == ["a0", "a1", "a2", "g0"]
    # priority still comes first: a high job of the bigger tenant goes before a normal one
    urgent = tenant_job("a-high", "acme", "2025-01-09T00:00:00.000000Z", priority=2)
    assert place([*queued, urgent], workers[:1], set(), usage=usage) == [("a-high", "w0")]


def test_quotas_hold_jobs_in_the_queue_and_say_why():
    from services.scheduler.core import Quota, Usage, queued_quota_refusal, quota_reason

    workers = [worker(f"w{i}") for i in range(3)]
    queued = [tenant_job(f"a{i}", "acme", f"2025-01-01T00:00:0{i}.000000Z") for i in range(3)]
    one_running = {"acme": Quota("acme", max_running=1)}
    assert [j for j, _ in place(queued, workers, set(), quotas=one_running)] == ["a0"]
    usage = Usage()
    usage.add(queued[0], on_gpu=False)
    assert place(queued[1:], workers, set(), quotas=one_running, usage=usage) == []
    assert quota_reason(queued[1], one_running["acme"], usage) == "quota running 1/1"
    # CPU slots: a 2-process job does not fit in 3 of 4 slots held
    two_procs = tenant_job("a-ddp", "acme", "t", spec={"distributed": {"num_processes": 2}})
    slots = Quota("acme", max_cpu_slots=4)
    usage.add(tenant_job("x", "acme", "t", spec={"distributed": {"num_processes": 2}}), False)
    assert quota_reason(two_procs, slots, usage, on_gpu=False) == "quota cpu slots 3+2/4"
    assert quota_reason(two_procs, slots, usage, on_gpu=True) == ""
    assert queued_quota_refusal(Quota("acme", max_queued=2), 2).startswith("quota queued 2/2")
    assert queued_quota_refusal(Quota("acme", max_queued=2), 1) == ""
    assert queued_quota_refusal(None, 100) == ""
    with pytest.raises(InvalidArgument):
        Quota("acme", max_running=-1)
    with pytest.raises(InvalidArgument):
        Quota("acme", weight=0)


def test_placement_by_process_slots_and_refusal_of_what_no_live_worker_could_run():
    small = Worker("w-small", "idle", "", "cpu", 0.0, slots=1)
    big = Worker("w-big", "idle", "", "cpu", 0.0, slots=4)
    ddp = job("ddp", spec={"distributed": {"num_processes": 2}})
    assert "needs 2 processes" in cannot_run(ddp, small) and cannot_run(ddp, big) == ""
    assert place([ddp], [small, big], set()) == [("ddp", "w-big")]
    spec = parse_spec({"base_model": "org/m", "dataset": "d",
                       "distributed": {"num_processes": 8}})
    assert "needs a worker with 8 slots" in refuse_on(spec, [small, big])
    assert refuse_on(spec, []) == ""  # nobody live: it waits for a capable worker


def test_why_a_job_waits():
    from services.scheduler.core import PriorityClass, Quota, Usage, why_waiting

    w = worker("w1", memory=8 * GIB)
    mine = tenant_job("mine", "acme", "2025-01-02T00:00:00.000000Z")
    ahead = [tenant_job(f"h{i}", "globex", f"2025-01-03T00:00:0{i}.000000Z",
                        priority=PriorityClass.HIGH) for i in range(3)]
    queued = [mine, *ahead]
    assert why_waiting(mine, queued, [w], None, Usage()) == "behind 3 job(s), 3 of class high"
    assert why_waiting(ahead[0], queued, [w], None, Usage()) == (
        "next: waiting for a free worker")
    usage = Usage()
    usage.add(tenant_job("r", "acme", "t"), on_gpu=False)
    assert why_waiting(mine, queued, [w], Quota("acme", max_running=1), usage) == (
        "quota running 1/1")
    huge = dataclasses.replace(mine, memory_estimate={"total": 24 * GIB})
    assert why_waiting(huge, [huge], [w], None, Usage()).startswith(
        "no worker can run it (w1: needs ~24.0 GiB per process")
    assert why_waiting(mine, queued, [], None, Usage()) == "no live worker"
    paused = dataclasses.replace(mine, status=Status.PAUSED)
    assert why_waiting(paused, queued, [w], None, Usage()).startswith("paused")
