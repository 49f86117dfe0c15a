"""What every command shares: the error it reports, its output, its client, its flags."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..config import Settings


class CliError(Exception):
    """A failure to report as one line, exit code 1."""


def output(args, data, text: str | None = None) -> None:
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True, default=str))
    else:
        print(text if text is not None else json.dumps(data, indent=2, default=str))


def connect(args):
    from ..client import Client

    return Client(api_key=args.api_key, data_dir=args.data_dir, ca_file=args.ca_file)


def data_dir(args) -> Path:
    return Path(args.data_dir or Settings().data_dir)


def _common_flags(default=None) -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="machine-readable JSON output",
                        default=False if default is None else default)
    common.add_argument("--data-dir", help="embedded stack data dir (default .llmstudio)",
                        default=default)
    common.add_argument("--api-key", help="API key (default: LLMSTUDIO_API_KEY, or the "
                        "embedded stack's admin key)", default=default)
    common.add_argument("--ca-file", help="CA certificate the services' TLS is checked against "
                        "(default: LLMSTUDIO_TLS_CA_FILE; `llmstudio certs` makes ca.crt)",
                        default=default)
    return common


# The flags every parser takes, before the command (the top-level parser: their defaults) or
# after it (each command's copy leaves them unset when absent, so it does not overwrite what
# was given before the command: `llmstudio --data-dir X up`).
COMMON_FLAGS = _common_flags()
COMMAND_FLAGS = _common_flags(default=argparse.SUPPRESS)


def add_command(parent, name, fn, help_text, **kw) -> argparse.ArgumentParser:
    sp = parent.add_parser(name, help=help_text, description=help_text, parents=[COMMAND_FLAGS],
                           **kw)
    sp.set_defaults(fn=fn)
    return sp


def add_group(subparsers, name, help_text):
    """A command with actions of its own (`llmstudio datasets push`): their subparsers."""
    return subparsers.add_parser(name, help=help_text).add_subparsers(
        dest="sub", required=True, metavar="ACTION")
