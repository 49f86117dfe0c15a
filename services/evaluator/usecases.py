"""The evaluator's use cases: evaluate a finished job (base vs tuned, in the background), resume
what a dead process left running, read evaluations.

A finished job is recorded as a running evaluation (idempotent on the job) and evaluated by a
task, so the JobCompleted message is acked at once. The task runs in the caller's trace context
(asyncio tasks inherit it), so EvalCompleted/EvalFailed continue the job's trace; an evaluation
resumed after a restart re-attaches the traceparent stored with it. The outcome and its event
are written in one transaction (the outbox publishes the event), so a crash cannot leave a
finished evaluation unannounced.

CreateEvaluation (`EvaluationRunner.request`) resolves the names a user gives against the
records of the caller's tenant only (model versions and dataset versions as their events told;
task files as the tenant's artifact keys or files under the configured roots), records a running
evaluation (idempotent on the request's idempotency key) and runs it like a job's.
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
from llmstudio.artifactkeys import InvalidKey, check_tenant_key
from llmstudio.errors import InvalidArgument, NotFound, PermissionDenied
from llmstudio.events import JobCompleted
from llmstudio.jsonl import parse_jsonl
from llmstudio.ml.evaluation import evaluate_model
from llmstudio.ml.tasks import TaskFile, parse_task_file
from llmstudio.modelroots import check_model_root
from llmstudio.outbox import Outbox
from llmstudio.paging import Paged
from llmstudio.storage import ArtifactStore

from .core import (
    EvalPlan,
    Evaluation,
    Request,
    build_report,
    choose_split,
    completed,
    evaluation_for_job,
    failed,
    outcome_event,
    plan_of,
    report_key,
    request_trigger,
    requested_evaluation,
)
from .store import EVALUATIONS, EvaluationStore, Unit

log = logging.getLogger(__name__)
MAX_TASK_FILE_BYTES = 256 << 20
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
                 data_dir: Path, *, model_roots: list[Path] | None = None,
                 task_roots: list[Path] | None = None):
        self.store = store
        self.model_roots = list(model_roots or [])  # where a requested base_model may be
        # where a task file given as a server path may be (none: paths are refused)
        self.task_roots = [Path(r).resolve() for r in task_roots or []]
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

    async def request(self, r: Request, *, tenant: str, actor: str) -> Evaluation:
        """Record a requested evaluation (NotFound for a name the tenant does not have) and start
        it; the same idempotency key again returns the evaluation it made."""
        if r.idempotency_key:
            trigger = request_trigger(tenant, "", r.idempotency_key)
            existing = await self.store.in_unit(Unit.for_trigger, tenant, trigger)
            if existing is not None:
                return existing
        if r.base_model:
            check_model_root("base_model", r.base_model, self.model_roots, "model_roots")
        tasks = [self._task_source(i, t, tenant) for i, t in enumerate(r.tasks)]
        ev = await self.store.in_unit(self._resolve, r, tenant, actor, tasks,
                                      telemetry.traceparent())
        try:
            created = await self.store.in_unit(_create_requested, ev)
        except IntegrityError:  # the same key raced in: the other request's evaluation
            created = False
        if not created:
            existing = await self.store.in_unit(Unit.for_trigger, tenant, ev.trigger)
            if existing is None:
                raise NotFound(f"evaluation for idempotency key {r.idempotency_key!r}")
            return existing
        self._spawn(ev)
        return ev

    @staticmethod
    def _resolve(u: Unit, r: Request, tenant: str, actor: str, tasks: list[dict[str, str]],
                 traceparent: str) -> Evaluation:
        job = None
        if r.model_name:
            job = u.job_of_version(tenant, r.model_name, r.version)
            if job is None:
                raise NotFound(f"model {r.model_name} version {r.version} not found")
        artifacts = u.dataset_artifacts(tenant, r.dataset_id)
        if artifacts is None:
            raise NotFound(f"dataset {r.dataset_id} not found")
        resolved = []
        for t in tasks:
            if t.get("dataset_id"):
                task_artifacts = u.dataset_artifacts(tenant, t["dataset_id"])
                key = (task_artifacts or {}).get("raw") or (task_artifacts or {}).get("rows")
                if not key:
                    raise NotFound(f"task file {t['name']}: dataset {t['dataset_id']} not found")
                t = {"name": t["name"], "scoring": t.get("scoring", ""), "key": key}
            resolved.append(t)
        split = choose_split(r.dataset_id, artifacts, r.split)
        return requested_evaluation(r, tenant=tenant, actor=actor, traceparent=traceparent,
                                    job=job, split=split, split_key=artifacts[split],
                                    tasks=resolved)

    def _task_source(self, i: int, t: dict[str, str], tenant: str) -> dict[str, str]:
        """A task file's source, checked: a key of the tenant, a file under the task roots, or
        a dataset id (resolved with the tenant's datasets)."""
        out = {"name": t["name"], "scoring": t.get("scoring", "")}
        if t.get("key"):
            try:
                out["key"] = check_tenant_key(t["key"], tenant, f"tasks[{i}].key")
            except InvalidKey as e:
                raise PermissionDenied(str(e)) from None
        elif t.get("path"):
            out["path"] = str(self._task_path(i, t["path"]))
        else:
            out["dataset_id"] = t["dataset_id"]
        return out

    def _task_path(self, i: int, path: str) -> Path:
        # the same refusal whether the file outside the roots exists or not
        refusal = PermissionDenied(f"tasks[{i}].path: not a file under the allowed roots "
                                   "(model_roots, dataset_import_roots)")
        if "\x00" in path or not self.task_roots:
            raise refusal
        resolved = Path(path).expanduser().resolve()
        if not any(resolved.is_relative_to(root) for root in self.task_roots) \
                or not resolved.is_file():
            raise refusal
        return resolved

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
            p = plan_of(ev)
            report = await asyncio.to_thread(self._compute, ev, p)
            key = report_key(ev.tenant, ev.id)
            body = json.dumps(report, indent=1).encode()
            await asyncio.to_thread(self.artifacts.put_bytes, key, body, "application/json")
        except Exception as e:  # noqa: BLE001 - any failure is recorded and reported
            log.exception("evaluation %s of job %s failed", ev.id, ev.job_id)
            return failed(ev, e)
        return completed(ev, report["base"]["metrics"], report["tuned"]["metrics"], key,
                         report["comparisons"])

    def _compute(self, ev: Evaluation, p: EvalPlan) -> dict[str, Any]:
        """In a thread: fetch the inputs, evaluate base and tuned, build the report."""
        cache = self.cache_root / ev.id
        try:
            rows = parse_jsonl(self.artifacts.get_bytes(p.validation_key),
                               self.artifacts.uri(p.validation_key))
            opts: dict[str, Any] = {
                "max_samples": p.max_samples, "max_new_tokens": p.max_new_tokens,
                "max_seq_length": p.max_seq_length, "progress": self._check_stop,
                "tasks": [self._task_file(t) for t in p.tasks],
            }
            base = evaluate_model(p.base_model, rows, **opts)
            if not p.checkpoint_key:
                return build_report(ev, p, base, None)
            checkpoint = cache / "checkpoint"
            self.artifacts.get_dir(p.checkpoint_key, checkpoint)  # verified against its manifest
            tuned = evaluate_model(p.base_model, rows, checkpoint_dir=str(checkpoint), **opts)
            return build_report(ev, p, base, tuned)
        finally:
            # The cache only lives for one evaluation: checkpoints are large and kept in the store.
            shutil.rmtree(cache, ignore_errors=True)

    def _task_file(self, t: dict[str, str]) -> TaskFile:
        if t.get("key"):
            data, source = self.artifacts.get_bytes(t["key"]), self.artifacts.uri(t["key"])
        else:
            path = self._task_path(0, t["path"])  # checked again: the roots may have changed
            if path.stat().st_size > MAX_TASK_FILE_BYTES:
                raise ValueError(f"{path}: larger than {MAX_TASK_FILE_BYTES} bytes")
            data, source = path.read_bytes(), str(path)
        return parse_task_file(t["name"], data, source, t.get("scoring", ""))

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


def _create_requested(u: Unit, ev: Evaluation) -> bool:
    if u.for_trigger(ev.tenant, ev.trigger) is not None:
        return False
    u.add(ev)
    return True


def _finish(u: Unit, outbox: Outbox, ev: Evaluation) -> None:
    """The outcome and the event announcing it, in one transaction. A requested evaluation is
    not announced: EvalCompleted attaches an evaluation to its job's version in the registry,
    which stays the one the job's own evaluation made."""
    u.save(ev)
    if not ev.requested:
        outbox.add(u, outcome_event(ev), tenant=ev.tenant, actor=ev.actor)


def record_dataset(store: EvaluationStore, tenant: str, dataset_id: str,
                   artifacts: dict[str, str]) -> Any:
    return store.in_unit(Unit.record_dataset, tenant, dataset_id, artifacts)


def record_version(store: EvaluationStore, tenant: str, model_name: str, version: int,
                   job_id: str) -> Any:
    return store.in_unit(Unit.record_version, tenant, model_name, version, job_id)
