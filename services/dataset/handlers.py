"""Bus handlers. A submitted job's "validating_files" step: does its dataset exist for the job's
tenant, and do the stored split files still hash to what was recorded?"""

from __future__ import annotations

import asyncio

from llmstudio.bus import Bus
from llmstudio.events import DatasetRejected, DatasetValidated, Envelope, JobSubmitted
from llmstudio.storage import ArtifactStore

from .core import objective_error
from .files import split_problems
from .store import DatasetStore


class JobDatasetCheck:
    def __init__(self, store: DatasetStore, artifacts: ArtifactStore, bus: Bus):
        self.store, self.artifacts, self.bus = store, artifacts, bus

    async def on_job_submitted(self, env: Envelope, data: JobSubmitted) -> None:
        # Idempotent: a redelivery checks again and publishes the verdict again.
        verdict = await asyncio.to_thread(self.check, env.tenant, data)
        await self.bus.publish(verdict, tenant=env.tenant, actor=env.actor)

    def check(self, tenant: str, job: JobSubmitted) -> DatasetValidated | DatasetRejected:
        record = self.store.get(tenant, job.dataset_id)
        if record is None:
            return DatasetRejected(
                ref=job.job_id, job_id=job.job_id, dataset_id=job.dataset_id,
                reason=f"dataset {job.dataset_id} not found",
            )
        mismatch = objective_error(job.spec.get("objective", "sft"), record.format)
        if mismatch:
            return DatasetRejected(
                ref=job.job_id, job_id=job.job_id, dataset_id=job.dataset_id,
                reason=f"dataset {job.dataset_id}: {mismatch}", errors=[mismatch],
            )
        problems = split_problems(self.artifacts, record.artifacts, record.split_sha256)
        if problems:
            return DatasetRejected(
                ref=job.job_id, job_id=job.job_id, dataset_id=job.dataset_id,
                reason=f"dataset {job.dataset_id}: {'; '.join(problems)}", errors=problems,
            )
        return DatasetValidated(
            job_id=job.job_id, dataset_id=record.id, sha256=record.sha256,
            artifacts=record.artifacts,
        )
