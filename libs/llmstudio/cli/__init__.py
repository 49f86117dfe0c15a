"""`llmstudio`: run the embedded stack and drive every service from the shell.

Every command takes --json for machine-readable output. On failure it prints one line,
`error: <reason>`, to stderr and exits non-zero (1: the call failed, 2: bad usage).

One module per resource; each registers its own commands (`register(subparsers)`).
"""

from __future__ import annotations

import argparse
import sys

import grpc

from . import (
    audit,
    certs,
    datasets,
    evals,
    jobs,
    keys,
    lineage,
    models,
    policies,
    quotas,
    serving,
    stack,
)
from .common import COMMON_FLAGS, CliError

EPILOG = """examples:
  llmstudio up                                 start the embedded stack under .llmstudio/
  llmstudio demo --base tiny                   the whole path on a tiny local model, in seconds
  llmstudio datasets push data.jsonl --name support-v1
  llmstudio jobs create -f job.yaml            then: llmstudio jobs watch <job id>
  llmstudio models promote my-model@1 production --justification "beats v0"
  llmstudio models approve <request id>        (a reviewer; then the registry promotes it)
  llmstudio lineage my-model@1                 datasets -> job -> checkpoints -> approvals
  llmstudio deploy my-model@production         then: llmstudio chat my-model "Hello"
  llmstudio audit verify
"""

# In the order `llmstudio --help` lists their commands.
COMMAND_MODULES = (stack, datasets, jobs, quotas, models, policies, lineage, serving, evals, audit,
                   keys, certs)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llmstudio", description="LLM Studio: fine-tune, evaluate, register and govern "
        "LLMs on your own hardware.", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter, parents=[COMMON_FLAGS])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except CliError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except grpc.RpcError as e:
        print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    except (RuntimeError, TimeoutError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
