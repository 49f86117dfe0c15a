"""`llmstudio evals list|run|get`: evaluation runs.

`evals run MODEL@VERSION --dataset ID [--split test] [--suite generation] [--metric bleu]
[--task NAME=path:/srv/tasks/mc.jsonl] [--task NAME=key:tenants/...,contains] [--wait]` starts an
evaluation on demand (CreateEvaluation); `--base-model PATH` evaluates a base model alone."""

from __future__ import annotations

import time

from .common import CliError, add_command, add_group, connect, output

TASK_SOURCES = {"path": "path", "key": "key", "dataset": "dataset_id"}


def cmd_list(args):
    from ..client import to_dict

    items = connect(args).evaluations.list(args.job or "", limit=args.limit)
    lines = [f"{e.id}  {e.job_id}  {e.status:<9} base={dict(e.base_metrics)} "
             f"tuned={dict(e.tuned_metrics)}" for e in items]
    output(args, [to_dict(e) for e in items], "\n".join(lines) or "no evaluations")


def parse_model(ref: str) -> tuple[str, int]:
    name, at, version = ref.rpartition("@")
    if not at or not name or not version.isdigit() or int(version) < 1:
        raise CliError(f"model {ref!r}: expected NAME@VERSION (a version number, e.g. tiny@2)")
    return name, int(version)


def parse_task(spec: str) -> dict[str, str]:
    """NAME=SOURCE_KIND:SOURCE[,SCORING] -> a TaskFile's fields."""
    name, eq, rest = spec.partition("=")
    kind, colon, source = rest.partition(":")
    if not eq or not colon or kind not in TASK_SOURCES or not name or not source:
        raise CliError(f"--task {spec!r}: expected NAME=path:FILE, NAME=key:KEY or "
                       "NAME=dataset:ID, optionally followed by ,exact|,contains|,regex")
    scoring = ""
    if "," in source:
        source, _, scoring = source.rpartition(",")
    return {"name": name, TASK_SOURCES[kind]: source, "scoring": scoring}


def wait_for(evaluations, evaluation_id: str, timeout_s: float, poll_s: float = 1.0):
    deadline = time.monotonic() + timeout_s
    while True:
        ev = evaluations.get(evaluation_id)
        if ev.status != "running":
            return ev
        if time.monotonic() > deadline:
            raise CliError(f"evaluation {evaluation_id} still running after {timeout_s:g} s")
        time.sleep(poll_s)


def render(ev) -> str:
    what = f"{ev.model_name}@{ev.version}" if ev.model_name else ev.base_model
    head = f"{ev.id}  {ev.status}  {what}  dataset {ev.dataset_id}/{ev.split}  suite {ev.suite}"
    if ev.error:
        return f"{head}\n  error: {ev.error}"
    if not ev.comparisons:
        metrics = sorted(ev.base_metrics.items())
        return "\n".join([head, *(f"  {k:<16} {v:.4f}" for k, v in metrics)])
    lines = [head, f"  {'metric':<16} {'base':>10} {'tuned':>10} {'diff':>10}  95% CI"]
    for c in ev.comparisons:
        verdict = "tuned better" if c.tuned_better else ""
        lines.append(f"  {c.name:<16} {c.base:>10.4f} {c.tuned:>10.4f} {c.diff:>+10.4f}  "
                     f"[{c.ci_low:+.4f}, {c.ci_high:+.4f}] {verdict}".rstrip())
    return "\n".join(lines)


def cmd_run(args):
    from ..client import to_dict

    if bool(args.model) == bool(args.base_model):
        raise CliError("give MODEL@VERSION or --base-model PATH (one of them)")
    api = connect(args).evaluations
    name, version = parse_model(args.model) if args.model else ("", 0)
    ev = api.create(
        model_name=name, version=version, base_model=args.base_model or "",
        dataset_id=args.dataset, split=args.split, suite=args.suite, metrics=args.metric,
        tasks=[parse_task(t) for t in args.task], max_samples=args.max_samples,
        max_new_tokens=args.max_new_tokens, bootstrap_samples=args.bootstrap, seed=args.seed)
    if args.wait:
        ev = wait_for(api, ev.id, args.timeout)
    output(args, to_dict(ev), render(ev))
    if args.wait and ev.status == "failed":
        raise CliError(f"evaluation {ev.id} failed: {ev.error}")


def cmd_get(args):
    from ..client import to_dict

    ev = connect(args).evaluations.get(args.id)
    output(args, to_dict(ev), render(ev))


def register(sub) -> None:
    es = add_group(sub, "evals", "evaluations")
    sp = add_command(es, "list", cmd_list, "list evaluations")
    sp.add_argument("--job", help="job id")
    sp.add_argument("--limit", type=int, default=0,
                    help="at most N evaluations (default: all, read page by page)")

    sp = add_command(es, "run", cmd_run, "evaluate a model version (base vs tuned) on a "
                     "dataset version, with a suite of metrics and task files")
    sp.add_argument("model", nargs="?", help="NAME@VERSION of the registry")
    sp.add_argument("--base-model", help="a base model folder instead (evaluated alone)")
    sp.add_argument("--dataset", required=True, help="dataset version id")
    sp.add_argument("--split", default="", choices=["", "train", "validation", "test"],
                    help="default: test if the dataset has one, else validation")
    sp.add_argument("--suite", default="", help="default | generation | loss | tasks")
    sp.add_argument("--metric", action="append", default=[],
                    help="one more metric (token_f1, bleu, chrf, rouge_l, ...); repeatable")
    sp.add_argument("--task", action="append", default=[],
                    help="NAME=path:FILE | NAME=key:KEY | NAME=dataset:ID [,exact|contains|regex]")
    sp.add_argument("--max-samples", type=int, default=0)
    sp.add_argument("--max-new-tokens", type=int, default=0)
    sp.add_argument("--bootstrap", type=int, default=0, help="bootstrap resamples (1000)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--wait", action="store_true", help="wait until it finishes")
    sp.add_argument("--timeout", type=float, default=3600.0, help="--wait at most this long")

    sp = add_command(es, "get", cmd_get, "one evaluation with its metric comparisons")
    sp.add_argument("id")
