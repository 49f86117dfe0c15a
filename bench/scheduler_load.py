"""The scheduler under load: 1,000 jobs submitted over gRPC, placed on 20 simulated workers.

The scheduler runs as its own process (`python -m services.scheduler`, environment as
`llmstudio up` sets it: SQLite under a temporary data dir, traces to a file) against a real
nats-server. This process plays everyone else on one `Bus`:
- the submitters: IN_FLIGHT concurrent `CreateJob` calls (grpc.aio, a developer API key written
  into the key bucket as governance would) until JOBS are acked;
- the dataset service: for each JobSubmitted it publishes DatasetValidated at once (the job is
  queued; the real service would first check the dataset's files);
- WORKERS trainer-workers: each heartbeats every `heartbeat_interval_s` (2 s, as the trainer),
  consumes its work items (`llmstudio.work.<worker>`, stream WORK) and, like the trainer, beats
  busy on accepting one, reports JobStarted and JobCompleted (the job takes no time: the
  scheduler never rests) and beats idle at once.

Measured:
- submit throughput: jobs / (first CreateJob sent -> last acked);
- dispatch latency: from the moment a job could be placed -- it was queued (JobQueued's time)
  and the worker it went to was free (had reported its previous job and beaten idle) -- to its
  work item reaching that worker. With instant jobs 20 workers drain far fewer jobs per second
  than are submitted, so most jobs wait for a free worker; that wait is the fleet's size, not
  the scheduler, and is reported apart as the queue wait (JobQueued -> work item). The part of
  the dispatch up to the scheduler's decision (JobAssigned's time) is printed beside it;
- the scheduler's peak RSS (VmHWM) and CPU seconds over the whole run.
Every job must be placed exactly once and end `succeeded` (ListJobs), or the run fails. This
process shares the machine's cores with the scheduler, as the embedded stack's services do.

Baseline: the targets on this 2-core machine (value = dispatch p99, baseline = its 1 s target;
the other figures each against their own target).

    .venv/bin/python -m bench.scheduler_load
    LLMSTUDIO_BENCH_JOBS=200 LLMSTUDIO_BENCH_WORKERS=5 .venv/bin/python -m bench.scheduler_load
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.protobuf.struct_pb2 import Struct

from bench.common import write_result
from llmstudio.auth import Principal, hash_secret, new_secret
from llmstudio.bus import Bus
from llmstudio.config import Settings
from llmstudio.events import (
    DatasetValidated,
    Envelope,
    InvalidEvent,
    JobAssigned,
    JobCompleted,
    JobQueued,
    JobStarted,
    JobSubmitted,
    WorkerHeartbeat,
    WorkItem,
    decode,
)
from llmstudio.grpcutil import health_check
from llmstudio.natsserver import free_port, start_nats_server
from llmstudio.v1 import jobs_pb2 as pb
from llmstudio.v1 import jobs_pb2_grpc

REPO = Path(__file__).resolve().parents[1]
JOBS = int(os.environ.get("LLMSTUDIO_BENCH_JOBS", "1000"))
WORKERS = int(os.environ.get("LLMSTUDIO_BENCH_WORKERS", "20"))
IN_FLIGHT = 32  # concurrent CreateJob calls
STALL_S = 60.0  # no job completed for this long: the run ends and fails
TARGETS = {"dispatch_p99_s": 1.0, "submit_jobs_per_s": 200.0, "peak_rss_mb": 300.0}
TENANT = "bench"
SHA = "0" * 64
WORKER_MEMORY = 64 << 30  # what each simulated worker offers a job
# A small Llama's config.json (SmolLM2-135M's shape): CreateJob reads it for the memory estimate.
MODEL_CONFIG = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 576,
    "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
    "num_key_value_heads": 3, "vocab_size": 49152, "max_position_embeddings": 8192,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16",
}


@dataclass
class JobTimes:
    """One job's moments, in this machine's wall-clock seconds."""

    submitted: float = 0.0  # CreateJob acked
    queued: float = 0.0  # JobQueued's envelope time (the scheduler's commit)
    assigned: float = 0.0  # JobAssigned's envelope time (the scheduler's decision)
    delivered: float = 0.0  # its work item reached a worker
    placeable: float = 0.0  # queued, and the worker it went to was free
    work_items: int = 0  # how many work items named it (exactly one when all is well)


class Fleet:
    """The dataset service and the simulated workers, on one Bus; a tap records the scheduler's
    JobQueued / JobAssigned times."""

    def __init__(self, settings: Settings, workers: int):
        self.bus = Bus(settings, "bench")
        self.interval_s = settings.heartbeat_interval_s
        self.worker_ids = [f"sim-{i:02d}" for i in range(workers)]
        self.running: dict[str, str] = dict.fromkeys(self.worker_ids, "")  # worker -> job
        self.free_since: dict[str, float] = {}
        self.jobs: dict[str, JobTimes] = {}
        self.completed = 0
        self.bus.subscribe(JobSubmitted, durable="dataset-submitted", handler=self.on_submitted)
        for wid in self.worker_ids:
            self.bus.subscribe(WorkItem, durable=f"work-{wid}", entity=wid,
                               handler=self._work_handler(wid))

    def times(self, job_id: str) -> JobTimes:
        return self.jobs.setdefault(job_id, JobTimes())

    async def start(self) -> None:
        await self.bus.start()
        for subject in (f"{JobQueued.SUBJECT}.*", f"{JobAssigned.SUBJECT}.*"):
            await self.bus.nc.subscribe(subject, cb=self._tap)

    async def heartbeats(self) -> None:
        """Every worker beats idle now (free from now on), then every `interval_s`."""
        now = time.time()
        for wid in self.worker_ids:
            self.free_since[wid] = now
        while True:
            for wid in self.worker_ids:
                await self.beat(wid)
            await asyncio.sleep(self.interval_s)

    async def beat(self, wid: str) -> None:
        job_id = self.running[wid]
        await self.bus.publish_core(WorkerHeartbeat(
            worker_id=wid, state="busy" if job_id else "idle", job_id=job_id,
            memory_bytes=WORKER_MEMORY))

    async def _tap(self, msg) -> None:
        try:
            env, data = decode(msg.data)
        except InvalidEvent:
            return
        if isinstance(data, JobQueued):
            self.times(data.job_id).queued = env.time.timestamp()
        elif isinstance(data, JobAssigned):
            self.times(data.job_id).assigned = env.time.timestamp()

    async def on_submitted(self, env: Envelope, data: JobSubmitted) -> None:
        train = f"tenants/{env.tenant}/datasets/{SHA}/train.jsonl"
        await self.bus.publish(
            DatasetValidated(job_id=data.job_id, dataset_id=data.dataset_id, sha256=SHA,
                             artifacts={"train": train}),
            tenant=env.tenant, actor="dataset")

    def _work_handler(self, wid: str):
        async def on_work(env: Envelope, item: WorkItem) -> None:
            t = self.times(item.job_id)
            t.work_items += 1
            t.delivered = t.delivered or time.time()
            t.placeable = self.free_since[wid]  # max() with `queued` once the tap has it
            self.running[wid] = item.job_id
            await self.beat(wid)
            report = {"tenant": env.tenant, "actor": wid}
            await self.bus.publish(JobStarted(job_id=item.job_id, worker_id=wid), **report)
            await self.bus.publish(JobCompleted(
                job_id=item.job_id, worker_id=wid, model_name=item.model_name, spec=item.spec,
                dataset_id=item.dataset_id, dataset_sha256=item.dataset_sha256,
                dataset_artifacts=item.dataset_artifacts, checkpoint_key="",
                adapter_key=f"tenants/{env.tenant}/jobs/{item.job_id}/adapter", steps=1,
                final_loss=0.0,
            ), **report)
            self.running[wid] = ""
            self.free_since[wid] = time.time()
            self.completed += 1
            await self.beat(wid)

        return on_work


# -- the scheduler process ----------------------------------------------------------------------


def start_scheduler(
    nats_url: str, data_dir: Path, timeout: float = 60,
) -> tuple[subprocess.Popen, str]:
    """`python -m services.scheduler` with the embedded stack's environment: (process, gRPC
    address) once it serves."""
    port = free_port()
    env = dict(os.environ, LLMSTUDIO_DATA_DIR=str(data_dir), LLMSTUDIO_NATS_URL=nats_url,
               LLMSTUDIO_GRPC_PORT=str(port),
               LLMSTUDIO_OTEL_EXPORTER=os.environ.get(
                   "LLMSTUDIO_OTEL_EXPORTER", f"file:{data_dir / 'traces.jsonl'}"))
    log_path = data_dir / "scheduler.log"
    with log_path.open("ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "services.scheduler"], env=env, cwd=REPO,
                                stdout=log, stderr=subprocess.STDOUT)
    addr = f"127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while not ((data_dir / "run" / "scheduler.ready").exists()
               and health_check(addr) == "SERVING"):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_scheduler(proc)
            tail = log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"scheduler did not start; log tail:\n{tail}")
        time.sleep(0.1)
    return proc, addr


def stop_scheduler(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _status_mb(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


# -- the run ------------------------------------------------------------------------------------


async def _api_key(bus: Bus) -> str:
    """A developer key of TENANT, written into the key bucket as governance would."""
    secret = new_secret()
    principal = Principal(f"key-{uuid.uuid4().hex[:8]}", TENANT, ("developer",), "bench")
    await (await bus.kv()).put(hash_secret(secret), principal.to_json())
    return secret


async def _submit(addr: str, key: str, spec: Struct, jobs: int, fleet: Fleet) -> float:
    """JOBS CreateJob calls, IN_FLIGHT at a time; returns the wall time from first to last."""
    remaining = iter(range(jobs))
    async with grpc.aio.insecure_channel(addr) as channel:
        stub = jobs_pb2_grpc.JobServiceStub(channel)

        async def submitter() -> None:
            for _ in remaining:
                job = await stub.CreateJob(pb.CreateJobRequest(spec=spec),
                                           metadata=(("x-api-key", key),), timeout=60)
                fleet.times(job.id).submitted = time.time()

        t0 = time.perf_counter()
        await asyncio.gather(*(submitter() for _ in range(IN_FLIGHT)))
        return time.perf_counter() - t0


async def _succeeded(addr: str, key: str, submitted: set[str]) -> int:
    """How many of the submitted jobs ListJobs has as succeeded."""
    async with grpc.aio.insecure_channel(addr) as channel:
        listed = await jobs_pb2_grpc.JobServiceStub(channel).ListJobs(
            pb.ListJobsRequest(status=pb.JOB_STATUS_SUCCEEDED), metadata=(("x-api-key", key),))
    return len(submitted & {job.id for job in listed.jobs})


async def _drive(fleet: Fleet, key: str, addr: str, model_dir: Path, jobs: int) -> dict:
    spec = Struct()
    spec.update({"name": "bench-load", "base_model": str(model_dir), "dataset": "ds-bench",
                 "hyperparameters": {"max_steps": 1}})
    beating = asyncio.create_task(fleet.heartbeats())
    try:
        t0 = time.perf_counter()
        submit_s = await _submit(addr, key, spec, jobs, fleet)
        done, progressed = 0, time.monotonic()
        while fleet.completed < jobs and time.monotonic() - progressed < STALL_S:
            if fleet.completed > done:
                done, progressed = fleet.completed, time.monotonic()
            await asyncio.sleep(0.05)
        drain_s = time.perf_counter() - t0
        submitted = {job_id for job_id, t in fleet.jobs.items() if t.submitted}
        succeeded = await _succeeded(addr, key, submitted)
        deadline = time.monotonic() + STALL_S
        while succeeded < jobs and time.monotonic() < deadline:
            await asyncio.sleep(0.5)  # the last reports are still being handled
            succeeded = await _succeeded(addr, key, submitted)
    finally:
        beating.cancel()
    return {"submit_s": submit_s, "drain_s": drain_s, "succeeded": succeeded}


def _percentiles(xs: list[float]) -> dict:
    if len(xs) < 2:  # next to nothing was placed: the run fails on that, not here
        return dict.fromkeys(("p50", "p99", "max"), max(xs, default=math.nan))
    cuts = statistics.quantiles(xs, n=100, method="inclusive")
    return {"p50": cuts[49], "p99": cuts[98], "max": max(xs)}


def measure(nats_url: str, data_dir: Path, jobs: int = JOBS, workers: int = WORKERS) -> dict:
    """Run the load against a scheduler process on `nats_url`: the figures, how many work items
    named each job (`work_items`) and how many jobs ended succeeded."""
    return asyncio.run(_measure(nats_url, data_dir, jobs, workers))


async def _measure(nats_url: str, data_dir: Path, jobs: int, workers: int) -> dict:
    model_dir = data_dir / "models" / "small-llama"
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.json").write_text(json.dumps(MODEL_CONFIG))
    fleet = Fleet(Settings(nats_url=nats_url, data_dir=data_dir), workers)
    await fleet.start()
    try:
        key = await _api_key(fleet.bus)
        proc, addr = await asyncio.to_thread(start_scheduler, nats_url, data_dir)
        try:
            idle_rss_mb = _status_mb(proc.pid, "VmRSS")
            cpu0 = _cpu_s(proc.pid)
            run = await _drive(fleet, key, addr, model_dir, jobs)
            peak_rss_mb = _status_mb(proc.pid, "VmHWM")
            cpu_s = _cpu_s(proc.pid) - cpu0
        finally:
            await asyncio.to_thread(stop_scheduler, proc)
    finally:
        await fleet.bus.stop()

    placed = [t for t in fleet.jobs.values() if t.work_items]
    for t in placed:
        t.placeable = max(t.placeable, t.queued)
    dispatch = [t.delivered - t.placeable for t in placed]
    decision = [t.assigned - t.placeable for t in placed if t.assigned]
    queue_wait = [t.delivered - t.queued for t in placed if t.queued]
    return {
        "jobs": jobs, "workers": workers, "in_flight": IN_FLIGHT,
        "submit_jobs_per_s": jobs / run["submit_s"],
        "dispatch_s": _percentiles(dispatch),
        "decision_s": _percentiles(decision),
        "queue_wait_s": _percentiles(queue_wait),
        "drain_s": run["drain_s"], "completed_jobs_per_s": fleet.completed / run["drain_s"],
        "peak_rss_mb": peak_rss_mb, "idle_rss_mb": idle_rss_mb, "scheduler_cpu_s": cpu_s,
        "succeeded": run["succeeded"],
        "work_items": {job_id: t.work_items for job_id, t in fleet.jobs.items()},
    }


def main() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        server = start_nats_server(Path(tmp) / "nats")
        try:
            m = measure(server.url, Path(tmp) / "data")
        finally:
            server.stop()
    work_items = m.pop("work_items")
    unplaced = [j for j, n in work_items.items() if n == 0]
    twice = [j for j, n in work_items.items() if n > 1]
    figures = [
        ("submit throughput", m["submit_jobs_per_s"], "jobs/s", ">=", "submit_jobs_per_s"),
        ("dispatch p50", m["dispatch_s"]["p50"], "s", "", ""),
        ("dispatch p99", m["dispatch_s"]["p99"], "s", "<", "dispatch_p99_s"),
        ("  to JobAssigned p99", m["decision_s"]["p99"], "s", "", ""),
        ("queue wait p50", m["queue_wait_s"]["p50"], "s", "", ""),
        ("queue wait p99", m["queue_wait_s"]["p99"], "s", "", ""),
        ("drain (jobs/s)", m["completed_jobs_per_s"], "jobs/s", "", ""),
        ("scheduler peak RSS", m["peak_rss_mb"], "MB", "<", "peak_rss_mb"),
        ("scheduler CPU", m["scheduler_cpu_s"], "s", "", ""),
    ]
    print(f"{m['jobs']} jobs, {m['workers']} workers, {IN_FLIGHT} CreateJob in flight")
    for label, value, unit, op, target in figures:
        goal = f"   target {op} {TARGETS[target]:g}" if target else ""
        print(f"{label:24s}{value:10.3f} {unit:7s}{goal}")
    print(f"{'succeeded':24s}{m['succeeded']:10d} of {m['jobs']}; placed twice: {len(twice)}, "
          f"never: {len(unplaced)}")
    met = {
        "dispatch_p99_s": m["dispatch_s"]["p99"] < TARGETS["dispatch_p99_s"],
        "submit_jobs_per_s": m["submit_jobs_per_s"] >= TARGETS["submit_jobs_per_s"],
        "peak_rss_mb": m["peak_rss_mb"] < TARGETS["peak_rss_mb"],
    }
    result = write_result(
        "scheduler_load", value=m["dispatch_s"]["p99"], baseline=TARGETS["dispatch_p99_s"],
        unit="s", targets=TARGETS, met=met, placed_twice=twice, never_placed=unplaced, **m,
    )
    if twice or unplaced or m["succeeded"] != m["jobs"]:
        raise SystemExit("scheduler_load: not every job was placed exactly once and succeeded")
    return result


if __name__ == "__main__":
    main()
