"""`llmstudio jobs ...`: create, list, show, watch, cancel."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .common import CliError, add_command, add_group, connect, output


def _job_line(j) -> str:
    from ..client import job_status_name

    loss = j.metrics.get("loss")
    extra = f" loss={loss:.4f}" if loss is not None else ""
    err = f"  error: {j.error}" if j.error else ""
    return f"{j.id}  {job_status_name(j.status):<16} {j.model_name}{extra}{err}"


def load_job_spec(path: Path) -> dict:
    import yaml

    if not path.is_file():
        raise CliError(f"{path}: no such file")
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise CliError(f"{path}: invalid YAML: {e}") from e
    if not isinstance(spec, dict):
        raise CliError(f"{path}: the job spec must be a mapping")
    return spec


def cmd_create(args):
    from ..client import to_dict

    spec = load_job_spec(Path(args.file))
    job = connect(args).jobs.create(spec, priority_class=args.priority)
    output(args, to_dict(job), _job_line(job) + _memory_line(job))


def _memory_line(job) -> str:
    from ..ml.memory import format_bytes

    est = dict(job.memory_estimate)
    if not est:
        return ""
    parts = ", ".join(f"{k} {format_bytes(est[k])}" for k in
                      ("weights", "gradients", "optimizer", "activations") if k in est)
    return f"\n  memory estimate per process: {format_bytes(est.get('total', 0))} ({parts})"


def cmd_list(args):
    from ..client import to_dict

    items = connect(args).jobs.list(args.status or "", limit=args.limit)
    output(args, [to_dict(j) for j in items], "\n".join(map(_job_line, items)) or "no jobs")


def cmd_show(args):
    from ..client import to_dict

    job = connect(args).jobs.get(args.id)
    output(args, to_dict(job), _job_details(job))


def _job_details(job) -> str:
    """The job, then its attempts: where each ran, how it ended, what it resumed from."""
    from ..client import job_status_name

    lines = [_job_line(job)]
    for label, value in (("tenant", job.tenant), ("dataset", job.dataset_id),
                         ("worker", job.worker_id), ("created", job.created_at),
                         ("updated", job.updated_at), ("trace", job.trace_id)):
        if value:
            lines.append(f"  {label + ':':<10} {value}")
    for name, value in sorted(job.artifacts.items()):
        lines.append(f"  {name + ':':<10} {value}")
    if job.waiting_reason:
        lines.append(f"  {'waiting:':<10} {job.waiting_reason}")
    if job.attempts:
        lines.append(f"  attempts ({job_status_name(job.status)} at attempt {job.attempt}):")
        for a in job.attempts:
            resumed = f", resumed from step {a.resumed_from_step}" if a.resumed_from_step else ""
            span = f"{a.started_at or a.assigned_at} -> {a.ended_at or 'now'}"
            lines.append(f"    {a.attempt}  {a.worker_id:<20} {span}{resumed}"
                         f"  {a.reason or 'running'}")
    return "\n".join(lines) + _memory_line(job)


def cmd_cancel(args):
    from ..client import to_dict

    job = connect(args).jobs.cancel(args.id)
    output(args, to_dict(job), _job_line(job))


def cmd_pause(args):
    from ..client import to_dict

    job = connect(args).jobs.pause(args.id)
    output(args, to_dict(job), _job_line(job) + (
        "  (pausing: the worker checkpoints and hands it back)" if job.worker_id else ""))


def cmd_resume(args):
    from ..client import to_dict

    job = connect(args).jobs.resume(args.id)
    output(args, to_dict(job), _job_line(job))


def cmd_watch(args):
    from ..client import TERMINAL_JOB_STATUSES, job_status_name, to_dict
    from ..progress import JobProgress

    client = connect(args)
    last = None
    bar = None if args.json else JobProgress()
    for update in client.jobs.watch(args.id):
        last = update.job
        if args.json:
            print(json.dumps(to_dict(update), sort_keys=True), flush=True)
        elif bar is not None:
            bar.update(update)
    if bar:
        bar.close()
    if last is None:
        raise CliError(f"no updates for {args.id}")
    if not args.json:
        print(_job_line(last))
    if last.status in TERMINAL_JOB_STATUSES and job_status_name(last.status) != "succeeded":
        sys.exit(1)


def register(sub) -> None:
    js = add_group(sub, "jobs", "fine-tuning jobs")
    sp = add_command(js, "create", cmd_create, "submit a job from a YAML spec (see README)")
    sp.add_argument("-f", "--file", required=True, help="JOB.yaml")
    sp.add_argument("--priority", default="normal", choices=("low", "normal", "high", "urgent"),
                    help="priority class: higher runs first; urgent is for admins")
    sp = add_command(js, "list", cmd_list, "list jobs, newest first")
    sp.add_argument("--status", help="validating_files|queued|running|succeeded|failed|cancelled")
    sp.add_argument("--limit", type=int, default=0,
                    help="at most N jobs (default: all, read page by page)")
    add_command(js, "show", cmd_show, "one job").add_argument("id")
    add_command(js, "watch", cmd_watch,
                "follow a job: progress bar with live loss").add_argument("id")
    add_command(js, "cancel", cmd_cancel, "cancel a job").add_argument("id")
    add_command(js, "pause", cmd_pause, "pause a job: a running one checkpoints and is handed "
                "back; it keeps its place in the queue").add_argument("id")
    add_command(js, "resume", cmd_resume, "resume a paused job").add_argument("id")
