"""The embedded stack's supervisor: starts nats-server and every service, restarts whichever
exits, and on SIGTERM stops them all (services first, then nats) and exits.

Restarts follow compose's `restart: unless-stopped`: any exit but a requested stop is restarted,
after a back-off that doubles with each quick exit in a row (1 s, 2 s, 4 s ... 30 s) and starts
over once a run has lasted 60 s. A restarted service keeps its gRPC port, so clients need not look
it up again. When a process exits, what it left in its process group (a training subprocess, a
dataset scan worker) is killed with it, as a container's processes die with the container.

`llmstudio up` starts it detached: `python -m llmstudio.supervisor DATA_DIR`. It reads the plan
(ports, services) from DATA_DIR/stack.json and from then on is that file's only writer: each
process's pid and restart count, which `status`, the CLI and the SDK read.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from . import local
from .natsauth import server_config_path
from .natsserver import start_nats_server

BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 30.0
BACKOFF_RESET_AFTER_S = 60.0  # a run this long ends a series of quick exits
POLL_S = 0.2
NATS_STOP_TIMEOUT_S = 10.0

log = logging.getLogger("llmstudio.supervisor")


def backoff_s(quick_exits: int) -> float:
    """The wait before restarting a process that has exited `quick_exits` times in a row."""
    return min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** (quick_exits - 1))


@dataclass
class Child:
    """One supervised process: how to start it, and where its series of restarts stands."""

    name: str
    spawn: Callable[[], subprocess.Popen]
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    starts: int = 0
    quick_exits: int = 0
    start_due: float = 0.0  # monotonic time of the next start

    def exited(self, now: float) -> float:
        """Count an exit (or a failed start) at `now`; return the wait before the restart."""
        ran = now - self.started_at
        self.quick_exits = 1 if ran >= BACKOFF_RESET_AFTER_S else self.quick_exits + 1
        delay = backoff_s(self.quick_exits)
        self.start_due = now + delay
        return delay


class Supervisor:
    def __init__(self, state: local.StackState, env: dict[str, str]):
        self.state = state
        self.env = env
        self.stopping = False
        self.nats = Child("nats", self._spawn_nats)
        self.services = [Child(name, partial(self._spawn_service, name))
                         for name in state.services]

    def request_stop(self, *_signal_args) -> None:
        self.stopping = True

    def run(self) -> None:
        while not self.stopping:
            for child in (self.nats, *self.services):
                if self.stopping:
                    break
                self._tend(child)
            time.sleep(POLL_S)
        self._stop_all()

    def _tend(self, child: Child) -> None:
        if child.proc is not None:
            code = child.proc.poll()
            if code is None:
                return
            _kill_group(child.proc.pid)
            child.proc = None
            self._exited(child, f"exited with {code}")
        if time.monotonic() >= child.start_due:
            self._start(child)

    def _exited(self, child: Child, why: str) -> None:
        now = time.monotonic()
        delay = child.exited(now)
        log.warning("%s %s after %.1fs; restarting in %.0fs", child.name, why,
                    now - child.started_at, delay)

    def _start(self, child: Child) -> None:
        child.started_at = time.monotonic()
        child.starts += 1
        try:
            child.proc = child.spawn()
        except (OSError, RuntimeError, TimeoutError) as e:  # e.g. nats-server that never served
            self._record(child)
            self._exited(child, f"did not start ({e})")
            return
        self._record(child)
        log.info("%s started (pid %d, start %d)", child.name, child.proc.pid, child.starts)

    def _record(self, child: Child) -> None:
        """Its restart count, and its pid once it has one (a failed start keeps the last)."""
        if child is self.nats:
            self.state.nats_restarts = child.starts - 1
            self.state.nats_pid = child.proc.pid if child.proc else self.state.nats_pid
        else:
            svc = self.state.services[child.name]
            svc.restarts = child.starts - 1
            svc.pid = child.proc.pid if child.proc else svc.pid
        self.state.save()

    def _spawn_nats(self) -> subprocess.Popen:
        data_dir = Path(self.state.data_dir)
        server = start_nats_server(
            data_dir / "nats", port=self.state.nats_port, log_file=data_dir / "logs" / "nats.log",
            config_file=server_config_path(local.nats_auth_dir(data_dir)))
        return server.process

    def _spawn_service(self, name: str) -> subprocess.Popen:
        local.ready_file(self.state, name).unlink(missing_ok=True)
        with open(local.log_file(self.state, name), "ab") as out:
            return subprocess.Popen(
                [sys.executable, "-m", f"services.{local.service_module(name)}"],
                env=local.service_env(self.state, name, self.env), stdin=subprocess.DEVNULL,
                stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: killed whole when it exits
            )

    def _stop_all(self) -> None:
        log.info("stopping")
        _stop([c.proc for c in self.services if c.proc], local.STOP_TIMEOUT_S)
        _stop([self.nats.proc] if self.nats.proc else [], NATS_STOP_TIMEOUT_S)


def _stop(procs: list[subprocess.Popen], timeout: float) -> None:
    """SIGTERM each, SIGKILL (with its process group) whatever still runs after `timeout`."""
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("pid %d ignored SIGTERM for %.0fs: killed", proc.pid, timeout)
        _kill_group(proc.pid)
        proc.wait()


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def main(argv: list[str] | None = None) -> None:
    (data_dir,) = argv if argv is not None else sys.argv[1:]
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s supervisor %(levelname)s %(message)s")
    state = local.StackState.load(Path(data_dir))
    if state is None:
        sys.exit(f"no {local.STATE_FILE} in {data_dir}")
    supervisor = Supervisor(state, dict(os.environ))
    signal.signal(signal.SIGTERM, supervisor.request_stop)
    signal.signal(signal.SIGINT, supervisor.request_stop)
    state.supervisor_pid = os.getpid()
    state.save()
    supervisor.run()


if __name__ == "__main__":
    main()
