"""Signed events: every service signs what it emits (ed25519); consumers check the signature and
that the signer may emit the event's type.

A signature covers the subject and the payload (`<subject>\\n<payload>`), so a signed envelope
cannot be replayed on another subject; it travels in the `Llmstudio-Signature` header (base64).
The signer is the envelope's `source`, checked against the trusted public keys, and
`events.EMITTERS` says which services may emit each type.

Keys are files: a service's private key (its 32-byte ed25519 seed, base64) and the trusted public
keys ({service: base64 key}, JSON). The embedded stack makes both (`ensure_keys`); compose and
k8s mount them. A service given no trust file verifies nothing (a lone service under test fed
hand-made events); given one, it parks whatever is unsigned, badly signed or not its signer's to
emit, as a security event.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from .events import Envelope, may_emit
from .secretfiles import secret_file

SIGNATURE_HEADER = "Llmstudio-Signature"
SECURITY_REASON = "security"  # the first word of a parked message's reason when it was forged


class BadSignature(Exception):
    """A message whose signature, signer or signer's entitlement does not hold."""


def _signed_bytes(subject: str, payload: bytes) -> bytes:
    return subject.encode() + b"\n" + payload


@dataclass(frozen=True)
class SigningKey:
    """A service's private key: what it signs its messages with."""

    service: str
    private: Ed25519PrivateKey

    @classmethod
    def load(cls, service: str, path: Path) -> SigningKey:
        try:
            seed = base64.b64decode(path.read_text().strip(), validate=True)
            return cls(service, Ed25519PrivateKey.from_private_bytes(seed))
        except (OSError, ValueError, binascii.Error) as e:
            raise ValueError(f"{path}: not an ed25519 key (base64 of a 32-byte seed): {e}") from e

    def sign(self, subject: str, payload: bytes) -> str:
        return base64.b64encode(self.private.sign(_signed_bytes(subject, payload))).decode()

    def public_key(self) -> str:
        return _public_b64(self.private.public_key())


@dataclass(frozen=True)
class TrustedSigners:
    """The services' public keys: whose signatures a consumer accepts."""

    keys: Mapping[str, Ed25519PublicKey]

    @classmethod
    def load(cls, path: Path) -> TrustedSigners:
        try:
            raw = json.loads(path.read_text())
            return cls({service: Ed25519PublicKey.from_public_bytes(base64.b64decode(key))
                        for service, key in raw.items()})
        except (OSError, ValueError, AttributeError, binascii.Error) as e:
            raise ValueError(f"{path}: not a JSON object of service -> ed25519 public key: {e}"
                             ) from e

    def check(self, subject: str, payload: bytes, headers: Mapping[str, str] | None,
              env: Envelope) -> None:
        """Raise BadSignature unless `env`'s source signed this subject and payload and may
        emit its type."""
        signature = (headers or {}).get(SIGNATURE_HEADER)
        if not signature:
            raise BadSignature(f"unsigned {env.type} claiming source {env.source!r}")
        key = self.keys.get(env.source)
        if key is None:
            raise BadSignature(f"{env.type} from unknown signer {env.source!r}")
        try:
            key.verify(base64.b64decode(signature), _signed_bytes(subject, payload))
        except (InvalidSignature, ValueError, binascii.Error):
            raise BadSignature(f"bad signature on {env.type} claiming source {env.source!r}"
                               ) from None
        if not may_emit(env.source, env.type):
            raise BadSignature(f"{env.source!r} may not emit {env.type}")


def _public_b64(key: Ed25519PublicKey) -> str:
    return base64.b64encode(key.public_bytes(Encoding.Raw, PublicFormat.Raw)).decode()


def key_path(keys_dir: Path, service: str) -> Path:
    return keys_dir / f"{service}.key"


def trust_path(keys_dir: Path) -> Path:
    return keys_dir / "signers.json"


def ensure_keys(keys_dir: Path, services: Iterable[str]) -> Path:
    """A private key per service (made once, readable by its owner only) and the trust file
    of their public keys under `keys_dir`; returns the trust file's path."""
    keys_dir.mkdir(parents=True, exist_ok=True)
    public = {}
    for service in services:
        path = key_path(keys_dir, service)
        secret_file(path, lambda: base64.b64encode(os.urandom(32)).decode())
        public[service] = SigningKey.load(service, path).public_key()
    trust, text = trust_path(keys_dir), json.dumps(public, indent=2, sort_keys=True) + "\n"
    if not trust.exists() or trust.read_text() != text:
        staged = trust.with_suffix(".tmp")
        staged.write_text(text)
        staged.replace(trust)  # a service starting meanwhile reads the old file or the new one
    return trust
