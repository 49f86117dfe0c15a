"""TLS for gRPC and NATS outside the embedded stack: a deployment's certificates (`llmstudio
certs`), and what servers and clients load from them.

`write_certs(DIR)` makes a dev CA and a server certificate per gRPC service and for nats-server,
each naming the hosts it is reached by (compose and k8s DNS names, localhost, 127.0.0.1, and any
--hosts). DIR holds what deployments mount (ca.crt, <name>.crt, <name>.key); the CA's private key
lies apart in DIR/private, so `kubectl create secret generic --from-file=DIR` (regular files only)
never ships it. What exists is kept unless forced: running it again changes nothing a deployment
relies on.

Servers need no client certificates: callers authenticate with API keys (gRPC) and their NATS
user; TLS keeps those secrets and the traffic private and proves the server is the deployment's.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from collections.abc import Iterable
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .config import GRPC_SERVICES

NATS = "nats"
SERVERS = (*GRPC_SERVICES, NATS)  # who gets a server certificate
DEFAULT_NAMESPACE = "llmstudio"  # deploy/k8s/kustomization.yaml's
LOCAL_HOSTS = ("localhost", "127.0.0.1")  # published ports, and the healthchecks inside a container
CA_FILE = "ca.crt"
CA_KEY_FILE = Path("private") / "ca.key"
CA_DAYS = 3650
SERVER_DAYS = 825  # what browsers and most TLS stacks still accept for a leaf


def cert_path(directory: Path, name: str) -> Path:
    return directory / f"{name}.crt"


def key_path(directory: Path, name: str) -> Path:
    return directory / f"{name}.key"


def server_hosts(name: str, namespace: str = DEFAULT_NAMESPACE,
                 extra: Iterable[str] = ()) -> list[str]:
    """What `name` is reached by: its compose service name (also the k8s Service's, short), its
    in-cluster names, loopback, and `extra` (e.g. the host a published port is reached at)."""
    cluster = [f"{name}.{namespace}", f"{name}.{namespace}.svc",
               f"{name}.{namespace}.svc.cluster.local"]
    return list(dict.fromkeys([name, *cluster, *LOCAL_HOSTS, *extra]))


def write_certs(directory: Path, hosts: Iterable[str] = (), namespace: str = DEFAULT_NAMESPACE,
                force: bool = False) -> dict[str, Path]:
    """The CA and a certificate per server (SERVERS) under `directory`; existing files are kept
    unless `force` (a new CA re-signs every server). Returns name -> certificate path, the CA's
    under "ca"."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_cert_file, ca_key_file = directory / CA_FILE, directory / CA_KEY_FILE
    new_ca = force or not (ca_cert_file.exists() and ca_key_file.exists())
    if new_ca:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_cert = _ca_certificate(ca_key)
        _write_private(ca_key_file, ca_key)
        ca_cert_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    else:
        loaded = serialization.load_pem_private_key(ca_key_file.read_bytes(), password=None)
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{ca_key_file}: not the EC key `llmstudio certs` makes")
        ca_key = loaded
        ca_cert = x509.load_pem_x509_certificate(ca_cert_file.read_bytes())
    extra = list(hosts)
    made = {"ca": ca_cert_file}
    for name in SERVERS:
        cert_file, key_file = cert_path(directory, name), key_path(directory, name)
        if new_ca or not (cert_file.exists() and key_file.exists()):
            key = ec.generate_private_key(ec.SECP256R1())
            cert = _server_certificate(name, server_hosts(name, namespace, extra), key,
                                       ca_cert, ca_key)
            _write_private(key_file, key)
            cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        made[name] = cert_file
    return made


def _write_private(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    """An owner-only PEM file (replacing what was there)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))


def _validity(days: int) -> tuple[datetime.datetime, datetime.datetime]:
    now = datetime.datetime.now(datetime.UTC)
    return now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)


def _ca_certificate(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "LLM Studio dev CA")])
    not_before, not_after = _validity(CA_DAYS)
    return (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before).not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256())
    )


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _server_certificate(name: str, hosts: list[str], key: ec.EllipticCurvePrivateKey,
                        ca_cert: x509.Certificate,
                        ca_key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    not_before, not_after = _validity(SERVER_DAYS)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before).not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )


# -- what servers and clients load ------------------------------------------------------------


def server_credentials(cert_file: Path | None, key_file: Path | None
                       ) -> grpc.ServerCredentials | None:
    """A gRPC server's TLS from its certificate and key; None when neither is configured."""
    if cert_file is None and key_file is None:
        return None
    if cert_file is None or key_file is None:
        missing = "tls_cert_file" if cert_file is None else "tls_key_file"
        raise ValueError(f"TLS needs both a certificate and its key: {missing} is not set")
    return grpc.ssl_server_credentials([(key_file.read_bytes(), cert_file.read_bytes())])


def channel_credentials(ca_file: Path) -> grpc.ChannelCredentials:
    """A gRPC client's TLS: it trusts the servers `ca_file` signed, and only those."""
    return grpc.ssl_channel_credentials(root_certificates=Path(ca_file).read_bytes())


def client_ssl_context(ca_file: Path) -> ssl.SSLContext:
    """A NATS client's TLS: the server's certificate must be signed by `ca_file` and name the
    host it is reached at."""
    return ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file))
