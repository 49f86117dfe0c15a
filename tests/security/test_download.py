"""DownloadArtifact: a user gets a version's files through the registry, authorized like any read,
never with artifact store credentials. A real registry over gRPC, a real nats-server, a local
artifact store holding a checkpoint written with `put_dir`."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from pathlib import Path

import grpc
import pytest

from llmstudio.bus import Bus
from llmstudio.cli import main as cli
from llmstudio.client import ArtifactDownloadError, Client, artifact_destination
from llmstudio.config import Settings
from llmstudio.events import JobSucceeded
from llmstudio.natsserver import free_port
from llmstudio.storage import CHUNK, MANIFEST, artifact_store_from_settings
from llmstudio.v1 import registry_pb2 as pb
from llmstudio.v1 import registry_pb2_grpc
from services.registry.app import build
from tests.support.harness import put_api_key, running

CHECKPOINT = "tenants/acme/jobs/job-1/checkpoint-80/"
ADAPTER = "tenants/acme/jobs/job-1/adapter/"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def files_of(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): sha256(p) for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def settings(nats_server, tmp_path):
    return Settings(nats_url=nats_server.url, data_dir=tmp_path, grpc_port=free_port(),
                    artifact_store="file", artifact_root=tmp_path / "artifacts")


@pytest.fixture
def stored(settings, tmp_path) -> Path:
    """A checkpoint folder as the trainer uploads it: several 1 MiB chunks, a nested file, an
    empty one; the adapter is a second, smaller folder."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "adapter_model.safetensors").write_bytes(os.urandom(2 * CHUNK + 12345))
    (src / "sub" / "config.json").write_text('{"r": 8}')
    (src / "empty.txt").write_bytes(b"")
    store = artifact_store_from_settings(settings)
    store.put_dir(CHECKPOINT, src)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    store.put_dir(ADAPTER, adapter)
    return src


async def register_version(settings: Settings, port: int, api_key: str, job_id: str,
                           model_name: str, checkpoint_key: str, adapter_key: str,
                           version: int) -> None:
    """Publish the JobSucceeded that registers `model_name@version` (tenant acme) and wait
    until the registry serves it."""
    bus = Bus(settings, "observer")
    await bus.start()
    try:
        await bus.publish(JobSucceeded(
            job_id=job_id, worker_id="w1", model_name=model_name,
            spec={"base_model": "/models/smollm2-135m", "dataset": "ds-1"},
            dataset_id="ds-1", dataset_sha256="5e" * 32, dataset_artifacts={},
            checkpoint_key=checkpoint_key, adapter_key=adapter_key,
            steps=80, final_loss=0.1), tenant="acme", actor="alice")
    finally:
        await bus.stop()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = registry_pb2_grpc.RegistryServiceStub(ch)
        for _ in range(300):
            try:
                await stub.GetVersion(pb.GetVersionRequest(model_name=model_name,
                                                           version=version),
                                      metadata=(("x-api-key", api_key),))
                return
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.05)
    pytest.fail(f"{model_name}@{version} was never registered")


@pytest.fixture
async def registry(settings, stored):
    """(port, {role: key}) of a registry holding acme's smol-lora@1 made by job-1."""
    keys = {"developer": await put_api_key(settings.nats_url, "developer", "acme"),
            "viewer": await put_api_key(settings.nats_url, "viewer", "acme"),
            "outsider": await put_api_key(settings.nats_url, "admin", "globex")}
    async with running("registry", build, settings) as port:
        await register_version(settings, port, keys["developer"], "job-1", "smol-lora",
                               CHECKPOINT.rstrip("/"), ADAPTER.rstrip("/"), 1)
        yield port, keys


async def chunks(port: int, key: str, **request) -> list[pb.ArtifactChunk]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        stream = registry_pb2_grpc.RegistryServiceStub(ch).DownloadArtifact(
            pb.DownloadArtifactRequest(**request), metadata=(("x-api-key", key),))
        return [c async for c in stream]


async def sdk_download(port: int, key: str, dest: Path, **kw) -> Path:
    def download() -> Path:
        with Client(api_key=key, settings=Settings(registry_addr=f"127.0.0.1:{port}"),
                    data_dir=dest.parent / "no-stack") as c:
            return c.models.download("smol-lora", 1, dest, **kw)

    return await asyncio.to_thread(download)


async def test_owner_and_viewer_download_the_stored_files(registry, stored, settings, tmp_path):
    port, keys = registry
    stored_manifest = artifact_store_from_settings(settings).get_bytes(CHECKPOINT + MANIFEST)
    want = {**files_of(stored), MANIFEST: hashlib.sha256(stored_manifest).hexdigest()}

    for role in ("developer", "viewer"):  # the viewer reads, like GetVersion
        dest = await sdk_download(port, keys[role], tmp_path / f"got-{role}")
        assert files_of(dest) == want

    # On the wire: each file announced once with its size and sha256, no chunk over 1 MiB.
    got = await chunks(port, keys["viewer"], model_name="smol-lora", version=1)
    assert max(len(c.data) for c in got) <= CHUNK
    announced = {c.path: (c.size, c.sha256) for c in got if c.path}
    assert announced == {rel: ((stored / rel).stat().st_size, sha) for rel, sha in want.items()
                         if rel != MANIFEST} | {MANIFEST: (len(stored_manifest), want[MANIFEST])}

    # The adapter artifact is the version's adapter key; the key never comes from the caller.
    dest = await sdk_download(port, keys["viewer"], tmp_path / "adapter", artifact="adapter")
    assert json.loads((dest / "adapter_config.json").read_text()) == {"peft_type": "LORA"}
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await chunks(port, keys["developer"], model_name="smol-lora", version=1,
                     artifact="eval_report")
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "artifact" in (refused.value.details() or "")


async def test_another_tenant_gets_not_found(registry, tmp_path):
    port, keys = registry
    for request in ({"model_name": "smol-lora", "version": 1},
                    {"model_name": "smol-lora", "version": 0}):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await chunks(port, keys["outsider"], **request)
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    # same answer as a model that does not exist in the owner's tenant
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await chunks(port, keys["developer"], model_name="no-such-model", version=1)
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as via_sdk:
        await sdk_download(port, keys["outsider"], tmp_path / "stolen")
    assert via_sdk.value.code() == grpc.StatusCode.NOT_FOUND
    assert not any((tmp_path / "stolen").iterdir())


async def test_a_corrupted_stored_file_fails_with_data_loss(registry, settings, tmp_path):
    port, keys = registry
    store = artifact_store_from_settings(settings)
    stored_config = store.get_bytes(CHECKPOINT + "sub/config.json")
    store.put_bytes(CHECKPOINT + "sub/config.json", b'{"r": 9}')  # same size, other bytes
    with pytest.raises(grpc.RpcError) as lost:
        await sdk_download(port, keys["developer"], tmp_path / "got")
    assert lost.value.code() == grpc.StatusCode.DATA_LOSS
    assert "sub/config.json" in (lost.value.details() or "")
    assert not (tmp_path / "got" / "sub" / "config.json").exists()  # the bad file is not kept

    # a stored manifest naming a path outside its folder is refused the same way
    store.put_bytes(CHECKPOINT + "sub/config.json", stored_config)
    store.put_bytes(CHECKPOINT + MANIFEST, json.dumps({"files": [
        {"path": "../../secrets/key", "size": 1, "sha256": "00" * 32}]}).encode())
    with pytest.raises(grpc.aio.AioRpcError) as hostile:
        await chunks(port, keys["developer"], model_name="smol-lora", version=1)
    assert hostile.value.code() == grpc.StatusCode.DATA_LOSS

    # no manifest: an upload that never finished is not served
    store.delete_prefix(CHECKPOINT + MANIFEST)
    with pytest.raises(grpc.aio.AioRpcError) as incomplete:
        await chunks(port, keys["developer"], model_name="smol-lora", version=1)
    assert incomplete.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "incomplete" in (incomplete.value.details() or "")


async def test_cli_download_needs_no_store_settings(registry, stored, tmp_path, monkeypatch,
                                                    capsys):
    port, keys = registry
    monkeypatch.setenv("LLMSTUDIO_REGISTRY_ADDR", f"127.0.0.1:{port}")
    monkeypatch.setenv("LLMSTUDIO_ARTIFACT_ROOT", str(tmp_path / "nowhere"))  # not used
    out = tmp_path / "cli"
    rc = await asyncio.to_thread(cli, [
        "models", "download", "smol-lora@1", "--out", str(out), "--json",
        "--api-key", keys["viewer"], "--data-dir", str(tmp_path / "no-stack")])
    assert rc == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["path"] == str(out)
    assert files_of(out).items() >= files_of(stored).items()
    assert not (tmp_path / "nowhere").exists()


# -- the SDK's path check ----------------------------------------------------------------------


@pytest.mark.parametrize("hostile", [
    "../outside", "sub/../../outside", "/etc/passwd", "sub\\..\\x", "", "sub//x", "./x", "a\x00b",
])
def test_sdk_refuses_a_path_outside_the_destination(hostile, tmp_path):
    with pytest.raises(ArtifactDownloadError, match="refusing artifact file path"):
        artifact_destination(tmp_path / "dest", hostile)


def test_sdk_refuses_a_path_through_a_symlink_out(tmp_path):
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "link").symlink_to(tmp_path)
    with pytest.raises(ArtifactDownloadError, match="escapes"):
        artifact_destination(dest, "link/x")
    assert artifact_destination(dest, "sub/x.json") == dest.resolve() / "sub" / "x.json"
