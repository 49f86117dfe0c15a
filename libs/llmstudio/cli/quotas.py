"""`llmstudio quotas show | set`: a tenant's quota (0: no limit) and fair-share weight."""

from __future__ import annotations

from .common import add_command, add_group, connect, output

LIMITS = ("max_running", "max_queued", "max_gpus", "max_cpu_slots")


def _quota_text(q) -> str:
    limits = ", ".join(f"{name.removeprefix('max_').replace('_', ' ')} "
                       f"{getattr(q, name) or 'unlimited'}" for name in LIMITS)
    by = f" (set by {q.updated_by} at {q.updated_at})" if q.updated_by else ""
    return f"tenant {q.tenant}: {limits}; weight {q.weight:g}{by}"


def cmd_show(args):
    from ..client import to_dict

    q = connect(args).jobs.get_quota(args.tenant or "")
    output(args, to_dict(q), _quota_text(q))


def cmd_set(args):
    from ..client import to_dict

    q = connect(args).jobs.set_quota(
        args.tenant or "", max_running=args.max_running, max_queued=args.max_queued,
        max_gpus=args.max_gpus, max_cpu_slots=args.max_cpu_slots, weight=args.weight)
    output(args, to_dict(q), _quota_text(q))


def register(sub) -> None:
    qs = add_group(sub, "quotas", "per-tenant quotas and fair-share weights")
    add_command(qs, "show", cmd_show, "a tenant's quota (default: yours)").add_argument(
        "tenant", nargs="?")
    sp = add_command(qs, "set", cmd_set, "set a tenant's quota (admin; 0 = no limit). Over "
                     "--max-queued a submit is refused; the other limits hold jobs in the queue")
    sp.add_argument("--tenant", help="default: yours (another tenant: platform admins only)")
    sp.add_argument("--max-running", type=int, default=0, help="jobs on workers at once")
    sp.add_argument("--max-queued", type=int, default=0, help="jobs waiting to run")
    sp.add_argument("--max-gpus", type=int, default=0, help="GPUs held by its running jobs")
    sp.add_argument("--max-cpu-slots", type=int, default=0,
                    help="CPU worker slots held by its running jobs")
    sp.add_argument("--weight", type=float, default=1.0,
                    help="its share of free capacity relative to other tenants (default 1)")
