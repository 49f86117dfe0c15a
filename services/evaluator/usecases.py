"""The evaluator's use cases: evaluate a finished job (base vs tuned, in the background), resume
what a dead process left running, read evaluations.

A finished job is recorded as a running evaluation (idempotent on the job) and evaluated by a
task, so the JobCompleted message is acked at once. The task runs in the caller's trace context
(asyncio tasks inherit it), so EvalCompleted/EvalFailed continue the job's trace; an evaluation
resumed after a restart re-attaches the traceparent stored with it. The outcome and its event
are written in one transaction (the outbox publishes the event), so a crash cannot leave a
finished evaluation unannounced.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import threading
from pathlib import Path
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from sqlalchemy.exc import IntegrityError

from llmstudio import telemetry
from llmstudio.errors import InvalidArgument, NotFound
from llmstudio.events import JobCompleted
from llmstudio.jsonl import parse_jsonl
from llmstudio.ml.evaluation import evaluate_model
from llmstudio.outbox import Outbox
from llmstudio.paging import Paged
from llmstudio.storage import ArtifactStore

from .core import (
    EvalPlan,
    Evaluation,
    build_report,
    completed,
    evaluation_for_job,
    failed,
    outcome_event,
    plan,
    report_key,
)
from .store import EVALUATIONS, EvaluationStore, Unit

log = logging.getLogger(__name__)
tracer = trace.get_tracer("evaluator")


class Evaluations:
    """Reading evaluations; another tenant's evaluation is indistinguishable from a missing one."""

    def __init__(self, store: EvaluationStore):
        self.store = store

    async def get(self, evaluation_id: str, tenant: str) -> Evaluation:
        if not evaluation_id:
            raise InvalidArgument("id", "required")
        ev = await self.store.in_unit(Unit.get, evaluation_id, tenant)
        if ev is None:
            raise NotFound(f"evaluation {evaluation_id} not found")
        return ev

    async def list(self, tenant: str, job_id: str = "", page_size: int = 0,
                   page_token: str = "") -> Paged[Evaluation]:
        """A page of the tenant's evaluations, oldest first (default: the first 100)."""
        return await self.store.in_unit(Unit.of_tenant, tenant, job_id,
                                        EVALUATIONS.page(page_size, page_token))


class EvaluationRunner:
    """Evaluates finished jobs one at a time, each in a worker thread."""

    def __init__(self, store: EvaluationStore, outbox: Outbox, artifacts: ArtifactStore,
                 data_dir: Path):
        self.store = store
        self.outbox = outbox
        self.artifacts = artifacts
        self.cache_root = Path(data_dir) / "eval-cache"
        # Evaluating is CPU/GPU-bound: one at a time, the others wait their turn.
        self._slot = asyncio.Semaphore(1)
        self._tasks: set[asyncio.Task] = set()  # strong references until they finish
        # Evaluation ids with a task in this process: resume() must not start a second one for
        # an evaluation the consumer created between bus start and the on_started hook.
        self._active: set[str] = set()
        self._stopping = threading.Event()  # read by the evaluation thread between batches

    async def job_completed(self, job: JobCompleted, *, tenant: str, actor: str) -> None:
        """Record an evaluation of `job` and start it; nothing if the job already has one."""
        ev = evaluation_for_job(job, tenant=tenant, actor=actor,
                                traceparent=telemetry.traceparent())
        try:
            created = await self.store.in_unit(_create, ev)
        except IntegrityError:  # another replica inserted it between our check and insert
            created = False
        if not created:
            log.info("job %s already has an evaluation: nothing to do", job.job_id)
            return
        self._spawn(ev)

    async def resume(self) -> None:
        """At start: rerun what a previous process left running."""
        for ev in await self.store.in_unit(Unit.running):
            log.info("resuming evaluation %s of job %s", ev.id, ev.job_id)
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
            with tracer.start_as_current_span(f"evaluate {ev.job_id}",
                                              attributes={"evaluation.id": ev.id}):
                async with self._slot:
                    outcome = await self._evaluate(ev)
                await self.outbox.transact(_finish, self.outbox, outcome)
        except Exception:  # noqa: BLE001 - not recorded: still running, resumed at next start
            log.exception("evaluation %s: outcome not recorded", ev.id)
        finally:
            if token is not None:
                otel_context.detach(token)

    async def _evaluate(self, ev: Evaluation) -> Evaluation:
        """`ev` completed with its metrics and report, or failed with the reason."""
        try:
            p = plan(JobCompleted.model_validate(ev.job), ev.tenant)
            report = await asyncio.to_thread(self._compute, ev, p)
            key = report_key(ev.tenant, ev.id)
            body = json.dumps(report, indent=1).encode()
            await asyncio.to_thread(self.artifacts.put_bytes, key, body, "application/json")
        except Exception as e:  # noqa: BLE001 - any failure is recorded and reported
            log.exception("evaluation %s of job %s failed", ev.id, ev.job_id)
            return failed(ev, e)
        return completed(ev, report["base"]["metrics"], report["tuned"]["metrics"], key)

    def _compute(self, ev: Evaluation, p: EvalPlan) -> dict[str, Any]:
        """In a thread: fetch the inputs, evaluate base and tuned, build the report."""
        cache = self.cache_root / ev.id
        try:
            rows = parse_jsonl(self.artifacts.get_bytes(p.validation_key),
                               self.artifacts.uri(p.validation_key))
            checkpoint = cache / "checkpoint"
            self.artifacts.get_dir(p.checkpoint_key, checkpoint)  # verified against its manifest
            opts: dict[str, Any] = {
                "max_samples": p.max_samples, "max_new_tokens": p.max_new_tokens,
                "max_seq_length": p.max_seq_length, "progress": self._check_stop,
            }
            base = evaluate_model(p.base_model, rows, **opts)
            tuned = evaluate_model(p.base_model, rows, checkpoint_dir=str(checkpoint), **opts)
            return build_report(ev, p, base, tuned)
        finally:
            # The cache only lives for one evaluation: checkpoints are large and kept in the store.
            shutil.rmtree(cache, ignore_errors=True)

    def _check_stop(self, done: int, total: int) -> None:
        # On shutdown the task is already cancelled (the evaluation stays "running" and resumes
        # at the next start); this ends its thread at the next batch instead of at the end.
        if self._stopping.is_set():
            raise InterruptedError(f"evaluator stopping ({done}/{total} rows done)")


def _create(u: Unit, ev: Evaluation) -> bool:
    if u.for_job(ev.job_id, ev.trigger) is not None:
        return False
    u.add(ev)
    return True


def _finish(u: Unit, outbox: Outbox, ev: Evaluation) -> None:
    """The outcome and the event announcing it, in one transaction."""
    u.save(ev)
    outbox.add(u, outcome_event(ev), tenant=ev.tenant, actor=ev.actor)
