"""The embedded stack: nats-server and every service as subprocesses on one machine.

`llmstudio up` plans the stack (free ports, N trainer workers, data under `.llmstudio/`), writes
the plan to `<data dir>/stack.json` and starts a detached supervisor (`llmstudio.supervisor`),
which starts every process, restarts a crashed one with back-off and records each pid there.
`up` returns once every service answers (gRPC health, or the worker's ready file). The CLI and
SDK read `stack.json` to find the stack while any process of it lives. `llmstudio down` stops
the supervisor, which stops the rest; `llmstudio status` names what is up, starting, restarting
or down. The admin key the stack bootstraps governance with is kept in `<data dir>/credentials`
(0600).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

from .auth import new_secret
from .config import GRPC_SERVICES
from .credentials import write_credentials
from .grpcutil import health_check
from .natsauth import OPERATOR, password_path
from .natsserver import free_port
from .secretfiles import secret_file
from .signing import key_path, trust_path

# gRPC services in start order; the trainer workers (`trainer-1` ...) follow them.
SERVICES = ("governance", "dataset", "scheduler", "registry", "evaluator", "serving")
WORKER_PREFIX = "trainer-"
SCHEDULER_REPLICA_PREFIX = "scheduler-"  # scheduler replicas 2..M (`up --schedulers M`)
STATE_FILE = "stack.json"
CREDENTIALS_FILE = "credentials"
STOP_TIMEOUT_S = 75.0  # a graceful stop before SIGKILL: a draining trainer gets its 60 s to
# checkpoint and hand its job back (services/trainer/worker.py STOP_GRACE_S)


@dataclass
class ServiceProc:
    pid: int
    port: int = 0
    restarts: int = 0
    http_port: int = 0  # serving's OpenAI-compatible API

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
    supervisor_pid: int = 0
    nats_restarts: int = 0

    def addr(self, service: str) -> str:
        """Where clients reach `service`: with scheduler replicas, every replica's address in
        one gRPC target (pick_first: the next one when a replica is down)."""
        replicas = [s for n, s in self.services.items() if n == service
                    or (service == "scheduler" and n.startswith(SCHEDULER_REPLICA_PREFIX))]
        if len(replicas) == 1:
            return replicas[0].addr
        return "ipv4:" + ",".join(s.addr for s in replicas)

    @property
    def serving_http_url(self) -> str:
        """Where the OpenAI-compatible API listens ("" without a serving service)."""
        serving = self.services.get("serving")
        return f"http://127.0.0.1:{serving.http_port}" if serving else ""

    @property
    def nats_port(self) -> int:
        return int(self.nats_url.rsplit(":", 1)[1])

    @property
    def operator_url(self) -> str:
        """nats_url as the operator (llmstudio.natsauth.OPERATOR): for the owner's own tools."""
        password = password_path(nats_auth_dir(Path(self.data_dir)), OPERATOR).read_text().strip()
        return self.nats_url.replace("nats://", f"nats://{OPERATOR}:{password}@", 1)

    @property
    def workers(self) -> list[str]:
        return [name for name in self.services if name.startswith(WORKER_PREFIX)]

    @property
    def schedulers(self) -> list[str]:
        return [name for name in self.services
                if name == "scheduler" or name.startswith(SCHEDULER_REPLICA_PREFIX)]

    def save(self) -> None:
        """Atomically: readers never see a half-written file."""
        path = Path(self.data_dir) / STATE_FILE
        tmp = path.with_name(f".{STATE_FILE}.{os.getpid()}")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        os.replace(tmp, path)

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
    return secret_file(Path(data_dir) / CREDENTIALS_FILE, new_secret)


# -- the processes of a stack -------------------------------------------------------------------

def service_module(name: str) -> str:
    """`trainer-2` runs `services.trainer`, `scheduler-2` `services.scheduler`; every other name
    is its own service."""
    if name.startswith(WORKER_PREFIX):
        return "trainer"
    return "scheduler" if name.startswith(SCHEDULER_REPLICA_PREFIX) else name


def service_data_dir(state: StackState, name: str) -> Path:
    """Workers 2..N get a data dir of their own (their run records, outbox, work dirs, ready
    file), like a compose replica's own /data; worker 1 keeps the stack's, where an earlier
    single-worker stack left its trainer.db. Artifacts stay shared (service_env)."""
    data_dir = Path(state.data_dir)
    if name.startswith(WORKER_PREFIX) and name != f"{WORKER_PREFIX}1":
        return data_dir / "workers" / name
    if name.startswith(SCHEDULER_REPLICA_PREFIX):  # its ready file; the database is shared
        return data_dir / "replicas" / name
    return data_dir


def ready_file(state: StackState, name: str) -> Path:
    """Where the service writes `<pid> <port>` once it is ready (llmstudio.service)."""
    return service_data_dir(state, name) / "run" / f"{service_module(name)}.ready"


def log_file(state: StackState, name: str) -> Path:
    return Path(state.data_dir) / "logs" / f"{name}.log"


def nats_auth_dir(data_dir: Path) -> Path:
    """The NATS users' passwords and the server's configuration (llmstudio.natsauth)."""
    return Path(data_dir) / "nats-auth"


def service_env(state: StackState, name: str, base: dict[str, str]) -> dict[str, str]:
    """`base` (the caller's environment) with where this process finds the stack and its data."""
    data_dir = Path(state.data_dir)
    env = dict(base)
    env.update({
        "LLMSTUDIO_DATA_DIR": str(service_data_dir(state, name)),
        "LLMSTUDIO_ARTIFACT_ROOT": base.get("LLMSTUDIO_ARTIFACT_ROOT", str(data_dir / "artifacts")),
        "LLMSTUDIO_NATS_URL": state.nats_url,
        "LLMSTUDIO_OTEL_EXPORTER": state.otel_exporter,
        "LLMSTUDIO_BOOTSTRAP_ADMIN_KEY": admin_key(data_dir),
        "LLMSTUDIO_GRPC_PORT": str(state.services[name].port),
        "HF_HUB_OFFLINE": base.get("HF_HUB_OFFLINE", "1"),
        "TOKENIZERS_PARALLELISM": "false",
        **{f"LLMSTUDIO_{svc.upper()}_ADDR": state.addr(svc)
           for svc in GRPC_SERVICES if svc in state.services},
    })
    if "serving" in state.services:  # its HTTP API (the OpenAI-compatible one)
        env["LLMSTUDIO_SERVING_HTTP_PORT"] = str(state.services["serving"].http_port)
        env["LLMSTUDIO_SERVING_HTTP_URL"] = state.serving_http_url
    # a job's base model comes from the stack's model folder, nowhere else (llmstudio.modelroots)
    env.setdefault("LLMSTUDIO_MODEL_ROOTS", str((data_dir / "models").resolve()))
    # files ImportDataset (and its command) may read: the stack's imports folder
    env.setdefault("LLMSTUDIO_DATASET_IMPORT_ROOTS", str((data_dir / "imports").resolve()))
    # every service is a NATS user of its own (llmstudio.natsauth)
    env["LLMSTUDIO_NATS_USER"] = service_module(name)
    env["LLMSTUDIO_NATS_PASSWORD_FILE"] = str(
        password_path(nats_auth_dir(data_dir), service_module(name)).resolve())
    # every service signs what it emits and checks what it consumes (llmstudio.signing)
    keys_dir = data_dir / "keys"
    env["LLMSTUDIO_TRUSTED_SIGNERS_FILE"] = str(trust_path(keys_dir).resolve())
    env["LLMSTUDIO_SIGNING_KEY_FILE"] = str(key_path(keys_dir, service_module(name)).resolve())
    if name.startswith(WORKER_PREFIX):
        env["LLMSTUDIO_WORKER_ID"] = "local-worker-" + name.removeprefix(WORKER_PREFIX)
    if service_module(name) == "scheduler":  # replicas share replica 1's database
        env["LLMSTUDIO_REPLICA_ID"] = name
        env.setdefault("LLMSTUDIO_DATABASE_URL",
                       f"sqlite:///{data_dir.resolve() / 'scheduler.db'}")
    return env


def _alive(pid: int) -> bool:
    if pid <= 0:  # never probe (or later signal) a process group by accident
        return False
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
    return not _zombie(pid)


def _zombie(pid: int) -> bool:
    """Exited but not yet reaped by its parent (the supervisor, between two polls)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def _wrote_ready_file(state: StackState, name: str) -> bool:
    """The service's current process is ready: a crashed run's file is stale."""
    try:
        written_by = int(ready_file(state, name).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return False
    return written_by == state.services[name].pid


def _ready(state: StackState, name: str) -> bool:
    svc = state.services[name]
    if not (_alive(svc.pid) and _wrote_ready_file(state, name)):
        return False
    return not svc.port or health_check(svc.addr) == "SERVING"


def running_stack(data_dir: Path) -> StackState | None:
    """The stack recorded in `data_dir` while any process of it lives (a dead service is being
    restarted, or can be looked at with `status`), else None."""
    state = StackState.load(data_dir)
    if state is None:
        return None
    pids = [state.supervisor_pid, state.nats_pid, *(s.pid for s in state.services.values())]
    return state if any(_alive(pid) for pid in pids) else None


# -- up / down / status -------------------------------------------------------------------------

def up(
    data_dir: Path,
    *,
    workers: int | None = None,
    schedulers: int = 1,
    otel_exporter: str = "",
    timeout: float = 180,
    progress: Callable[[str], None] | None = None,
) -> StackState:
    """Start the stack unless it already runs (then wait until it serves); return its state.
    `workers`: trainer workers (default 1; an existing stack must match when it is given);
    `schedulers`: scheduler replicas (one places jobs, every one serves; default 1)."""
    if schedulers < 1:
        raise ValueError(f"--schedulers {schedulers}: a stack needs at least one scheduler")
    if workers is not None and workers < 1:
        raise ValueError(f"--workers {workers}: a stack needs at least one worker")
    data_dir = Path(data_dir).resolve()
    existing = running_stack(data_dir)
    if existing and _alive(existing.supervisor_pid):
        if workers is not None and workers != len(existing.workers):
            raise RuntimeError(f"a stack with {len(existing.workers)} worker(s) already runs in "
                               f"{data_dir}: run `llmstudio down` first")
        if schedulers != 1 and schedulers != len(existing.schedulers):
            raise RuntimeError(f"a stack with {len(existing.schedulers)} scheduler(s) already "
                               f"runs in {data_dir}: run `llmstudio down` first")
        return _wait_ready(data_dir, existing.supervisor_pid, timeout, progress, fresh=False)
    down(data_dir)  # clear a half-dead previous stack, or one whose supervisor died
    (data_dir / "logs").mkdir(parents=True, exist_ok=True)
    admin_key(data_dir)
    write_credentials(data_dir)  # nats-auth/ and keys/: the NATS users, the signing keys
    replicas = [f"{SCHEDULER_REPLICA_PREFIX}{i}" for i in range(2, schedulers + 1)]
    names = [*SERVICES, *replicas, *(f"{WORKER_PREFIX}{i}" for i in range(1, (workers or 1) + 1))]
    state = StackState(
        str(data_dir), f"nats://127.0.0.1:{free_port()}", 0,
        services={n: ServiceProc(0, free_port() if service_module(n) in GRPC_SERVICES else 0,
                                 http_port=free_port() if n == "serving" else 0)
                  for n in names},
        otel_exporter=otel_exporter or f"file:{data_dir / 'traces.jsonl'}",
    )
    state.save()
    with open(data_dir / "logs" / "supervisor.log", "ab") as log:
        supervisor = subprocess.Popen(
            [sys.executable, "-m", "llmstudio.supervisor", str(data_dir)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,  # outlives this command and its terminal
        )
    return _wait_ready(data_dir, supervisor.pid, timeout, progress, fresh=True)


def _wait_ready(data_dir: Path, supervisor_pid: int, timeout: float, progress, *,
                fresh: bool) -> StackState:
    """Until every service is ready. Starting a `fresh` stack, a process that exits before it
    ever was ready, a dead supervisor or the timeout stop the stack and raise with the log
    tail; an existing stack is left to its supervisor's restarts."""
    def fail(error: Exception) -> None:
        if fresh:
            _stop_supervisor(supervisor_pid)  # it may not have recorded its pid yet
            down(data_dir)
        raise error

    pending: set[str] | None = None
    deadline = time.monotonic() + timeout
    while True:
        state = StackState.load(data_dir)
        if state is None:
            raise RuntimeError(f"the stack in {data_dir} was stopped while starting")
        pending = set(state.services) if pending is None else pending
        if fresh and state.nats_restarts:
            fail(RuntimeError(f"nats-server exited during start; log tail:\n"
                              f"{_tail(data_dir / 'logs' / 'nats.log')}"))
        for name in sorted(pending):
            if fresh and state.services[name].restarts:
                fail(RuntimeError(f"service {name} exited during start; log tail:\n"
                                  f"{_tail(log_file(state, name))}"))
            if _ready(state, name):
                pending.discard(name)
                if progress:
                    progress(name)
        if not pending:
            return state
        if not _alive(supervisor_pid):
            fail(RuntimeError("the stack's supervisor exited; log tail:\n"
                              f"{_tail(data_dir / 'logs' / 'supervisor.log')}"))
        if time.monotonic() > deadline:
            fail(TimeoutError(
                f"services not ready after {timeout:.0f}s: {', '.join(sorted(pending))}"))
        time.sleep(0.2)


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-2000:] if path.exists() else ""


def down(data_dir: Path, timeout: float = STOP_TIMEOUT_S) -> bool:
    """Stop every process of the stack: the supervisor stops the services, then nats; whatever
    is left (a supervisor that was killed) is stopped here. True if a stack was recorded."""
    state = StackState.load(Path(data_dir))
    if state is None:
        return False
    if _alive(state.supervisor_pid):
        _stop_supervisor(state.supervisor_pid, timeout)
        state = StackState.load(Path(data_dir)) or state  # the pids of its last restarts
    pids = [s.pid for s in state.services.values()]
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    _wait_gone(pids, timeout)
    _signal(state.nats_pid, signal.SIGTERM)
    _wait_gone([state.nats_pid], timeout)
    (Path(data_dir) / STATE_FILE).unlink(missing_ok=True)
    return True


def _stop_supervisor(pid: int, timeout: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM: it stops the services (each within `timeout`), then nats, then exits."""
    _signal(pid, signal.SIGTERM)
    _wait_gone([pid], 2 * timeout + 5)


def _signal(pid: int, sig: int) -> None:
    if pid <= 0:
        return
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


def status(data_dir: Path) -> dict[str, dict]:
    """Each process of the stack: `state` (SERVING or RUNNING when up; STARTING; RESTARTING
    while the supervisor waits out its back-off; DOWN when dead and nobody restarts it; a
    gRPC health status such as NOT_SERVING or UNREACHABLE), `pid` and `restarts`."""
    state = StackState.load(Path(data_dir))
    if state is None:
        return {}
    supervised = _alive(state.supervisor_pid)

    def entry(pid: int, restarts: int, up_state: Callable[[], str]) -> dict:
        if _alive(pid):
            now = up_state()
        elif supervised:
            now = "RESTARTING" if pid else "STARTING"
        else:
            now = "DOWN"
        return {"state": now, "pid": pid, "restarts": restarts}

    def service_state(name: str) -> str:
        svc = state.services[name]
        if not _wrote_ready_file(state, name):
            return "STARTING"
        return health_check(svc.addr) if svc.port else "RUNNING"

    result = {
        "supervisor": entry(state.supervisor_pid, 0, lambda: "RUNNING"),
        "nats": entry(state.nats_pid, state.nats_restarts, lambda: "RUNNING"),
    }
    for name, svc in state.services.items():
        result[name] = entry(svc.pid, svc.restarts, partial(service_state, name))
    return result
