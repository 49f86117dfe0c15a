"""RegistryService over gRPC: proto <-> domain translation; every call is scoped to the
caller's tenant (another tenant's model is NOT_FOUND)."""

from __future__ import annotations

import logging

from google.protobuf.struct_pb2 import Struct

from llmstudio.auth import current_principal
from llmstudio.errors import InvalidArgument, NotFound
from llmstudio.events import ModelStageChanged
from llmstudio.v1 import registry_pb2 as pb
from llmstudio.v1 import registry_pb2_grpc

from . import core
from .outbox import Outbox
from .store import RegistryStore, StageRequest

log = logging.getLogger(__name__)


class RegistryApi(registry_pb2_grpc.RegistryServiceServicer):
    PERMISSIONS = {
        "ListModels": "read",
        "GetModel": "read",
        "GetVersion": "read",
        "SetStage": "write",
    }

    def __init__(self, store: RegistryStore, outbox: Outbox):
        self.store = store
        self.outbox = outbox

    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        with self.store.unit() as u:
            models = u.models(current_principal().tenant)
        return pb.ListModelsResponse(models=[model_to_pb(m) for m in models])

    async def GetModel(self, request: pb.GetModelRequest, context) -> pb.Model:
        name = _required("name", request.name)
        with self.store.unit() as u:
            model = u.model(current_principal().tenant, name)
        if model is None:
            raise NotFound(f"model {name} not found")
        return model_to_pb(model)

    async def GetVersion(self, request: pb.GetVersionRequest, context) -> pb.ModelVersion:
        name = _required("model_name", request.model_name)
        if request.version < 0:
            raise InvalidArgument("version", "must be >= 1, or 0 for the latest")
        with self.store.unit() as u:
            mv = u.get_version(current_principal().tenant, name, request.version)
        if mv is None:
            what = f"version {request.version}" if request.version else "any version"
            raise NotFound(f"model {name} has no {what}")
        return version_to_pb(mv)

    async def SetStage(self, request: pb.SetStageRequest, context) -> pb.ModelVersion:
        """Move a version to a stage (see `core` for the lifecycle).

        The version must be named (>= 1): a stage change is a deliberate act on one version, and
        "latest" may change under the caller. A retry with the same idempotency key returns the
        version without applying the request again, even if its stage moved on since; reusing a
        key for another request is INVALID_ARGUMENT."""
        principal = current_principal()
        name = _required("model_name", request.model_name)
        if request.version < 1:
            raise InvalidArgument("version", "must be >= 1 (name the version to move)")
        to_stage = stage_from_pb(request.stage)
        asked = StageRequest(name, request.version, to_stage)
        key = request.idempotency_key
        now = core.now_iso()
        with self.store.unit() as u:
            earlier = u.stage_request(principal.tenant, key) if key else None
            if earlier is not None:
                if earlier != asked:
                    raise InvalidArgument(
                        "idempotency_key",
                        f"already used to move {core.ref(earlier.model_name, earlier.version)}"
                        f" to {earlier.stage}",
                    )
                moved = u.get_version(principal.tenant, name, request.version)
            else:
                versions = u.versions_of(principal.tenant, name)
                if not versions:
                    raise NotFound(f"model {name} not found")
                moved, changes = core.plan_stage_change(versions, request.version, to_stage, now)
                for change in changes:
                    u.save_version(change.version)
                    self.outbox.add(
                        u,
                        ModelStageChanged(
                            ref=change.version.ref, model_name=name,
                            version=change.version.version,
                            from_stage=change.from_stage.value, to_stage=change.to_stage.value,
                        ),
                        tenant=principal.tenant,
                        actor=principal.name or principal.key_id,
                    )
                if key:
                    u.add_stage_request(principal.tenant, key, asked, now)
        try:
            await self.outbox.flush()
        except Exception as e:  # noqa: BLE001 - committed; the outbox loop publishes it later
            log.warning("stage change of %s committed, event publish deferred: %s", moved.ref, e)
        return version_to_pb(moved)


def _required(field: str, value: str) -> str:
    if not value.strip():
        raise InvalidArgument(field, "required")
    return value


def stage_from_pb(stage: int) -> core.Stage:
    if stage == pb.STAGE_UNSPECIFIED or stage not in pb.Stage.values():
        raise InvalidArgument(
            "stage", "must be one of STAGE_DEVELOPMENT, STAGE_STAGING, STAGE_PRODUCTION, STAGE_ARCHIVED"
        )
    return core.Stage(pb.Stage.Name(stage).removeprefix("STAGE_").lower())


def stage_to_pb(stage: core.Stage) -> int:
    return pb.Stage.Value(f"STAGE_{stage.value.upper()}")


def version_to_pb(v: core.ModelVersion) -> pb.ModelVersion:
    lin = v.lineage
    hyperparameters = Struct()
    hyperparameters.update(lin.get("hyperparameters", {}))
    return pb.ModelVersion(
        model_name=v.model_name,
        version=v.version,
        stage=stage_to_pb(v.stage),
        tenant=v.tenant,
        lineage=pb.Lineage(
            dataset_id=lin.get("dataset_id", ""),
            dataset_sha256=lin.get("dataset_sha256", ""),
            base_model=lin.get("base_model", ""),
            job_id=lin.get("job_id", v.job_id),
            hyperparameters=hyperparameters,
            trace_id=lin.get("trace_id", ""),
            evaluation_id=lin.get("evaluation_id", ""),
            method=lin.get("method", ""),
        ),
        metrics=v.metrics,
        artifacts=v.artifacts,
        created_at=v.created_at,
        updated_at=v.updated_at,
    )


def model_to_pb(m: core.Model) -> pb.Model:
    return pb.Model(
        name=m.name,
        tenant=m.tenant,
        versions=[version_to_pb(v) for v in m.versions],
        created_at=m.created_at,
    )
