"""`llmstudio audit verify | query`: the tamper-evident audit log."""

from __future__ import annotations

import sys

from .common import add_command, add_group, connect, output


def cmd_verify(args):
    from ..client import to_dict

    r = connect(args).governance.verify_audit()
    # A tenant admin's reply counts its tenant's records and names no head or checkpoint.
    anchor = (f", {r.anchored_records} anchored by checkpoint {r.checkpoint_seq} "
              f"({r.checkpoint_time})" if r.checkpoint_seq else "")
    text = (f"audit chain OK: {r.records} records{anchor}" if r.ok else
            f"audit chain BROKEN at sequence {r.first_bad_sequence}: {r.reason}"
            if r.first_bad_sequence else f"audit chain BROKEN: {r.reason}")
    output(args, to_dict(r), text)
    if not r.ok:
        sys.exit(1)


def cmd_query(args):
    from ..client import to_dict

    records = connect(args).governance.query_audit(args.type or "", args.subject or "",
                                                   args.after, args.limit)
    lines = [f"{r.sequence:>6} {r.time}  {r.event_type:<44} {r.subject}  by {r.actor or r.source}"
             for r in records]
    output(args, [to_dict(r) for r in records], "\n".join(lines) or "no records")


def register(sub) -> None:
    au = add_group(sub, "audit", "the tamper-evident audit log")
    add_command(au, "verify", cmd_verify,
                "recompute the hash chain and check it against the signed checkpoints (admin)")
    sp = add_command(au, "query", cmd_query, "list audit records (admin: of your tenant)")
    sp.add_argument("--type", help="event type prefix, e.g. llmstudio.job.")
    sp.add_argument("--subject", help="entity id (job, dataset, ...)")
    sp.add_argument("--after", type=int, default=0, help="after this sequence")
    sp.add_argument("--limit", type=int, default=0, help="default 1000")
