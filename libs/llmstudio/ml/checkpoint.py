"""What makes a checkpoint directory trustworthy: every file listed in manifest.json (written
last) exists with its size and sha256. Shared by the trainer (resume) and export."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint directory is incomplete or does not match its manifest."""


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_checkpoint(ckpt: str | Path) -> dict[str, Any]:
    """Return the manifest of `ckpt` if every file it lists exists with its size and sha256;
    raise CheckpointError naming the first problem otherwise."""
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise CheckpointError(f"{ckpt}: no such checkpoint directory")
    path = ckpt / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{ckpt}: no {MANIFEST} (incomplete checkpoint)")
    try:
        manifest = json.loads(path.read_text())
        entries = [(e["path"], e["sha256"], e.get("size")) for e in manifest["files"]]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: malformed manifest: {e!r}") from None
    for rel, sha, size in entries:
        p = ckpt / rel
        if not p.is_file():
            raise CheckpointError(f"{ckpt}: {rel} is listed in {MANIFEST} but missing")
        if (size is not None and p.stat().st_size != size) or file_sha256(p) != sha:
            raise CheckpointError(f"{ckpt}: {rel} does not match its sha256 in {MANIFEST}")
    return manifest
