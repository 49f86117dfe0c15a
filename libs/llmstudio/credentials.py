"""A deployment's secrets, made in one place for the embedded stack, compose and k8s: the NATS
users' passwords and nats-server's authorization file (llmstudio.natsauth), and a signing key
per service with the trust file of their public keys (llmstudio.signing)."""

from __future__ import annotations

from pathlib import Path

from .events.emitters import ANY_SERVICE
from .natsauth import write_server_config
from .signing import ensure_keys


def write_credentials(directory: Path) -> dict[str, Path]:
    """`directory`/nats-auth and `directory`/keys; what exists already is kept (a password or a
    key is made once), so running it again changes nothing a deployment relies on."""
    return {
        "nats_auth": write_server_config(directory / "nats-auth").parent,
        "keys": ensure_keys(directory / "keys", ANY_SERVICE).parent,
    }
