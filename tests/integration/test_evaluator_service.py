"""The evaluator against a real nats-server: a real tiny adapter evaluated base vs tuned, read
back over gRPC, tenant-scoped, idempotent, resumed after a restart, its outcome announced
through the outbox; and a `method: full` job evaluated and registered (with the registry)."""

from __future__ import annotations

import asyncio
import json
import math

import grpc
import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

from opentelemetry import trace  # noqa: E402

from llmstudio import telemetry  # noqa: E402
from llmstudio.bus import Bus  # noqa: E402
from llmstudio.config import Settings  # noqa: E402
from llmstudio.events import EvalCompleted, EvalFailed, JobSucceeded  # noqa: E402
from llmstudio.jobspec import JobSpec  # noqa: E402
from llmstudio.ml.checkpoint import checkpoint_kind, store_prefix  # noqa: E402
from llmstudio.ml.tiny import build_tiny_model  # noqa: E402
from llmstudio.natsserver import free_port  # noqa: E402
from llmstudio.outbox import Outbox  # noqa: E402
from llmstudio.storage import LocalArtifactStore  # noqa: E402
from llmstudio.v1 import evaluation_pb2, evaluation_pb2_grpc, registry_pb2_grpc  # noqa: E402
from llmstudio.v1 import registry_pb2 as reg_pb  # noqa: E402
from services.evaluator.app import build  # noqa: E402
from services.evaluator.core import completed, evaluation_for_job, outcome_event  # noqa: E402
from services.evaluator.store import EvaluationStore  # noqa: E402
from services.registry.app import build as build_registry  # noqa: E402
from services.trainer.recipes import TrainRequest, train  # noqa: E402
from tests.support.harness import put_api_key, running  # noqa: E402

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.slow]  # trains

ROWS = [{"prompt": f"say {w} twice:", "completion": f" {w} {w}"}
        for w in ("apple", "river", "stone", "cat", "dog", "moon", "sun", "tree",
                  "bird", "fish", "rain", "snow", "fire", "wind", "road", "ship")]


@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> str:
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "m"))


def trained_checkpoint(spec: JobSpec, out_dir):
    """The last checkpoint of the trainer's recipe for `spec`, run on ROWS."""
    result = train(TrainRequest(spec, ROWS, out_dir))
    assert result.steps == spec.hyperparameters.max_steps and result.adapter_dir is not None
    return result.adapter_dir


@pytest.fixture(scope="module")
def trained(base_model, tmp_path_factory):
    """The spec and last checkpoint of an 8-step LoRA job on ROWS."""
    spec = JobSpec(
        base_model=base_model, dataset="ds-1", lora={"r": 8, "alpha": 16, "dropout": 0.0},
        hyperparameters={"max_steps": 8, "batch_size": 4, "learning_rate": 2e-2, "seed": 1},
        eval={"max_samples": 4, "max_new_tokens": 8},
    )
    return spec, trained_checkpoint(spec, tmp_path_factory.mktemp("run"))


def job_completed(job_id: str, spec: JobSpec, artifacts: dict[str, str], ckpt: str,
                  model_name: str = "tiny-lora") -> JobSucceeded:
    return JobSucceeded(
        job_id=job_id, worker_id="w1", model_name=model_name, spec=spec.model_dump(mode="json"),
        dataset_id="ds-1", dataset_sha256="ab" * 32, dataset_artifacts=artifacts,
        checkpoint_key=ckpt, adapter_key=ckpt, steps=spec.hyperparameters.max_steps,
        final_loss=1.0,
    )


def leave_behind(settings: Settings, *evaluations, announce=()) -> None:
    """What a previous evaluator process left in its database: `evaluations` running, and the
    outcomes `announce` committed with their events still in the outbox (it died before
    publishing them)."""
    store = EvaluationStore(settings.db_url("evaluator"))
    outbox = Outbox(store, Bus(settings, "evaluator"))
    try:
        store.migrate()
        with store.unit() as u:
            for ev in (*evaluations, *announce):
                u.add(ev)
            for ev in announce:
                outbox.add(u, outcome_event(ev), tenant=ev.tenant, actor=ev.actor,
                           traceparent=ev.traceparent)
    finally:
        store.dispose()


async def _wait(pred, timeout=60.0, what="condition"):
    deadline = asyncio.get_running_loop().time() + timeout
    while not pred():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_evaluates_base_vs_tuned_over_the_bus_and_grpc(nats_server, tmp_path, trained):
    spec, adapter_dir = trained
    settings = Settings(nats_url=nats_server.url, data_dir=tmp_path, grpc_port=free_port())
    store = LocalArtifactStore(tmp_path / "artifacts")
    ckpt = store.put_dir(store_prefix("acme", "job-1", 8), adapter_dir).rstrip("/")
    val = store.put_blob("\n".join(json.dumps(r) for r in ROWS).encode(), "tenants/acme/datasets")
    artifacts = {"train": val, "validation": val}
    acme = await put_api_key(nats_server.url, "viewer", "acme")
    other = await put_api_key(nats_server.url, "viewer", "other")

    # A previous process left an evaluation running (resumed at start, in its job's trace) and
    # one finished whose event it never published (the outbox publishes it at start).
    tp = "00-" + "c" * 32 + "-" + "d" * 16 + "-01"
    left = evaluation_for_job(job_completed("job-0", spec, artifacts, ckpt), tenant="acme",
                              actor="", traceparent=tp)
    unannounced = completed(
        evaluation_for_job(job_completed("job-9", spec, artifacts, ckpt), tenant="acme",
                           actor="bob", traceparent=tp),
        {"eval_loss": 2.0}, {"eval_loss": 1.0}, "tenants/acme/evaluations/ev-9/report.json")
    leave_behind(settings, left, announce=[unannounced])

    events, traces = [], {}
    client = Bus(settings, "test")

    async def record(env, data):
        traces[env.id] = telemetry.current_trace_id()
        events.append((env, data))

    client.subscribe_subject("evals", "llmstudio.eval.>", record)

    def of(cls, job_id):
        return [(e, d) for e, d in events if isinstance(d, cls) and d.job_id == job_id]

    async with running("evaluator", build, settings) as port:
        await client.start()
        try:
            done = job_completed("job-1", spec, artifacts, ckpt)
            with trace.get_tracer("test").start_as_current_span("submit") as span:
                await client.publish(done, tenant="acme", actor="alice")
                job_trace = format(span.get_span_context().trace_id, "032x")
            await _wait(lambda: of(EvalCompleted, "job-1") or of(EvalFailed, "job-1"), what="eval")
            assert not of(EvalFailed, "job-1"), of(EvalFailed, "job-1")
            env, ev = of(EvalCompleted, "job-1")[0]
            assert env.tenant == "acme" and env.actor == "alice" and traces[env.id] == job_trace
            assert ev.model_name == "tiny-lora" and ev.evaluation_id.startswith("ev-")
            for m in (ev.base_metrics, ev.tuned_metrics):
                assert set(m) == {"eval_loss", "perplexity", "exact_match"}
                assert math.isfinite(m["eval_loss"]) and 0.0 <= m["exact_match"] <= 1.0
            # the adapter learned the training distribution
            assert ev.tuned_metrics["eval_loss"] < ev.base_metrics["eval_loss"]

            report = json.loads(store.get_bytes(ev.report_key))
            assert ev.report_key == f"tenants/acme/evaluations/{ev.evaluation_id}/report.json"
            assert report["tuned"]["metrics"] == ev.tuned_metrics and report["samples"] == 4
            assert report["base"]["examples"] and "prediction" in report["tuned"]["examples"][0]
            assert not (tmp_path / "eval-cache" / ev.evaluation_id).exists()

            # the resumed one completed too, in the trace stored with it
            await _wait(lambda: of(EvalCompleted, "job-0"), what="resumed evaluation")
            env0, ev0 = of(EvalCompleted, "job-0")[0]
            assert ev0.evaluation_id == left.id and traces[env0.id] == "c" * 32
            # the outcome left in the outbox was published, once, as it was committed
            [(env9, ev9)] = of(EvalCompleted, "job-9")
            assert ev9 == outcome_event(unannounced) and traces[env9.id] == "c" * 32
            assert (env9.tenant, env9.actor, env9.source) == ("acme", "bob", "evaluator")

            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = evaluation_pb2_grpc.EvaluationServiceStub(ch)
                as_acme, as_other = (("x-api-key", acme),), (("x-api-key", other),)
                got = await stub.GetEvaluation(
                    evaluation_pb2.GetEvaluationRequest(id=ev.evaluation_id), metadata=as_acme)
                assert (got.job_id, got.tenant, got.status) == ("job-1", "acme", "completed")
                assert dict(got.tuned_metrics) == pytest.approx(ev.tuned_metrics)
                assert dict(got.base_metrics) == pytest.approx(ev.base_metrics)
                assert got.report_key == ev.report_key and got.created_at

                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.GetEvaluation(
                        evaluation_pb2.GetEvaluationRequest(id=ev.evaluation_id), metadata=as_other)
                assert err.value.code() == grpc.StatusCode.NOT_FOUND
                listed = await stub.ListEvaluations(
                    evaluation_pb2.ListEvaluationsRequest(job_id="job-1"), metadata=as_other)
                assert list(listed.evaluations) == []

                # the same JobSucceeded again (a new event id, so not deduplicated by NATS)
                await client.publish(done, tenant="acme", actor="alice")
                await asyncio.sleep(1.5)
                listed = await stub.ListEvaluations(
                    evaluation_pb2.ListEvaluationsRequest(job_id="job-1"), metadata=as_acme)
                assert [e.id for e in listed.evaluations] == [ev.evaluation_id]
                assert len(of(EvalCompleted, "job-1")) == 1
                everything = await stub.ListEvaluations(
                    evaluation_pb2.ListEvaluationsRequest(), metadata=as_acme)
                assert {e.job_id for e in everything.evaluations} == {"job-0", "job-1", "job-9"}
                assert len(of(EvalCompleted, "job-9")) == 1

                # a job whose dataset has no validation split: failed, with the reason
                await client.publish(job_completed("job-2", spec, {"train": val}, ckpt),
                                     tenant="acme")
                await _wait(lambda: of(EvalFailed, "job-2"), what="EvalFailed")
                reason = of(EvalFailed, "job-2")[0][1].reason
                assert "no 'validation' split" in reason
                failed = (await stub.ListEvaluations(
                    evaluation_pb2.ListEvaluationsRequest(job_id="job-2"), metadata=as_acme)
                ).evaluations[0]
                assert failed.status == "failed" and failed.error == reason
        finally:
            await client.stop()


async def test_a_full_fine_tune_is_evaluated_and_registered(nats_server, tmp_path, base_model):
    """A `method: full` job: its checkpoint holds every weight (no adapter); the evaluator loads
    it as the tuned model and the registry attaches the evaluation to the job's version."""
    spec = JobSpec(
        base_model=base_model, dataset="ds-1", method="full",
        hyperparameters={"max_steps": 2, "batch_size": 8, "learning_rate": 3e-3, "seed": 1},
        eval={"max_samples": 2, "max_new_tokens": 4},
    )
    checkpoint = trained_checkpoint(spec, tmp_path / "run")
    assert checkpoint_kind(checkpoint) == "full"
    store = LocalArtifactStore(tmp_path / "artifacts")
    ckpt = store.put_dir(store_prefix("acme", "job-full", 2), checkpoint).rstrip("/")
    val = store.put_blob("\n".join(json.dumps(r) for r in ROWS).encode(), "tenants/acme/datasets")
    job = job_completed("job-full", spec, {"train": val, "validation": val}, ckpt,
                        model_name="tiny-full")
    developer = await put_api_key(nats_server.url, "developer", "acme")

    def settings() -> Settings:  # one data dir (artifacts), a gRPC port each
        return Settings(nats_url=nats_server.url, data_dir=tmp_path, grpc_port=free_port())

    evals: list[EvalCompleted | EvalFailed] = []
    client = Bus(settings(), "test")

    async def record(env, data):
        evals.append(data)

    client.subscribe_subject("evals", "llmstudio.eval.>", record)
    async with (running("evaluator", build, settings()),
                running("registry", build_registry, settings()) as registry_port):
        await client.start()
        try:
            await client.publish(job, tenant="acme", actor="alice")
            await _wait(lambda: evals, timeout=120, what="the evaluation's outcome")
            [ev] = evals
            assert isinstance(ev, EvalCompleted), ev
            assert (ev.job_id, ev.model_name) == ("job-full", "tiny-full")
            assert set(ev.tuned_metrics) == {"eval_loss", "perplexity", "exact_match"}
            # the tuned model is the checkpoint's weights: two steps on these rows lower the loss
            assert ev.tuned_metrics["eval_loss"] < ev.base_metrics["eval_loss"]

            async with grpc.aio.insecure_channel(f"127.0.0.1:{registry_port}") as ch:
                registry = registry_pb2_grpc.RegistryServiceStub(ch)
                request = reg_pb.GetVersionRequest(model_name="tiny-full", version=1)
                md = (("x-api-key", developer),)

                async def evaluated_version():
                    """The job's version once the evaluation is attached to it, else None."""
                    try:
                        v = await registry.GetVersion(request, metadata=md)
                    except grpc.aio.AioRpcError as e:
                        assert e.code() == grpc.StatusCode.NOT_FOUND  # not registered yet
                        return None
                    return v if v.lineage.evaluation_id else None

                deadline = asyncio.get_running_loop().time() + 30
                while (version := await evaluated_version()) is None:
                    assert asyncio.get_running_loop().time() < deadline, "not attached in 30 s"
                    await asyncio.sleep(0.1)
            assert (version.lineage.job_id, version.lineage.method) == ("job-full", "full")
            assert version.lineage.evaluation_id == ev.evaluation_id
            assert version.artifacts["checkpoint"] == ckpt
            assert version.artifacts["eval_report"] == ev.report_key
            assert version.metrics["tuned_eval_loss"] == pytest.approx(
                ev.tuned_metrics["eval_loss"])
            assert version.metrics["base_eval_loss"] == pytest.approx(ev.base_metrics["eval_loss"])
        finally:
            await client.stop()


async def test_create_evaluation_on_demand_with_suites_tasks_and_intervals(
        nats_server, tmp_path, trained, base_model):
    """CreateEvaluation over real gRPC: a registry version (known from its events) on a dataset
    version's test split, the generation suite plus a multiple-choice file (a server path under
    the import roots) and a custom task (an artifact of the tenant); every metric comes back with
    its paired bootstrap interval. Idempotent by key; another tenant gets NOT_FOUND; a viewer
    cannot create; keys and paths outside the tenant or the roots are refused; a base model is
    evaluated alone. The automatic evaluation of the job reports intervals too."""
    from llmstudio.events import DatasetRegistered, ModelVersionRegistered

    spec, adapter_dir = trained
    roots = tmp_path / "imports"
    roots.mkdir()
    mc_path = roots / "mc.jsonl"
    mc_path.write_text("\n".join(json.dumps(r) for r in [
        {"query": f"say {w} twice:", "choices": [f"{w} {w}", "no"], "gold": 0}
        for w in ("apple", "river", "stone")]))
    (tmp_path / "outside.jsonl").write_text(mc_path.read_text())
    settings = Settings(nats_url=nats_server.url, data_dir=tmp_path, grpc_port=free_port(),
                        dataset_import_roots=[roots])
    store = LocalArtifactStore(tmp_path / "artifacts")
    ckpt = store.put_dir(store_prefix("acme", "job-1", 8), adapter_dir).rstrip("/")
    val = store.put_blob("\n".join(json.dumps(r) for r in ROWS).encode(), "tenants/acme/datasets")
    qa = store.put_blob(json.dumps({"input": "say cat twice:", "expected": "cat"}).encode(),
                        "tenants/acme/datasets")
    artifacts = {"train": val, "validation": val, "test": val}
    developer = (("x-api-key", await put_api_key(nats_server.url, "developer", "acme")),)
    viewer = (("x-api-key", await put_api_key(nats_server.url, "viewer", "acme")),)
    other = (("x-api-key", await put_api_key(nats_server.url, "developer", "other")),)
    evals = []
    client = Bus(settings, "test")

    async def record(env, data):
        evals.append(data)

    client.subscribe_subject("evals", "llmstudio.eval.>", record)

    async with running("evaluator", build, settings) as port:
        await client.start()
        try:
            await client.publish(DatasetRegistered(
                dataset_id="ds-1", name="words", sha256="ab" * 32, format="jsonl",
                num_rows=16, train_rows=16, validation_rows=16, artifacts=artifacts),
                tenant="acme")
            await client.publish(job_completed("job-1", spec, artifacts, ckpt), tenant="acme")
            await client.publish(ModelVersionRegistered(
                ref="tiny-lora-v1", model_name="tiny-lora", version=1, job_id="job-1",
                dataset_sha256="ab" * 32), tenant="acme")
            await _wait(lambda: evals, what="the job's evaluation")
            assert isinstance(evals[0], EvalCompleted), evals[0]

            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = evaluation_pb2_grpc.EvaluationServiceStub(ch)
                auto = await stub.GetEvaluation(evaluation_pb2.GetEvaluationRequest(
                    id=evals[0].evaluation_id), metadata=developer)
                assert {c.name for c in auto.comparisons} == {
                    "eval_loss", "perplexity", "exact_match"}
                loss = next(c for c in auto.comparisons if c.name == "eval_loss")
                assert loss.diff == pytest.approx(auto.tuned_metrics["eval_loss"]
                                                  - auto.base_metrics["eval_loss"])
                assert loss.tuned_better == (loss.ci_high < 0) and not loss.higher_is_better

                tasks = [evaluation_pb2.TaskFile(name="mc", path=str(mc_path)),
                         evaluation_pb2.TaskFile(name="qa", key=qa, scoring="contains")]
                req = evaluation_pb2.CreateEvaluationRequest(
                    model_name="tiny-lora", version=1, dataset_id="ds-1", split="test",
                    suite="generation", tasks=tasks, max_samples=6, max_new_tokens=6,
                    bootstrap_samples=200, seed=5, idempotency_key="k1")

                async def create(r=req, md=developer):
                    deadline = asyncio.get_running_loop().time() + 30
                    while True:  # the version's event may still be on its way
                        try:
                            return await stub.CreateEvaluation(r, metadata=md)
                        except grpc.aio.AioRpcError as e:
                            if (e.code() != grpc.StatusCode.NOT_FOUND
                                    or asyncio.get_running_loop().time() > deadline):
                                raise
                            await asyncio.sleep(0.2)

                ev = await create()
                assert ev.status == "running" and ev.split == "test" and ev.version == 1
                assert (await create()).id == ev.id  # same idempotency key: same evaluation

                async def finished(eid, md=developer):
                    deadline = asyncio.get_running_loop().time() + 120
                    while True:
                        got = await stub.GetEvaluation(
                            evaluation_pb2.GetEvaluationRequest(id=eid), metadata=md)
                        if got.status != "running":
                            return got
                        assert asyncio.get_running_loop().time() < deadline, "not finished"
                        await asyncio.sleep(0.2)

                done = await finished(ev.id)
                assert done.status == "completed", done.error
                names = {c.name for c in done.comparisons}
                assert names == {"eval_loss", "perplexity", "exact_match", "token_f1", "bleu",
                                 "chrf", "rouge_l", "mc/acc", "mc/acc_norm", "qa/score"}
                for c in done.comparisons:
                    assert c.ci_low <= c.ci_high and c.samples > 0
                    assert c.diff == pytest.approx(c.tuned - c.base)
                    assert c.tuned == pytest.approx(done.tuned_metrics[c.name])
                    assert c.tuned_better == (c.ci_low > 0 if c.higher_is_better
                                              else c.ci_high < 0)
                assert next(c for c in done.comparisons if c.name == "mc/acc").samples == 3
                report = json.loads(store.get_bytes(done.report_key))
                assert report["split"] == "test" and report["bootstrap"]["resamples"] == 200
                assert len(evals) == 1  # a requested evaluation is not announced

                # another tenant: neither the evaluation nor the version nor the dataset
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.GetEvaluation(evaluation_pb2.GetEvaluationRequest(id=ev.id),
                                             metadata=other)
                assert err.value.code() == grpc.StatusCode.NOT_FOUND
                for r in (evaluation_pb2.CreateEvaluationRequest(
                              model_name="tiny-lora", version=1, dataset_id="ds-1"),
                          evaluation_pb2.CreateEvaluationRequest(
                              base_model=base_model, dataset_id="ds-1")):
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await stub.CreateEvaluation(r, metadata=other)
                    assert err.value.code() == grpc.StatusCode.NOT_FOUND
                # a viewer reads, never creates
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.CreateEvaluation(req, metadata=viewer)
                assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
                # task files outside the tenant or the roots
                for bad in (evaluation_pb2.TaskFile(name="x", key="tenants/other/datasets/q"),
                            evaluation_pb2.TaskFile(name="x", path=str(tmp_path / "outside.jsonl")),
                            evaluation_pb2.TaskFile(name="x", path=str(roots / "missing.jsonl"))):
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await stub.CreateEvaluation(evaluation_pb2.CreateEvaluationRequest(
                            model_name="tiny-lora", version=1, dataset_id="ds-1",
                            tasks=[bad]), metadata=developer)
                    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, bad
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.CreateEvaluation(evaluation_pb2.CreateEvaluationRequest(
                        model_name="tiny-lora", version=1, dataset_id="ds-1", suite="nope"),
                        metadata=developer)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

                # a base model alone: its metrics, no comparison
                alone = await create(evaluation_pb2.CreateEvaluationRequest(
                    base_model=base_model, dataset_id="ds-1", split="validation",
                    max_samples=2, max_new_tokens=4))
                alone = await finished(alone.id)
                assert alone.status == "completed", alone.error
                assert set(alone.base_metrics) == {"eval_loss", "perplexity", "exact_match"}
                assert not alone.comparisons and not alone.tuned_metrics
                assert alone.base_metrics["eval_loss"] == pytest.approx(
                    done.base_metrics["eval_loss"], rel=1e-6)  # same rows, same base
        finally:
            await client.stop()
