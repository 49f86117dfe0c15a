"""Calls refused for their credentials are announced (AuthenticationFailed, audited by
governance), at most one per caller and interval: a loop of bad keys cannot flood the audit."""

from __future__ import annotations

import asyncio

import grpc
import nats
import pytest

from llmstudio import authfailures
from llmstudio.config import Settings
from llmstudio.events import AuthenticationFailed, decode
from llmstudio.v1 import registry_pb2, registry_pb2_grpc
from services.registry.app import build
from tests.support.harness import put_api_key, running
from tests.support.waiting import wait_for_async


async def test_refused_calls_are_announced_once_per_caller_and_interval(
        nats_server, tmp_path, monkeypatch):
    monkeypatch.setattr(authfailures, "INTERVAL_S", 1.5)
    settings = Settings(nats_url=nats_server.url, data_dir=tmp_path)
    announced: list[AuthenticationFailed] = []
    nc = await nats.connect(nats_server.url)

    async def record(msg) -> None:
        announced.append(decode(msg.data)[1])

    await nc.subscribe("llmstudio.governance.auth_failed.*", cb=record)
    viewer = await put_api_key(nats_server.url, "viewer", "acme")
    try:
        async with running("registry", build, settings) as port, \
                grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = registry_pb2_grpc.RegistryServiceStub(channel)

            async def call(key: str, write: bool = False) -> grpc.StatusCode:
                md = (("x-api-key", key),)
                try:
                    if write:
                        await stub.SetStage(registry_pb2.SetStageRequest(model_name="m", version=1),
                                            metadata=md)
                    else:
                        await stub.ListModels(registry_pb2.ListModelsRequest(), metadata=md)
                except grpc.aio.AioRpcError as e:
                    return e.code()
                return grpc.StatusCode.OK

            codes = [await call(f"lls_guess-{i}") for i in range(20)]
            assert set(codes) == {grpc.StatusCode.UNAUTHENTICATED}
            await wait_for_async(lambda: announced, 10, "the first refusal announced")
            await asyncio.sleep(0.5)
            assert len(announced) == 1  # the other 19 within the interval: counted, not sent
            first = announced[0]
            assert (first.service, first.code, first.refused) == (
                "registry", "UNAUTHENTICATED", 1)
            assert first.method == "/llmstudio.v1.RegistryService/ListModels"
            assert first.peer.startswith("ipv4:127.0.0.1") or first.peer.startswith("ipv6:")

            await asyncio.sleep(1.5)  # the interval is over: the next one says how many
            assert await call(viewer, write=True) == grpc.StatusCode.PERMISSION_DENIED
            await wait_for_async(lambda: len(announced) == 2, 10, "the next refusal")
            second = announced[1]
            assert (second.code, second.refused) == ("PERMISSION_DENIED", 20)
            assert second.key_id.startswith("key-") and "viewer" in second.reason
            assert await call(viewer) == grpc.StatusCode.OK  # a granted call is not a refusal
            await asyncio.sleep(0.3)
            assert len(announced) == 2
    finally:
        await nc.close()


@pytest.mark.parametrize("peer", ["ipv4:10.0.0.7:51234", "ipv6:[::1]:40000"])
def test_a_caller_is_its_address_not_its_port(peer):
    sent = []

    async def publish(event):
        sent.append(event)

    async def refuse_twice():
        reporter = authfailures.AuthFailures("dataset", publish, interval_s=60)
        for port in ("1", "2"):
            reporter(authfailures.Refusal("/m", peer.rsplit(":", 1)[0] + ":" + port,
                                          "UNAUTHENTICATED", "unknown key"))
        await asyncio.sleep(0.05)

    asyncio.run(refuse_twice())
    assert len(sent) == 1
