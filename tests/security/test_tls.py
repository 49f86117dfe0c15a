"""TLS outside the embedded stack, with certificates `llmstudio certs` makes: a service's gRPC
API and nats-server answer only clients that speak TLS and trust the deployment's CA; a client
holding that CA never falls back to plaintext."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
import stat

import grpc
import nats
import pytest
from cryptography import x509

from llmstudio.auth import Principal, hash_secret, new_secret
from llmstudio.bus import APIKEY_BUCKET, Bus
from llmstudio.cli import main as cli
from llmstudio.client import Client
from llmstudio.config import Settings
from llmstudio.grpcutil import channel, health_check
from llmstudio.natsserver import start_nats_server
from llmstudio.tls import CA_KEY_FILE, SERVERS, client_ssl_context
from llmstudio.v1 import registry_pb2, registry_pb2_grpc
from services.registry.app import build
from tests.support.harness import running


@pytest.fixture
def certs(tmp_path):
    """A deployment's certificates, made by the CLI."""
    directory = tmp_path / "tls"
    assert cli(["certs", str(directory), "--hosts", "llm.example.org"]) == 0
    return directory


@pytest.fixture
def other_ca(tmp_path):
    """Another deployment's: its CA signs certificates with the very same names."""
    directory = tmp_path / "other"
    assert cli(["certs", str(directory)]) == 0
    return directory / "ca.crt"


@pytest.fixture
def tls_nats(tmp_path, certs):
    """nats-server with the deploy/nats tls block (TLS only, handshake first accepted)."""
    config = tmp_path / "nats-tls.conf"
    config.write_text(
        "tls {\n"
        f'  cert_file: "{certs / "nats.crt"}"\n'
        f'  key_file: "{certs / "nats.key"}"\n'
        "  handshake_first: auto\n"
        "}\n")
    server = start_nats_server(tmp_path / "js", config_file=config)
    yield server
    server.stop()


async def _tls_connect(url: str, ca_file, **kw):
    return await nats.connect(url, tls=client_ssl_context(ca_file), tls_handshake_first=True,
                              allow_reconnect=False, connect_timeout=3, **kw)


async def _put_api_key(url: str, ca_file, role: str) -> str:
    secret = new_secret()
    nc = await _tls_connect(url, ca_file)
    try:
        kv = await nc.jetstream().create_key_value(bucket=APIKEY_BUCKET, history=1)
        await kv.put(hash_secret(secret), Principal("key-tls", "acme", (role,), "tls").to_json())
    finally:
        await nc.close()
    return secret


def _refused_in_plaintext(port: int) -> bool:
    """A client that speaks the NATS protocol in the clear: the server asks for TLS and never
    answers its CONNECT / PING."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        info = json.loads(s.recv(4096).decode().split(" ", 1)[1])
        assert info["tls_required"] is True
        s.sendall(b'CONNECT {"verbose":false}\r\nPING\r\n')
        reply = b""
        try:
            while chunk := s.recv(4096):
                reply += chunk
        except (TimeoutError, ConnectionResetError):
            pass
        return b"PONG" not in reply


def test_certs_name_the_deployments_hosts_and_are_kept(certs, tmp_path):
    ca = x509.load_pem_x509_certificate((certs / "ca.crt").read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for name in SERVERS:
        cert = x509.load_pem_x509_certificate((certs / f"{name}.crt").read_bytes())
        assert cert.issuer == ca.subject
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = set(san.get_values_for_type(x509.DNSName))
        assert {name, f"{name}.llmstudio.svc", f"{name}.llmstudio.svc.cluster.local",
                "localhost", "llm.example.org"} <= names, name
        assert "127.0.0.1" in {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
        assert stat.S_IMODE((certs / f"{name}.key").stat().st_mode) == 0o600
    # the CA's key is not among the files a deployment mounts (`--from-file=DIR`)
    assert not (certs / "ca.key").exists() and (certs / CA_KEY_FILE).is_file()
    assert stat.S_IMODE((certs / CA_KEY_FILE).stat().st_mode) == 0o600

    before = {p.name: p.read_bytes() for p in certs.iterdir() if p.is_file()}
    assert cli(["certs", str(certs)]) == 0
    assert {p.name: p.read_bytes() for p in certs.iterdir() if p.is_file()} == before
    (certs / "registry.crt").unlink()  # one lost: made again, signed by the same CA
    assert cli(["certs", str(certs)]) == 0
    assert (certs / "ca.crt").read_bytes() == before["ca.crt"]
    assert (certs / "registry.crt").read_bytes() != before["registry.crt"]
    assert cli(["certs", str(certs), "--force"]) == 0
    assert (certs / "ca.crt").read_bytes() != before["ca.crt"]


async def test_grpc_and_the_bus_over_tls_with_the_deployments_ca(
        certs, other_ca, tls_nats, tmp_path, monkeypatch, capsys):
    ca = certs / "ca.crt"
    settings = Settings(nats_url=tls_nats.url, data_dir=tmp_path / "registry", tls_ca_file=ca,
                        tls_cert_file=certs / "registry.crt", tls_key_file=certs / "registry.key")
    key = await _put_api_key(tls_nats.url, ca, "viewer")
    # the registry's own bus connects over TLS too: it starts only if that works
    async with running("registry", build, settings) as port:
        for host in ("127.0.0.1", "localhost"):
            addr = f"{host}:{port}"
            with Client(key, settings=Settings(registry_addr=addr, tls_ca_file=ca),
                        data_dir=tmp_path / "no-stack") as client:
                assert await asyncio.to_thread(client.models.list) == []
            assert await asyncio.to_thread(health_check, addr, 3, ca) == "SERVING"

        addr = f"127.0.0.1:{port}"
        request = registry_pb2.ListModelsRequest()
        md = (("x-api-key", key),)
        for label, ch in (
            ("plaintext", grpc.insecure_channel(addr)),
            ("another deployment's CA", channel(addr, key, other_ca)),
            ("the system's CAs", grpc.secure_channel(addr, grpc.ssl_channel_credentials())),
        ):
            with ch, pytest.raises(grpc.RpcError) as refused:
                await asyncio.to_thread(registry_pb2_grpc.RegistryServiceStub(ch).ListModels,
                                        request, timeout=5, metadata=md)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, label
        assert await asyncio.to_thread(health_check, addr, 3) == "UNREACHABLE"
        assert await asyncio.to_thread(health_check, addr, 3, other_ca) == "UNREACHABLE"

        # the CLI: --ca-file, and the same from LLMSTUDIO_TLS_CA_FILE
        monkeypatch.setenv("LLMSTUDIO_REGISTRY_ADDR", addr)
        monkeypatch.setenv("LLMSTUDIO_API_KEY", key)
        argv = ["--data-dir", str(tmp_path / "no-stack"), "--json", "models", "list"]
        assert await asyncio.to_thread(cli, ["--ca-file", str(ca), *argv]) == 0
        assert json.loads(capsys.readouterr().out) == []
        assert await asyncio.to_thread(cli, ["--ca-file", str(other_ca), *argv]) == 1
        assert "UNAVAILABLE" in capsys.readouterr().err
        monkeypatch.setenv("LLMSTUDIO_TLS_CA_FILE", str(ca))
        assert await asyncio.to_thread(cli, argv) == 0


async def test_nats_speaks_tls_only(certs, other_ca, tls_nats, tmp_path):
    ca = certs / "ca.crt"
    bus = Bus(Settings(nats_url=tls_nats.url, data_dir=tmp_path, tls_ca_file=ca), "registry")
    await bus.start()
    try:
        nc = await _tls_connect(tls_nats.url, ca)
        sub = await nc.subscribe("tls.check")
        await nc.flush()
        received = None
        for _ in range(20):  # a core message: sent again until the subscriber has one
            await bus.nc.publish("tls.check", b"over tls")
            await bus.nc.flush()
            with contextlib.suppress(nats.errors.TimeoutError):
                received = (await sub.next_msg(timeout=0.5)).data
                break
        assert received == b"over tls"
        await nc.close()
    finally:
        await bus.stop()

    assert await asyncio.to_thread(_refused_in_plaintext, tls_nats.port)
    with pytest.raises(Exception, match="CERTIFICATE_VERIFY_FAILED"):
        await _tls_connect(tls_nats.url, other_ca)
    # a client that upgrades when asked, trusting only the system's CAs
    with pytest.raises(Exception, match="CERTIFICATE_VERIFY_FAILED"):
        await nats.connect(tls_nats.url, allow_reconnect=False, connect_timeout=3)


async def test_a_bus_holding_a_ca_never_speaks_plaintext(certs, tmp_path):
    """A man in the middle posing as a plaintext nats-server (its INFO asks for no TLS) gets a
    TLS handshake, never a CONNECT with the service's password."""
    received = bytearray()

    async def impostor(reader, writer):
        writer.write(b'INFO {"server_id":"mitm","version":"2.11.0","tls_required":false,'
                     b'"auth_required":true,"max_payload":1048576}\r\n')
        await writer.drain()
        while data := await reader.read(4096):
            received.extend(data)
        writer.close()

    server = await asyncio.start_server(impostor, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    password = tmp_path / "password"
    password.write_text("s3cret-of-the-registry")
    bus = Bus(Settings(nats_url=f"nats://127.0.0.1:{port}", data_dir=tmp_path,
                       tls_ca_file=certs / "ca.crt", nats_user="registry",
                       nats_password_file=password), "registry")
    try:
        with pytest.raises((ssl.SSLError, OSError, asyncio.TimeoutError)):
            await asyncio.wait_for(bus.broker.connect(), 10)
    finally:
        server.close()
    assert received, "the client sent nothing: the test proves nothing"
    assert received.startswith(b"\x16\x03")  # a TLS record: the handshake, first
    assert b"CONNECT" not in received and b"s3cret-of-the-registry" not in received
