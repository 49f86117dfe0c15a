"""Bus handlers: a job the scheduler accepted as succeeded registers a model version; a finished
evaluation attaches its metrics to that version. Both use cases are idempotent: delivery is at
least once."""

from __future__ import annotations

from llmstudio.bus import refuse_foreign_keys
from llmstudio.events import Envelope, EvalCompleted, JobSucceeded

from .usecases import Registry


class RegistryHandlers:
    def __init__(self, registry: Registry):
        self.registry = registry

    async def on_job_succeeded(self, env: Envelope, data: JobSucceeded) -> None:
        refuse_foreign_keys(env.tenant, data.checkpoint_key, data.adapter_key,
                            *data.dataset_artifacts.values())
        await self.registry.register_job(env.tenant, env.actor, data)

    async def on_eval_completed(self, env: Envelope, data: EvalCompleted) -> None:
        refuse_foreign_keys(env.tenant, data.report_key)
        # Raises VersionNotRegisteredYet before the job's version exists: the bus retries.
        await self.registry.attach_evaluation(env.tenant, data)
