"""Bus subscribers: job.succeeded (a completion the scheduler accepted) -> an evaluation of the
job (use case `EvaluationRunner`); dataset.registered and model.version_registered -> the
tenant's dataset and model versions that CreateEvaluation resolves names with."""

from __future__ import annotations

from llmstudio.bus import Bus, refuse_foreign_keys
from llmstudio.events import DatasetRegistered, Envelope, JobSucceeded, ModelVersionRegistered

from .store import EvaluationStore
from .usecases import EvaluationRunner, record_dataset, record_version


class EvaluatorHandlers:
    def __init__(self, runner: EvaluationRunner, store: EvaluationStore | None = None):
        self.runner = runner
        self.store = store or runner.store

    def subscribe(self, bus: Bus) -> None:
        bus.subscribe(JobSucceeded, durable="job-succeeded", handler=self.on_job_succeeded)
        bus.subscribe(DatasetRegistered, durable="dataset-registered",
                      handler=self.on_dataset_registered, entity=">")
        bus.subscribe(ModelVersionRegistered, durable="version-registered",
                      handler=self.on_version_registered, entity=">")

    async def on_job_succeeded(self, env: Envelope, job: JobSucceeded) -> None:
        # The plan checks them again before anything is read (evaluations resumed at start).
        refuse_foreign_keys(env.tenant, job.checkpoint_key, *job.dataset_artifacts.values())
        await self.runner.job_completed(job, tenant=env.tenant, actor=env.actor)

    async def on_dataset_registered(self, env: Envelope, data: DatasetRegistered) -> None:
        refuse_foreign_keys(env.tenant, *data.artifacts.values())
        await record_dataset(self.store, env.tenant, data.dataset_id, data.artifacts)

    async def on_version_registered(self, env: Envelope, data: ModelVersionRegistered) -> None:
        await record_version(self.store, env.tenant, data.model_name, data.version, data.job_id)
