"""RegistryService over gRPC: proto <-> use-case translation; every call is scoped to the
caller's tenant (another tenant's model is NOT_FOUND)."""

from __future__ import annotations

import json
from contextlib import aclosing

import grpc
from google.protobuf.struct_pb2 import Struct

from llmstudio.auth import current_principal
from llmstudio.errors import InvalidArgument
from llmstudio.storage import CorruptArtifact
from llmstudio.v1 import registry_pb2 as pb
from llmstudio.v1 import registry_pb2_grpc

from . import core
from .usecases import ArtifactChunk, Registry


class RegistryApi(registry_pb2_grpc.RegistryServiceServicer):
    PERMISSIONS = {
        "ListModels": "read",
        "GetModel": "read",
        "GetVersion": "read",
        "SetStage": "write",
        "DownloadArtifact": "read",
        "RequestPromotion": "write",
        "GetPromotion": "read",
        "SetAlias": "write",
        "DeleteAlias": "write",
        "UpdateModel": "write",
        "UpdateVersion": "write",
        "CompareVersions": "read",
        "GetModelCard": "read",
        "DeleteVersion": "write",
    }

    def __init__(self, registry: Registry):
        self.registry = registry

    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        models = await self.registry.list_models(current_principal().tenant, request.page_size,
                                                 request.page_token)
        return pb.ListModelsResponse(models=[model_to_pb(m) for m in models],
                                     next_page_token=models.next_page_token)

    async def GetModel(self, request: pb.GetModelRequest, context) -> pb.Model:
        return model_to_pb(
            await self.registry.get_model(current_principal().tenant, request.name))

    async def GetVersion(self, request: pb.GetVersionRequest, context) -> pb.ModelVersion:
        return version_to_pb(await self.registry.get_version(
            current_principal().tenant, request.model_name, request.version, request.alias))

    async def SetAlias(self, request: pb.SetAliasRequest, context) -> pb.Model:
        principal = current_principal()
        return model_to_pb(await self.registry.set_alias(
            principal.tenant, principal.name or principal.key_id, request.model_name,
            request.alias, request.version))

    async def UpdateModel(self, request: pb.UpdateModelRequest, context) -> pb.Model:
        return model_to_pb(await self.registry.update_model(
            current_principal().tenant, request.name,
            request.description if request.HasField("description") else None,
            dict(request.set_tags), list(request.remove_tags)))

    async def UpdateVersion(self, request: pb.UpdateVersionRequest, context) -> pb.ModelVersion:
        return version_to_pb(await self.registry.update_version(
            current_principal().tenant, request.model_name, request.version,
            request.description if request.HasField("description") else None,
            dict(request.set_tags), list(request.remove_tags)))

    async def CompareVersions(self, request: pb.CompareVersionsRequest,
                              context) -> pb.VersionComparison:
        return comparison_to_pb(await self.registry.compare_versions(
            current_principal().tenant, request.model_name, request.a, request.b))

    async def GetModelCard(self, request: pb.GetModelCardRequest, context) -> pb.ModelCard:
        card = await self.registry.model_card(current_principal().tenant, request.model_name,
                                              request.version)
        return pb.ModelCard(model_name=card.model_name, version=card.version,
                            markdown=card.markdown, artifact_key=card.artifact_key,
                            sha256=card.sha256)

    async def DeleteVersion(self, request: pb.DeleteVersionRequest, context) -> pb.ModelVersion:
        principal = current_principal()
        return version_to_pb(await self.registry.delete_version(
            principal.tenant, principal.name or principal.key_id, request.model_name,
            request.version, request.reason))

    async def DeleteAlias(self, request: pb.DeleteAliasRequest, context) -> pb.Model:
        principal = current_principal()
        return model_to_pb(await self.registry.delete_alias(
            principal.tenant, principal.name or principal.key_id, request.model_name,
            request.alias))

    async def SetStage(self, request: pb.SetStageRequest, context) -> pb.ModelVersion:
        principal = current_principal()
        asked = core.StageRequest(request.model_name, request.version, stage_from_pb(request.stage))
        moved = await self.registry.set_stage(
            principal.tenant, principal.name or principal.key_id, asked, request.idempotency_key,
            requester=principal.key_id)
        return version_to_pb(moved)

    async def RequestPromotion(self, request: pb.RequestPromotionRequest,
                               context) -> pb.PromotionRecord:
        principal = current_principal()
        asked = core.StageRequest(request.model_name, request.version, stage_from_pb(request.stage))
        promotion = await self.registry.request_promotion(
            principal.tenant, principal.key_id, principal.name or principal.key_id, asked,
            request.justification, request.idempotency_key)
        return promotion_to_pb(promotion)

    async def GetPromotion(self, request: pb.GetPromotionRecordRequest,
                           context) -> pb.PromotionRecord:
        return promotion_to_pb(await self.registry.get_promotion(
            current_principal().tenant, request.request_id))

    async def DownloadArtifact(self, request: pb.DownloadArtifactRequest, context):
        chunks = self.registry.download_artifact(
            current_principal().tenant, request.model_name, request.version,
            request.artifact or "checkpoint")
        async with aclosing(chunks):  # a client gone mid-stream closes the stored file at once
            try:
                async for chunk in chunks:
                    yield chunk_to_pb(chunk)
            except CorruptArtifact as e:
                await context.abort(grpc.StatusCode.DATA_LOSS, str(e))


def stage_from_pb(stage: int) -> core.Stage:
    if stage == pb.STAGE_UNSPECIFIED or stage not in pb.Stage.values():
        raise InvalidArgument(
            "stage",
            "must be one of STAGE_DEVELOPMENT, STAGE_STAGING, STAGE_PRODUCTION, STAGE_ARCHIVED",
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
        aliases=list(v.aliases),
        tags=v.tags,
        description=v.description,
        deleted_at=v.deleted_at,
    )


def promotion_to_pb(p: core.Promotion) -> pb.PromotionRecord:
    return pb.PromotionRecord(
        request_id=p.request_id, model_name=p.model_name, version=p.version,
        stage=stage_to_pb(p.stage), justification=p.justification,
        requester=p.requester, status=p.status, unmet=list(p.unmet),
        policy_version=p.policy_version, created_at=p.created_at, updated_at=p.updated_at)


def chunk_to_pb(chunk: ArtifactChunk) -> pb.ArtifactChunk:
    if chunk.file is None:
        return pb.ArtifactChunk(data=chunk.data)
    return pb.ArtifactChunk(path=chunk.file.path, data=chunk.data, size=chunk.file.size,
                            sha256=chunk.file.sha256)


def model_to_pb(m: core.Model) -> pb.Model:
    return pb.Model(
        name=m.name,
        tenant=m.tenant,
        versions=[version_to_pb(v) for v in m.versions],
        created_at=m.created_at,
        aliases=m.aliases,
        tags=m.tags,
        description=m.description,
    )


def comparison_to_pb(c: core.Comparison) -> pb.VersionComparison:
    def interval(ci: tuple[float, float] | None) -> pb.Interval | None:
        return pb.Interval(low=ci[0], high=ci[1]) if ci else None

    def value_diff(d: core.ValueDiff) -> pb.ValueDiff:
        return pb.ValueDiff(key=d.key, a=_json(d.a) if d.has_a else "",
                            b=_json(d.b) if d.has_b else "", same=d.same)

    return pb.VersionComparison(
        a=version_to_pb(c.a), b=version_to_pb(c.b),
        metrics=[pb.MetricDelta(name=m.name, a=m.a, b=m.b, delta=m.delta,
                                a_interval=interval(m.a_interval),
                                b_interval=interval(m.b_interval)) for m in c.metrics],
        hyperparameters=[value_diff(d) for d in c.hyperparameters],
        dataset=[value_diff(d) for d in c.dataset])


def _json(value) -> str:
    return json.dumps(value, sort_keys=True)
