"""Bus handlers: a finished job registers a model version; a finished evaluation attaches its
metrics to that version. Both are idempotent: delivery is at least once."""

from __future__ import annotations

import logging

from llmstudio import telemetry
from llmstudio.events import (
    Envelope,
    EvalCompleted,
    EventData,
    JobCompleted,
    ModelVersionRegistered,
)

from . import core
from .outbox import Outbox
from .store import RegistryStore

log = logging.getLogger(__name__)


class VersionNotRegisteredYet(Exception):
    """An evaluation arrived before its job's version: raised so the bus retries later."""


class RegistryHandlers:
    def __init__(self, store: RegistryStore, outbox: Outbox):
        self.store = store
        self.outbox = outbox

    async def on_job_completed(self, env: Envelope, data: EventData) -> None:
        if not isinstance(data, JobCompleted):
            log.warning("job-completed: ignoring %s on a job.completed subject", env.type)
            return
        trace_id = data.trace_id or telemetry.current_trace_id()
        with self.store.unit() as u:
            if u.version_by_job(env.tenant, data.job_id) is None:
                version = u.next_version(env.tenant, data.model_name)
                mv = core.version_from_job(env.tenant, data, version, trace_id, core.now_iso())
                u.add_version(mv)
                self.outbox.add(
                    u,
                    ModelVersionRegistered(
                        ref=mv.ref, model_name=mv.model_name, version=mv.version,
                        job_id=data.job_id, dataset_sha256=data.dataset_sha256,
                    ),
                    tenant=env.tenant,
                    actor=env.actor,
                )
                log.info("registered %s for job %s (tenant %s)", mv.ref, data.job_id, env.tenant)
        # Also after a redelivery: publishes the event if the first delivery failed to.
        await self.outbox.flush()

    async def on_eval_completed(self, env: Envelope, data: EventData) -> None:
        if not isinstance(data, EvalCompleted):
            log.warning("eval-completed: ignoring %s on an eval.completed subject", env.type)
            return
        with self.store.unit() as u:
            mv = u.version_by_job(env.tenant, data.job_id)
            if mv is None:
                raise VersionNotRegisteredYet(
                    f"no model version for job {data.job_id} (tenant {env.tenant}) yet"
                )
            u.save_version(core.with_evaluation(mv, data, core.now_iso()))
        log.info("attached evaluation %s to %s", data.evaluation_id, mv.ref)
