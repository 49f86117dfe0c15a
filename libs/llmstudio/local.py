"""The embedded stack: nats-server and every service as subprocesses on one machine.

`llmstudio up` starts them (free ports, data under `.llmstudio/`), waits until each answers
(gRPC health, or the worker's ready file) and records them in `<data dir>/stack.json`, which the
CLI and SDK read to find the stack. `llmstudio down` stops them; `llmstudio status` checks them.
The admin key the stack bootstraps governance with is kept in `<data dir>/credentials` (0600).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .auth import new_secret
from .config import GRPC_SERVICES
from .grpcutil import health_check
from .natsserver import free_port, start_nats_server

SERVICES = ("governance", "dataset", "scheduler", "registry", "evaluator", "trainer")
STATE_FILE = "stack.json"
CREDENTIALS_FILE = "credentials"


@dataclass
class ServiceProc:
    pid: int
    port: int = 0

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"


@dataclass
class StackState:
    data_dir: str
    nats_url: str
    nats_pid: int
    services: dict[str, ServiceProc] = field(default_factory=dict)
    otel_exporter: str = "none"

    def addr(self, service: str) -> str:
        return self.services[service].addr

    def save(self) -> None:
        path = Path(self.data_dir) / STATE_FILE
        path.write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, data_dir: Path) -> StackState | None:
        path = Path(data_dir) / STATE_FILE
        if not path.exists():
            return None
        raw = json.loads(path.read_text())
        raw["services"] = {k: ServiceProc(**v) for k, v in raw["services"].items()}
        return cls(**raw)


def admin_key(data_dir: Path) -> str:
    """The stack's admin key: created once, reused by every later `up` of the same data dir."""
    path = Path(data_dir) / CREDENTIALS_FILE
    if path.exists():
        return path.read_text().strip()
    secret = new_secret()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    return secret


def _alive(pid: int) -> bool:
    try:  # reap our own exited children first: a zombie still answers kill(pid, 0)
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def running_stack(data_dir: Path) -> StackState | None:
    state = StackState.load(data_dir)
    if state and _alive(state.nats_pid) and all(_alive(s.pid) for s in state.services.values()):
        return state
    return None


def up(
    data_dir: Path,
    *,
    otel_exporter: str = "",
    timeout: float = 180,
    progress=None,
) -> StackState:
    """Start the stack unless it already runs; return its state."""
    data_dir = Path(data_dir).resolve()
    existing = running_stack(data_dir)
    if existing:
        return existing
    down(data_dir)  # clear a half-dead previous stack
    (data_dir / "logs").mkdir(parents=True, exist_ok=True)
    otel_exporter = otel_exporter or f"file:{data_dir / 'traces.jsonl'}"
    nats = start_nats_server(data_dir / "nats", log_file=data_dir / "logs" / "nats.log")
    ports = {name: free_port() for name in GRPC_SERVICES}
    state = StackState(str(data_dir), nats.url, nats.process.pid, otel_exporter=otel_exporter)
    env = dict(os.environ)
    env.update({
        "LLMSTUDIO_DATA_DIR": str(data_dir),
        "LLMSTUDIO_NATS_URL": nats.url,
        "LLMSTUDIO_OTEL_EXPORTER": otel_exporter,
        "LLMSTUDIO_BOOTSTRAP_ADMIN_KEY": admin_key(data_dir),
        "LLMSTUDIO_WORKER_ID": "local-worker-1",
        "HF_HUB_OFFLINE": env.get("HF_HUB_OFFLINE", "1"),
        "TOKENIZERS_PARALLELISM": "false",
        **{f"LLMSTUDIO_{name.upper()}_ADDR": f"127.0.0.1:{port}" for name, port in ports.items()},
    })
    for name in SERVICES:
        (data_dir / "run" / f"{name}.ready").unlink(missing_ok=True)
        svc_env = dict(env, LLMSTUDIO_GRPC_PORT=str(ports.get(name, 0)))
        log = open(data_dir / "logs" / f"{name}.log", "ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", f"services.{name}"],
            env=svc_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        state.services[name] = ServiceProc(proc.pid, ports.get(name, 0))
    state.save()
    _wait_ready(state, data_dir, timeout, progress)
    return state


def _wait_ready(state: StackState, data_dir: Path, timeout: float, progress) -> None:
    pending = set(state.services)
    deadline = time.monotonic() + timeout
    while pending:
        for name in sorted(pending):
            svc = state.services[name]
            if not _alive(svc.pid):
                log = data_dir / "logs" / f"{name}.log"
                tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                down(data_dir)
                raise RuntimeError(f"service {name} exited during start; log tail:\n{tail}")
            ready_file = data_dir / "run" / f"{name}.ready"
            ok = ready_file.exists() and (not svc.port or health_check(svc.addr) == "SERVING")
            if ok:
                pending.discard(name)
                if progress:
                    progress(name)
        if pending and time.monotonic() > deadline:
            down(data_dir)
            raise TimeoutError(
                f"services not ready after {timeout:.0f}s: {', '.join(sorted(pending))}")
        time.sleep(0.2)


def down(data_dir: Path, timeout: float = 20) -> bool:
    """Stop every process of the stack (services first, then nats). True if one was running."""
    state = StackState.load(Path(data_dir))
    if state is None:
        return False
    pids = [s.pid for s in state.services.values()]
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    _wait_gone(pids, timeout)
    _signal(state.nats_pid, signal.SIGTERM)
    _wait_gone([state.nats_pid], timeout)
    (Path(data_dir) / STATE_FILE).unlink(missing_ok=True)
    return True


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _wait_gone(pids: list[int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for pid in pids:
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(pid):
            _signal(pid, signal.SIGKILL)
            time.sleep(0.1)
            _alive(pid)


def status(data_dir: Path) -> dict[str, str]:
    state = StackState.load(Path(data_dir))
    if state is None:
        return {}
    result = {"nats": "RUNNING" if _alive(state.nats_pid) else "STOPPED"}
    for name, svc in state.services.items():
        if not _alive(svc.pid):
            result[name] = "STOPPED"
        elif svc.port:
            result[name] = health_check(svc.addr)
        else:
            result[name] = "RUNNING"
    return result
