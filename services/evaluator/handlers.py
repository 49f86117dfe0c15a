"""Bus subscribers: job.completed -> an evaluation of the job (use case `EvaluationRunner`)."""

from __future__ import annotations

from llmstudio.bus import Bus
from llmstudio.events import Envelope, JobCompleted

from .usecases import EvaluationRunner


class EvaluatorHandlers:
    def __init__(self, runner: EvaluationRunner):
        self.runner = runner

    def subscribe(self, bus: Bus) -> None:
        bus.subscribe(JobCompleted, durable="job-completed", handler=self.on_job_completed)

    async def on_job_completed(self, env: Envelope, job: JobCompleted) -> None:
        await self.runner.job_completed(job, tenant=env.tenant, actor=env.actor)
