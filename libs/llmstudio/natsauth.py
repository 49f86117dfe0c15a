"""Who may do what on NATS: a user per service, an operator and external automation.

Each service connects as itself and may publish only the events it may emit (`EMITTERS`), its
dead-letter records and what JetStream needs (its API, acks); only governance writes the API-key
bucket, only the scheduler the placement lease. External automation may publish commands
(`llmstudio.cmd.>`) and read their answers, nothing else: no event, no key bucket, no consumer
of anyone's work. The operator (the stack's owner: the CLI's admin commands, tests, repairs) may
do everything.

`authorization_conf` renders this as nats-server's `authorization` block; `llmstudio
credentials` and the embedded stack write it with random passwords (`ensure_credentials`), and
compose and k8s mount the same file.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

from .bus import APIKEY_BUCKET, LEASE_BUCKET, STREAMS, inbox_prefix
from .events import EMITTERS
from .events.emitters import ANY_SERVICE
from .secretfiles import secret_file

OPERATOR = "operator"
AUTOMATION = "automation"
USERS = (*sorted(ANY_SERVICE), OPERATOR, AUTOMATION)
COMMANDS = "llmstudio.cmd.>"
_OWN_BUCKETS = {"governance": [APIKEY_BUCKET], "scheduler": [LEASE_BUCKET]}
# JetStream calls that undo what others stored: refused but for the owner's own use (the
# scheduler purges a lost worker's work items; governance may repair its key bucket)
_ERASES = ("DELETE", "PURGE", "MSG.DELETE")
_ERASABLE = {"scheduler": {"$JS.API.STREAM.PURGE.WORK"}}


def _erasing(user: str) -> list[str]:
    streams = [*STREAMS, *(f"KV_{b}" for b in (APIKEY_BUCKET, LEASE_BUCKET))]
    calls = [f"$JS.API.STREAM.{op}.{stream}" for stream in streams for op in _ERASES]
    calls.append(f"$JS.API.STREAM.UPDATE.KV_{APIKEY_BUCKET}")
    return [c for c in calls if c not in _ERASABLE.get(user, set())]


# The core-NATS events a service subscribes to (Bus.subscribe_core): nobody else reads the bus
# but through its own JetStream consumers.
_CORE_SUBSCRIPTIONS = {"scheduler": ["llmstudio.worker.heartbeat.*",
                                     "llmstudio.scheduler.job_updated.*"]}


def permissions(user: str) -> dict:
    """The nats-server `permissions` block of `user`."""
    if user == OPERATOR:
        return {"publish": {"allow": [">"]}, "subscribe": {"allow": [">"]}}
    answers = f"{inbox_prefix(user)}.>"
    if user == AUTOMATION:  # a command, and the JetStream ack of its publish
        return {"publish": {"allow": [COMMANDS]}, "subscribe": {"allow": [answers]},
                "allow_responses": False}
    emits = sorted({f"{cls.SUBJECT}.>" for cls, services in EMITTERS.items()
                    if user in services})
    buckets = [f"$KV.{bucket}.>" for bucket in _OWN_BUCKETS.get(user, [])]
    return {
        "publish": {
            "allow": [*emits, "$JS.API.>", "$JS.ACK.>", *buckets],  # emits: dead letters too
            "deny": [] if user == "governance" else _erasing(user),
        },
        "subscribe": {"allow": [answers, *_CORE_SUBSCRIPTIONS.get(user, [])]},
    }


def ensure_credentials(directory: Path) -> dict[str, str]:
    """A password per user under `directory` (made once, readable by their owner only)."""
    directory.mkdir(parents=True, exist_ok=True)
    passwords = {}
    for user in USERS:
        passwords[user] = secret_file(password_path(directory, user),
                                      lambda: secrets.token_urlsafe(32))
    return passwords


def password_path(directory: Path, user: str) -> Path:
    return directory / f"{user}.password"


def authorization_conf(passwords: dict[str, str]) -> str:
    """The `authorization` block of nats-server's configuration (a file of its own: compose's
    and k8s's nats.conf include it; the embedded stack starts nats-server with it)."""
    users = [{"user": user, "password": password, "permissions": permissions(user)}
             for user, password in sorted(passwords.items())]
    return ("# made by `llmstudio credentials`: the NATS users (llmstudio.natsauth)\n"
            f"authorization: {json.dumps({'users': users}, indent=2)}\n")


def server_config_path(directory: Path) -> Path:
    return directory / "authorization.conf"


def write_server_config(directory: Path) -> Path:
    """Passwords (made once) and the authorization file under `directory` (owner-only: it
    holds the passwords)."""
    text = authorization_conf(ensure_credentials(directory))
    path = server_config_path(directory)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path
