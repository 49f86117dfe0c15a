"""`llmstudio evals list`: evaluation runs."""

from __future__ import annotations

from .common import add_command, add_group, connect, output


def cmd_list(args):
    from ..client import to_dict

    items = connect(args).evaluations.list(args.job or "", limit=args.limit)
    lines = [f"{e.id}  {e.job_id}  {e.status:<9} base={dict(e.base_metrics)} "
             f"tuned={dict(e.tuned_metrics)}" for e in items]
    output(args, [to_dict(e) for e in items], "\n".join(lines) or "no evaluations")


def register(sub) -> None:
    es = add_group(sub, "evals", "evaluations")
    sp = add_command(es, "list", cmd_list, "list evaluations")
    sp.add_argument("--job", help="job id")
    sp.add_argument("--limit", type=int, default=0,
                    help="at most N evaluations (default: all, read page by page)")
