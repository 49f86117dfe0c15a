"""The artifact store, one set of assertions against every backend: the local filesystem, a
real S3 server (`weed mini`, started once per session) and MinIO in Docker (testcontainers;
skipped where no Docker engine is reachable)."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path

import pytest

from llmstudio.artifactkeys import InvalidKey
from llmstudio.config import Settings
from llmstudio.storage import (
    ArtifactNotFound,
    CorruptArtifact,
    IncompleteArtifact,
    LocalArtifactStore,
    S3ArtifactStore,
    artifact_store_from_settings,
)
from tests.support.seaweed import S3Endpoint, seaweed_s3

MiB = 1024 * 1024


@pytest.fixture(scope="session")
def weed_endpoint(tmp_path_factory):
    with seaweed_s3(tmp_path_factory.mktemp("weed")) as ep:
        yield ep


def _docker_reachable() -> bool:
    try:
        import docker

        docker.from_env(timeout=3).ping()
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def minio_endpoint():
    if not _docker_reachable():
        pytest.skip("no Docker engine reachable: MinIO testcontainer not started")
    try:
        from testcontainers.community.minio import MinioContainer
    except ImportError:  # testcontainers < 4.15
        from testcontainers.minio import MinioContainer
    with MinioContainer() as container:
        cfg = container.get_config()
        yield S3Endpoint(cfg["endpoint"], cfg["access_key"], cfg["secret_key"])


@pytest.fixture(params=["local", "s3", pytest.param("minio", marks=pytest.mark.docker)])
def store(request, tmp_path):
    if request.param == "local":
        return LocalArtifactStore(tmp_path / "artifacts")
    ep = request.getfixturevalue("weed_endpoint" if request.param == "s3" else "minio_endpoint")
    # A fresh bucket per test keeps tests independent on the shared server.
    return S3ArtifactStore(ep.endpoint, ep.access_key, ep.secret_key, f"t-{uuid.uuid4().hex[:16]}")


def record_writes(store, monkeypatch) -> list[str]:
    """Spy on the store's two write primitives; returns the keys written, in order."""
    written: list[str] = []
    for name in ("put_bytes", "put_file"):
        original = getattr(store, name)

        def spy(key, *args, _original=original, **kwargs):
            written.append(key)
            return _original(key, *args, **kwargs)

        monkeypatch.setattr(store, name, spy)
    return written


def make_tree(root: Path) -> dict[str, bytes]:
    files = {
        "adapter_model.safetensors": os.urandom(300_000),
        "adapter_config.json": b'{"r": 8}',
        "tokenizer/tokenizer.json": b'{"model": {}}',
        "tokenizer/deep/special.txt": b"<s>\n</s>\n",
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


# --- round trips --------------------------------------------------------------------------------


def test_bytes_round_trip(store, tmp_path):
    assert store.put_bytes(
        "reports/eval.json", b'{"acc": 0.95}', "application/json") == "reports/eval.json"
    assert store.get_bytes("reports/eval.json") == b'{"acc": 0.95}'
    assert b"".join(store.open_stream("reports/eval.json")) == b'{"acc": 0.95}'
    store.put_bytes("reports/eval.json", b"v2")  # overwrite replaces
    assert store.get_bytes("reports/eval.json") == b"v2"
    downloaded = store.download_file("reports/eval.json", tmp_path / "out" / "e.json")
    assert downloaded.read_bytes() == b"v2"
    store.put_bytes("empty", b"")
    assert store.get_bytes("empty") == b""
    uri = store.uri("reports/eval.json")
    if isinstance(store, LocalArtifactStore):
        assert uri == (store.root / "reports/eval.json").as_uri() and uri.startswith("file:///")
    else:
        assert uri == f"s3://{store.bucket}/reports/eval.json"


def test_large_file_streams_round_trip(store, tmp_path):
    src = tmp_path / "weights.safetensors"
    data = os.urandom(6 * MiB)  # > 5 MiB: a multipart upload on S3
    src.write_bytes(data)
    assert store.put_file("ckpt/weights.safetensors", src) == "ckpt/weights.safetensors"
    chunks = list(store.open_stream("ckpt/weights.safetensors"))
    assert len(chunks) > 1 and all(len(c) <= MiB for c in chunks)  # streamed, not one blob
    assert hashlib.sha256(b"".join(chunks)).digest() == hashlib.sha256(data).digest()
    dest = store.download_file("ckpt/weights.safetensors", tmp_path / "dl" / "w.safetensors")
    assert dest.read_bytes() == data
    assert store.list("ckpt/") == ["ckpt/weights.safetensors"]  # no temp files left behind


# --- content addressing ------------------------------------------------------------------------


def test_put_blob_is_content_addressed_and_stored_once(store, tmp_path, monkeypatch):
    data = b"train split, version 1\n" * 1000
    key = store.put_blob(data)
    assert key == f"blobs/sha256/{hashlib.sha256(data).hexdigest()}"
    assert store.get_bytes(key) == data

    written = record_writes(store, monkeypatch)
    path = tmp_path / "same.jsonl"
    path.write_bytes(data)
    assert store.put_blob(data) == key
    assert store.put_blob(path) == key  # a file with the same content: same key
    assert written == []  # the existing blob was not rewritten

    other = store.put_blob(b"different")
    assert other != key and written == [other]
    assert store.list("blobs/") == sorted([key, other])


# --- list / exists / delete --------------------------------------------------------------------


def test_list_exists_delete_prefix(store):
    for key in ["run/1/a.bin", "run/1/sub/b.bin", "run/10/c.bin", "run/2/d.bin", "top.txt"]:
        store.put_bytes(key, key.encode())
    assert store.list("run/1/") == ["run/1/a.bin", "run/1/sub/b.bin"]
    assert store.list("run/1") == ["run/1/a.bin", "run/1/sub/b.bin", "run/10/c.bin"]  # S3 prefix
    assert store.list("") == [
        "run/1/a.bin", "run/1/sub/b.bin", "run/10/c.bin", "run/2/d.bin", "top.txt",
    ]
    assert store.list("nothing/") == []
    assert store.exists("run/1/sub/b.bin") and store.exists("top.txt")
    assert not store.exists("run/1/sub") and not store.exists("run/3/x")  # a "dir" is no object

    assert store.delete_prefix("run/1/") == 2
    assert store.list("") == ["run/10/c.bin", "run/2/d.bin", "top.txt"]
    assert not store.exists("run/1/a.bin")
    assert store.delete_prefix("run/1/") == 0
    with pytest.raises(InvalidKey):
        store.delete_prefix("")  # never "delete everything" by accident
    if isinstance(store, LocalArtifactStore):
        assert not (store.root / "run" / "1").exists()  # emptied directories are removed


# --- directories and manifests -----------------------------------------------------------------


def test_put_dir_writes_manifest_last_and_get_dir_round_trips(store, tmp_path, monkeypatch):
    files = make_tree(tmp_path / "ckpt")
    written = record_writes(store, monkeypatch)
    assert store.put_dir("jobs/j1/checkpoint-100", tmp_path / "ckpt") == "jobs/j1/checkpoint-100/"

    assert written[-1] == "jobs/j1/checkpoint-100/manifest.json"
    assert sorted(written[:-1]) == sorted(f"jobs/j1/checkpoint-100/{rel}" for rel in files)
    manifest = json.loads(store.get_bytes("jobs/j1/checkpoint-100/manifest.json"))
    assert {e["path"]: (e["size"], e["sha256"]) for e in manifest["files"]} == {
        rel: (len(d), hashlib.sha256(d).hexdigest()) for rel, d in files.items()
    }

    got = store.get_dir("jobs/j1/checkpoint-100/", tmp_path / "restored")
    assert got == manifest
    assert read_tree(tmp_path / "restored") == {
        **files, "manifest.json": store.get_bytes("jobs/j1/checkpoint-100/manifest.json"),
    }


def test_put_dir_uploads_an_existing_manifest_last(store, tmp_path, monkeypatch):
    files = make_tree(tmp_path / "ckpt")
    own = {
        "version": 1, "step": 7,
        "files": [{"path": r, "size": len(d), "sha256": hashlib.sha256(d).hexdigest()}
                  for r, d in files.items()],
    }
    (tmp_path / "ckpt" / "manifest.json").write_text(json.dumps(own))
    written = record_writes(store, monkeypatch)
    store.put_dir("c", tmp_path / "ckpt")
    assert written[-1] == "c/manifest.json" and written.count("c/manifest.json") == 1
    assert json.loads(store.get_bytes("c/manifest.json")) == own  # uploaded as is
    assert store.get_dir("c", tmp_path / "out")["step"] == 7
    assert read_tree(tmp_path / "out")["adapter_config.json"] == b'{"r": 8}'


def test_get_dir_refuses_a_half_written_checkpoint(store, tmp_path, monkeypatch):
    make_tree(tmp_path / "ckpt")
    # A writer that crashes after its second file: files are there, the manifest is not.
    original, calls = store.put_file, []

    def crashing_put_file(key, path, *args, **kwargs):
        calls.append(key)
        if len(calls) == 3:
            raise ConnectionError("writer died")
        return original(key, path, *args, **kwargs)

    monkeypatch.setattr(store, "put_file", crashing_put_file)
    with pytest.raises(ConnectionError):
        store.put_dir("jobs/j2/checkpoint-5", tmp_path / "ckpt")
    assert len(store.list("jobs/j2/checkpoint-5/")) == 2
    with pytest.raises(IncompleteArtifact, match="manifest.json"):
        store.get_dir("jobs/j2/checkpoint-5", tmp_path / "restored")
    assert not (tmp_path / "restored").exists()

    # Files uploaded one by one, never committed with a manifest: refused as well.
    store.put_bytes("jobs/j3/checkpoint-1/model.safetensors", b"weights")
    with pytest.raises(IncompleteArtifact):
        store.get_dir("jobs/j3/checkpoint-1/", tmp_path / "restored")
    with pytest.raises(IncompleteArtifact):
        store.get_dir("never/written", tmp_path / "restored")


def test_get_dir_detects_corrupted_and_missing_files(store, tmp_path):
    make_tree(tmp_path / "ckpt")
    store.put_dir("c1", tmp_path / "ckpt")
    store.put_bytes("c1/tokenizer/tokenizer.json", b'{"model": {"tampered": 1}}')
    with pytest.raises(CorruptArtifact, match="tokenizer/tokenizer.json.*sha256"):
        store.get_dir("c1", tmp_path / "out1")
    assert not (tmp_path / "out1" / "tokenizer" / "tokenizer.json").exists()
    assert not (tmp_path / "out1" / "manifest.json").exists()

    store.put_dir("c2", tmp_path / "ckpt")
    store.delete_prefix("c2/adapter_model.safetensors")
    with pytest.raises(CorruptArtifact, match="adapter_model.safetensors.*missing"):
        store.get_dir("c2", tmp_path / "out2")

    store.put_bytes("c3/manifest.json", b"{not json")
    with pytest.raises(CorruptArtifact, match="malformed"):
        store.get_dir("c3", tmp_path / "out3")


def test_get_dir_never_writes_outside_the_target(store, tmp_path):
    evil = {"files": [{"path": "../escaped.txt", "size": 1, "sha256": "0" * 64}]}
    store.put_bytes("c/manifest.json", json.dumps(evil).encode())
    store.put_bytes("escaped.txt", b"x")
    with pytest.raises(InvalidKey, match=r"\.\."):
        store.get_dir("c", tmp_path / "out")
    assert not (tmp_path / "escaped.txt").exists()


# --- bad input ---------------------------------------------------------------------------------


BAD_KEYS = ["", "/etc/passwd", "a/../b", "..", "../x", "a\\b", "a//b", "a/", "./a", "C:/x"]


@pytest.mark.parametrize("key", BAD_KEYS)
def test_invalid_keys_are_rejected(store, tmp_path, key):
    src = tmp_path / "f"
    src.write_bytes(b"x")
    calls = [
        lambda: store.put_bytes(key, b"x"), lambda: store.put_file(key, src),
        lambda: store.get_bytes(key), lambda: store.open_stream(key),
        lambda: store.exists(key), lambda: store.download_file(key, tmp_path / "d"),
    ]
    for call in calls:
        with pytest.raises(InvalidKey) as info:
            call()
        assert isinstance(info.value, ValueError) and repr(key) in str(info.value)
    assert store.list("") == []  # nothing was written anywhere


def test_missing_key_raises_artifact_not_found(store, tmp_path):
    store.put_bytes("present/x", b"1")
    for call in (
        lambda: store.get_bytes("present/y"),
        lambda: store.open_stream("absent"),  # raised at call time, not on first next()
        lambda: store.download_file("absent", tmp_path / "dl" / "absent"),
    ):
        with pytest.raises(ArtifactNotFound, match="absent|present/y") as info:
            call()
        assert isinstance(info.value, KeyError)
    assert not store.exists("absent")
    assert not (tmp_path / "dl" / "absent").exists()


# --- settings and server ------------------------------------------------------------------------


def test_store_from_settings(tmp_path, weed_endpoint):
    local = artifact_store_from_settings(Settings(data_dir=tmp_path / "data"))
    assert isinstance(local, LocalArtifactStore)
    assert local.root == (tmp_path / "data" / "artifacts").resolve()
    rooted = artifact_store_from_settings(Settings(artifact_root=tmp_path / "elsewhere"))
    assert rooted.root == (tmp_path / "elsewhere").resolve()

    ep = weed_endpoint
    s3 = artifact_store_from_settings(Settings(
        artifact_store="s3", s3_endpoint=f"http://{ep.endpoint}", s3_access_key=ep.access_key,
        s3_secret_key=ep.secret_key, s3_bucket="from-settings",
    ))
    assert isinstance(s3, S3ArtifactStore)
    s3.put_bytes("k", b"v")
    assert s3.get_bytes("k") == b"v" and s3.uri("k") == "s3://from-settings/k"

    with pytest.raises(ValueError, match="'gcs'"):
        artifact_store_from_settings(Settings(artifact_store="gcs"))


def test_s3_server_enforces_credentials(weed_endpoint):
    from minio.error import S3Error

    with pytest.raises(S3Error, match="SignatureDoesNotMatch"):
        S3ArtifactStore(weed_endpoint.endpoint, weed_endpoint.access_key, "wrong", "any-bucket")
