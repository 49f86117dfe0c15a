"""Bus handlers: events to use cases. A submitted job's "validating_files" step is the dataset
service's (`Datasets.check_job`)."""

from __future__ import annotations

from llmstudio.bus import Bus
from llmstudio.events import Envelope, JobSubmitted

from .usecases import Datasets


class DatasetHandlers:
    def __init__(self, datasets: Datasets):
        self.datasets = datasets

    def subscribe(self, bus: Bus) -> None:
        bus.subscribe(JobSubmitted, durable="job-submitted", handler=self.on_job_submitted)

    async def on_job_submitted(self, env: Envelope, data: JobSubmitted) -> None:
        await self.datasets.check_job(env.tenant, env.actor, data)
