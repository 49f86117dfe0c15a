"""Bus handlers: a job the scheduler accepted as succeeded registers a model version; a finished
evaluation attaches its metrics to that version; governance's decision on a promotion request
moves the version once approved; a tenant's new policy says which stages are gated. Every use
case is idempotent: delivery is at least once."""

from __future__ import annotations

from llmstudio.bus import Refused, refuse_foreign_keys
from llmstudio.events import Envelope, EvalCompleted, JobSucceeded, PolicyChanged, PolicyDecided
from llmstudio.signing import SECURITY_REASON

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

    async def on_policy_decided(self, env: Envelope, data: PolicyDecided) -> None:
        await self.registry.apply_decision(env.tenant, data)

    async def on_policy_changed(self, env: Envelope, data: PolicyChanged) -> None:
        if data.tenant != env.tenant:
            raise Refused(f"{SECURITY_REASON}: policy of tenant {data.tenant!r} announced as "
                          f"tenant {env.tenant!r}")
        await self.registry.apply_policy_change(env.tenant, data)
