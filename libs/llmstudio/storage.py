"""Artifact store: datasets, checkpoints, adapters, merged weights and eval reports.

One interface, two backends: `LocalArtifactStore` (a directory; the embedded default) and
`S3ArtifactStore` (any S3 server through the `minio` client). Keys are `/`-separated relative
paths. Immutable content goes under content-addressed keys (`put_blob`); directories such as
checkpoints go through `put_dir`, which writes `manifest.json` last, and `get_dir`, which refuses
a prefix without one: a reader only ever sees complete, verified checkpoints.

Keys and their tenant-bounded layout: `llmstudio.artifactkeys`.

`list`/`delete_prefix` use S3 prefix semantics in both backends: `"ckpt/1"` also matches
`"ckpt/10/..."`; end the prefix with `/` to mean a directory.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path

from .artifactkeys import validate_key

CHUNK = 1024 * 1024
MANIFEST = "manifest.json"
OCTET = "application/octet-stream"


class ArtifactNotFound(KeyError):
    """No object under this key."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else "artifact not found"


class IncompleteArtifact(Exception):
    """The prefix has no manifest.json: it was never written completely (or not at all)."""


class CorruptArtifact(Exception):
    """A file listed in a manifest is missing, or its size/sha256 does not match, or the
    manifest itself is malformed."""


def _dir_prefix(prefix: str) -> str:
    return validate_key(prefix.rstrip("/") or prefix, prefix=True).rstrip("/") + "/"


def _sha256_file(path: Path) -> tuple[str, int]:
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def _write_atomic(dest: Path, chunks) -> tuple[str, int]:
    """Write chunks to a temp file beside `dest`, then rename: readers never see half a file.
    Returns (sha256, size) of what was written."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    h, size = hashlib.sha256(), 0
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
                h.update(chunk)
                size += len(chunk)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return h.hexdigest(), size


class ArtifactStore(ABC):
    # -- backend primitives -------------------------------------------------------------------
    @abstractmethod
    def put_bytes(self, key: str, data: bytes, content_type: str = OCTET) -> str: ...

    @abstractmethod
    def put_file(self, key: str, path: str | Path, content_type: str = OCTET) -> str:
        """Upload a local file without reading it whole into memory. Returns the key."""

    @abstractmethod
    def open_stream(self, key: str) -> Iterator[bytes]:
        """Chunks of the object. Raises ArtifactNotFound at call time, not on first next()."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """All keys starting with `prefix`, recursively, sorted."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> int:
        """Delete every key starting with `prefix` (non-empty). Returns how many."""

    @abstractmethod
    def uri(self, key: str) -> str: ...

    # -- built on the primitives --------------------------------------------------------------
    def get_bytes(self, key: str) -> bytes:
        return b"".join(self.open_stream(key))

    def download_file(self, key: str, dest_path: str | Path) -> Path:
        dest = Path(dest_path)
        _write_atomic(dest, self.open_stream(key))
        return dest

    def put_blob(self, data_or_path: bytes | str | Path, prefix: str = "blobs/sha256") -> str:
        """Store immutable content under `<prefix>/<sha256 hex>`; existing blobs are not
        rewritten."""
        folder = _dir_prefix(prefix)
        if isinstance(data_or_path, bytes | bytearray | memoryview):
            data = bytes(data_or_path)
            key = f"{folder}{hashlib.sha256(data).hexdigest()}"
            if not self.exists(key):
                self.put_bytes(key, data)
            return key
        path = Path(data_or_path)
        key = f"{folder}{_sha256_file(path)[0]}"
        if not self.exists(key):
            self.put_file(key, path)
        return key

    def put_dir(self, prefix: str, local_dir: str | Path, manifest_last: bool = True) -> str:
        """Upload every file under `local_dir` to `prefix/`, plus `prefix/manifest.json`.

        The manifest is the commit marker, so by default it goes last: a crash mid-upload leaves
        a prefix that `get_dir` refuses. A `manifest.json` already in the directory is uploaded
        as is; otherwise one is generated listing path, size and sha256 of each file.
        `manifest_last=False` uploads it first (only useful to test readers). Returns the prefix.
        """
        base, root = _dir_prefix(prefix), Path(local_dir)
        if not root.is_dir():
            raise NotADirectoryError(f"put_dir: {root} is not a directory")
        own = root / MANIFEST
        files = sorted(p for p in root.rglob("*") if p.is_file() and p != own)
        if own.is_file():
            manifest = own.read_bytes()
        else:
            entries = []
            for p in files:
                sha, size = _sha256_file(p)
                entries.append(
                    {"path": p.relative_to(root).as_posix(), "size": size, "sha256": sha})
            manifest = json.dumps({"version": 1, "files": entries}, indent=1).encode()
        if not manifest_last:
            self.put_bytes(base + MANIFEST, manifest, "application/json")
        for p in files:
            self.put_file(base + p.relative_to(root).as_posix(), p)
        if manifest_last:
            self.put_bytes(base + MANIFEST, manifest, "application/json")
        return base

    def get_dir(self, prefix: str, local_dir: str | Path) -> dict:
        """Download the files listed in `prefix/manifest.json` into `local_dir`, verifying each
        sha256 while streaming. Raises IncompleteArtifact without a manifest, CorruptArtifact on
        any mismatch (the bad file is not left in `local_dir`). Returns the manifest."""
        base, root = _dir_prefix(prefix), Path(local_dir)
        try:
            raw = self.get_bytes(base + MANIFEST)
        except ArtifactNotFound:
            raise IncompleteArtifact(
                f"{self.uri(base)} has no {MANIFEST}: incomplete or missing artifact"
            ) from None
        try:
            manifest = json.loads(raw)
            entries = [(e["path"], e["sha256"], e.get("size")) for e in manifest["files"]]
        except (ValueError, KeyError, TypeError) as e:
            raise CorruptArtifact(f"{self.uri(base + MANIFEST)} is malformed: {e!r}") from None
        for rel, want_sha, want_size in entries:
            key = validate_key(base + rel)  # a manifest must not write outside local_dir
            dest = root / rel
            try:
                sha, size = _write_atomic(dest, self.open_stream(key))
            except ArtifactNotFound:
                raise CorruptArtifact(
                    f"{self.uri(key)} is listed in {MANIFEST} but missing") from None
            if sha != want_sha or (want_size is not None and size != want_size):
                dest.unlink(missing_ok=True)
                raise CorruptArtifact(
                    f"{self.uri(key)}: sha256 {sha} size {size}, manifest says "
                    f"sha256 {want_sha} size {want_size}"
                )
        root.mkdir(parents=True, exist_ok=True)
        (root / MANIFEST).write_bytes(raw)
        return manifest


class LocalArtifactStore(ArtifactStore):
    # Temp files of _write_atomic: hidden from list().
    _TMP = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / validate_key(key)

    def put_bytes(self, key: str, data: bytes, content_type: str = OCTET) -> str:
        _write_atomic(self._path(key), [data])
        return key

    def put_file(self, key: str, path: str | Path, content_type: str = OCTET) -> str:
        dest = self._path(key)
        with open(path, "rb") as f:
            _write_atomic(dest, iter(lambda: f.read(CHUNK), b""))
        return key

    def open_stream(self, key: str) -> Iterator[bytes]:
        try:
            f = open(self._path(key), "rb")
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise ArtifactNotFound(f"no artifact {self.uri(key)}") from None

        def chunks():
            with f:
                while chunk := f.read(CHUNK):
                    yield chunk

        return chunks()

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        if prefix:
            validate_key(prefix, prefix=True)
        # Walk only the deepest directory that can hold matches.
        start = self.root / prefix.rpartition("/")[0]
        keys = []
        for dirpath, _dirs, names in os.walk(start):
            for name in names:
                if self._TMP.match(name):
                    continue
                key = Path(dirpath, name).relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list(validate_key(prefix, prefix=True))
        for key in keys:
            path = self.root / key
            path.unlink(missing_ok=True)
            # Drop directories the deletion emptied, so the tree mirrors the key space.
            parent = path.parent
            while parent != self.root and not any(parent.iterdir()):
                parent.rmdir()
                parent = parent.parent
        return len(keys)

    def uri(self, key: str) -> str:
        uri = (self.root / validate_key(key, prefix=True)).as_uri()
        return uri + ("/" if key.endswith("/") else "")


class S3ArtifactStore(ArtifactStore):
    def __init__(
        self,
        endpoint: str,
        access_key: str,
        secret_key: str,
        bucket: str,
        secure: bool = False,
        region: str | None = None,
        create_bucket: bool = True,
    ):
        from minio import Minio  # imported here so the local backend needs no minio
        from minio.error import S3Error

        # Accept "http://host:port" as well as minio's bare "host:port".
        if m := re.match(r"^(https?)://(.*?)/?$", endpoint):
            secure, endpoint = m.group(1) == "https", m.group(2)
        self.bucket, self._S3Error = bucket, S3Error
        self.client = Minio(
            endpoint, access_key=access_key, secret_key=secret_key, secure=secure, region=region
        )
        if create_bucket and not self._bucket_exists(bucket):
            try:
                self.client.make_bucket(bucket_name=bucket, location=region)
            except S3Error as e:  # another process created it in between
                if e.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise

    def _bucket_exists(self, bucket: str) -> bool:
        try:
            return self.client.bucket_exists(bucket_name=bucket)
        except self._S3Error as e:
            # A least-privilege user may list only its own prefixes, so MinIO refuses the
            # prefix-less HEAD: the operator made the bucket (minio-init) for such users.
            if e.code == "AccessDenied":
                return True
            raise

    def _missing(self, e: Exception) -> bool:
        return isinstance(e, self._S3Error) and e.code in (
            "NoSuchKey", "NotFound", "ResourceNotFound")

    def put_bytes(self, key: str, data: bytes, content_type: str = OCTET) -> str:
        self.client.put_object(
            bucket_name=self.bucket, object_name=validate_key(key), data=io.BytesIO(data),
            length=len(data), content_type=content_type,
        )
        return key

    def put_file(self, key: str, path: str | Path, content_type: str = OCTET) -> str:
        # fput_object reads part by part (multipart above 5 MiB), never the whole file.
        self.client.fput_object(
            bucket_name=self.bucket, object_name=validate_key(key), file_path=str(path),
            content_type=content_type,
        )
        return key

    def open_stream(self, key: str) -> Iterator[bytes]:
        try:
            resp = self.client.get_object(bucket_name=self.bucket, object_name=validate_key(key))
        except Exception as e:
            if self._missing(e):
                raise ArtifactNotFound(f"no artifact {self.uri(key)}") from None
            raise

        def chunks():
            try:
                yield from resp.stream(CHUNK)
            finally:
                resp.close()
                resp.release_conn()

        return chunks()

    def exists(self, key: str) -> bool:
        try:
            self.client.stat_object(bucket_name=self.bucket, object_name=validate_key(key))
            return True
        except Exception as e:
            if self._missing(e):
                return False
            raise

    def list(self, prefix: str = "") -> list[str]:
        if prefix:
            validate_key(prefix, prefix=True)
        objs = self.client.list_objects(
            bucket_name=self.bucket, prefix=prefix or None, recursive=True)
        return sorted(o.object_name for o in objs if not o.is_dir)

    def delete_prefix(self, prefix: str) -> int:
        from minio.deleteobjects import DeleteObject

        keys = self.list(validate_key(prefix, prefix=True))
        # remove_objects is lazy: nothing is deleted until its error iterator is consumed.
        doomed = [DeleteObject(name=k) for k in keys]
        errors = list(
            self.client.remove_objects(bucket_name=self.bucket, delete_object_list=doomed))
        if errors:
            raise OSError(
                f"delete_prefix {self.uri(prefix)}: {len(errors)} failed, first: {errors[0]}")
        return len(keys)

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{validate_key(key, prefix=True)}"


def artifact_store_from_settings(settings) -> ArtifactStore:
    kind = settings.artifact_store.lower()
    if kind in ("file", "local"):
        return LocalArtifactStore(settings.artifact_root or Path(settings.data_dir) / "artifacts")
    if kind == "s3":
        return S3ArtifactStore(
            settings.s3_endpoint, settings.s3_access_key, settings.s3_secret_key,
            settings.s3_bucket, secure=settings.s3_secure, region=settings.s3_region,
        )
    raise ValueError(
        f"LLMSTUDIO_ARTIFACT_STORE={settings.artifact_store!r}: expected 'file' or 's3'")
