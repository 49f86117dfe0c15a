"""The embedded stack as `llmstudio up --workers 2` runs it: real nats-server, every service and
two trainer workers under the supervisor; a service killed with SIGKILL is reported, restarted
with a new pid on the same port, and the CLI and SDK keep finding the stack meanwhile."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nats
import pytest

from llmstudio import local
from llmstudio.client import Client
from llmstudio.grpcutil import health_check
from llmstudio.supervisor import BACKOFF_MAX_S, Child, backoff_s
from tests.support.waiting import wait_for


def _cli(data_dir: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "LLMSTUDIO_API_KEY"}  # the stack's key
    return subprocess.run(
        [sys.executable, "-m", "llmstudio.cli", *args, "--data-dir", str(data_dir)],
        capture_output=True, text=True, timeout=60, env=env)


def _state(data_dir: Path) -> local.StackState:
    state = local.StackState.load(data_dir)
    assert state is not None
    return state


def _pids(state: local.StackState) -> list[int]:
    return [state.supervisor_pid, state.nats_pid, *(s.pid for s in state.services.values())]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("stack").resolve()
    local.up(data_dir, workers=2, timeout=240)
    yield data_dir
    local.down(data_dir)


def test_backoff_doubles_to_its_cap_and_starts_over_after_a_long_run():
    assert [backoff_s(n) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]
    assert BACKOFF_MAX_S == 30
    child = Child("registry", spawn=lambda: subprocess.Popen(["true"]))
    now = 1000.0
    delays = []
    for _ in range(3):
        child.started_at = now - 5  # ran 5 s each time
        delays.append(child.exited(now))
    assert delays == [1, 2, 4]
    child.started_at = now - 61  # ran past 60 s: a fresh series
    assert child.exited(now) == 1
    assert child.start_due == now + 1


def test_a_stack_needs_a_scheduler_and_nothing_starts_without_one(tmp_path):
    result = _cli(tmp_path, "up", "--schedulers", "0")
    assert result.returncode == 2 and "must be at least 1" in result.stderr
    assert not (tmp_path / local.STATE_FILE).exists()


def test_clients_reach_scheduler_replicas_through_one_failover_target(tmp_path):
    state = local.StackState(str(tmp_path), "nats://127.0.0.1:1", 0, services={
        "scheduler": local.ServiceProc(1, 5001), "scheduler-2": local.ServiceProc(2, 5002),
        "registry": local.ServiceProc(3, 5003)})
    assert state.addr("scheduler") == "ipv4:127.0.0.1:5001,127.0.0.1:5002"
    assert state.addr("registry") == "127.0.0.1:5003"
    assert state.schedulers == ["scheduler", "scheduler-2"]
    assert local.service_module("scheduler-2") == "scheduler"
    env = local.service_env(state, "scheduler-2", {})
    assert env["LLMSTUDIO_REPLICA_ID"] == "scheduler-2"
    assert env["LLMSTUDIO_DATABASE_URL"] == f"sqlite:///{tmp_path.resolve()}/scheduler.db"
    assert local.ready_file(state, "scheduler-2") != local.ready_file(state, "scheduler")


@pytest.mark.slow
def test_a_stack_that_cannot_start_fails_up_with_the_log_and_leaves_nothing(tmp_path,
                                                                          monkeypatch):
    monkeypatch.setenv("LLMSTUDIO_MAX_DELIVER", "many")  # every service refuses its settings
    with pytest.raises(RuntimeError, match="exited during start") as e:
        local.up(tmp_path, timeout=120)
    assert "max_deliver" in str(e.value)
    assert not (tmp_path / local.STATE_FILE).exists()
    assert local.status(tmp_path) == {}
    supervisor_log = (tmp_path / "logs" / "supervisor.log").read_text()
    started = [int(line.split("(pid ")[1].split(",")[0])
               for line in supervisor_log.splitlines() if " started (pid " in line]
    assert len(started) >= 7 and not [pid for pid in started if local._alive(pid)]


@pytest.mark.slow
def test_each_worker_has_its_own_id_log_and_heartbeat(stack):
    state = _state(stack)
    assert state.workers == ["trainer-1", "trainer-2"]
    assert local.up(stack).supervisor_pid == state.supervisor_pid  # already up: the same stack
    with pytest.raises(RuntimeError, match="2 worker"):
        local.up(stack, workers=3)
    # `up` returned only once every process was up.
    status = local.status(stack)
    assert {name: p["state"] for name, p in status.items()} == {
        "supervisor": "RUNNING", "nats": "RUNNING", "governance": "SERVING",
        "dataset": "SERVING", "scheduler": "SERVING", "registry": "SERVING",
        "evaluator": "SERVING", "serving": "SERVING", "trainer-1": "RUNNING",
        "trainer-2": "RUNNING"}
    for name in state.workers:
        assert (stack / "logs" / f"{name}.log").stat().st_size > 0
        pid = int(local.ready_file(state, name).read_text().split()[0])
        assert pid == state.services[name].pid
    assert local.ready_file(state, "trainer-1") != local.ready_file(state, "trainer-2")

    async def heartbeats() -> set[str]:
        nc = await nats.connect(state.operator_url)
        seen: set[str] = set()

        async def on_beat(msg) -> None:
            seen.add(json.loads(msg.data)["data"]["worker_id"])

        await nc.subscribe("llmstudio.worker.heartbeat.>", cb=on_beat)
        for _ in range(50):  # a heartbeat every 2 s per worker
            if len(seen) == 2:
                break
            await asyncio.sleep(0.2)
        await nc.close()
        return seen

    assert asyncio.run(heartbeats()) == {"local-worker-1", "local-worker-2"}


@pytest.mark.slow
def test_a_killed_service_is_reported_restarted_and_the_stack_stays_reachable(stack):
    before = _state(stack)
    registry = before.services["registry"]
    # Hold the supervisor so the registry stays dead while the CLI looks, then let it restart.
    os.kill(before.supervisor_pid, signal.SIGSTOP)
    try:
        os.kill(registry.pid, signal.SIGKILL)
        wait_for(lambda: not local._alive(registry.pid), 10, "the registry to die")

        shown = _cli(stack, "status")
        assert shown.returncode == 1
        assert "registry    RESTARTING" in shown.stdout
        assert "not up: registry restarting" in shown.stdout
        assert "scheduler   SERVING" in shown.stdout

        listed = _cli(stack, "jobs", "list", "--json")  # found the stack and its admin key
        assert listed.returncode == 0, listed.stderr
        assert json.loads(listed.stdout) == []
        with Client(data_dir=stack) as client:
            assert client.stack is not None and client.addr("registry") == registry.addr
            assert client.jobs.list() == []
    finally:
        os.kill(before.supervisor_pid, signal.SIGCONT)
    resumed = time.monotonic()

    restarted = wait_for(lambda: _state(stack).services["registry"].pid != registry.pid and
                          _state(stack).services["registry"], 10, "a new registry process")
    assert time.monotonic() - resumed < backoff_s(1) + 3
    assert restarted.port == registry.port and restarted.restarts == 1
    wait_for(lambda: health_check(registry.addr) == "SERVING", 60, "the registry to serve")
    with Client(data_dir=stack) as client:
        assert client.models.list() == []
    assert local.status(stack)["registry"] == {
        "state": "SERVING", "pid": restarted.pid, "restarts": 1}
    assert "registry exited with -9" in (stack / "logs" / "supervisor.log").read_text()


@pytest.mark.slow
def test_down_leaves_no_process_behind(stack):
    state = _state(stack)
    pids = _pids(state)
    assert all(local._alive(pid) for pid in pids)
    assert local.down(stack)
    assert not [pid for pid in pids if local._alive(pid)]
    assert local.running_stack(stack) is None
    assert not (stack / local.STATE_FILE).exists()
