"""A version's files in the artifact store: the raw upload, the normalized rows, the split files
and the report. Rows and splits are content-addressed (stored once however many versions share
them); a version's record is written only after all its files, so no version is ever partial.
A job's check hashes the split files again; a preview reads a few lines of one."""

from __future__ import annotations

import hashlib
from pathlib import Path

from llmstudio.storage import ArtifactNotFound, ArtifactStore

from . import core
from .ingest import Ingested, report_json

JSONL = "application/jsonl"


def write_files(artifacts: ArtifactStore, tenant: str, ingested: Ingested, dataset_id: str,
                split_prefix: str, raw: Path | None) -> dict[str, str]:
    """Store a version's files under the tenant's prefix; returns its artifacts map
    (kind -> key)."""
    keys: dict[str, str] = {}
    if raw is not None:
        keys["raw"] = artifacts.put_blob(raw, core.raw_prefix(tenant))
    rows = core.rows_key(tenant, ingested.sha256)
    if not artifacts.exists(rows):
        artifacts.put_file(rows, ingested.rows_path, JSONL)
    keys["rows"] = rows
    for split, path in ingested.split_paths.items():
        keys[split] = artifacts.put_file(f"{split_prefix}/{split}.jsonl", path, JSONL)
    keys["report"] = artifacts.put_bytes(core.report_key(tenant, dataset_id),
                                         report_json(ingested.report), "application/json")
    return keys


def split_problems(
    artifacts: ArtifactStore, keys: dict[str, str], recorded: dict[str, str]
) -> list[str]:
    """What is wrong with the stored split files (missing, or sha256 differs from the record)."""
    problems = []
    for split, expected in recorded.items():
        key = keys[split]
        try:
            chunks = artifacts.open_stream(key)
        except ArtifactNotFound:
            problems.append(f"{split} split is missing: no artifact {key}")
            continue
        digest = hashlib.sha256()
        for chunk in chunks:
            digest.update(chunk)
        if digest.hexdigest() != expected:
            problems.append(
                f"{split} split is corrupt: {key} has sha256 {digest.hexdigest()}, "
                f"recorded {expected}"
            )
    return problems


def read_lines(
    artifacts: ArtifactStore, key: str, offset: int, limit: int
) -> list[tuple[int, str]]:
    """Lines offset..offset+limit of a stored JSONL file, streamed (never the whole file)."""
    rows, buffer, index = [], b"", 0
    for chunk in artifacts.open_stream(key):
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            if index >= offset:
                rows.append((index, line.decode("utf-8")))
                if len(rows) == limit:
                    return rows
            index += 1
    return rows
