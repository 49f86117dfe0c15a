"""Serving use cases: deployments (each change in one transaction with its event), serving's view
of the registry (from events), and generation from a deployment.

A request resolves its deployment's version once, at its start, and finishes on it: a switch to
another version (a promotion to the stage the deployment follows) applies to the requests that
start after it, so none is dropped or answered by two versions.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from llmstudio.auth import Principal
from llmstudio.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from llmstudio.events import (
    DeploymentCreated,
    DeploymentDeleted,
    DeploymentSwitched,
    JobCompleted,
    ModelAliasMoved,
    ModelStageChanged,
    ModelVersionDeleted,
    ModelVersionRegistered,
)
from llmstudio.outbox import Outbox, now_iso
from llmstudio.paging import Paged

from . import core
from .core import Deployment, ServedVersion
from .engine import Chunk, SamplingParams
from .pool import ModelPool
from .store import DEPLOYMENTS, ServingStore, Unit

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prompt:
    """What to continue: plain text, or chat messages through the model's chat template."""

    text: str = ""
    messages: tuple[dict[str, str], ...] = ()


@dataclass(frozen=True)
class Served:
    """A deployment and the version it serves now (None while it waits for one)."""

    deployment: Deployment
    version: ServedVersion | None


class Serving:
    def __init__(self, store: ServingStore, outbox: Outbox, pool: ModelPool):
        self.store, self.outbox, self.pool = store, outbox, pool

    # -- deployments ---------------------------------------------------------------------------
    async def create(self, caller: Principal, model: str, name: str = "") -> Served:
        target = core.parse_target(model)
        return await self.outbox.transact(
            self._create, caller, target, name or target.model_name, now_iso())

    def _create(self, u: Unit, caller: Principal, target: core.Target, name: str,
                now: str) -> Served:
        if u.deployment(caller.tenant, name) is not None:
            raise AlreadyExists(f"deployment {name} exists (delete it first, or pick a name)")
        current = u.version(caller.tenant, target.model_name, target.version, target.follows)
        if current is None and target.version:
            raise NotFound(f"model {target.model_name} has no version {target.version} "
                           "(or its registration has not reached serving yet)")
        d = core.new_deployment(caller.tenant, name, target, current,
                                caller.name or caller.key_id, now)
        u.add_deployment(d)
        self.outbox.add(u, DeploymentCreated(name=d.name, model_name=d.model_name,
                                             version=d.version, follows=d.follows),
                        tenant=d.tenant, actor=d.created_by)
        return Served(d, current)

    async def get(self, tenant: str, name: str) -> Served:
        return await self.store.in_unit(_served, tenant, name)

    async def list(self, tenant: str, page_size: int = 0, page_token: str = "") -> Paged[Served]:
        def read(u: Unit) -> Paged[Served]:
            page = u.deployments(tenant, DEPLOYMENTS.page(page_size, page_token))
            return Paged([Served(d, u.version(tenant, d.model_name, d.version) if d.version
                                 else None) for d in page], page.next_after)

        return await self.store.in_unit(read)

    async def delete(self, caller: Principal, name: str) -> Served:
        def delete(u: Unit) -> Served:
            served = _served(u, caller.tenant, name)
            u.delete_deployment(caller.tenant, name)
            self.outbox.add(u, DeploymentDeleted(name=name), tenant=caller.tenant,
                            actor=caller.name or caller.key_id)
            return served

        return await self.outbox.transact(delete)

    # -- generation ------------------------------------------------------------------------------
    async def generate(self, tenant: str, name: str, prompt: Prompt,
                       params: SamplingParams) -> AsyncIterator[tuple[Chunk, int]]:
        """(chunk, version) as the deployment's current version generates them."""
        served = await self.get(tenant, name)
        if served.version is None:
            raise FailedPrecondition(
                f"deployment {name} waits for a version in {served.deployment.follows} "
                f"of {served.deployment.model_name}")
        version = served.version
        if version.stage == core.DELETED:
            raise FailedPrecondition(
                f"deployment {name}: {version.model_name} v{version.version} was deleted from the "
                "registry (deploy another version)")
        async with self.pool.engine_for(version) as (engine, adapter):
            if prompt.messages:
                ids = engine.chat_prompt([dict(m) for m in prompt.messages])
            elif prompt.text:
                ids = engine.encode(prompt.text)
            else:
                raise InvalidArgument("prompt", "a prompt or messages is required")
            try:
                stream = engine.generate(ids, params, adapter)
            except ValueError as e:  # bad sampling parameters, a prompt too long for the model
                raise InvalidArgument("", str(e)) from None
            try:
                async for chunk in stream:
                    yield chunk, version.version
            finally:  # a caller gone mid-stream frees its batch row at once
                await stream.aclose()

    # -- serving's view of the registry (events) -------------------------------------------------
    async def job_succeeded(self, tenant: str, job: JobCompleted) -> None:
        base_model = str(job.spec.get("base_model", ""))
        await self.store.in_unit(Unit.add_job, tenant, job.job_id, base_model,
                                 job.checkpoint_key)

    async def version_registered(self, tenant: str, e: ModelVersionRegistered) -> None:
        await self.store.in_unit(Unit.add_version, tenant, e.model_name, e.version, e.job_id)

    async def stage_changed(self, tenant: str, e: ModelStageChanged, actor: str) -> None:
        """Record the stage; switch the deployments that follow the stage the version entered
        (one transaction, each switch announced)."""
        def apply(u: Unit) -> None:
            u.set_stage(tenant, e.model_name, e.version, e.to_stage)
            self._switch(u, tenant, e.model_name, e.version, e.to_stage, actor)

        await self.outbox.transact(apply)

    async def version_deleted(self, tenant: str, e: ModelVersionDeleted) -> None:
        """A deleted version generates nothing more (a deployment pinned to it says so)."""
        await self.store.in_unit(Unit.set_stage, tenant, e.model_name, e.version, core.DELETED)

    async def alias_moved(self, tenant: str, e: ModelAliasMoved, actor: str) -> None:
        """Record the alias; switch the deployments that follow it to the version it names now
        (an alias removed leaves them on the version they serve)."""
        def apply(u: Unit) -> None:
            u.set_alias(tenant, e.model_name, e.alias, e.version)
            self._switch(u, tenant, e.model_name, e.version, e.alias, actor)

        await self.outbox.transact(apply)

    def _switch(self, u: Unit, tenant: str, model_name: str, version: int, follows: str,
                actor: str) -> None:
        """Switch the deployments of `model_name` that follow `follows` (a stage or an alias) to
        `version`, each switch announced."""
        now = now_iso()
        for d in u.following(tenant, model_name):
            moved = core.switched(d, model_name, version, follows, now)
            if moved is None:
                continue
            u.save_deployment(moved)
            self.outbox.add(u, DeploymentSwitched(
                name=d.name, model_name=d.model_name, from_version=d.version,
                to_version=moved.version), tenant=tenant, actor=actor)
            log.info("deployment %s (tenant %s): %s v%d -> v%d", d.name, tenant,
                     d.model_name, d.version, moved.version)


def _served(u: Unit, tenant: str, name: str) -> Served:
    d = u.deployment(tenant, name)
    if d is None:
        raise NotFound(f"deployment {name} not found")
    return Served(d, u.version(tenant, d.model_name, d.version) if d.version else None)
