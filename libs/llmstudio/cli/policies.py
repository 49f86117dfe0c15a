"""`llmstudio policies get | set | history`: the tenant's promotion policy (versioned YAML)."""

from __future__ import annotations

from pathlib import Path

from .common import CliError, add_command, add_group, connect, output


def _header(p) -> str:
    if not p.version:
        return "# built-in default policy (the tenant has set none)"
    return f"# policy v{p.version} of {p.tenant}, set by {p.author} at {p.created_at}"


def cmd_get(args):
    from ..client import to_dict

    p = connect(args).governance.get_policy(args.version, args.tenant or "")
    output(args, to_dict(p), f"{_header(p)}\n{p.yaml.rstrip()}")


def cmd_set(args):
    from ..client import to_dict

    path = Path(args.file)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise CliError(f"cannot read {path}: {e.strerror or e}") from None
    p = connect(args).governance.set_policy(text, args.tenant or "")
    gated = ", ".join(p.gated_stages) or "none"
    output(args, to_dict(p), f"policy v{p.version} of {p.tenant} set (gates: {gated})")


def cmd_history(args):
    from ..client import to_dict

    policies = connect(args).governance.policy_history(args.tenant or "")
    lines = [f"v{p.version}  {p.created_at}  by {p.author}  sha256 {p.sha256[:12]}  gates "
             f"{', '.join(p.gated_stages) or 'none'}" for p in policies]
    output(args, [to_dict(p) for p in policies],
           "\n".join(lines) or "no policy set: the built-in default applies")


def register(sub) -> None:
    ps = add_group(sub, "policies", "promotion policies (gates, thresholds, approvals)")
    sp = add_command(ps, "get", cmd_get, "the policy in force, or one version")
    sp.add_argument("--version", type=int, default=0)
    sp.add_argument("--tenant", help="another tenant (its admin only)")
    sp = add_command(ps, "set", cmd_set, "set a new version of the policy from a YAML file "
                     "(admin)")
    sp.add_argument("file")
    sp.add_argument("--tenant", help="another tenant (its admin only)")
    sp = add_command(ps, "history", cmd_history, "every version set, with author and time")
    sp.add_argument("--tenant", help="another tenant (its admin only)")
