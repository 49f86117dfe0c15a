"""ServingService over gRPC: proto <-> use-case translation; every call is scoped to the caller's
tenant (another tenant's deployment is NOT_FOUND)."""

from __future__ import annotations

from contextlib import aclosing

from llmstudio.auth import current_principal
from llmstudio.errors import ResourceExhausted
from llmstudio.v1 import serving_pb2 as pb
from llmstudio.v1 import serving_pb2_grpc

from .engine import Overloaded, SamplingParams
from .usecases import Prompt, Served, Serving


class ServingApi(serving_pb2_grpc.ServingServiceServicer):
    PERMISSIONS = {
        "CreateDeployment": "write",
        "GetDeployment": "read",
        "ListDeployments": "read",
        "DeleteDeployment": "write",
        "Generate": "read",
    }

    def __init__(self, serving: Serving):
        self.serving = serving

    async def CreateDeployment(self, request: pb.CreateDeploymentRequest, context):
        return to_pb(await self.serving.create(current_principal(), request.model, request.name))

    async def GetDeployment(self, request: pb.GetDeploymentRequest, context):
        return to_pb(await self.serving.get(current_principal().tenant, request.name))

    async def ListDeployments(self, request: pb.ListDeploymentsRequest, context):
        page = await self.serving.list(current_principal().tenant, request.page_size,
                                       request.page_token)
        return pb.ListDeploymentsResponse(deployments=[to_pb(s) for s in page],
                                          next_page_token=page.next_page_token)

    async def DeleteDeployment(self, request: pb.DeleteDeploymentRequest, context):
        return to_pb(await self.serving.delete(current_principal(), request.name))

    async def Generate(self, request: pb.GenerateRequest, context):
        prompt = Prompt(request.prompt, tuple({"role": m.role, "content": m.content}
                                              for m in request.messages))
        given = {name: getattr(request, name) for name in ("temperature", "top_p", "seed")
                 if request.HasField(name)}  # unset: SamplingParams's defaults
        if request.max_tokens:
            given["max_tokens"] = request.max_tokens
        params = SamplingParams(stop=tuple(request.stop), **given)
        chunks = self.serving.generate(current_principal().tenant, request.deployment, prompt,
                                       params)
        async with aclosing(chunks):  # a client gone mid-stream ends its generation at once
            try:
                async for chunk, version in chunks:
                    yield pb.GenerateChunk(
                        text=chunk.text, token_ids=list(chunk.token_ids),
                        finish_reason=chunk.finish_reason or "",
                        prompt_tokens=chunk.prompt_tokens,
                        completion_tokens=chunk.completion_tokens, version=version)
            except Overloaded as e:
                raise ResourceExhausted(str(e)) from None


def to_pb(served: Served) -> pb.Deployment:
    d, v = served.deployment, served.version
    return pb.Deployment(
        name=d.name, tenant=d.tenant, model_name=d.model_name, version=d.version,
        follows=d.follows, status=d.status, base_model=v.base_model if v else "",
        created_at=d.created_at, updated_at=d.updated_at, created_by=d.created_by)
