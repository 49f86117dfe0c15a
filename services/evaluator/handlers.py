"""job.completed -> an evaluation: base vs tuned on the validation split, in the background.

The handler only records the evaluation (idempotent on the job) and starts a task, so the
message is acked at once. The task runs in the handler's trace context (asyncio tasks inherit
it), so EvalCompleted/EvalFailed continue the job's trace; an evaluation resumed after a restart
re-attaches the traceparent stored with it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import threading
from pathlib import Path

from opentelemetry import context as otel_context
from opentelemetry import trace

from llmstudio import telemetry
from llmstudio.bus import Bus
from llmstudio.config import Settings
from llmstudio.events import Envelope, EvalCompleted, EvalFailed, EventData, JobCompleted
from llmstudio.jsonl import parse_jsonl
from llmstudio.ml.evaluation import evaluate_model
from llmstudio.storage import ArtifactStore

from .core import (
    COMPLETED,
    FAILED,
    RUNNING,
    EvalPlan,
    Evaluation,
    build_report,
    evaluation_for_job,
    plan,
    report_key,
)
from .store import EvaluationStore

log = logging.getLogger(__name__)
tracer = trace.get_tracer("evaluator")


class Evaluations:
    def __init__(self, settings: Settings, bus: Bus, store: EvaluationStore, artifacts: ArtifactStore):
        self.settings = settings
        self.bus = bus
        self.store = store
        self.artifacts = artifacts
        # Evaluating is CPU/GPU-bound: one at a time, the others wait their turn.
        self._slot = asyncio.Semaphore(1)
        self._tasks: set[asyncio.Task] = set()  # strong references until they finish
        # Evaluation ids with a task in this process: resume() must not start a second one for
        # an evaluation the consumer created between bus start and the on_started hook.
        self._active: set[str] = set()
        self._stopping = threading.Event()  # read by the evaluation thread between batches

    def subscribe(self) -> None:
        self.bus.subscribe(JobCompleted, durable="job-completed", handler=self.on_job_completed)

    async def on_job_completed(self, env: Envelope, data: EventData) -> None:
        if not isinstance(data, JobCompleted):
            return
        ev = evaluation_for_job(env, data, telemetry.traceparent())
        if not self.store.create(ev):
            log.info("job %s already has an evaluation: nothing to do", data.job_id)
            return
        self._spawn(ev)

    async def resume(self) -> None:
        """At start: rerun what a previous process left running, announce what it did not."""
        for ev in self.store.unfinished():
            log.info("resuming evaluation %s (%s)", ev.id, ev.status)
            ctx = telemetry.extract({"traceparent": ev.traceparent} if ev.traceparent else {})
            self._spawn(ev, ctx)

    async def stop(self) -> None:
        self._stopping.set()
        for t in self._tasks:
            t.cancel()  # a cancelled evaluation stays "running" and resumes at the next start
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, ev: Evaluation, ctx: otel_context.Context | None = None) -> None:
        if ev.id in self._active:
            return
        self._active.add(ev.id)
        task = asyncio.create_task(self._run(ev, ctx), name=f"eval-{ev.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(lambda _: self._active.discard(ev.id))

    async def _run(self, ev: Evaluation, ctx: otel_context.Context | None) -> None:
        token = otel_context.attach(ctx) if ctx is not None else None
        try:
            with tracer.start_as_current_span(f"evaluate {ev.job_id}", attributes={"evaluation.id": ev.id}):
                if ev.status == RUNNING:
                    async with self._slot:
                        ev = await self._evaluate(ev)
                await self._announce(ev)
        finally:
            if token is not None:
                otel_context.detach(token)

    async def _evaluate(self, ev: Evaluation) -> Evaluation:
        """Run the evaluation and record its outcome; returns the updated record."""
        try:
            job = JobCompleted.model_validate(ev.job)
            p = plan(job)
            report = await asyncio.to_thread(self._compute, ev, p)
            key = report_key(ev.id)
            body = json.dumps(report, indent=1).encode()
            await asyncio.to_thread(self.artifacts.put_bytes, key, body, "application/json")
        except Exception as e:  # noqa: BLE001 - any failure is recorded and reported
            log.exception("evaluation %s of job %s failed", ev.id, ev.job_id)
            reason = f"{type(e).__name__}: {e}"[:2000]
            self.store.fail(ev.id, reason)
            ev.status, ev.error = FAILED, reason
            return ev
        base, tuned = report["base"]["metrics"], report["tuned"]["metrics"]
        self.store.complete(ev.id, base, tuned, key)
        ev.status, ev.base_metrics, ev.tuned_metrics, ev.report_key = COMPLETED, base, tuned, key
        return ev

    def _compute(self, ev: Evaluation, p: EvalPlan) -> dict:
        """In a thread: fetch the inputs, evaluate base and tuned, build the report."""
        cache = Path(self.settings.data_dir) / "eval-cache" / ev.id
        try:
            rows = parse_jsonl(self.artifacts.get_bytes(p.validation_key),
                               self.artifacts.uri(p.validation_key))
            adapter = cache / "checkpoint"
            self.artifacts.get_dir(p.checkpoint_key, adapter)  # verified against its manifest
            opts = {"max_samples": p.max_samples, "max_new_tokens": p.max_new_tokens,
                    "max_seq_length": p.max_seq_length, "progress": self._check_stop}
            base = evaluate_model(p.base_model, rows, **opts)
            tuned = evaluate_model(p.base_model, rows, adapter_dir=str(adapter), **opts)
            return build_report(ev, p, base, tuned)
        finally:
            # The cache only lives for one evaluation: checkpoints are large and kept in the store.
            shutil.rmtree(cache, ignore_errors=True)

    def _check_stop(self, done: int, total: int) -> None:
        # On shutdown the task is already cancelled (the evaluation stays "running" and resumes
        # at the next start); this ends its thread at the next batch instead of at the end.
        if self._stopping.is_set():
            raise InterruptedError(f"evaluator stopping ({done}/{total} rows done)")

    async def _announce(self, ev: Evaluation) -> None:
        model_name = ev.job.get("model_name", "")
        if ev.status == COMPLETED:
            data: EventData = EvalCompleted(
                evaluation_id=ev.id, job_id=ev.job_id, model_name=model_name,
                base_metrics=ev.base_metrics, tuned_metrics=ev.tuned_metrics,
                report_key=ev.report_key,
            )
        else:
            data = EvalFailed(evaluation_id=ev.id, job_id=ev.job_id, reason=ev.error)
        try:
            await self.bus.publish(data, tenant=ev.tenant, actor=ev.actor)
        except Exception:  # noqa: BLE001 - stays unannounced; the next start publishes it
            log.exception("evaluation %s: %s not published", ev.id, data.TYPE)
            return
        self.store.mark_announced(ev.id)
