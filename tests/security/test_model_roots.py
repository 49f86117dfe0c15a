"""A job's base_model comes from the operator's model roots and nowhere else: a path outside
them is refused the same whether it exists or not (no probing the server's files, no reading
another tenant's checkpoints), and so is a hub id."""

from __future__ import annotations

import grpc
from google.protobuf.struct_pb2 import Struct

from llmstudio.config import Settings
from llmstudio.natsserver import free_port
from llmstudio.v1 import jobs_pb2, jobs_pb2_grpc
from services.scheduler.app import build
from tests.support.harness import put_api_key, running
from tests.support.models import config_only_model


async def test_a_base_model_outside_the_model_roots_is_refused_alike(nats_server, tmp_path):
    roots = tmp_path / "models"
    model = config_only_model(roots / "tiny")
    elsewhere = tmp_path / "tenants" / "other" / "checkpoint-8"  # exists, outside the roots
    elsewhere.mkdir(parents=True)
    (elsewhere / "config.json").write_text("{}")
    settings = Settings(nats_url=nats_server.url, data_dir=tmp_path / "data",
                        grpc_port=free_port(), model_roots=[roots])
    key = await put_api_key(nats_server.url, "developer", "acme")
    async with running("scheduler", build, settings) as port, \
            grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = jobs_pb2_grpc.JobServiceStub(channel)

        async def submit(base_model: str):
            spec = Struct()
            spec.update({"name": "rooted", "base_model": base_model, "dataset": "ds-1"})
            try:
                return await stub.CreateJob(jobs_pb2.CreateJobRequest(spec=spec),
                                            metadata=(("x-api-key", key),))
            except grpc.aio.AioRpcError as e:
                return e

        refused = {name: await submit(path) for name, path in {
            "existing": str(elsewhere), "missing": str(tmp_path / "no" / "such"),
            "escape": str(roots / ".." / "tenants" / "other" / "checkpoint-8"),
            "etc": "/etc", "hub id": "HuggingFaceTB/SmolLM2-135M",
        }.items()}
        for name, error in refused.items():
            assert isinstance(error, grpc.aio.AioRpcError), name
            assert error.code() == grpc.StatusCode.PERMISSION_DENIED, name
            assert error.details() == ("spec.base_model: not a model folder under the allowed "
                                       "model roots (LLMSTUDIO_MODEL_ROOTS)"), name
        job = await submit(str(model))
        assert not isinstance(job, grpc.aio.AioRpcError), job
        assert job.spec["base_model"] == str(model.resolve())
