"""Bus subscribers: job.succeeded (a completion the scheduler accepted) -> an evaluation of the
job (use case `EvaluationRunner`)."""

from __future__ import annotations

from llmstudio.bus import Bus, refuse_foreign_keys
from llmstudio.events import Envelope, JobSucceeded

from .usecases import EvaluationRunner


class EvaluatorHandlers:
    def __init__(self, runner: EvaluationRunner):
        self.runner = runner

    def subscribe(self, bus: Bus) -> None:
        bus.subscribe(JobSucceeded, durable="job-succeeded", handler=self.on_job_succeeded)

    async def on_job_succeeded(self, env: Envelope, job: JobSucceeded) -> None:
        # The plan checks them again before anything is read (evaluations resumed at start).
        refuse_foreign_keys(env.tenant, job.checkpoint_key, *job.dataset_artifacts.values())
        await self.runner.job_completed(job, tenant=env.tenant, actor=env.actor)
