"""`llmstudio keys create | whoami`: API keys."""

from __future__ import annotations

from ..auth import ROLES
from .common import add_command, add_group, connect, output


def cmd_create(args):
    from ..client import to_dict

    r = connect(args).governance.create_key(args.role, args.tenant or "", args.name or "")
    output(args, to_dict(r), f"key {r.key_id} ({args.role}, tenant {r.principal.tenant}); "
           f"secret, shown once:\n{r.secret}")


def cmd_whoami(args):
    from ..client import to_dict

    p = connect(args).governance.whoami()
    output(args, to_dict(p), f"{p.key_id} tenant={p.tenant} roles={','.join(p.roles)}")


def register(sub) -> None:
    ks = add_group(sub, "keys", "API keys")
    sp = add_command(ks, "create", cmd_create, "create an API key (admin)")
    sp.add_argument("--role", required=True, choices=ROLES,
                    help="viewer: read; developer: write, request promotions; reviewer: read, "
                    "approve promotions; admin: keys, quotas, policies and audit of the tenant")
    sp.add_argument("--tenant", help="default: your tenant")
    sp.add_argument("--name")
    add_command(ks, "whoami", cmd_whoami, "the principal of the key in use")
