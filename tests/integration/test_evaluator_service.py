"""The evaluator against a real nats-server: a real tiny adapter evaluated base vs tuned, read
back over gRPC, tenant-scoped, idempotent, resumed after a restart."""

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
from llmstudio.events import EvalCompleted, EvalFailed, JobCompleted, make_envelope  # noqa: E402
from llmstudio.jobspec import JobSpec  # noqa: E402
from llmstudio.ml.tiny import build_tiny_model  # noqa: E402
from llmstudio.natsserver import free_port  # noqa: E402
from llmstudio.storage import LocalArtifactStore  # noqa: E402
from llmstudio.v1 import evaluation_pb2, evaluation_pb2_grpc  # noqa: E402
from services.evaluator.app import build  # noqa: E402
from services.evaluator.core import evaluation_for_job  # noqa: E402
from services.evaluator.store import EvaluationStore  # noqa: E402
from services.trainer.recipe import train_lora_sft  # noqa: E402
from tests.support.harness import put_api_key, running  # noqa: E402

ROWS = [{"prompt": f"say {w} twice:", "completion": f" {w} {w}"}
        for w in ("apple", "river", "stone", "cat", "dog", "moon", "sun", "tree",
                  "bird", "fish", "rain", "snow", "fire", "wind", "road", "ship")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny base model and an 8-step LoRA checkpoint trained on ROWS."""
    model_dir = str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "m"))
    spec = JobSpec(
        base_model=model_dir, dataset="ds-1", lora={"r": 8, "alpha": 16, "dropout": 0.0},
        hyperparameters={"max_steps": 8, "batch_size": 4, "learning_rate": 2e-2, "seed": 1},
        eval={"max_samples": 4, "max_new_tokens": 8},
    )
    result = train_lora_sft(spec, model_dir, ROWS, tmp_path_factory.mktemp("run"))
    assert result.steps == 8 and result.adapter_dir is not None
    return spec, result.adapter_dir


def job_completed(job_id: str, spec: JobSpec, artifacts: dict[str, str], ckpt: str) -> JobCompleted:
    return JobCompleted(
        job_id=job_id, worker_id="w1", model_name="tiny-lora", spec=spec.model_dump(mode="json"),
        dataset_id="ds-1", dataset_sha256="ab" * 32, dataset_artifacts=artifacts,
        checkpoint_key=ckpt, adapter_key=ckpt, steps=8, final_loss=1.0,
    )


async def _wait(pred, timeout=60.0, what="condition"):
    deadline = asyncio.get_running_loop().time() + timeout
    while not pred():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_evaluates_base_vs_tuned_over_the_bus_and_grpc(nats_server, tmp_path, trained):
    spec, adapter_dir = trained
    settings = Settings(nats_url=nats_server.url, data_dir=tmp_path, grpc_port=free_port())
    store = LocalArtifactStore(tmp_path / "artifacts")
    ckpt = store.put_dir("jobs/job-1/checkpoint-8", adapter_dir).rstrip("/")
    val = store.put_blob("\n".join(json.dumps(r) for r in ROWS).encode())
    artifacts = {"train": val, "validation": val}
    acme = await put_api_key(nats_server.url, "viewer", "acme")
    other = await put_api_key(nats_server.url, "viewer", "other")

    # An evaluation a previous process left running: resumed at start, in its job's trace.
    job0 = job_completed("job-0", spec, artifacts, ckpt)
    left = evaluation_for_job(make_envelope(job0, source="trainer", tenant="acme"), job0,
                              traceparent="00-" + "c" * 32 + "-" + "d" * 16 + "-01")
    EvaluationStore(settings.db_url("evaluator")).create(left)

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
            assert ev.report_key == f"evaluations/{ev.evaluation_id}/report.json"
            assert report["tuned"]["metrics"] == ev.tuned_metrics and report["samples"] == 4
            assert report["base"]["examples"] and "prediction" in report["tuned"]["examples"][0]
            assert not (tmp_path / "eval-cache" / ev.evaluation_id).exists()

            # the resumed one completed too, in the trace stored with it
            await _wait(lambda: of(EvalCompleted, "job-0"), what="resumed evaluation")
            env0, ev0 = of(EvalCompleted, "job-0")[0]
            assert ev0.evaluation_id == left.id and traces[env0.id] == "c" * 32

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

                # the same JobCompleted again (a new event id, so not deduplicated by NATS)
                await client.publish(done, tenant="acme", actor="alice")
                await asyncio.sleep(1.5)
                listed = await stub.ListEvaluations(
                    evaluation_pb2.ListEvaluationsRequest(job_id="job-1"), metadata=as_acme)
                assert [e.id for e in listed.evaluations] == [ev.evaluation_id]
                assert len(of(EvalCompleted, "job-1")) == 1
                everything = await stub.ListEvaluations(
                    evaluation_pb2.ListEvaluationsRequest(), metadata=as_acme)
                assert {e.job_id for e in everything.evaluations} == {"job-0", "job-1"}

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
