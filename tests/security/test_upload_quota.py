"""A tenant's uploads are bounded before they are spooled: at most N at once, and their bytes
in the spool together; another tenant's upload goes on meanwhile."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest

from llmstudio.config import Settings
from llmstudio.natsserver import free_port
from llmstudio.v1 import datasets_pb2, datasets_pb2_grpc
from services.dataset.app import build
from tests.support.harness import put_api_key, running
from tests.support.waiting import wait_for_async

ROWS = b"".join(json.dumps({"prompt": f"p{i}", "completion": f"c{i}"}).encode() + b"\n"
                for i in range(40))


@pytest.fixture
def settings(nats_server, tmp_path):
    return Settings(nats_url=nats_server.url, data_dir=tmp_path, grpc_port=free_port(),
                    dataset_max_uploads_per_tenant=2, dataset_tenant_spool_bytes=1 << 20)


async def test_a_tenant_s_uploads_are_bounded_before_they_are_spooled(settings):
    acme = await put_api_key(settings.nats_url, "developer", "acme")
    globex = await put_api_key(settings.nats_url, "developer", "globex")
    spool = settings.data_dir / "spool"
    release = asyncio.Event()
    async with running("dataset", build, settings) as port, \
            grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = datasets_pb2_grpc.DatasetServiceStub(channel)

        async def upload(key: str, name: str, chunks, hold: bool = False):
            async def messages():
                yield datasets_pb2.UploadDatasetChunk(
                    options=datasets_pb2.CreateDatasetRequest(name=name, filename=f"{name}.jsonl"))
                for i, chunk in enumerate(chunks):
                    if hold and i == 1:
                        await release.wait()
                    yield datasets_pb2.UploadDatasetChunk(data=chunk)

            try:
                return await stub.UploadDataset(messages(), metadata=(("x-api-key", key),))
            except grpc.aio.AioRpcError as e:
                return e

        def spooled() -> int:
            return len(list(spool.glob("ingest-*/upload")))  # being received

        half, rest = ROWS[:len(ROWS) // 2], ROWS[len(ROWS) // 2:]
        held = [asyncio.create_task(upload(acme, f"held-{i}", [half, rest], hold=True))
                for i in range(2)]
        await wait_for_async(lambda: spooled() == 2, 10, "two uploads of acme being received")

        third = await upload(acme, "third", [ROWS])
        assert third.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "tenant acme has 2 uploads in progress" in third.details()
        assert spooled() == 2  # refused before a byte of it was spooled
        other = await upload(globex, "other", [ROWS])  # another tenant is not held up
        assert not isinstance(other, grpc.aio.AioRpcError) and other.num_rows == 40

        release.set()
        done = await asyncio.gather(*held)
        assert [d.num_rows for d in done] == [40, 40]
        # the bytes: more than the tenant's spool budget in one upload is refused as it comes
        big = [b"x" * (256 << 10)] * 5
        too_big = await upload(acme, "big", big)
        assert too_big.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "would hold more than 1048576 bytes" in too_big.details()
        again = await upload(acme, "after", [ROWS])  # and its budget is whole again
        assert not isinstance(again, grpc.aio.AioRpcError) and again.num_rows == 40
