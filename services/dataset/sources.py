"""Where ImportDataset may read from: S3 URIs of allowed buckets, server paths under allowed
roots. Everything else is refused before a byte is read. And the S3 fetch itself, bounded by
the upload size limit."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlparse

from llmstudio.config import Settings
from llmstudio.errors import (
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
)
from llmstudio.modelroots import check_model_root
from llmstudio.storage import S3ArtifactStore


@dataclass(frozen=True)
class S3Source:
    bucket: str
    key: str

    @property
    def name(self) -> str:
        return PurePosixPath(self.key).name


@dataclass(frozen=True)
class PathSource:
    path: Path

    @property
    def name(self) -> str:
        return self.path.name


def parse_source(uri: str, allowed_buckets: list[str],
                 allowed_roots: list[Path]) -> S3Source | PathSource:
    """Check `uri` against the allowlists. Raises InvalidArgument (malformed, unsupported scheme,
    '..') or PermissionDenied (outside the allowlists)."""
    if not uri:
        raise InvalidArgument("source_uri", "required (s3://bucket/key or file:///path)")
    if "\x00" in uri or "%00" in uri:
        raise InvalidArgument("source_uri", "must not contain a NUL character")
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        if parsed.query or parsed.fragment or uri.endswith(("?", "#")):
            raise InvalidArgument("source_uri", f"{uri!r}: an S3 URI takes no '?' or '#' part "
                                                "(percent-encode them in the key)")
        key = parsed.path.lstrip("/")
        if not parsed.netloc or not key:
            raise InvalidArgument("source_uri", f"{uri!r}: expected s3://bucket/key")
        if ".." in PurePosixPath(key).parts:
            raise InvalidArgument("source_uri", f"{uri!r}: '..' is not allowed in a key")
        if parsed.netloc not in allowed_buckets:
            allowed = ", ".join(allowed_buckets) or "none (LLMSTUDIO_DATASET_IMPORT_BUCKETS)"
            raise PermissionDenied(f"source_uri: bucket {parsed.netloc!r} is not in the import "
                                   f"allowlist (allowed: {allowed})")
        return S3Source(parsed.netloc, key)
    if parsed.scheme not in ("file", ""):
        raise InvalidArgument("source_uri", f"scheme {parsed.scheme!r} is not supported: use "
                                            "s3://bucket/key or file:///path")
    if parsed.scheme == "file" and parsed.netloc not in ("", "localhost"):
        raise InvalidArgument("source_uri", f"{uri!r}: a file URI names no host")
    raw = unquote(parsed.path) if parsed.scheme == "file" else uri
    path = PurePosixPath(raw)
    if not path.is_absolute():
        raise InvalidArgument("source_uri", f"{uri!r}: a server path must be absolute")
    if ".." in path.parts:
        raise InvalidArgument("source_uri", f"{uri!r}: '..' is not allowed in a path")
    if not allowed_roots:
        raise PermissionDenied("source_uri: importing server paths is disabled (set "
                               "LLMSTUDIO_DATASET_IMPORT_ROOTS)")
    resolved = Path(raw).resolve()  # a symlink must not lead out of the roots either
    roots = [Path(r).resolve() for r in allowed_roots]
    if not any(resolved.is_relative_to(root) for root in roots):
        raise PermissionDenied(f"source_uri: {raw} is outside the allowed import roots "
                               f"({', '.join(map(str, roots))})")
    if not resolved.exists():
        raise InvalidArgument("source_uri", f"{raw}: no such file or folder")
    return PathSource(resolved)


def check_model_dir(base_model: str, allowed_roots: list[Path]) -> None:
    """With model roots configured, base_model must be a folder under one of them (so a read
    key cannot probe the server's files through tokenizer errors). Raises PermissionDenied."""
    check_model_root("base_model", base_model, allowed_roots, "LLMSTUDIO_DATASET_MODEL_ROOTS")


def fetch_s3(settings: Settings, source: S3Source, dest: Path) -> None:
    """Copy the object to `dest`, streamed (blocking: run it in a thread). Raises
    FailedPrecondition when it cannot be read, ResourceExhausted past the upload size limit."""
    s, where = settings, f"s3://{source.bucket}/{source.key}"
    store = S3ArtifactStore(s.s3_endpoint, s.s3_access_key, s.s3_secret_key, source.bucket,
                            secure=s.s3_secure, region=s.s3_region, create_bucket=False)
    try:
        chunks = store.open_stream(source.key)
    except Exception as e:  # noqa: BLE001 - any S3 failure is the caller's to fix
        raise FailedPrecondition(f"source_uri: cannot read {where}: {e}") from None
    size = 0
    with dest.open("wb") as sink:
        for chunk in chunks:
            size += len(chunk)
            if size > s.dataset_max_upload_bytes:
                raise ResourceExhausted(f"{where} is larger than the limit of "
                                        f"{s.dataset_max_upload_bytes} bytes")
            sink.write(chunk)
