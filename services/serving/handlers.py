"""Bus handlers: serving's view of the registry. A succeeded job says where its checkpoint is and
which base model it tuned; the registry's events say which version it became, its stage and the
aliases naming it (one consumer for them, so a version's stage changes come after its
registration)."""

from __future__ import annotations

from llmstudio.bus import Bus, refuse_foreign_keys
from llmstudio.events import (
    Envelope,
    JobSucceeded,
    ModelAliasMoved,
    ModelStageChanged,
    ModelVersionDeleted,
    ModelVersionRegistered,
)

from .usecases import Serving


class ServingHandlers:
    def __init__(self, serving: Serving):
        self.serving = serving

    def subscribe(self, bus: Bus) -> None:
        bus.subscribe(JobSucceeded, durable="job-succeeded", handler=self.on_job_succeeded)
        bus.subscribe((ModelVersionRegistered, ModelStageChanged, ModelAliasMoved,
                       ModelVersionDeleted),
                      durable="models",
                      handler=self.on_model_event)

    async def on_job_succeeded(self, env: Envelope, data: JobSucceeded) -> None:
        refuse_foreign_keys(env.tenant, data.checkpoint_key)
        await self.serving.job_succeeded(env.tenant, data)

    async def on_model_event(
        self, env: Envelope,
        data: ModelVersionRegistered | ModelStageChanged | ModelAliasMoved | ModelVersionDeleted,
    ) -> None:
        if isinstance(data, ModelVersionRegistered):
            await self.serving.version_registered(env.tenant, data)
        elif isinstance(data, ModelVersionDeleted):
            await self.serving.version_deleted(env.tenant, data)
        elif isinstance(data, ModelAliasMoved):
            await self.serving.alias_moved(env.tenant, data, env.actor)
        else:
            await self.serving.stage_changed(env.tenant, data, env.actor)
