"""A dataset's files in the artifact store: the raw upload and the split JSONL files."""

from __future__ import annotations

import hashlib

from llmstudio.storage import ArtifactNotFound, ArtifactStore

from .core import SPLITS, Prepared

JSONL = "application/jsonl"


def write_files(
    artifacts: ArtifactStore, raw: bytes, prepared: Prepared, prefix: str
) -> dict[str, str]:
    """Store the upload as a content-addressed blob and each split under `prefix/<split>.jsonl`.
    Returns the artifacts map: "raw" | "train" | "validation" -> key."""
    keys = {"raw": artifacts.put_blob(raw)}
    for split in SPLITS:
        keys[split] = artifacts.put_bytes(f"{prefix}/{split}.jsonl", prepared.files[split], JSONL)
    return keys


def split_problems(
    artifacts: ArtifactStore, keys: dict[str, str], recorded: dict[str, str]
) -> list[str]:
    """What is wrong with the stored split files (missing, or sha256 differs from the record)."""
    problems = []
    for split in SPLITS:
        key = keys[split]
        try:
            chunks = artifacts.open_stream(key)
        except ArtifactNotFound:
            problems.append(f"{split} split is missing: no artifact {key}")
            continue
        digest = hashlib.sha256()
        for chunk in chunks:
            digest.update(chunk)
        if digest.hexdigest() != recorded[split]:
            problems.append(
                f"{split} split is corrupt: {key} has sha256 {digest.hexdigest()}, "
                f"recorded {recorded[split]}"
            )
    return problems
