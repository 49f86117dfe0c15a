"""gRPC plumbing shared by every service: server with health, reflection, auth and tracing, and
client channels that carry the API key and the trace context.

Servicers declare `PERMISSIONS = {"MethodName": "read" | "write" | "admin"}` and raise domain
errors (`llmstudio.errors`); the interceptor authenticates, authorizes, opens a server span in the
caller's trace, and maps domain errors to status codes.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from opentelemetry import trace

from . import errors, telemetry
from .auth import KeyDirectory, Principal, set_current_principal
from .errors import StudioError
from .tls import channel_credentials, server_credentials

log = logging.getLogger(__name__)

STATUS_CODES: dict[type[StudioError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def status_code(error: StudioError) -> grpc.StatusCode:
    """The status code of a domain error (of its nearest mapped class; else INTERNAL)."""
    for cls in type(error).__mro__:
        if cls in STATUS_CODES:
            return STATUS_CODES[cls]
    return grpc.StatusCode.INTERNAL


PUBLIC_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")
# The largest request message a server takes: gRPC core refuses a longer one (RESOURCE_EXHAUSTED)
# as it arrives, before it is deserialized or its API key looked at. CreateDataset carries a
# small file in one message; bigger ones stream in chunks (UploadDataset, 1 MiB each from the
# SDK), each a message under this limit.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
# What a server may send back (a page of a listing, a preview): clients take that much.
MAX_RESPONSE_BYTES = 64 * 1024 * 1024
# RPCs one server runs at once, WatchJob streams included; past it gRPC answers
# RESOURCE_EXHAUSTED at once. LLMSTUDIO_GRPC_MAX_CONCURRENT_RPCS overrides it.
DEFAULT_MAX_CONCURRENT_RPCS = 256
SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_RESPONSE_BYTES),
]
CLIENT_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_RESPONSE_BYTES),
]


def max_concurrent_rpcs() -> int:
    """The cap on a server's concurrent RPCs (see DEFAULT_MAX_CONCURRENT_RPCS)."""
    value = os.environ.get("LLMSTUDIO_GRPC_MAX_CONCURRENT_RPCS", "")
    if not value:
        return DEFAULT_MAX_CONCURRENT_RPCS
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"LLMSTUDIO_GRPC_MAX_CONCURRENT_RPCS: a positive number (got {value!r})")
    return int(value)


def api_key_from_metadata(metadata: Iterable[tuple[str, str]]) -> str:
    for k, v in metadata or ():
        if k == "x-api-key":
            return v
        if k == "authorization" and v.lower().startswith("bearer "):
            return v[7:]
    return ""


@dataclass(frozen=True)
class Refusal:
    """A call refused for its credentials: what `StudioInterceptor.on_refused` is told."""

    method: str
    peer: str
    code: str  # UNAUTHENTICATED or PERMISSION_DENIED
    reason: str
    key_id: str = ""  # the key, when it was known but lacked the permission


class StudioInterceptor(grpc.aio.ServerInterceptor):
    """Auth (API key -> principal -> permission), a server span, domain error mapping."""

    def __init__(self, service: str, directory: KeyDirectory, permissions: dict[str, str],
                 on_refused: Callable[[Refusal], None] | None = None):
        self.directory = directory
        self.permissions = permissions  # full method name -> permission
        self.tracer = trace.get_tracer(service)
        self.on_refused = on_refused  # told of each call refused for its credentials

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        method = details.method
        if handler is None or method.startswith(PUBLIC_PREFIXES):
            return handler
        metadata = list(details.invocation_metadata or ())
        required = self.permissions.get(method)
        principal = self.directory.lookup(api_key_from_metadata(metadata))
        if required is None:
            return _abort_handler(handler, grpc.StatusCode.UNIMPLEMENTED, f"{method} not routed")
        if principal is None:
            return _abort_handler(
                handler, grpc.StatusCode.UNAUTHENTICATED,
                "missing or unknown API key (send it as 'x-api-key' metadata)",
                self._reporter(method, ""),
            )
        if not principal.can(required):
            return _abort_handler(
                handler, grpc.StatusCode.PERMISSION_DENIED,
                f"role {','.join(principal.roles)} may not {required} ({method})",
                self._reporter(method, principal.key_id),
            )
        return self._wrap(handler, method, principal, dict(metadata))

    def _reporter(self, method: str, key_id: str) -> Callable[[str, grpc.StatusCode, str], None]:
        def report(peer: str, code: grpc.StatusCode, reason: str) -> None:
            if self.on_refused is not None:
                self.on_refused(Refusal(method, peer, code.name, reason, key_id))

        return report

    def _wrap(self, handler, method: str, principal: Principal, metadata: dict[str, str]):
        tracer = self.tracer

        def start_span():
            return tracer.start_as_current_span(
                method, context=telemetry.extract(metadata), kind=trace.SpanKind.SERVER,
                attributes={"rpc.method": method, "tenant": principal.tenant},
            )

        # Each RPC runs in its own task, so the principal set here is seen by that call only.
        async def unary(request, context):
            set_current_principal(principal)
            try:
                with start_span():
                    return await handler.unary_unary(request, context)
            except StudioError as e:
                await context.abort(status_code(e), str(e))

        async def stream(request, context):
            set_current_principal(principal)
            try:
                with start_span():
                    async for item in handler.unary_stream(request, context):
                        yield item
            except StudioError as e:
                await context.abort(status_code(e), str(e))

        async def client_stream(requests, context):
            set_current_principal(principal)
            try:
                with start_span():
                    return await handler.stream_unary(requests, context)
            except StudioError as e:
                await context.abort(status_code(e), str(e))

        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                unary, handler.request_deserializer, handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                stream, handler.request_deserializer, handler.response_serializer)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                client_stream, handler.request_deserializer, handler.response_serializer)
        return handler


def _abort_handler(handler, code: grpc.StatusCode, message: str,
                   report: Callable[[str, grpc.StatusCode, str], None] | None = None):
    async def deny(request, context):
        if report is not None:
            report(context.peer(), code, message)
        await context.abort(code, message)

    async def deny_stream(request, context):
        if report is not None:
            report(context.peer(), code, message)
        await context.abort(code, message)
        yield  # pragma: no cover - makes this an async generator

    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            deny_stream, handler.request_deserializer, handler.response_serializer)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(
            deny, handler.request_deserializer, handler.response_serializer)
    return grpc.unary_unary_rpc_method_handler(
        deny, handler.request_deserializer, handler.response_serializer)


@dataclass
class Registration:
    """One servicer: its `add_XServicer_to_server` function, instance and full service name."""

    add: Callable
    servicer: object
    full_name: str  # e.g. "llmstudio.v1.JobService"


async def start_server(
    service: str,
    registrations: list[Registration],
    directory: KeyDirectory,
    host: str,
    port: int,
    on_refused: Callable[[Refusal], None] | None = None,
    cert_file: Path | None = None,
    key_file: Path | None = None,
) -> tuple[grpc.aio.Server, HealthServicer, int]:
    """`cert_file` and `key_file` (llmstudio.tls): it speaks TLS only; neither: plaintext."""
    permissions = {
        f"/{r.full_name}/{m}": perm
        for r in registrations
        for m, perm in getattr(r.servicer, "PERMISSIONS", {}).items()
    }
    server = grpc.aio.server(
        interceptors=[StudioInterceptor(service, directory, permissions, on_refused)],
        options=SERVER_OPTIONS,
        maximum_concurrent_rpcs=max_concurrent_rpcs(),
    )
    for r in registrations:
        r.add(r.servicer, server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    names = [r.full_name for r in registrations]
    reflection.enable_server_reflection(
        [*names, reflection.SERVICE_NAME, "grpc.health.v1.Health"], server)
    credentials = server_credentials(cert_file, key_file)
    bound = (server.add_secure_port(f"{host}:{port}", credentials) if credentials
             else server.add_insecure_port(f"{host}:{port}"))
    await server.start()
    for name in ["", *names]:
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, health, bound


async def stop_server(server: grpc.aio.Server, health: HealthServicer, grace: float = 5.0):
    await health.enter_graceful_shutdown()
    await server.stop(grace)


# -- client side ------------------------------------------------------------------------------


class _ClientMetadata(
    grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
):
    """Adds the API key and the current trace context to every call of a sync channel."""

    def __init__(self, api_key: str):
        self.api_key = api_key

    def _details(self, details):
        metadata = list(details.metadata or [])
        if self.api_key:
            metadata.append(("x-api-key", self.api_key))
        metadata.extend(telemetry.inject().items())
        return details._replace(metadata=metadata)  # grpc's call details are a namedtuple

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


# A call that finds its server gone (a replica killed, a restart) is tried again, on the next
# address of a multi-address target ("ipv4:a,b": scheduler replicas). Safe: reads are
# idempotent, and the SDK sends every CreateJob with an idempotency key.
RETRY_CONFIG = json.dumps({"methodConfig": [{
    "name": [{}],
    "retryPolicy": {"maxAttempts": 5, "initialBackoff": "0.2s", "maxBackoff": "2s",
                    "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]},
}]})


def _raw_channel(addr: str, ca_file: Path | None, options=None) -> grpc.Channel:
    """TLS trusting `ca_file` (llmstudio.tls) when given, else plaintext."""
    if ca_file is None:
        return grpc.insecure_channel(addr, options=options)
    return grpc.secure_channel(addr, channel_credentials(ca_file), options=options)


def channel(addr: str, api_key: str = "", ca_file: Path | None = None) -> grpc.Channel:
    options = [*CLIENT_OPTIONS, ("grpc.enable_retries", 1),
               ("grpc.service_config", RETRY_CONFIG)]
    return grpc.intercept_channel(
        _raw_channel(addr, ca_file, options), _ClientMetadata(api_key)
    )


def health_check(addr: str, timeout: float = 2.0, ca_file: Path | None = None) -> str:
    """SERVING / NOT_SERVING / UNREACHABLE, through grpc.health.v1."""
    with _raw_channel(addr, ca_file) as ch:
        try:
            resp = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.RpcError:
            return "UNREACHABLE"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
