"""Where the audit chain's anchors live, outside the database: signed checkpoints in the
artifact store under append-only object names, and the ed25519 key that signs them in a file of
its own.

A checkpoint object is written once and never overwritten (`audit/checkpoints/<seq>.json`,
zero-padded so names sort as numbers). Make the store's `audit/` prefix write-once for
governance (S3 object lock or a policy without DeleteObject) so that whoever can rewrite the
database cannot also move the anchors.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
)

from llmstudio.storage import ArtifactStore

from .core import Checkpoint, key_fingerprint

CHECKPOINT_PREFIX = "audit/checkpoints/"
PUBLIC_KEY_PREFIX = "audit/keys/"
CHECKPOINT_NAME = re.compile(r"(\d{12})\.json")


class CheckpointExists(Exception):
    """A checkpoint of this number is in the store already: it is never overwritten."""


class CheckpointStore:
    def __init__(self, artifacts: ArtifactStore):
        self.artifacts = artifacts

    def _names(self) -> list[str]:
        return [k for k in self.artifacts.list(CHECKPOINT_PREFIX)
                if CHECKPOINT_NAME.fullmatch(k[len(CHECKPOINT_PREFIX):])]

    def snapshot(self) -> Iterator[Checkpoint]:
        """The checkpoints in the store now, oldest first, each read when reached.

        Listed at call time: every record they anchor was committed before this call, so a walk
        over the log that starts afterwards sees all of them."""
        names = self._names()

        def read() -> Iterator[Checkpoint]:
            for name in names:
                yield Checkpoint.from_json(self.artifacts.get_bytes(name), name)

        return read()

    def newest(self) -> Checkpoint | None:
        names = self._names()
        return Checkpoint.from_json(self.artifacts.get_bytes(names[-1]), names[-1]) \
            if names else None

    def write(self, checkpoint: Checkpoint) -> str:
        # One writer (governance's checkpointer, one at a time), so check-then-put suffices;
        # the store's write-once policy guards against anyone else.
        key = f"{CHECKPOINT_PREFIX}{checkpoint.seq:012d}.json"
        if self.artifacts.exists(key):
            raise CheckpointExists(f"checkpoint {key} exists; checkpoints are never rewritten")
        return self.artifacts.put_bytes(key, checkpoint.to_json(), "application/json")

    def publish_public_key(self, key: Ed25519PrivateKey) -> str:
        """Put the verifying key beside the checkpoints, so an auditor can check them alone."""
        public = key.public_key()
        name = f"{PUBLIC_KEY_PREFIX}{key_fingerprint(public)}.pem"
        if not self.artifacts.exists(name):
            self.artifacts.put_bytes(
                name, public.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo),
                "application/x-pem-file")
        return name


def load_or_create_signing_key(path: Path) -> Ed25519PrivateKey:
    """The checkpoint signing key in `path` (PEM, PKCS#8); made on first start, mode 0600."""
    if path.exists():
        key = load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path}: not an ed25519 private key")
        return key
    key = Ed25519PrivateKey.generate()
    path.parent.mkdir(parents=True, exist_ok=True)
    pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    # O_EXCL: two governance processes starting together never overwrite each other's key.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    return key
