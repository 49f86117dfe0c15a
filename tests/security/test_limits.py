"""Limits an attacker with a user's credentials (or none) runs into: names that would become
bad subjects are refused at submit, a row NATS can never take does not hold back the outbox,
oversized messages are refused before they are read into memory, every listing pages, and a
slow WatchJob reader cannot make the scheduler hold unbounded updates. Real nats-server, real
gRPC servers on loopback, real stores."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from google.protobuf.struct_pb2 import Struct

from llmstudio.bus import Bus
from llmstudio.client import Client
from llmstudio.config import Settings
from llmstudio.events import DeadLettered, Envelope, ModelStageChanged, ModelVersionRegistered
from llmstudio.grpcutil import MAX_MESSAGE_BYTES
from llmstudio.natsserver import free_port
from llmstudio.outbox import Outbox
from llmstudio.v1 import jobs_pb2, jobs_pb2_grpc
from services.dataset.core import DatasetRecord
from services.dataset.store import VERSIONS, DatasetStore
from services.dataset.store import Unit as DatasetUnit
from services.evaluator.core import Evaluation
from services.evaluator.store import EVALUATIONS, EvaluationStore
from services.evaluator.store import Unit as EvaluationUnit
from services.registry.core import ModelVersion, Stage
from services.registry.store import MODELS, RegistryStore
from services.registry.store import Unit as RegistryUnit
from services.scheduler.app import build as build_scheduler
from services.scheduler.core import Job, Status
from services.scheduler.watch import WATCH_QUEUE_LIMIT, Watchers
from tests.support.bus import all_stream_messages, stream_messages
from tests.support.harness import put_api_key, running
from tests.support.models import config_only_model

TENANT = "acme"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def settings(nats_server, tmp_path):
    return Settings(nats_url=nats_server.url, data_dir=tmp_path / "data", grpc_port=free_port())


def md(key: str) -> tuple[tuple[str, str], ...]:
    return (("x-api-key", key),)


def struct(d: dict) -> Struct:
    s = Struct()
    s.update(d)
    return s


# -- names --------------------------------------------------------------------------------------

async def test_a_job_name_that_is_no_subject_token_is_refused_at_submit(settings, tmp_path):
    model = config_only_model(tmp_path / "tiny-model", {"model_type": "llama"})
    dev = await put_api_key(settings.nats_url, "developer", TENANT)
    async with running("scheduler", build_scheduler, settings) as port, \
            grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = jobs_pb2_grpc.JobServiceStub(channel)
        for bad in ("a b", "m.v1", "a>", "*", "../x", "x" * 65):
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.CreateJob(jobs_pb2.CreateJobRequest(spec=struct(
                    {"base_model": str(model), "dataset": "ds-1", "name": bad})), metadata=md(dev))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bad
            assert e.value.details().startswith("spec.name:"), bad
        assert (await stub.ListJobs(jobs_pb2.ListJobsRequest(), metadata=md(dev))).jobs == []
        # a good name, and a default name made from a base model whose name holds dots
        job = await stub.CreateJob(jobs_pb2.CreateJobRequest(spec=struct(
            {"base_model": str(model), "dataset": "ds-1", "name": "x" * 64})), metadata=md(dev))
        assert job.model_name == "x" * 64
        dotted = tmp_path / "Qwen2.5-0.5B"
        dotted.mkdir()
        (dotted / "config.json").write_text('{"model_type": "llama"}')
        job = await stub.CreateJob(jobs_pb2.CreateJobRequest(spec=struct(
            {"base_model": str(dotted), "dataset": "ds-1"})), metadata=md(dev))
        assert job.model_name == "Qwen2-5-0-5B-lora"


# -- the outbox ---------------------------------------------------------------------------------

def stage_changed(version: int) -> ModelStageChanged:
    return ModelStageChanged(ref=f"m-v{version}", model_name="m", version=version,
                             from_stage="staging", to_stage="production")


@pytest.mark.parametrize("refused", ["bad subject", "oversized payload"])
async def test_a_row_nats_never_takes_is_parked_and_the_rows_after_it_go_out(
    nats_server, tmp_path, refused
):
    store = RegistryStore(f"sqlite:///{tmp_path / 'o.db'}")
    store.migrate()
    bus = Bus(Settings(nats_url=nats_server.url, data_dir=tmp_path), "registry")
    outbox = Outbox(store, bus)
    await bus.start()
    try:
        if refused == "bad subject":  # what `spec.name: "a b"` made before names were checked
            poison = ModelVersionRegistered(ref="a b-v1", model_name="a b", version=1,
                                            job_id="job-1", dataset_sha256="ab" * 32)
        else:  # over the server's max_payload (1 MiB)
            poison = ModelStageChanged(ref="m-v0", model_name="m", version=0,
                                       from_stage="x" * (2 << 20), to_stage="production")
        with store.unit() as u:
            outbox.add(u, poison, tenant="globex")
            for version in (1, 2, 3):
                outbox.add(u, stage_changed(version), tenant=TENANT)
        with store.unit() as u:
            [poison_row, *_] = u.pending_events()
        await asyncio.wait_for(outbox.flush(), 20)  # nothing raised: the poison row is parked

        messages = await stream_messages(nats_server.url, "llmstudio.model.stage_changed.>", 3)
        assert [Envelope.model_validate_json(m.data).data["version"] for m in messages] == [
            1, 2, 3]
        with store.unit() as u:
            assert u.pending_events() == []
        [letter] = await all_stream_messages(nats_server.url, "llmstudio.deadletter.>")
        assert letter.subject == "llmstudio.deadletter.registry-outbox"
        env = Envelope.model_validate_json(letter.data)
        parked = DeadLettered.model_validate(env.data)
        assert env.tenant == "globex"
        assert parked.original_subject == poison_row.subject
        assert parked.payload == poison_row.envelope[:65536]
        assert parked.reason.startswith("refused by NATS:")
        # the good rows went out after it, and nothing is left to retry
        await outbox.flush()
        assert len(await all_stream_messages(nats_server.url, "llmstudio.model.>")) == 3
    finally:
        await bus.stop()
        store.dispose()


# -- message size and concurrency ---------------------------------------------------------------

def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of process `pid`, in KiB."""
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return {name: int(fields[name].split()[0]) for name in ("VmRSS", "VmHWM")}


def unknown_field(size: int) -> bytes:
    """A length-delimited field number 15 of `size` bytes, in protobuf's wire format."""
    header, n = bytearray([15 << 3 | 2]), size
    while n >= 0x80:
        header.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes([*header, n]) + b"x" * size


@contextlib.contextmanager
def service_process(name: str, settings: Settings, **env: str):
    """`python -m services.<name>` as a process of its own; yields (pid, port) once ready."""
    ready = settings.data_dir / "run" / f"{name}.ready"
    proc = subprocess.Popen(
        [sys.executable, "-m", f"services.{name}"], cwd=ROOT,
        env={**os.environ, "LLMSTUDIO_NATS_URL": settings.nats_url,
             "LLMSTUDIO_DATA_DIR": str(settings.data_dir),
             "LLMSTUDIO_GRPC_PORT": str(settings.grpc_port), **env})
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None, f"{name} exited with {proc.returncode}"
            assert time.monotonic() < deadline, f"{name} not ready in 60s"
            time.sleep(0.1)
        yield proc.pid, int(ready.read_text().split()[1])
    finally:
        proc.terminate()
        proc.wait(30)


async def test_a_200_mib_message_without_a_key_is_refused_before_it_is_read(settings):
    """gRPC core refuses the message by its length as it arrives: the server never holds it
    (its peak RSS grows by far less than the 200 MiB sent), and it answers the next call."""
    viewer = await put_api_key(settings.nats_url, "viewer", TENANT)
    with service_process("registry", settings) as (pid, port):
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", -1)]
        ) as channel:
            list_models = channel.unary_unary("/llmstudio.v1.RegistryService/ListModels")
            await list_models(b"", metadata=md(viewer))  # warm: the server's buffers exist
            before = memory_kib(pid)
            payload = unknown_field(200 << 20)  # a valid ListModelsRequest: 200 MiB to skip
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await list_models(payload, timeout=60)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert str(MAX_MESSAGE_BYTES) in e.value.details()
            del payload
            after = memory_kib(pid)
            assert after["VmHWM"] - before["VmHWM"] < 50 << 10, (before, after)
            assert await list_models(b"", metadata=md(viewer)) == b""  # still serving


async def test_rpcs_past_the_cap_are_refused(settings, monkeypatch, tmp_path):
    """Two WatchJob streams hold both places of a scheduler capped at 2; a third call is
    RESOURCE_EXHAUSTED at once, and served once a stream ends."""
    monkeypatch.setenv("LLMSTUDIO_GRPC_MAX_CONCURRENT_RPCS", "2")
    model = config_only_model(tmp_path / "tiny-model", {"model_type": "llama"})
    dev = await put_api_key(settings.nats_url, "developer", TENANT)
    async with running("scheduler", build_scheduler, settings) as port, \
            grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = jobs_pb2_grpc.JobServiceStub(channel)
        job = await stub.CreateJob(jobs_pb2.CreateJobRequest(spec=struct(
            {"base_model": str(model), "dataset": "ds-1"})), metadata=md(dev))
        watches = [stub.WatchJob(jobs_pb2.WatchJobRequest(id=job.id), metadata=md(dev))
                   for _ in range(2)]
        for watch in watches:
            assert (await watch.read()).kind == "status"  # both streams are open
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.GetJob(jobs_pb2.GetJobRequest(id=job.id), metadata=md(dev))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        watches[0].cancel()
        deadline = time.monotonic() + 10
        while True:
            try:
                got = await stub.GetJob(jobs_pb2.GetJobRequest(id=job.id), metadata=md(dev))
                break
            except grpc.aio.AioRpcError as e:
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert time.monotonic() < deadline, "the ended stream's place was not freed"
                await asyncio.sleep(0.1)
        assert got.id == job.id
        watches[1].cancel()


# -- paging -------------------------------------------------------------------------------------

async def test_jobs_list_in_pages_every_job_once(settings, tmp_path):
    """250 jobs in pages of 100: every job exactly once, newest first, and the last page says
    so; a bad page size or token is INVALID_ARGUMENT; the SDK and the CLI follow the pages."""
    model = config_only_model(tmp_path / "tiny-model", {"model_type": "llama"})
    dev = await put_api_key(settings.nats_url, "developer", TENANT)
    other = await put_api_key(settings.nats_url, "developer", "globex")
    async with running("scheduler", build_scheduler, settings) as port, \
            grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = jobs_pb2_grpc.JobServiceStub(channel)
        request = jobs_pb2.CreateJobRequest(spec=struct({"base_model": str(model),
                                                         "dataset": "ds-1"}))
        created = [(await stub.CreateJob(request, metadata=md(dev))).id for _ in range(250)]
        await stub.CreateJob(request, metadata=md(other))  # another tenant's: in no page

        pages, token = [], ""
        while True:
            page = await stub.ListJobs(jobs_pb2.ListJobsRequest(page_size=100, page_token=token),
                                       metadata=md(dev))
            pages.append([j.id for j in page.jobs])
            token = page.next_page_token
            if not token:
                break
        assert [len(p) for p in pages] == [100, 100, 50]
        assert [job_id for p in pages for job_id in p] == created[::-1]  # each once, newest first
        default = await stub.ListJobs(jobs_pb2.ListJobsRequest(), metadata=md(dev))
        assert [j.id for j in default.jobs] == pages[0] and default.next_page_token

        for bad, field in ((jobs_pb2.ListJobsRequest(page_size=1001), "page_size"),
                           (jobs_pb2.ListJobsRequest(page_size=-1), "page_size"),
                           (jobs_pb2.ListJobsRequest(page_token="not-a-token"), "page_token"),
                           (jobs_pb2.ListJobsRequest(page_token=base64.urlsafe_b64encode(
                               b'["2030-01-01", 7]').decode()), "page_token")):
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.ListJobs(bad, metadata=md(dev))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert e.value.details().startswith(f"{field}:")

        sdk = Client(api_key=dev, settings=Settings(
            scheduler_addr=f"127.0.0.1:{port}", data_dir=tmp_path / "no-stack"))
        assert [j.id for j in await asyncio.to_thread(sdk.jobs.list)] == created[::-1]
        assert [j.id for j in await asyncio.to_thread(sdk.jobs.list, "", 120)] == (
            created[::-1][:120])
        cli = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "llmstudio.cli", "--data-dir", str(tmp_path / "no-stack"),
            "--json", "jobs", "list", "--api-key", dev, "--limit", "150",
            env={**os.environ, "LLMSTUDIO_SCHEDULER_ADDR": f"127.0.0.1:{port}"},
            stdout=asyncio.subprocess.PIPE, cwd=ROOT)
        out, _ = await cli.communicate()
        assert [j["id"] for j in json.loads(out)] == created[::-1][:150]


# -- WatchJob -----------------------------------------------------------------------------------

def a_job(status: Status, version: int) -> Job:
    return Job(id="job-1", tenant=TENANT, status=status, spec={}, model_name="m",
               dataset_id="ds-1", priority=1, created_by="key-1", created_at="t", updated_at="t",
               version=version)


async def test_a_slow_watcher_holds_a_bounded_number_of_updates():
    """100,000 samples and status changes to a stream nobody reads: the queue stays at its
    limit, the oldest samples go first, and every status change and the newest samples stay."""
    watchers = Watchers()
    running_job = a_job(Status.RUNNING, 2)
    with watchers.watch("job-1") as queue:
        watchers.status(running_job)
        for step in range(1, 100_001):
            watchers.metrics(running_job, step, {"loss": 1.0})
        watchers.checkpoint(running_job, 100_000, "ck/100000")
        watchers.status(a_job(Status.SUCCEEDED, 3))
        assert queue.qsize() == WATCH_QUEUE_LIMIT
        unread = [queue.get_nowait() for _ in range(queue.qsize())]
    assert [(u.kind, u.job.status) for u in unread if u.kind != "metrics"] == [
        ("status", Status.RUNNING), ("checkpoint", Status.RUNNING),
        ("status", Status.SUCCEEDED)]
    steps = [u.step for u in unread if u.kind == "metrics"]
    assert steps == list(range(100_001 - (WATCH_QUEUE_LIMIT - 3), 100_001))

    # with no sample left to drop, the oldest update goes; the newest is always kept
    with watchers.watch("job-1") as queue:
        for version in range(1, 1001):
            watchers.status(a_job(Status.RUNNING if version < 1000 else Status.FAILED, version))
        assert queue.qsize() == WATCH_QUEUE_LIMIT
        versions = [queue.get_nowait().job.version for _ in range(WATCH_QUEUE_LIMIT)]
    assert versions == list(range(1001 - WATCH_QUEUE_LIMIT, 1001))


def read_every_page(unit_list, listing, size: int) -> list[list]:
    """Every page of a store listing, through its tokens as a client would pass them."""
    pages, token = [], ""
    while True:
        page = unit_list(listing.page(size, token))
        pages.append(list(page))
        token = page.next_page_token
        if not token:
            return pages


@pytest.mark.parametrize("listing", ["datasets", "models", "evaluations"])
def test_the_other_listings_page_every_item_once(db_url, listing):
    """Ties in the first sort column (same name, same creation time) page by the second."""
    when = datetime(2030, 1, 1, tzinfo=UTC)
    if listing == "datasets":
        store = DatasetStore(db_url)
        items = [DatasetRecord(
            id=f"ds-{name}{v}", tenant=TENANT, name=name, sha256=f"{name}{v}", format="text",
            num_rows=1, train_rows=1, validation_rows=0, artifacts={}, split_sha256={},
            validation_fraction=0.0, seed=0, created_at="t", created_by="k", version=v)
            for name in ("a", "b", "c") for v in (1, 2, 3)]
        add, keyed, query = DatasetUnit.add, VERSIONS, lambda u, p: u.versions(TENANT, page=p)
        expected = 9
    elif listing == "models":
        store = RegistryStore(db_url)
        items = [ModelVersion(tenant=TENANT, model_name=f"m{i}", version=v,
                              stage=Stage.DEVELOPMENT, job_id=f"job-{i}-{v}", created_at="t",
                              updated_at="t") for i in range(7) for v in (1, 2)]
        add, keyed, query = RegistryUnit.add_version, MODELS, lambda u, p: u.models(TENANT, p)
        expected = 7  # models, each with its 2 versions
    else:
        store = EvaluationStore(db_url)
        items = [Evaluation(id=f"ev-{i}", job_id=f"job-{i}", tenant=TENANT, job={},
                            created_at=when + timedelta(seconds=i // 3)) for i in range(9)]
        add, keyed, query = EvaluationUnit.add, EVALUATIONS, lambda u, p: u.of_tenant(TENANT,
                                                                                     page=p)
        expected = 9
    store.migrate()
    try:
        with store.unit() as u:
            for item in items:
                add(u, item)
        with store.unit() as u:
            everything = query(u, None)
            pages = read_every_page(lambda p: query(u, p), keyed, 2)
        assert everything.next_page_token == "" and len(everything) == expected
        assert all(len(p) == 2 for p in pages[:-1]) and 1 <= len(pages[-1]) <= 2
        assert [keyed.sort_key(i) for p in pages for i in p] == [
            keyed.sort_key(i) for i in everything]
        if listing == "models":  # each model on its page with all its versions
            assert all([v.version for v in m.versions] == [1, 2] for p in pages for m in p)
    finally:
        store.dispose()
