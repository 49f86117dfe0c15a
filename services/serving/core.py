"""Serving domain logic, pure: what a deployment serves, and what it serves next.

A deployment names a model's version (`NAME@3`: that one, for good), a stage (`NAME@production`:
whichever version is in it; switched when the registry moves another there) or an alias
(`NAME@champion`: the version the alias names; switched when the registry moves the alias).
What a version is made of — its base model and checkpoint — the service learns from the events
that made it (`job.succeeded` then `model.version_registered`, joined on the job id), so serving
needs no call to the registry and knows only what its tenant's events said.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from llmstudio.errors import InvalidArgument
from llmstudio.names import name_error

STAGES = ("development", "staging", "production")  # what a deployment may follow
DELETED = "deleted"  # a version's state once the registry deleted it: nothing generates from it
READY, WAITING = "ready", "waiting"


@dataclass(frozen=True)
class Target:
    """What `NAME@VERSION`, `NAME@STAGE` or `NAME@ALIAS` asks for."""

    model_name: str
    version: int = 0  # a fixed version, or
    follows: str = ""  # a stage or an alias


def parse_target(model: str) -> Target:
    """`NAME@VERSION` | `NAME@STAGE` | `NAME@ALIAS` -> Target; InvalidArgument naming what is
    wrong. An alias is any other name (the registry refuses aliases named like stages or
    numbers), so a deployment of one may wait until the alias is set."""
    name, sep, which = model.partition("@")
    if not sep or not name or not which:
        raise InvalidArgument("model", f"{model!r}: expected NAME@VERSION or NAME@STAGE "
                                       f"(a stage: {', '.join(STAGES)})")
    if why := name_error(name):
        raise InvalidArgument("model", f"model name {why}")
    if which.isdigit() and int(which) >= 1:
        return Target(name, version=int(which))
    if which in STAGES:
        return Target(name, follows=which)
    if which not in ("archived", "latest") and not which.isdigit() and name_error(which) is None:
        return Target(name, follows=which)  # an alias (the registry's SetAlias)
    raise InvalidArgument("model", f"{model!r}: {which!r} is neither a version (1, 2, ...), "
                                   f"a stage ({', '.join(STAGES)}) nor an alias")


def follows_alias(follows: str) -> bool:
    """Does a deployment following `follows` follow an alias (not a stage)?"""
    return bool(follows) and follows not in STAGES


@dataclass(frozen=True)
class ServedVersion:
    """A registered version as serving knows it: where its weights are."""

    tenant: str
    model_name: str
    version: int
    job_id: str
    base_model: str  # the base model folder the job fine-tuned
    checkpoint_key: str  # its checkpoint in the artifact store (an adapter or full weights)
    stage: str = "development"


@dataclass(frozen=True)
class Deployment:
    tenant: str
    name: str
    model_name: str
    version: int  # served now; 0 while the followed stage holds none
    follows: str = ""
    created_by: str = ""
    created_at: str = ""
    updated_at: str = ""

    @property
    def status(self) -> str:
        return READY if self.version else WAITING


def new_deployment(tenant: str, name: str, target: Target, current: ServedVersion | None,
                   created_by: str, now: str) -> Deployment:
    """The deployment of `target` (`current`: the version it resolves to now, if any)."""
    if why := name_error(name):
        raise InvalidArgument("name", f"deployment name {why}")
    return Deployment(tenant=tenant, name=name, model_name=target.model_name,
                      version=current.version if current else 0, follows=target.follows,
                      created_by=created_by, created_at=now, updated_at=now)


def switched(d: Deployment, model_name: str, version: int, to_stage: str,
             now: str) -> Deployment | None:
    """`d` moved to `version`, which just entered `to_stage` (or which the alias `to_stage` now
    names), if `d` follows that stage (alias) of that model and serves another version; else
    None. An alias removed (version 0) leaves its deployments on the version they serve."""
    if not version:
        return None
    if d.model_name != model_name or not d.follows or d.follows != to_stage \
            or d.version == version:
        return None
    return replace(d, version=version, updated_at=now)
