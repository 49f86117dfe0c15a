"""Bus subscribers: job.succeeded (a completion the scheduler accepted) -> an evaluation of the
job (use case `EvaluationRunner`)."""

from __future__ import annotations

from llmstudio.bus import Bus
from llmstudio.events import Envelope, JobSucceeded

from .usecases import EvaluationRunner


class EvaluatorHandlers:
    def __init__(self, runner: EvaluationRunner):
        self.runner = runner

    def subscribe(self, bus: Bus) -> None:
        bus.subscribe(JobSucceeded, durable="job-succeeded", handler=self.on_job_succeeded)

    async def on_job_succeeded(self, env: Envelope, job: JobSucceeded) -> None:
        await self.runner.job_completed(job, tenant=env.tenant, actor=env.actor)
