"""The event bus: JetStream streams, an event publisher, and durable consumers with a dead letter.

Every service gets one `Bus`. It publishes events (CloudEvents JSON, `Nats-Msg-Id` = event id for
JetStream dedup, `traceparent` header) and registers handlers as durable pull consumers with
explicit ack and `max_deliver`. A message that is not a valid event, or whose handler keeps
failing until `max_deliver`, is parked on `llmstudio.deadletter.<consumer>` with the reason and
terminated: never redelivered forever, never dropped silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TypeVar

import nats
from faststream import AckPolicy
from faststream.nats import (
    ConsumerConfig,
    DeliverPolicy,
    JStream,
    NatsBroker,
    NatsMessage,
    NatsSecurity,
    NatsUserPassword,
    PullSub,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import Header as JsHeader
from nats.js.errors import APIError, BadRequestError, NoStreamResponseError, NotFoundError
from opentelemetry import trace

from . import telemetry
from .artifactkeys import InvalidKey, check_tenant_key
from .config import Settings
from .events import DeadLettered, Envelope, EventData, InvalidEvent, decode, make_envelope
from .signing import SECURITY_REASON, SIGNATURE_HEADER, BadSignature, SigningKey, TrustedSigners
from .tls import client_ssl_context

log = logging.getLogger(__name__)
SECURITY_PARK_INTERVAL_S = 10.0  # forged core messages: at most one parked per this, per service

Handler = Callable[[Envelope, EventData], Awaitable[None]]
RawHandler = Callable[[str, dict[str, str], bytes], Awaitable[None]]
E = TypeVar("E", bound=EventData)


class PublishFailed(ConnectionError):
    """Not every message of an ordered batch was stored: the first `stored` were."""

    def __init__(self, stored: int, cause: BaseException | None):
        super().__init__(f"published {stored}, then: {cause!r}")
        self.stored = stored
        self.__cause__ = cause


class Refused(Exception):
    """A handler's refusal of a message for good (a command its caller may not send): parked at
    once with this reason, never retried."""


def refuse_foreign_keys(tenant: str, *keys: str) -> None:
    """Raise Refused (a security refusal: parked and audited at once) when an event names an
    artifact key outside its tenant's prefix; empty keys are not named, so pass."""
    for key in keys:
        if key:
            try:
                check_tenant_key(key, tenant)
            except InvalidKey as e:
                raise Refused(f"{SECURITY_REASON}: {e}") from None


class UnexpectedEvent(ValueError):
    """A valid event of a type its subject does not carry: parked at once, never retried."""


def subscription_subject(classes: tuple[type[EventData], ...], entity: str = "*") -> str:
    """The filter subject for event classes: `<SUBJECT>.<entity>` for one subject, else the
    longest common prefix of their subjects + `.>` (`llmstudio.job.>`)."""
    subjects = {cls.SUBJECT for cls in classes}
    if len(subjects) == 1:
        return f"{subjects.pop()}.{entity}"
    parts = [s.split(".") for s in sorted(subjects)]
    common = []
    for tokens in zip(*parts, strict=False):
        if len(set(tokens)) > 1:
            break
        common.append(tokens[0])
    if len(common) < 2:
        raise ValueError(f"events of different domains in one subscription: {sorted(subjects)}")
    return ".".join(common) + ".>"


_delivery_subject: ContextVar[str] = ContextVar("delivery_subject", default="")


def delivered_subject() -> str:
    """The NATS subject of the message the running handler was called for ("" outside one)."""
    return _delivery_subject.get()


@dataclass(frozen=True)
class StreamSpec:
    subjects: list[str]
    retention: RetentionPolicy = RetentionPolicy.LIMITS
    max_age_s: float = 0  # 0 = forever
    audited: bool = True  # governance copies every message of the stream into the audit log


# One stream per domain. METRICS samples and WORK items are operational, not domain events.
STREAMS: dict[str, StreamSpec] = {
    "DATASETS": StreamSpec(["llmstudio.dataset.>"]),
    "JOBS": StreamSpec(["llmstudio.job.>"]),
    "EVALS": StreamSpec(["llmstudio.eval.>"]),
    "MODELS": StreamSpec(["llmstudio.model.>"]),
    "SERVING": StreamSpec(["llmstudio.serving.>"]),
    "GOVERNANCE": StreamSpec(["llmstudio.governance.>", "llmstudio.policy.>"]),
    "DEADLETTER": StreamSpec(["llmstudio.deadletter.>"]),
    "METRICS": StreamSpec(["llmstudio.metrics.>"], max_age_s=7 * 86400, audited=False),
    "WORK": StreamSpec(["llmstudio.work.>"], retention=RetentionPolicy.WORK_QUEUE, audited=False),
    # external automation's requests (llmstudio.commands): not events; what they cause is
    "COMMANDS": StreamSpec(["llmstudio.cmd.>"], max_age_s=7 * 86400, audited=False),
    # governance's announcements of its audit checkpoints (in the log, they would grow the chain
    # they anchor)
    "AUDIT": StreamSpec(["llmstudio.audit.>"], audited=False),
}
AUDITED_STREAMS = [name for name, spec in STREAMS.items() if spec.audited]
DEDUP_WINDOW_S = 120
APIKEY_BUCKET = "llmstudio-apikeys"
LEASE_BUCKET = "llmstudio-scheduler-leader"  # the scheduler replicas' placement lease


def inbox_prefix(user: str) -> str:
    """Where NATS user `user`'s answers come (JetStream's acks and API replies, pulled messages,
    KV watches): its own, so no other user may subscribe to them (llmstudio.natsauth). Without
    a user (no authentication): NATS's default."""
    return f"_INBOX_{user}" if user else "_INBOX"


def nats_security(settings: Settings) -> NatsSecurity | None:
    """The user this process connects as (settings.nats_user) and the CA it trusts
    (settings.tls_ca_file: TLS, llmstudio.tls), or None: neither.

    With a CA the TLS handshake comes first, before the server says anything: nats-py would
    otherwise upgrade only when the server's INFO asks for TLS, so a forged plaintext INFO could
    take the password. nats-server's `tls { handshake_first }` accepts that (deploy/nats)."""
    tls = client_ssl_context(settings.tls_ca_file) if settings.tls_ca_file else None
    if not settings.nats_user:
        return NatsSecurity(ssl_context=tls, tls_handshake_first=True) if tls else None
    if settings.nats_password_file is None:
        raise ValueError(f"nats_user {settings.nats_user!r} needs nats_password_file")
    password = settings.nats_password_file.read_text().strip()
    return NatsUserPassword(settings.nats_user, password, ssl_context=tls,
                            tls_handshake_first=tls is not None)


def stream_for(subject: str) -> str:
    for name, spec in STREAMS.items():
        for pattern in spec.subjects:
            if subject.startswith(pattern[:-1]):
                return name
    raise KeyError(f"no stream holds subject {subject!r}")


async def ensure_streams(js: JetStreamContext) -> None:
    """Create or update every stream; safe to run from every service at start."""
    for name, spec in STREAMS.items():
        config = StreamConfig(
            name=name,
            subjects=spec.subjects,
            retention=spec.retention,
            storage=StorageType.FILE,
            duplicate_window=DEDUP_WINDOW_S,
            max_age=spec.max_age_s or None,
        )
        try:
            await js.add_stream(config)
        except BadRequestError:
            await js.update_stream(config)


@dataclass
class Bus:
    settings: Settings
    service: str
    broker: NatsBroker = field(init=False)
    js: JetStreamContext | None = field(init=False, default=None)
    # publish_in_order's acks: the inbox they come to, and the ones awaited (token -> future)
    _ack_inbox: str = field(init=False, default="")
    _acks: dict[str, asyncio.Future] = field(init=False, default_factory=dict)
    # what it signs its messages with, and whose signatures it accepts (None: checks nothing)
    signing_key: SigningKey | None = field(init=False, default=None)
    trusted: TrustedSigners | None = field(init=False, default=None)
    _security_parked_at: float = field(init=False, default=-math.inf)
    _security_dropped: int = field(init=False, default=0)  # forged core messages since then
    _tracer: trace.Tracer = field(init=False)

    def __post_init__(self) -> None:
        self.broker = NatsBroker(
            self.settings.nats_url,
            max_reconnect_attempts=-1,
            logger=logging.getLogger(f"llmstudio.bus.{self.service}"),
            security=nats_security(self.settings),
            # a user's answers come to its own inbox (llmstudio.natsauth): nobody else's to read
            inbox_prefix=inbox_prefix(self.settings.nats_user),
        )
        self._tracer = trace.get_tracer(self.service)
        if self.settings.signing_key_file:
            self.signing_key = SigningKey.load(self.service, self.settings.signing_key_file)
        if self.settings.trusted_signers_file:
            self.trusted = TrustedSigners.load(self.settings.trusted_signers_file)

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        await self.broker.connect()
        self.js = self.broker.connection.jetstream()
        await ensure_streams(self.js)
        self._ack_inbox = self.nc.new_inbox()
        await self.nc.subscribe(f"{self._ack_inbox}.*", cb=self._on_ack)
        await self.broker.start()

    async def stop(self) -> None:
        await self.broker.stop()

    @property
    def nc(self) -> NATS:
        return self.broker.connection

    # -- publishing ------------------------------------------------------------------------
    async def publish(self, data: EventData, *, tenant: str, actor: str = "") -> Envelope:
        """Publish a domain event to its stream and wait for JetStream's ack."""
        env = make_envelope(data, source=self.service, tenant=tenant, actor=actor)
        await self.publish_envelope(env, data.subject())
        return env

    async def publish_envelope(self, env: Envelope, subject: str) -> None:
        headers = telemetry.inject({"Nats-Msg-Id": env.id, "ce-type": env.type})
        assert self.js is not None, "bus not started"
        payload = env.model_dump_json().encode()
        await self.js.publish(subject, payload, headers=self._signed(subject, payload, headers))

    async def publish_in_order(
        self, messages: Sequence[tuple[str, bytes, dict[str, str]]], timeout: float = 5.0,
    ) -> None:
        """Store (subject, payload, headers) messages in JetStream in their order, pipelined: each
        is written to the connection before the next (the server stores one connection's
        messages in the order sent) and the acks are awaited together, one round trip for the
        lot instead of one per message. Raises PublishFailed with how many were stored, counted
        from the first, when one was not (or its ack did not come within `timeout`)."""
        loop = asyncio.get_running_loop()
        tokens: list[str] = []
        try:
            for subject, payload, headers in messages:
                token = uuid.uuid4().hex
                self._acks[token] = loop.create_future()
                tokens.append(token)
                await self.nc.publish(subject, payload, reply=f"{self._ack_inbox}.{token}",
                                      headers=self._signed(subject, payload, headers))
        except Exception as e:  # noqa: BLE001 - the ones sent before it may still be stored
            self._acks[tokens[-1]].set_exception(e)  # it was not sent
        acks = [self._acks[t] for t in tokens]
        try:
            if acks:
                with contextlib.suppress(TimeoutError):  # the missing acks count as failures
                    await asyncio.wait_for(asyncio.gather(*acks, return_exceptions=True),
                                           timeout)
        finally:
            for token in tokens:
                self._acks.pop(token, None)
        for stored, ack in enumerate(acks):
            if not ack.done() or ack.cancelled():
                raise PublishFailed(stored, TimeoutError(f"no ack within {timeout:g}s"))
            if ack.exception() is not None:
                raise PublishFailed(stored, ack.exception())

    async def _on_ack(self, msg: Msg) -> None:
        """JetStream's answer to one of publish_in_order's messages."""
        ack = self._acks.get(msg.subject.rsplit(".", 1)[1])
        if ack is None or ack.done():
            return
        if msg.headers and msg.headers.get(JsHeader.STATUS) == "503":
            ack.set_exception(NoStreamResponseError())
            return
        answer = json.loads(msg.data or b"{}")
        if "error" in answer:
            ack.set_exception(APIError.from_error(answer["error"]))
        else:
            ack.set_result(None)

    async def publish_core(self, data: EventData, *, tenant: str = "system") -> None:
        """Fire-and-forget on core NATS (heartbeats): not stored, not audited."""
        env = make_envelope(data, source=self.service, tenant=tenant)
        subject, payload = data.subject(), env.model_dump_json().encode()
        await self.nc.publish(subject, payload, headers=self._signed(subject, payload, {}))

    def _signed(self, subject: str, payload: bytes, headers: dict[str, str]) -> dict[str, str]:
        """`headers` with this service's signature of the message (unchanged without a key)."""
        if self.signing_key is None:
            return headers
        return {**headers, SIGNATURE_HEADER: self.signing_key.sign(subject, payload)}

    def _forged(self, subject: str, payload: bytes, headers: Mapping[str, str] | None,
                env: Envelope) -> str:
        """Why a message is not to be trusted ("" when it is, or when nothing is checked)."""
        if self.trusted is None:
            return ""
        try:
            self.trusted.check(subject, payload, headers, env)
        except BadSignature as e:
            return f"{SECURITY_REASON}: {e}"
        return ""

    async def last_event(self, event: type[E], entity: str) -> E | None:
        """The newest stored event of type `event` about `entity` (read from its stream, not
        from a consumer: what the stream holds now), or None when there is none."""
        assert self.js is not None, "bus not started"
        subject = f"{event.SUBJECT}.{entity}"
        try:
            msg = await self.js.get_last_msg(stream_for(subject), subject)
        except NotFoundError:
            return None
        env, data = decode(msg.data or b"")
        if reason := self._forged(subject, msg.data or b"", msg.headers, env):
            log.error("ignoring the newest %s on %s: %s", event.TYPE, subject, reason)
            return None
        return data if isinstance(data, event) else None

    # -- consuming -------------------------------------------------------------------------
    def subscribe(
        self,
        events: type[E] | tuple[type[EventData], ...],
        *,
        durable: str,
        handler: Callable[[Envelope, E], Awaitable[None]],
        entity: str = "*",
        deliver_new: bool = False,
        inactive_threshold_s: float | None = None,
    ) -> None:
        """Register `handler` for `events` (one event class, or several of one domain) as the
        durable pull consumer `<service>-<durable>`; the subject comes from the classes.

        The handler is called only with the subscribed types: an event of another type of the
        same domain is acked and skipped; a message on one of the subscribed subjects that
        carries another type is parked as a forgery or a bug. See `subscribe_subject`.
        """
        classes = events if isinstance(events, tuple) else (events,)
        accepted = {cls.TYPE for cls in classes}
        owned = tuple(f"{cls.SUBJECT}." for cls in classes)

        async def typed(env: Envelope, data: EventData) -> None:
            if env.type in accepted:
                await handler(env, data)  # type: ignore[arg-type]
            elif delivered_subject().startswith(owned):
                raise UnexpectedEvent(f"{env.type} on a subject of {sorted(accepted)}")

        self.subscribe_subject(
            durable, subscription_subject(classes, entity), typed,
            deliver_new=deliver_new, inactive_threshold_s=inactive_threshold_s,
            # the server sends only these (one consumer, so their order is kept): not every
            # event of the domain for the handler to skip
            only=sorted({f"{cls.SUBJECT}.{entity}" for cls in classes}),
        )

    def subscribe_subject(
        self,
        name: str,
        subject: str,
        handler: Handler,
        *,
        deliver_new: bool = False,
        inactive_threshold_s: float | None = None,
        only: list[str] | None = None,
    ) -> None:
        """Register `handler` for every event on `subject` as the durable pull consumer
        `<service>-<name>`: for consumers of whole streams (the audit log), where the handler
        takes every type. Services subscribe to event classes with `subscribe`. `only`: the
        subjects under `subject` the consumer takes (NATS filter_subjects), when not all.

        Must be called before `start()`. The handler gets a validated envelope and its data; it
        must be idempotent (delivery is at least once). Raising makes the message redelivered
        after a backoff, up to max_deliver, then parked on the dead-letter subject.
        """
        durable = f"{self.service}-{name}"
        max_deliver = self.settings.max_deliver
        self._pull(subject, ConsumerConfig(
            durable_name=durable,
            filter_subject=None if only and len(only) > 1 else subject,
            filter_subjects=only if only and len(only) > 1 else None,
            max_deliver=max_deliver,
            ack_wait=self.settings.ack_wait_s,
            deliver_policy=DeliverPolicy.NEW if deliver_new else DeliverPolicy.ALL,
            inactive_threshold=inactive_threshold_s,
        ), lambda msg: self._dispatch(durable, msg, handler, max_deliver))

    def subscribe_raw(self, name: str, subject: str, handler: RawHandler) -> None:
        """Register `handler` for the messages on `subject` that are not events (commands:
        llmstudio.commands) as the durable pull consumer `<service>-<name>`. It is called with
        (subject, headers, body); raising Refused parks the message at once, anything else is
        retried as for events."""
        durable = f"{self.service}-{name}"
        max_deliver = self.settings.max_deliver
        self._pull(subject, ConsumerConfig(
            durable_name=durable, filter_subject=subject, max_deliver=max_deliver,
            ack_wait=self.settings.ack_wait_s,
        ), lambda msg: self._dispatch_raw(durable, msg, handler, max_deliver))

    def _pull(self, subject: str, config: ConsumerConfig,
              dispatch: Callable[[NatsMessage], Awaitable[None]]) -> None:
        """A durable pull consumer (its `config`) on `subject`'s stream, explicitly acked."""
        subscriber = self.broker.subscriber(
            subject,
            stream=JStream(stream_for(subject), declare=False),
            durable=config.durable_name,
            config=config,
            pull_sub=PullSub(batch_size=16, timeout=1.0),
            ack_policy=AckPolicy.MANUAL,
            # pulled messages come to this user's own inbox (faststream's default is _INBOX.)
            inbox_prefix=f"{inbox_prefix(self.settings.nats_user)}.".encode(),
        )
        # faststream runs the messages of a fetched batch concurrently; one at a time keeps a
        # consumer's deliveries in stream order once handlers await threads.
        in_order = asyncio.Lock()

        async def on_message(msg: NatsMessage) -> None:
            async with in_order:
                await dispatch(msg)

        subscriber(on_message)

    def subscribe_core(
        self, event: type[E], handler: Callable[[Envelope, E], Awaitable[None]]
    ) -> None:
        """Plain core-NATS subscription to `event` (heartbeats): not stored, not acked; a message
        that is not a valid event of that type is logged and skipped."""
        subject = f"{event.SUBJECT}.*"

        async def on_message(msg: NatsMessage) -> None:
            try:
                env, data = decode(msg.body)
            except InvalidEvent as e:
                log.warning("ignoring invalid message on %s: %s", subject, e)
                return
            if not isinstance(data, event):
                log.warning("ignoring %s on %s", env.type, subject)
                return
            raw = msg.raw_message
            if reason := self._forged(raw.subject, msg.body, raw.headers, env):
                await self._park_forged_core(raw.subject, msg.body, reason)
                return
            await handler(env, data)

        self.broker.subscriber(subject)(on_message)

    async def _park_forged_core(self, subject: str, body: bytes, reason: str) -> None:
        """A forged core message (a heartbeat) is dropped; one each SECURITY_PARK_INTERVAL_S is
        parked, saying how many were dropped since the last, so a flood of them (any subjects)
        cannot flood the audit log."""
        self._security_dropped += 1
        now = time.monotonic()
        if now - self._security_parked_at < SECURITY_PARK_INTERVAL_S:
            return
        dropped, self._security_dropped, self._security_parked_at = self._security_dropped, 0, now
        log.error("dropping %s: %s (%d forged core messages dropped)", subject, reason, dropped)
        await self._park(f"{self.service}-core", subject, body,
                         f"{reason} ({dropped} forged core message(s) dropped)", 1)

    async def _dispatch(self, consumer: str, msg: NatsMessage, handler: Handler, max_deliver: int):
        raw = msg.raw_message
        deliveries = raw.metadata.num_delivered if raw.metadata else 1
        try:
            env, data = decode(msg.body)
        except InvalidEvent as e:
            await self._park(consumer, raw.subject, msg.body, f"invalid event: {e}", deliveries)
            await msg.reject()
            return
        if reason := self._forged(raw.subject, msg.body, raw.headers, env):
            log.error("%s: parking %s: %s", consumer, raw.subject, reason)
            await self._park(consumer, raw.subject, msg.body, reason, deliveries)
            await msg.reject()
            return
        await self._run(consumer, msg, deliveries, max_deliver, f"{consumer} {env.type}",
                        {"event.id": env.id}, lambda: handler(env, data))

    async def _dispatch_raw(self, consumer: str, msg: NatsMessage, handler: RawHandler,
                            max_deliver: int):
        raw = msg.raw_message
        deliveries = raw.metadata.num_delivered if raw.metadata else 1
        await self._run(consumer, msg, deliveries, max_deliver, f"{consumer} {raw.subject}", {},
                        lambda: handler(raw.subject, dict(raw.headers or {}), msg.body))

    async def _run(self, consumer: str, msg: NatsMessage, deliveries: int, max_deliver: int,
                   span_name: str, attributes: dict[str, str],
                   call: Callable[[], Awaitable[None]]) -> None:
        """A handler's call in a consumer span: acked when it returns; parked at once when it
        refuses the message, else redelivered after a backoff up to max_deliver, then parked."""
        raw = msg.raw_message
        with self._tracer.start_as_current_span(
            span_name, context=telemetry.extract(raw.headers), kind=trace.SpanKind.CONSUMER,
            attributes={"messaging.destination": raw.subject, **attributes},
        ) as span:
            token = _delivery_subject.set(raw.subject)
            try:
                await call()
            except Exception as e:  # noqa: BLE001 - any failure is retried, then parked
                span.record_exception(e)
                if isinstance(e, Refused):
                    reason = str(e)
                elif isinstance(e, UnexpectedEvent) or deliveries >= max_deliver:
                    reason = f"handler failed {deliveries} times: {type(e).__name__}: {e}"
                else:
                    log.warning("%s: %s failed (%s), will retry", consumer, raw.subject, e)
                    await msg.nack(delay=min(2.0**deliveries * 0.25, 10.0))
                    return
                log.error("%s: parking %s: %s", consumer, raw.subject, reason)
                await self._park(consumer, raw.subject, msg.body, reason, deliveries)
                await msg.reject()
                return
            finally:
                _delivery_subject.reset(token)
            await msg.ack()

    async def _park(self, consumer: str, subject: str, body: bytes, reason: str, deliveries: int):
        data = DeadLettered(
            consumer=consumer,
            original_subject=subject,
            reason=reason[:2000],
            deliveries=deliveries,
            payload=body.decode("utf-8", errors="replace")[:65536],
        )
        await self.publish(data, tenant="system", actor=self.service)

    # -- key-value -------------------------------------------------------------------------
    async def kv(self, bucket: str = APIKEY_BUCKET, ttl_s: float | None = None):
        """The KV bucket, created on first use (`ttl_s`: how long its entries live)."""
        assert self.js is not None, "bus not started"
        try:
            return await self.js.key_value(bucket)
        except (NotFoundError, nats.js.errors.BucketNotFoundError):
            return await self.js.create_key_value(bucket=bucket, history=1, ttl=ttl_s)

