"""The registry service against a real nats-server, over real gRPC; its store on SQLite (and on
PostgreSQL where one runs at 127.0.0.1:5432)."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from opentelemetry import trace

from llmstudio import telemetry
from llmstudio.bus import Bus, PublishFailed
from llmstudio.config import Settings
from llmstudio.events import (
    Envelope,
    EvalCompleted,
    JobSucceeded,
    ModelStageChanged,
    ModelVersionRegistered,
    PolicyChanged,
)
from llmstudio.natsserver import free_port
from llmstudio.outbox import Outbox
from llmstudio.v1 import registry_pb2 as pb
from llmstudio.v1 import registry_pb2_grpc
from services.registry import core
from services.registry.app import build
from services.registry.core import Stage, StageRequest
from services.registry.store import RegistryStore, Unit
from services.registry.usecases import Registry, VersionNotRegisteredYet
from tests.support.harness import put_api_key, running

SHA = "5e" * 32
SPEC = {
    "base_model": "/models/smollm2-135m",
    "dataset": "ds-1",
    "method": "lora",
    "lora": {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": None},
    "hyperparameters": {"max_steps": 80, "learning_rate": 0.0002, "batch_size": 8},
}


ACME = "tenants/acme"  # most events here are acme's: its keys live under acme's prefix


def job_completed(job_id: str, model_name: str = "smol-lora",
                  tenant: str = "acme") -> JobSucceeded:
    own = f"tenants/{tenant}"
    return JobSucceeded(
        job_id=job_id, worker_id="w1", model_name=model_name, spec=SPEC, dataset_id="ds-1",
        dataset_sha256=SHA, dataset_artifacts={"train": f"{own}/datasets/{SHA}/train.jsonl"},
        checkpoint_key=f"{own}/jobs/{job_id}/checkpoint-80",
        adapter_key=f"{own}/jobs/{job_id}/checkpoint-80",
        steps=80, final_loss=0.125,
    )


def eval_completed(job_id: str) -> EvalCompleted:
    return EvalCompleted(
        evaluation_id=f"ev-{job_id}", job_id=job_id, model_name="smol-lora",
        base_metrics={"exact_match": 0.0, "perplexity": 40.5},
        tuned_metrics={"exact_match": 0.95, "perplexity": 1.5},
        report_key=f"{ACME}/evaluations/ev-{job_id}/report.json",
    )


async def eventually(fn, timeout: float = 15.0):
    """Retry `fn` (sync or async) until it returns a truthy value without raising."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            result = fn()
            if asyncio.iscoroutine(result):
                result = await result
            if result:
                return result
        except (grpc.aio.AioRpcError, AssertionError):
            if asyncio.get_running_loop().time() > deadline:
                raise
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.1)


class Observer:
    """A test-side bus: publishes job/eval events and records the registry's model events."""

    def __init__(self, settings: Settings):
        self.bus = Bus(settings, "observer")
        self.events: list[tuple[str, object, str]] = []  # (tenant, data, trace id it arrived in)

        async def on_model(env, data):
            self.events.append((env.tenant, data, telemetry.current_trace_id()))

        async def on_dead(env, data):
            self.dead.append(data)

        self.dead: list = []
        self.bus.subscribe_subject("models", "llmstudio.model.>", on_model)
        self.bus.subscribe_subject("dead", "llmstudio.deadletter.>", on_dead)

    async def settled(self, stream: str, durable: str, delivered: int) -> bool:
        """Has `durable` acked `delivered` messages, with none pending or awaiting a retry?"""
        info = await self.bus.js.consumer_info(stream, durable)
        return (info.num_pending, info.num_ack_pending, info.delivered.stream_seq) == (
            0, 0, delivered)

    def of(self, kind: type) -> list:
        return [(t, d, tid) for t, d, tid in self.events if isinstance(d, kind)]


@pytest.fixture
def settings(nats_server, tmp_path):
    return Settings(nats_url=nats_server.url, data_dir=tmp_path, grpc_port=free_port())


@pytest.fixture
async def observer(settings):
    obs = Observer(settings)
    await obs.bus.start()
    yield obs
    await obs.bus.stop()


def stub(channel: grpc.aio.Channel) -> registry_pb2_grpc.RegistryServiceStub:
    return registry_pb2_grpc.RegistryServiceStub(channel)


def md(key: str):
    return (("x-api-key", key),)


async def ungate(observer: Observer, tenant: str) -> None:
    """Announce a policy of `tenant` that gates no stage (as governance would), and wait until
    the registry took it: SetStage then moves versions without promotion requests (the gated
    path: tests/integration/test_promotion.py)."""
    await observer.bus.publish(PolicyChanged(
        policy_id=f"ungated-{tenant}", tenant=tenant, version=1, author="key-admin",
        sha256="0" * 64, yaml="stages: {}\n", gated_stages=[]), tenant=tenant, actor="key-admin")
    await eventually(lambda: observer.settled("GOVERNANCE", "registry-policy-changed", 1))


async def test_registry_end_to_end(settings, observer):
    dev = await put_api_key(settings.nats_url, "developer", "acme")
    viewer = await put_api_key(settings.nats_url, "viewer", "acme")
    outsider = await put_api_key(settings.nats_url, "admin", "globex")
    async with running("registry", build, settings) as port:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            reg = stub(ch)
            await ungate(observer, "acme")

            async def get(version: int, key: str = dev) -> pb.ModelVersion:
                return await reg.GetVersion(
                    pb.GetVersionRequest(model_name="smol-lora", version=version), metadata=md(key))

            async def set_stage(version: int, stage: int, key: str = dev, idem: str = ""):
                return await reg.SetStage(
                    pb.SetStageRequest(model_name="smol-lora", version=version, stage=stage,
                                       idempotency_key=idem),
                    metadata=md(key))

            # A finished job registers version 1, with the lineage of its data and its trace.
            with trace.get_tracer("test").start_as_current_span("submit") as span:
                job_trace = format(span.get_span_context().trace_id, "032x")
                await observer.bus.publish(job_completed("job-1"), tenant="acme", actor="alice")
            v1 = await eventually(lambda: get(1))
            assert (v1.model_name, v1.version, v1.tenant, v1.stage) == (
                "smol-lora", 1, "acme", pb.STAGE_DEVELOPMENT)
            lin = v1.lineage
            assert (lin.dataset_id, lin.dataset_sha256, lin.job_id, lin.base_model, lin.method) == (
                "ds-1", SHA, "job-1", "/models/smollm2-135m", "lora")
            assert lin.trace_id == job_trace
            hp = dict(lin.hyperparameters)
            assert hp["method"] == "lora" and hp["max_steps"] == 80 and hp["batch_size"] == 8
            assert dict(hp["lora"])["r"] == 8
            assert dict(v1.artifacts) == {"checkpoint": f"{ACME}/jobs/job-1/checkpoint-80",
                                          "adapter": f"{ACME}/jobs/job-1/checkpoint-80"}
            assert dict(v1.metrics) == {"final_loss": 0.125, "steps": 80.0}
            assert v1.created_at.endswith("Z") and v1.created_at == v1.updated_at

            await eventually(lambda: observer.of(ModelVersionRegistered))
            [(tenant, registered, event_trace)] = observer.of(ModelVersionRegistered)
            assert tenant == "acme" and event_trace == job_trace  # the event continues the trace
            assert registered == ModelVersionRegistered(
                ref="smol-lora-v1", model_name="smol-lora", version=1, job_id="job-1",
                dataset_sha256=SHA)

            # The same job completing again (a new envelope) is acked and registers nothing new.
            await observer.bus.publish(job_completed("job-1"), tenant="acme", actor="alice")
            await eventually(lambda: observer.settled("JOBS", "registry-job-succeeded", 2))
            await asyncio.sleep(0.3)
            assert len(observer.of(ModelVersionRegistered)) == 1
            assert [v.version for v in (await reg.GetModel(
                pb.GetModelRequest(name="smol-lora"), metadata=md(dev))).versions] == [1]
            # A second job of the same model is version 2.
            await observer.bus.publish(job_completed("job-2"), tenant="acme", actor="alice")
            v2 = await eventually(lambda: get(2))
            assert v2.lineage.job_id == "job-2" and v2.stage == pb.STAGE_DEVELOPMENT
            assert (await get(0)).version == 2  # 0 = latest
            model = await reg.GetModel(pb.GetModelRequest(name="smol-lora"), metadata=md(dev))
            assert [v.lineage.job_id for v in model.versions] == ["job-1", "job-2"]
            await eventually(lambda: len(observer.of(ModelVersionRegistered)) == 2)
            await asyncio.sleep(0.3)
            assert [d.version for _, d, _ in observer.of(ModelVersionRegistered)] == [1, 2]

            # The evaluation of job 1 attaches base-vs-tuned metrics to version 1.
            await observer.bus.publish(eval_completed("job-1"), tenant="acme", actor="evaluator")
            v1 = await eventually(lambda: _with_metric(get(1), "tuned_exact_match"))
            assert v1.metrics["base_exact_match"] == 0.0 and v1.metrics["tuned_exact_match"] == 0.95
            assert v1.metrics["tuned_perplexity"] == 1.5 and v1.metrics["final_loss"] == 0.125
            assert v1.lineage.evaluation_id == "ev-job-1"
            assert v1.artifacts["eval_report"] == f"{ACME}/evaluations/ev-job-1/report.json"

            # Stage lifecycle: v1 development -> staging -> production.
            assert (await set_stage(1, pb.STAGE_STAGING)).stage == pb.STAGE_STAGING
            assert (await set_stage(1, pb.STAGE_PRODUCTION)).stage == pb.STAGE_PRODUCTION
            same = await set_stage(1, pb.STAGE_PRODUCTION)  # same stage: a no-op
            assert same.stage == pb.STAGE_PRODUCTION
            # Promoting v2 archives v1.
            await set_stage(2, pb.STAGE_STAGING)
            promoted = await set_stage(2, pb.STAGE_PRODUCTION, idem="promote-v2")
            assert promoted.stage == pb.STAGE_PRODUCTION
            assert (await get(1)).stage == pb.STAGE_ARCHIVED

            # A retry with the same idempotency key answers without re-applying ...
            again = await set_stage(2, pb.STAGE_PRODUCTION, idem="promote-v2")
            assert again.stage == pb.STAGE_PRODUCTION
            # ... and the key cannot be reused for another request.
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await set_stage(1, pb.STAGE_DEVELOPMENT, idem="promote-v2")
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "idempotency_key" in err.value.details()

            # Archived cannot go straight back to production.
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await set_stage(1, pb.STAGE_PRODUCTION)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "from archived to production" in err.value.details()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await set_stage(1, pb.STAGE_UNSPECIFIED)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert err.value.details().startswith("stage:")
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await set_stage(7, pb.STAGE_STAGING)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND

            # Every applied change is announced, lower-case, in order, by the caller's tenant.
            def changes():
                return [(d.ref, d.from_stage, d.to_stage)
                        for _, d, _ in observer.of(ModelStageChanged)]

            expected = [
                ("smol-lora-v1", "development", "staging"),
                ("smol-lora-v1", "staging", "production"),
                ("smol-lora-v2", "development", "staging"),
                ("smol-lora-v1", "production", "archived"),
                ("smol-lora-v2", "staging", "production"),
            ]
            await eventually(lambda: len(changes()) >= len(expected))
            await asyncio.sleep(0.3)
            assert changes() == expected
            assert {t for t, _, _ in observer.of(ModelStageChanged)} == {"acme"}

            # A viewer reads but may not change stages.
            assert (await get(2, viewer)).stage == pb.STAGE_PRODUCTION
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await set_stage(2, pb.STAGE_ARCHIVED, viewer)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert (await get(2)).stage == pb.STAGE_PRODUCTION

            # Another tenant sees nothing of acme's.
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await reg.GetModel(pb.GetModelRequest(name="smol-lora"), metadata=md(outsider))
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await get(1, outsider)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await set_stage(2, pb.STAGE_ARCHIVED, outsider)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            hidden = await reg.ListModels(pb.ListModelsRequest(), metadata=md(outsider))
            assert list(hidden.models) == []
            assert observer.dead == []  # no registry handler gave up on an event
            listed = await reg.ListModels(pb.ListModelsRequest(), metadata=md(viewer))
            assert [(m.name, [v.stage for v in m.versions]) for m in listed.models] == [
                ("smol-lora", [pb.STAGE_ARCHIVED, pb.STAGE_PRODUCTION])]


async def _with_metric(call, name: str):
    v = await call
    return v if name in v.metrics else None


async def test_evaluation_before_its_version_is_retried_until_the_job_registers(
    settings, observer, caplog
):
    key = await put_api_key(settings.nats_url, "viewer", "acme")
    async with running("registry", build, settings) as port:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            reg = stub(ch)
            await observer.bus.publish(eval_completed("job-7"), tenant="acme", actor="evaluator")
            await asyncio.sleep(0.8)  # the registry has seen it by now, and could not attach it
            # The same job id in another tenant is another tenant's version: not a match.
            await observer.bus.publish(job_completed("job-7", "other", "globex"),
                                       tenant="globex")
            await asyncio.sleep(0.5)
            await observer.bus.publish(job_completed("job-7"), tenant="acme")
            v = await eventually(lambda: _with_metric(
                reg.GetVersion(pb.GetVersionRequest(model_name="smol-lora", version=1),
                               metadata=md(key)), "tuned_exact_match"))
            assert v.lineage.evaluation_id == "ev-job-7" and v.metrics["tuned_exact_match"] == 0.95
            assert any("no model version for job job-7 (tenant acme) yet" in r.getMessage()
                       for r in caplog.records)  # it was refused first, then retried
            assert observer.dead == []
            listed = await reg.ListModels(pb.ListModelsRequest(), metadata=md(key))
            assert [m.name for m in listed.models] == ["smol-lora"]


async def test_events_naming_another_tenants_artifacts_are_parked_as_security_events(
    settings, observer
):
    """globex's success naming acme's checkpoint, and globex's evaluation naming acme's report:
    parked at once (no retries), no version registered or changed."""
    key = await put_api_key(settings.nats_url, "viewer", "globex")
    async with running("registry", build, settings) as port:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            reg = stub(ch)
            await observer.bus.publish(job_completed("job-8"), tenant="globex")
            await observer.bus.publish(eval_completed("job-8"), tenant="globex")
            await eventually(lambda: len(observer.dead) == 2 or None)
            for dead in observer.dead:
                assert dead.reason.startswith("security: ") and dead.deliveries == 1
                assert "not under tenant 'globex'" in dead.reason
            assert {d.consumer for d in observer.dead} == {
                "registry-job-succeeded", "registry-eval-completed"}
            listed = await reg.ListModels(pb.ListModelsRequest(), metadata=md(key))
            assert list(listed.models) == []


# -- store and outbox -------------------------------------------------------------------------


@pytest.fixture
def store(db_url):
    s = RegistryStore(db_url)
    s.migrate()
    yield s
    s.dispose()


def test_store_keeps_versions_per_tenant_and_job(store):
    from sqlalchemy.exc import IntegrityError

    with store.unit() as u:
        assert u.next_version("acme", "smol-lora") == 1
        u.add_version(core.version_from_job(
            "acme", job_completed("job-1"), 1, "t", "2030-01-01T00:00:00.000Z"))
        u.add_version(core.version_from_job(
            "acme", job_completed("job-2"), 2, "t", "2030-01-02T00:00:00.000Z"))
        u.add_version(core.version_from_job(
            "globex", job_completed("job-1"), 1, "t", "2030-01-03T00:00:00.000Z"))
    with store.unit() as u:
        assert u.next_version("acme", "smol-lora") == 3
        found = u.version_by_job("acme", "job-2")
        assert found.version == 2 and found.lineage["hyperparameters"]["lora"]["r"] == 8
        assert found.metrics == {"final_loss": 0.125, "steps": 80.0}
        assert u.get_version("acme", "smol-lora", 0).version == 2
        assert u.get_version("acme", "nope", 0) is None
        [model] = u.models("acme")
        assert (model.name, model.created_at, [v.job_id for v in model.versions]) == (
            "smol-lora", "2030-01-01T00:00:00.000Z", ["job-1", "job-2"])
        assert [v.tenant for v in u.model("globex", "smol-lora").versions] == ["globex"]
        u.save_version(core.with_evaluation(found, eval_completed("job-2"), "later"))
        u.add_stage_request("acme", "k1", StageRequest("smol-lora", 2, Stage.STAGING), "now")
    with store.unit() as u:
        saved = u.get_version("acme", "smol-lora", 2)
        assert saved.metrics["tuned_exact_match"] == 0.95 and saved.updated_at == "later"
        assert u.stage_request("acme", "k1") == StageRequest("smol-lora", 2, Stage.STAGING)
        assert u.stage_request("globex", "k1") is None
    # A second version for the same job is refused by the database, whatever the caller does.
    with pytest.raises(IntegrityError), store.unit() as u:
        u.add_version(core.version_from_job("acme", job_completed("job-1"), 3, "t", "now"))
    with store.unit() as u:
        assert u.next_version("acme", "smol-lora") == 3  # the failed unit was rolled back


class FlakyBus:
    """Stands in for the bus: refuses to publish until `up`, records what it published."""

    service = "registry"

    def __init__(self):
        self.up = False
        self.published: list[tuple[str, str]] = []

    async def publish_in_order(self, messages):
        if not self.up:
            raise PublishFailed(0, ConnectionError("nats is down"))
        for subject, payload, headers in messages:
            assert Envelope.model_validate_json(payload).id == headers["Nats-Msg-Id"]
            self.published.append((headers["Nats-Msg-Id"], subject))


async def test_use_cases_commit_while_nats_is_down_and_publish_later_with_stable_ids(store):
    bus = FlakyBus()
    outbox = Outbox(store, bus, defer_failures=True)
    registry = Registry(store, outbox)
    await store.in_unit(Unit.set_gated_stages, "acme", 1, [], core.now_iso())  # ungated
    # NATS is down: each change is still made and answered; its events wait in the outbox.
    registered = await registry.register_job("acme", "alice", job_completed("job-1"))
    assert (registered.ref, registered.stage) == ("smol-lora-v1", Stage.DEVELOPMENT)
    moved = await registry.set_stage(
        "acme", "alice", StageRequest("smol-lora", 1, Stage.STAGING), "k1")
    assert moved.stage == Stage.STAGING
    assert (await registry.get_version("acme", "smol-lora", 1)).stage == Stage.STAGING
    with store.unit() as u:
        pending = u.pending_events()
    assert [p.subject for p in pending] == [
        "llmstudio.model.version_registered.smol-lora-v1",
        "llmstudio.model.stage_changed.smol-lora-v1"]
    # A redelivered job and a retried request change nothing and announce nothing more.
    assert (await registry.register_job("acme", "alice", job_completed("job-1"))).version == 1
    await registry.set_stage("acme", "alice", StageRequest("smol-lora", 1, Stage.STAGING), "k1")
    bus.up = True
    await outbox.flush()
    # In order, and with the ids written at first: a re-publish would be deduplicated.
    assert bus.published == [
        (Envelope.model_validate_json(p.envelope).id, p.subject) for p in pending]
    with store.unit() as u:
        assert u.pending_events() == []
    await outbox.flush()
    assert len(bus.published) == 2


async def test_use_cases_refuse_bad_arguments_by_field(store):
    from llmstudio.errors import FailedPrecondition, InvalidArgument, NotFound

    registry = Registry(store, Outbox(store, FlakyBus(), defer_failures=True))
    await registry.register_job("acme", "alice", job_completed("job-1"))
    for call, field in [
        (registry.get_version("acme", " ", 1), "model_name"),
        (registry.get_version("acme", "smol-lora", -1), "version"),
        (registry.get_model("acme", ""), "name"),
        (registry.set_stage("acme", "a", StageRequest("smol-lora", 0, Stage.STAGING)), "version"),
    ]:
        with pytest.raises(InvalidArgument) as err:
            await call
        assert err.value.field == field
    with pytest.raises(NotFound):
        await registry.set_stage("globex", "a", StageRequest("smol-lora", 1, Stage.STAGING))
    with pytest.raises(FailedPrecondition):
        await registry.set_stage("acme", "a", StageRequest("smol-lora", 1, Stage.PRODUCTION))
    with pytest.raises(VersionNotRegisteredYet):  # another tenant's job is not this one
        await registry.attach_evaluation("globex", eval_completed("job-1"))
