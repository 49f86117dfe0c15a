"""Commands on the bus: what external automation sends instead of calling gRPC.

External automation holds NATS credentials that may publish `llmstudio.cmd.<domain>.<verb>` and
nothing else (llmstudio.natsauth). A command is the matching gRPC request in protobuf's JSON
mapping, published to JetStream (stream COMMANDS) with the caller's API key in the
`Llmstudio-Api-Key` header (so the key never reaches the audit log) and, to make a retry
harmless, a `Nats-Msg-Id`. The owning service authorizes it exactly as the RPC (the servicer's
PERMISSIONS) and runs the same use case; its outcome comes back as ordinary events (a created
job's JobSubmitted). A command that is refused -- unknown key, a role without the permission, a
bad request -- is parked on the dead-letter subject with the reason (audited, as every dead
letter), never retried.

| subject | the RPC it stands for |
|---|---|
| llmstudio.cmd.jobs.create | JobService.CreateJob |
| llmstudio.cmd.jobs.cancel | JobService.CancelJob |
| llmstudio.cmd.jobs.pause | JobService.PauseJob |
| llmstudio.cmd.jobs.resume | JobService.ResumeJob |
| llmstudio.cmd.datasets.import | DatasetService.ImportDataset (a dataset pushed by URI) |
| llmstudio.cmd.datasets.derive | DatasetService.DeriveDataset |
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message

from .auth import KeyDirectory, set_current_principal
from .bus import Bus, Refused
from .errors import StudioError
from .grpcutil import status_code

API_KEY_HEADER = "Llmstudio-Api-Key"
SUBJECT_PREFIX = "llmstudio.cmd"


@dataclass(frozen=True)
class Command:
    """One verb: the servicer's RPC it stands for, and that RPC's request message."""

    method: str
    request: type[Message]


def serve_commands(bus: Bus, keys: KeyDirectory, domain: str, servicer: Any,
                   commands: dict[str, Command]) -> None:
    """Take `llmstudio.cmd.<domain>.<verb>` for each of `commands`' verbs: authorize the
    sender's key as the RPC (`servicer.PERMISSIONS`) and call it."""

    async def handle(subject: str, headers: dict[str, str], body: bytes) -> None:
        verb = subject.rsplit(".", 1)[1]
        command = commands.get(verb)
        if command is None:
            raise Refused(f"unknown command {subject} (known: "
                          f"{', '.join(f'{SUBJECT_PREFIX}.{domain}.{v}' for v in commands)})")
        principal = keys.lookup(headers.get(API_KEY_HEADER, ""))
        if principal is None:
            raise Refused(f"security: {subject} without a known API key "
                          f"(send it in the {API_KEY_HEADER} header)")
        required = servicer.PERMISSIONS[command.method]
        if not principal.can(required):
            raise Refused(f"security: key {principal.key_id} (role "
                          f"{','.join(principal.roles)}) may not {required} ({command.method})")
        try:
            request = json_format.Parse(body or b"{}", command.request())
        except json_format.ParseError as e:
            raise Refused(f"invalid {command.method} request: {e}") from None
        set_current_principal(principal)  # as the gRPC interceptor does for the RPC
        try:
            await getattr(servicer, command.method)(request, None)
        except StudioError as e:
            raise Refused(f"{command.method} refused: {status_code(e).name}: {e}") from None
        finally:
            set_current_principal(None)

    bus.subscribe_raw(f"cmd-{domain}", f"{SUBJECT_PREFIX}.{domain}.*", handle)
