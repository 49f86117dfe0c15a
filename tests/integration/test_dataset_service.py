"""The dataset service in-process against a real nats-server, over real gRPC on loopback."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import shutil
import uuid

import grpc
import nats
import pytest
from sqlalchemy.exc import IntegrityError

from llmstudio.config import Settings
from llmstudio.events import (
    DatasetRegistered,
    DatasetRejected,
    DatasetValidated,
    JobSubmitted,
    decode,
    make_envelope,
)
from llmstudio.ml.tiny import build_tiny_model
from llmstudio.natsserver import free_port
from llmstudio.storage import LocalArtifactStore, S3ArtifactStore
from llmstudio.v1 import datasets_pb2, datasets_pb2_grpc
from services.dataset import core
from services.dataset.app import build
from services.dataset.core import DatasetRecord
from services.dataset.store import DatasetStore
from services.dataset.usecases import registered
from tests.support.harness import put_api_key, running
from tests.support.seaweed import seaweed_s3

ROWS = [{"prompt": f"Reverse: w{i} v{i}\nAnswer:", "completion": f" v{i} w{i}"} for i in range(40)]


def jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


@pytest.fixture
def settings(nats_server, tmp_path):
    return Settings(nats_url=nats_server.url, data_dir=tmp_path, grpc_port=free_port())


@pytest.fixture
async def events(nats_server):
    """Every dataset event published from now on, decoded, in order."""
    seen: list = []
    nc = await nats.connect(nats_server.url)

    async def on_msg(msg):
        seen.append(decode(msg.data))

    await nc.subscribe("llmstudio.dataset.>", cb=on_msg)
    yield seen
    await nc.close()


@pytest.fixture
async def service(settings):
    async with running("dataset", build, settings) as port:
        yield port


def stub(port: int, key: str | None):
    ch = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    metadata = (("x-api-key", key),) if key else ()
    return ch, datasets_pb2_grpc.DatasetServiceStub(ch), metadata


async def wait_for(pred, timeout=10.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not (found := pred()):
        assert asyncio.get_running_loop().time() < deadline, "timed out waiting for an event"
        await asyncio.sleep(0.05)
    return found


def of_type(events, cls, **fields):
    return [(env, data) for env, data in events if isinstance(data, cls)
            and all(getattr(data, k) == v for k, v in fields.items())]


async def create(port, key, **kw):
    ch, client, md = stub(port, key)
    async with ch:
        return await client.CreateDataset(datasets_pb2.CreateDatasetRequest(**kw), metadata=md)


def canonical_jsonl(rows) -> bytes:
    return "".join(core.canonical(r) + "\n" for r in rows).encode()


async def test_create_get_list_with_stable_sha_and_deterministic_split(settings, service, events):
    key = await put_api_key(settings.nats_url, "developer", "acme")
    reformatted = "\n\n".join(
        json.dumps({"completion": r["completion"], "id": i, "prompt": r["prompt"]}, indent=None)
        for i, r in enumerate(ROWS)
    ).encode()
    first = await create(service, key, name="reverse", content=jsonl(ROWS), filename="a.jsonl")
    again = await create(service, key, name="reverse", content=reformatted, filename="b.jsonl")
    changed = await create(service, key, name="reverse", content=jsonl(ROWS[:30]))

    sha = hashlib.sha256(canonical_jsonl(ROWS)).hexdigest()
    assert first.id.startswith("ds-") and len(first.id) == 15
    # Every push is a version; the same normalized content shares its stored files.
    assert (first.version, again.version) == (1, 2) and again.sha256 == first.sha256 == sha
    assert {k: v for k, v in again.artifacts.items() if k not in ("raw", "report")} == {
        k: v for k, v in first.artifacts.items() if k not in ("raw", "report")}
    assert (changed.version, changed.num_rows) == (3, 30) and changed.sha256 != sha
    assert (first.format, first.num_rows, first.source_schema, first.source_format) == (
        "prompt_completion", 40, "prompt_completion", "jsonl")
    assert first.train_rows + first.validation_rows == 40 and first.validation_rows >= 1
    assert (first.status, list(first.warnings), first.parent_id) == ("accepted", [], "")
    assert json.loads(first.transformation)["op"] == "upload"
    assert first.tenant == "acme" and first.created_by.startswith("key-")
    assert first.created_at.endswith("Z") and first.created_at[:4].isdigit()
    assert set(first.artifacts) == {"raw", "rows", "train", "validation", "report"}

    artifacts = LocalArtifactStore(settings.data_dir / "artifacts")
    assert artifacts.get_bytes(first.artifacts["raw"]) == jsonl(ROWS)
    assert artifacts.get_bytes(first.artifacts["rows"]) == canonical_jsonl(ROWS)
    assert first.artifacts["rows"] == f"tenants/acme/datasets/{sha}/rows.jsonl"
    assert first.artifacts["raw"].startswith("tenants/acme/datasets/raw/")
    assert first.artifacts["report"] == f"tenants/acme/datasets/reports/{first.id}.json"
    stored = []
    for split in ("train", "validation"):
        assert first.artifacts[split] == f"tenants/acme/datasets/{sha}/seed0-val0.1/{split}.jsonl"
        stored += artifacts.get_bytes(first.artifacts[split]).decode().splitlines()
    assert sorted(stored) == sorted(canonical_jsonl(ROWS).decode().splitlines())

    ch, client, md = stub(service, key)
    async with ch:
        got = await client.GetDataset(datasets_pb2.GetDatasetRequest(id=first.id), metadata=md)
        assert got == first
        listed = await client.ListDatasets(datasets_pb2.ListDatasetsRequest(), metadata=md)
        assert [(d.id, d.version) for d in listed.datasets] == [
            (first.id, 1), (again.id, 2), (changed.id, 3)]
        by_name = await client.ListDatasets(
            datasets_pb2.ListDatasetsRequest(name="other"), metadata=md)
        assert list(by_name.datasets) == []

    env, registered = (
        await wait_for(lambda: of_type(events, DatasetRegistered, dataset_id=first.id))
    )[0]
    assert (env.tenant, env.actor) == ("acme", first.created_by)
    assert (registered.sha256, registered.num_rows) == (first.sha256, 40)
    assert registered.artifacts == dict(first.artifacts)
    assert len(of_type(events, DatasetRegistered, dataset_id=first.id)) == 1


async def test_other_split_parameters_make_a_new_version_without_overwriting(settings, service):
    key = await put_api_key(settings.nats_url, "developer", "acme")
    default = await create(service, key, name="r", content=jsonl(ROWS))
    reseeded = await create(service, key, name="r", content=jsonl(ROWS), seed=5,
                            validation_fraction=0.5, test_fraction=0.2)
    artifacts = LocalArtifactStore(settings.data_dir / "artifacts")
    assert default.sha256 == reseeded.sha256 and reseeded.version == 2
    assert default.artifacts["train"] != reseeded.artifacts["train"]
    assert default.artifacts["rows"] == reseeded.artifacts["rows"]
    assert reseeded.test_rows >= 1 and reseeded.validation_rows >= 10
    assert reseeded.train_rows + reseeded.validation_rows + reseeded.test_rows == 40
    train = artifacts.get_bytes(default.artifacts["train"]).decode().splitlines()
    assert len(train) == default.train_rows


async def test_idempotency_key_returns_the_same_dataset(settings, service, events):
    key = await put_api_key(settings.nats_url, "developer", "acme")
    other_tenant = await put_api_key(settings.nats_url, "developer", "globex")
    req = dict(name="r", content=jsonl(ROWS), idempotency_key="upload-1")
    a = await create(service, key, **req)
    b = await create(service, key, **req)
    c = await create(service, other_tenant, **req)
    assert a == b and c.id != a.id and c.tenant == "globex"
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await create(service, key, **(req | {"content": jsonl(ROWS[:5])}))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert a.id in e.value.details()
    await wait_for(lambda: of_type(events, DatasetRegistered, dataset_id=c.id))
    assert len(of_type(events, DatasetRegistered, dataset_id=a.id)) == 1


async def test_invalid_line_rejected_with_line_number_and_nothing_stored(settings, service, events):
    key = await put_api_key(settings.nats_url, "developer", "acme")
    content = jsonl(ROWS[:1]) + b'{"prompt": "x" "completion": "y"}\n' + jsonl(
        [{"prompt": "p"}, {"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await create(service, key, name="broken", content=content, filename="data.jsonl")
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = e.value.details()
    assert details.startswith("3 invalid rows; data.jsonl:2: invalid JSON: Expecting ',' delimiter")
    assert "data.jsonl:3: field 'completion': missing" in details
    assert "data.jsonl:4: mixed schemas" in details

    env, rejected = (await wait_for(lambda: of_type(events, DatasetRejected, ref="broken")))[0]
    assert env.tenant == "acme" and env.actor.startswith("key-")
    assert rejected.job_id == "" and rejected.reason == details
    assert rejected.errors[0].startswith("data.jsonl:2: invalid JSON")
    assert len(rejected.errors) == 3

    ch, client, md = stub(service, key)
    async with ch:
        listed = await client.ListDatasets(datasets_pb2.ListDatasetsRequest(), metadata=md)
    assert list(listed.datasets) == []
    assert LocalArtifactStore(settings.data_dir / "artifacts").list() == []
    assert of_type(events, DatasetRegistered) == []


async def test_invalid_name_is_rejected_as_unnamed(settings, service, events):
    key = await put_api_key(settings.nats_url, "developer", "acme")
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await create(service, key, name="../etc", content=jsonl(ROWS))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith("name: must match")
    (_, rejected), = await wait_for(lambda: of_type(events, DatasetRejected))
    assert rejected.ref == "unnamed" and "'../etc'" in rejected.reason


async def test_auth_roles_and_tenancy(settings, service):
    dev = await put_api_key(settings.nats_url, "developer", "acme")
    viewer = await put_api_key(settings.nats_url, "viewer", "acme")
    stranger = await put_api_key(settings.nats_url, "admin", "globex")
    ds = await create(service, dev, name="r", content=jsonl(ROWS))

    ch, client, md = stub(service, stranger)
    async with ch:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await client.GetDataset(datasets_pb2.GetDatasetRequest(id=ds.id), metadata=md)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        listed = await client.ListDatasets(datasets_pb2.ListDatasetsRequest(), metadata=md)
        assert list(listed.datasets) == []

    ch, client, md = stub(service, viewer)
    async with ch:
        got = await client.GetDataset(datasets_pb2.GetDatasetRequest(id=ds.id), metadata=md)
        assert got.id == ds.id
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await client.CreateDataset(
                datasets_pb2.CreateDatasetRequest(name="v", content=jsonl(ROWS)), metadata=md)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED

    ch, client, md = stub(service, None)
    async with ch:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await client.GetDataset(datasets_pb2.GetDatasetRequest(id=ds.id), metadata=md)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def publish_job(nats_url, tenant, job_id, dataset_id, spec=None):
    data = JobSubmitted(job_id=job_id, dataset_id=dataset_id, model_name="tiny", spec=spec or {})
    env = make_envelope(data, source="scheduler", tenant=tenant, actor="key-sched")
    nc = await nats.connect(nats_url)
    try:
        await nc.jetstream().publish(
            data.subject(), env.model_dump_json().encode(), headers={"Nats-Msg-Id": env.id})
    finally:
        await nc.close()


async def test_job_submitted_validates_the_dataset_files(settings, service, events):
    key = await put_api_key(settings.nats_url, "developer", "acme")
    ds = await create(service, key, name="r", content=jsonl(ROWS))

    await publish_job(settings.nats_url, "acme", "job-ok", ds.id)
    env, ok = (await wait_for(lambda: of_type(events, DatasetValidated, job_id="job-ok")))[0]
    assert (env.tenant, env.actor) == ("acme", "key-sched")
    assert (ok.dataset_id, ok.sha256, ok.artifacts) == (ds.id, ds.sha256, dict(ds.artifacts))

    await publish_job(settings.nats_url, "acme", "job-missing", "ds-000000000000")
    await publish_job(settings.nats_url, "globex", "job-foreign", ds.id)
    for job_id, dataset_id in (("job-missing", "ds-000000000000"), ("job-foreign", ds.id)):
        env, bad = (await wait_for(lambda j=job_id: of_type(events, DatasetRejected, job_id=j)))[0]
        assert bad.ref == job_id and bad.dataset_id == dataset_id
        assert bad.reason == f"dataset {dataset_id} not found"

    artifacts = LocalArtifactStore(settings.data_dir / "artifacts")
    path = artifacts.root / ds.artifacts["validation"]
    path.write_bytes(path.read_bytes().replace(b"v", b"V", 1))
    await publish_job(settings.nats_url, "acme", "job-tampered", ds.id)
    _, bad = (await wait_for(lambda: of_type(events, DatasetRejected, job_id="job-tampered")))[0]
    assert bad.reason.startswith(f"dataset {ds.id}: validation split is corrupt")
    assert ds.artifacts["validation"] in bad.reason and "train" not in bad.reason

    path.unlink()
    await publish_job(settings.nats_url, "acme", "job-deleted", ds.id)
    _, bad = (await wait_for(lambda: of_type(events, DatasetRejected, job_id="job-deleted")))[0]
    assert bad.errors == [f"validation split is missing: no artifact {ds.artifacts['validation']}"]
    assert of_type(events, DatasetValidated, job_id="job-tampered") == []


async def test_dataset_stored_but_not_announced_is_announced_on_start(settings, events):
    # What a crash between the commit and the publish leaves: the version and its event, queued.
    store = DatasetStore(settings.db_url("dataset"))
    store.migrate()
    stored = record(tenant="acme", id="ds-0123456789ab")
    event = make_envelope(registered(stored), source="dataset", tenant="acme", actor="key-1")
    with store.unit() as u:
        u.add(stored)
        u.enqueue(registered(stored).subject(), event.model_dump_json(), "")
    async with running("dataset", build, settings):
        env, data = (await wait_for(lambda: of_type(events, DatasetRegistered)))[0]
        await wait_for(lambda: not pending(store))
    assert data == registered(stored) and (env.id, env.tenant) == (event.id, "acme")
    store.dispose()


def pending(store: DatasetStore) -> list:
    with store.unit() as u:
        return u.pending_events()


async def test_concurrent_versions_of_one_name_take_the_next_numbers(settings, service, events):
    key = await put_api_key(settings.nats_url, "developer", "acme")
    a, b = await asyncio.gather(create(service, key, name="r", content=jsonl(ROWS)),
                                create(service, key, name="r", content=jsonl(ROWS[:30])))
    assert sorted((a.version, b.version)) == [1, 2] and a.id != b.id
    for ds in (a, b):
        await wait_for(lambda d=ds: of_type(events, DatasetRegistered, dataset_id=d.id))


async def test_concurrent_calls_with_one_idempotency_key_make_one_version(
        settings, service, events):
    key = await put_api_key(settings.nats_url, "developer", "acme")
    req = dict(name="r", content=jsonl(ROWS), idempotency_key="same")
    a, b = await asyncio.gather(create(service, key, **req), create(service, key, **req))
    assert a == b
    ch, client, md = stub(service, key)
    async with ch:
        listed = await client.ListDatasets(datasets_pb2.ListDatasetsRequest(), metadata=md)
    assert [d.id for d in listed.datasets] == [a.id]
    await wait_for(lambda: of_type(events, DatasetRegistered, dataset_id=a.id))
    await asyncio.sleep(0.2)  # a second announcement would have arrived by now
    assert len(of_type(events, DatasetRegistered)) == 1


# -- the store on SQLite and PostgreSQL ------------------------------------------------------------


def record(**kw) -> DatasetRecord:
    fields = dict(
        id="ds-" + uuid.uuid4().hex[:12], tenant="acme", name="r", sha256="a" * 64,
        format="prompt_completion", num_rows=3, train_rows=2, validation_rows=1,
        artifacts={"raw": "blobs/sha256/x", "train": "t", "validation": "v"},
        split_sha256={"train": "1" * 64, "validation": "2" * 64}, validation_fraction=0.1,
        seed=2**40, created_at="2025-01-01T00:00:00.000000Z", created_by="key-1",
        request_sha256="f" * 64,
    )
    return DatasetRecord(**(fields | kw))


@pytest.fixture
def store(db_url):
    s = DatasetStore(db_url)
    s.migrate()
    yield s
    s.dispose()


def test_store_is_tenant_scoped_and_round_trips(store):
    a = record(name="r", created_at="2025-01-01T00:00:01.000000Z")
    b = record(name="s", created_at="2025-01-01T00:00:02.000000Z", idempotency_key="k")
    foreign = record(tenant="globex", idempotency_key="k")
    with store.unit() as u:
        for r in (a, b, foreign):
            u.add(r)
    with store.unit() as u:
        assert u.get("acme", a.id) == a
        assert u.get("globex", a.id) is None
        assert u.versions("acme") == [a, b]
        assert u.versions("acme", name="s") == [b]
        assert u.by_idempotency_key("acme", "k") == b
        assert u.by_idempotency_key("globex", "k") == foreign
    with pytest.raises(IntegrityError), store.unit() as u:
        u.add(record(idempotency_key="k"))
    with store.unit() as u:  # the refused insert took nothing with it
        assert len(u.versions("acme")) == 2


@pytest.mark.parametrize(
    ("rows", "fmt"),
    [
        ([{"text": f"document {i}: the river and the stone"} for i in range(6)], "text"),
        ([{"prompt": f"Q{i}?", "chosen": f" yes {i}", "rejected": f" no {i}"} for i in range(6)],
         "preference"),
    ],
)
async def test_text_and_preference_datasets(settings, service, events, rows, fmt):
    key = await put_api_key(settings.nats_url, "developer", "acme")
    ds = await create(service, key, name=f"ds-{fmt}", content=jsonl(rows), filename="d.jsonl")
    expected = hashlib.sha256(canonical_jsonl(rows)).hexdigest()
    assert (ds.format, ds.num_rows, ds.sha256) == (fmt, 6, expected)
    artifacts = LocalArtifactStore(settings.data_dir / "artifacts")
    stored = b"".join(artifacts.get_bytes(ds.artifacts[s]) for s in ("train", "validation"))
    assert sorted(stored.decode().splitlines()) == sorted(core.canonical(r) for r in rows)
    _, registered = (
        await wait_for(lambda: of_type(events, DatasetRegistered, dataset_id=ds.id))
    )[0]
    assert registered.format == fmt

    bad = rows[:2] + [{"prompt": "p", "completion": "c"}]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await create(service, key, name="mixed", content=jsonl(bad), filename="m.jsonl")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"m.jsonl:3: mixed schemas: a prompt_completion row in a file of {fmt} rows " \
        "(set by m.jsonl:1)" in err.value.details()


async def test_job_whose_objective_needs_another_format_is_rejected(settings, service, events):
    key = await put_api_key(settings.nats_url, "developer", "acme")
    ds = await create(service, key, name="sft-rows", content=jsonl(ROWS))
    await publish_job(settings.nats_url, "acme", "job-dpo", ds.id, spec={"objective": "dpo"})
    _, rejected = (await wait_for(lambda: of_type(events, DatasetRejected, job_id="job-dpo")))[0]
    assert "objective dpo needs a dataset of format preference" in rejected.reason
    assert not of_type(events, DatasetValidated, job_id="job-dpo")


def test_store_numbers_versions_per_name_and_refuses_a_taken_number(store):
    with store.unit() as u:
        for name, version in (("r", 1), ("r", 2), ("other", 1)):
            u.add(record(name=name, version=version))
        assert u.latest_version("acme", "r") == 2 and u.latest_version("acme", "x") == 0
    with pytest.raises(IntegrityError), store.unit() as u:
        u.add(record(name="r", version=2))


# -- streaming upload, import, derive, report, preview -------------------------------------------


async def upload(port, key, chunks: list[bytes], **options):
    ch, client, md = stub(port, key)

    async def messages():
        yield datasets_pb2.UploadDatasetChunk(
            options=datasets_pb2.CreateDatasetRequest(**options))
        for chunk in chunks:
            yield datasets_pb2.UploadDatasetChunk(data=chunk)

    async with ch:
        return await client.UploadDataset(messages(), metadata=md)


def chunked(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


async def test_streamed_upload_equals_one_message_upload(settings, service):
    key = await put_api_key(settings.nats_url, "developer", "acme")
    streamed = await upload(service, key, chunked(jsonl(ROWS), 97), name="s",
                            filename="s.jsonl")
    whole = await create(service, key, name="w", content=jsonl(ROWS))
    assert streamed.sha256 == whole.sha256 and streamed.num_rows == 40
    artifacts = LocalArtifactStore(settings.data_dir / "artifacts")
    assert artifacts.get_bytes(streamed.artifacts["raw"]) == jsonl(ROWS)
    assert list((settings.data_dir / "spool").iterdir()) == []  # the spooled upload is gone


async def test_upload_protocol_and_size_errors_store_nothing(settings, service):
    key = await put_api_key(settings.nats_url, "developer", "acme")
    ch, client, md = stub(service, key)

    async def data_first():
        yield datasets_pb2.UploadDatasetChunk(data=b"x")

    async with ch:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await client.UploadDataset(data_first(), metadata=md)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith("options: the first message")


async def test_upload_over_the_size_limit_is_refused(nats_server, tmp_path):
    settings = Settings(nats_url=nats_server.url, data_dir=tmp_path, grpc_port=free_port(),
                        dataset_max_upload_bytes=1000)
    async with running("dataset", build, settings) as port:
        key = await put_api_key(settings.nats_url, "developer", "acme")
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await upload(port, key, chunked(jsonl(ROWS), 300), name="big")
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "1000 bytes" in e.value.details()
    assert LocalArtifactStore(tmp_path / "artifacts").list() == []


async def test_compressed_upload_past_the_expansion_limit_is_refused(nats_server, tmp_path):
    settings = Settings(nats_url=nats_server.url, data_dir=tmp_path, grpc_port=free_port(),
                        dataset_max_expanded_bytes=5000)
    async with running("dataset", build, settings) as port:
        key = await put_api_key(settings.nats_url, "developer", "acme")
        small = await create(port, key, name="ok", content=gzip.compress(jsonl(ROWS[:5])),
                             filename="ok.jsonl.gz")
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await create(port, key, name="bomb", content=gzip.compress(b"\n" * 10**6),
                         filename="bomb.jsonl.gz")
        ch, client, md = stub(port, key)
        async with ch:
            listed = await client.ListDatasets(datasets_pb2.ListDatasetsRequest(), metadata=md)
    assert small.num_rows == 5 and small.source_format == "jsonl"
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "bomb.jsonl.gz" in e.value.details() and "5000" in e.value.details()
    assert [d.name for d in listed.datasets] == ["ok"]


async def import_uri(port, key, uri: str, **options):
    ch, client, md = stub(port, key)
    async with ch:
        return await client.ImportDataset(datasets_pb2.ImportDatasetRequest(
            options=datasets_pb2.CreateDatasetRequest(**options), source_uri=uri), metadata=md)


async def test_import_from_a_server_path_only_under_allowed_roots(nats_server, tmp_path):
    allowed, outside = tmp_path / "imports", tmp_path / "private"
    allowed.mkdir()
    outside.mkdir()
    (allowed / "ok.jsonl").write_bytes(jsonl(ROWS))
    (outside / "secret.jsonl").write_bytes(jsonl(ROWS))
    (allowed / "link.jsonl").symlink_to(outside / "secret.jsonl")
    settings = Settings(nats_url=nats_server.url, data_dir=tmp_path / "data",
                        grpc_port=free_port(), dataset_import_roots=[allowed])
    async with running("dataset", build, settings) as port:
        key = await put_api_key(settings.nats_url, "developer", "acme")
        ds = await import_uri(port, key, (allowed / "ok.jsonl").as_uri(), name="imported")
        assert ds.num_rows == 40 and json.loads(ds.transformation)["op"] == "import"
        refused = {
            (outside / "secret.jsonl").as_uri(): grpc.StatusCode.PERMISSION_DENIED,
            str(allowed / "link.jsonl"): grpc.StatusCode.PERMISSION_DENIED,
            f"{allowed}/../private/secret.jsonl": grpc.StatusCode.INVALID_ARGUMENT,
            "http://example.com/data.jsonl": grpc.StatusCode.INVALID_ARGUMENT,
            "s3://not-allowed/data.jsonl": grpc.StatusCode.PERMISSION_DENIED,
            "relative/data.jsonl": grpc.StatusCode.INVALID_ARGUMENT,
            f"{allowed.as_uri()}/ok%00.jsonl": grpc.StatusCode.INVALID_ARGUMENT,
            "s3://not-allowed/a#b.jsonl": grpc.StatusCode.INVALID_ARGUMENT,
        }
        for uri, code in refused.items():
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await import_uri(port, key, uri, name="x")
            assert e.value.code() == code, uri
            assert e.value.details().startswith("source_uri"), e.value.details()
        ch, client, md = stub(port, key)
        async with ch:
            listed = await client.ListDatasets(datasets_pb2.ListDatasetsRequest(), metadata=md)
    assert [d.name for d in listed.datasets] == ["imported"]


@pytest.fixture(scope="module")
def weed(tmp_path_factory):
    with seaweed_s3(tmp_path_factory.mktemp("weed")) as ep:
        yield ep


async def test_import_from_an_allowed_s3_bucket(nats_server, tmp_path, weed):
    uploads = S3ArtifactStore(weed.endpoint, weed.access_key, weed.secret_key, "raw-data")
    uploads.put_bytes("team/chat.jsonl", jsonl(ROWS))
    settings = Settings(nats_url=nats_server.url, data_dir=tmp_path, grpc_port=free_port(),
                        s3_endpoint=weed.endpoint, s3_access_key=weed.access_key,
                        s3_secret_key=weed.secret_key, dataset_import_buckets=["raw-data"])
    async with running("dataset", build, settings) as port:
        key = await put_api_key(settings.nats_url, "developer", "acme")
        ds = await import_uri(port, key, "s3://raw-data/team/chat.jsonl", name="from-s3")
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await import_uri(port, key, "s3://raw-data/team/missing.jsonl", name="gone")
    assert ds.num_rows == 40 and ds.sha256 == hashlib.sha256(canonical_jsonl(ROWS)).hexdigest()
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "s3://raw-data/team/missing.jsonl" in e.value.details()


SECRET_EMAIL = "ada.lovelace@example.org"


async def test_derive_dedup_and_redact_records_lineage_and_report(settings, service, events):
    key = await put_api_key(settings.nats_url, "developer", "acme")
    rows = ROWS[:20] + ROWS[:3] + [{"prompt": f"write to {SECRET_EMAIL}", "completion": " ok"}]
    parent = await create(service, key, name="raw", content=jsonl(rows), test_fraction=0.1)
    assert parent.status == "accepted_with_warnings"
    assert any(w.startswith("3 exact duplicate") for w in parent.warnings)

    ch, client, md = stub(service, key)
    async with ch:
        report = await client.GetDatasetReport(
            datasets_pb2.GetDatasetReportRequest(id=parent.id), metadata=md)
        child = await client.DeriveDataset(datasets_pb2.DeriveDatasetRequest(
            parent_id=parent.id, quality=datasets_pb2.QualityOptions(
                remove_duplicates=True, redact_pii=True)), metadata=md)
        with pytest.raises(grpc.aio.AioRpcError) as nothing:
            await client.DeriveDataset(datasets_pb2.DeriveDatasetRequest(parent_id=parent.id),
                                       metadata=md)
        child_report = await client.GetDatasetReport(
            datasets_pb2.GetDatasetReportRequest(id=child.id), metadata=md)
    assert (report.exact_duplicates, report.pii_rows, dict(report.pii_counts)) == (
        3, 1, {"email": 1})
    assert [(f.row, f.other_row) for f in report.findings if f.kind == "duplicate"] == [
        (21, 1), (22, 2), (23, 3)]
    (pii,) = [f for f in report.findings if f.kind == "pii:email"]
    assert pii.row == 24 and SECRET_EMAIL not in report.report_json
    assert report.chars.count == 24 and report.chars.max >= report.chars.p50 > 0

    assert (child.name, child.version, child.parent_id) == ("raw", 2, parent.id)
    assert child.num_rows == 21 and child.test_fraction == parent.test_fraction
    recipe = json.loads(child.transformation)
    assert recipe == {"op": "derive", "parent": parent.id, "redact_pii": True,
                      "remove_duplicates": True, "remove_near_duplicates": False,
                      "resplit": False}
    rows_text = LocalArtifactStore(settings.data_dir / "artifacts").get_bytes(
        child.artifacts["rows"]).decode()
    assert SECRET_EMAIL not in rows_text and "[EMAIL]" in rows_text
    assert "raw" not in child.artifacts and "raw" in parent.artifacts
    assert dict(child_report.pii_counts) == {} and child_report.exact_duplicates == 0
    assert dict(child_report.redacted_counts) == {"email": 1}
    assert child_report.removed_exact_duplicates == 3 and child.status == "accepted"
    assert nothing.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    _, registered = (
        await wait_for(lambda: of_type(events, DatasetRegistered, dataset_id=child.id))
    )[0]
    assert (registered.sha256, registered.version, registered.parent_id) == (
        child.sha256, 2, parent.id)
    assert json.loads(registered.transformation) == recipe


async def test_preview_renders_rows_as_the_trainer_sees_them(settings, service, tmp_path):
    model = build_tiny_model(tmp_path / "tiny")
    key = await put_api_key(settings.nats_url, "developer", "acme")
    chat = [{"messages": [{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": f"hello {i}"},
                          {"role": "assistant", "content": f"hi {i}"}]} for i in range(4)]
    ds = await create(service, key, name="chat", content=jsonl(chat), base_model=str(model),
                      max_length=8)
    ch, client, md = stub(service, key)
    async with ch:
        preview = await client.PreviewDataset(datasets_pb2.PreviewDatasetRequest(
            id=ds.id, base_model=str(model), limit=2), metadata=md)
        report = await client.GetDatasetReport(
            datasets_pb2.GetDatasetReportRequest(id=ds.id), metadata=md)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await client.PreviewDataset(datasets_pb2.PreviewDatasetRequest(id=ds.id), metadata=md)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert preview.split == "train" and preview.split_rows == ds.train_rows
    row = preview.rows[0]
    messages = json.loads(row.row_json)["messages"]
    assert "Be brief." in row.rendered and messages[1]["content"] in row.rendered
    assert row.learned.strip().startswith(messages[2]["content"])
    assert messages[1]["content"] not in row.learned
    assert 0 < row.learned_tokens < row.num_tokens and not row.truncated
    assert report.tokenizer == str(model) and report.tokens.count == 4
    assert report.truncated_rows == 4 and report.tokens.min > 8


async def test_a_100_mb_single_line_is_refused_by_line_and_nothing_is_stored(settings, service):
    key = await put_api_key(settings.nats_url, "developer", "acme")
    ch, client, md = stub(service, key)
    head = jsonl(ROWS[:2]) + b'{"prompt": "'

    async def messages():
        yield datasets_pb2.UploadDatasetChunk(options=datasets_pb2.CreateDatasetRequest(
            name="huge", filename="huge.jsonl"))
        yield datasets_pb2.UploadDatasetChunk(data=head)
        for _ in range(100):  # 100 MiB of one line, sent without holding it here either
            yield datasets_pb2.UploadDatasetChunk(data=b"x" * (1 << 20))
        yield datasets_pb2.UploadDatasetChunk(data=b'", "completion": "y"}\n' + jsonl(ROWS[2:4]))

    async with ch:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await client.UploadDataset(messages(), metadata=md)
        listed = await client.ListDatasets(datasets_pb2.ListDatasetsRequest(), metadata=md)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith("1 invalid row; huge.jsonl:3: line is ")
    assert f"limit of {settings.dataset_max_line_bytes} bytes" in e.value.details()
    assert list(listed.datasets) == []
    assert LocalArtifactStore(settings.data_dir / "artifacts").list() == []
    assert list((settings.data_dir / "spool").iterdir()) == []


@pytest.mark.parametrize("name", ["../etc", "/etc/passwd", "a/../../b", "data\x00"])
async def test_names_that_are_paths_are_refused(settings, service, name):
    key = await put_api_key(settings.nats_url, "developer", "acme")
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await create(service, key, name=name, content=jsonl(ROWS))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith("name: must")
    assert LocalArtifactStore(settings.data_dir / "artifacts").list() == []


async def test_a_redacted_upload_keeps_no_link_to_the_unredacted_file(settings, service):
    key = await put_api_key(settings.nats_url, "developer", "acme")
    rows = ROWS[:10] + [{"prompt": f"write to {SECRET_EMAIL}", "completion": " ok"}]
    ds = await create(service, key, name="clean", content=jsonl(rows),
                      quality=datasets_pb2.QualityOptions(redact_pii=True))
    artifacts = LocalArtifactStore(settings.data_dir / "artifacts")
    assert "raw" not in ds.artifacts
    assert all(SECRET_EMAIL.encode() not in artifacts.get_bytes(k) for k in ds.artifacts.values())


async def test_base_model_problems_are_invalid_argument_or_outside_the_model_roots(
        nats_server, tmp_path):
    model = build_tiny_model(tmp_path / "models" / "tiny")
    bare = tmp_path / "models" / "no-template"
    shutil.copytree(model, bare)
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    settings = Settings(nats_url=nats_server.url, data_dir=tmp_path / "data",
                        grpc_port=free_port(), dataset_model_roots=[tmp_path / "models"])
    chat = [{"messages": [{"role": "user", "content": f"hi {i}"},
                          {"role": "assistant", "content": f"yo {i}"}]} for i in range(3)]
    # before the service starts: its key directory loads it at start (no watch to wait for)
    key = await put_api_key(settings.nats_url, "developer", "acme")
    async with running("dataset", build, settings) as port:
        errors = {}
        for name, base in (("bare", bare), ("outside", tmp_path), ("etc", "/etc")):
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await create(port, key, name=name, content=jsonl(chat), base_model=str(base))
            errors[name] = e.value
        ok = await create(port, key, name="ok", content=jsonl(chat), base_model=str(model))
    assert errors["bare"].code() == grpc.StatusCode.INVALID_ARGUMENT
    assert errors["bare"].details().startswith("base_model: its tokenizer cannot encode")
    for name in ("outside", "etc"):
        assert errors[name].code() == grpc.StatusCode.PERMISSION_DENIED
        assert "LLMSTUDIO_DATASET_MODEL_ROOTS" in errors[name].details()
    assert ok.num_rows == 3


async def test_upload_options_are_checked_before_the_file_and_the_spool_is_cleared_on_start(
        settings, nats_server):
    stale = settings.data_dir / "spool" / "ingest-stale"
    stale.mkdir(parents=True)
    (stale / "upload").write_bytes(b"left by a crash")
    async with running("dataset", build, settings) as port:
        assert not stale.exists()
        key = await put_api_key(settings.nats_url, "developer", "acme")
        ch, client, md = stub(port, key)
        sent = []

        async def messages():
            yield datasets_pb2.UploadDatasetChunk(options=datasets_pb2.CreateDatasetRequest(
                name="ok", test_fraction=2.0))
            for i in range(1000):
                sent.append(i)
                yield datasets_pb2.UploadDatasetChunk(data=b"x" * (1 << 20))
                # Paced: a send racing the server's abort fails the call client-side
                # ("Internal error from Core") before its status arrives.
                await asyncio.sleep(0.005)

        async with ch:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await client.UploadDataset(messages(), metadata=md)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith("test_fraction: must be >= 0 and < 1")
    assert len(sent) < 1000  # refused long before the whole file was sent
